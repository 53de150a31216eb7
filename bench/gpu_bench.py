"""GPU benchmark (issue 5 item 5): LoRA throughput and MFU at ~1B, QLoRA peak memory at 7B, through the
real trainer (`finetune_trainer.train.Run`), against the sizing model and the model-size table.

Only where CUDA is available: elsewhere it prints `# gpu_bench: no CUDA device, skipped` and exits 0.
`--smoke` runs the same harness on whatever device there is with tiny shapes (to test the harness on a
CPU); its figures are prefixed `smoke_` and mean nothing.

What runs (each measurement in its own process, so peak-memory counters and the CUDA context are fresh):

1. device facts and a bf16 8192^3 matrix product (random data, median of 20 after warm-up), for scale;
2. a randomly initialised Llama of the shape the sizing model assumes for 1B (`sizing.shape(1)`: hidden
   size h and L layers with 12*L*h^2 ~ 1e9; intermediate 8h/3 rounded to 64, head size 128, untied
   vocabulary 32,000, so 1.16B parameters in all: `shape` leaves the embeddings out), built in bf16 on the GPU and saved with save_pretrained; a byte-level BPE tokenizer from
   `finetune_trainer.tiny.build_tokenizer` (its vocabulary is smaller than the model's 32,000 rows; that
   changes no FLOP and no byte of memory);
3. synthetic instruction rows whose answers are longer than maxSeqLength, so every row is truncated to
   exactly maxSeqLength tokens: no padding, every token of a batch is a real one;
4. LoRA on the 1B model with the healthcare example's adapter (r 16, alpha 32, dropout 0.05, q/k/v/o),
   bf16, batch 4 x 2048, gradient accumulation 1, with and without gradient checkpointing, through
   `Run(config).run()` (data loading, accelerate, peft, the training loop, checkpoint, artifacts);
   tokens/s = non-padding tokens / step time summed over the steps after the warm-up steps, read from the
   trainer's own metrics.jsonl (each step ends in a host sync, `float(loss)`, so step times are real);
5. the same 7B-shaped model (`sizing.shape(7)`), saved in bf16 and loaded through the trainer's QLoRA path
   (bitsandbytes nf4, double quantization, bf16 compute), trained a few steps at the healthcare example's
   settings (batch 4, maxSeqLength 512, gradient checkpointing) and at batch 4 x 2048, and, time allowing,
   at examples/qlora-7b.yaml's adapter (r 64, all linear layers, batch 4 x 2048), and both 2048 runs again
   with `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` (how much of the reserve is fragmentation).
   The memory the prepared model holds before the first batch is noted too (QLoRA only: the LoRA base is
   loaded on the CPU and moved to the GPU by accelerate later), to split the error between weights and
   the rest (activations, logits and loss, adapter gradients and moments).

Model FLOPs per token for LoRA (frozen base; reported as MFU):

    F = 4*N_mm + 6*N_lora + 6*L*h*s

- N_mm: parameters of the base's matrix products (every decoder linear layer and the output head; the
  embedding lookup is no matrix product). Forward 2*N_mm, backward 2*N_mm for the activation gradients
  only: the frozen base computes no weight gradients.
- N_lora: adapter parameters: forward 2, activation gradients 2, weight gradients 2 per parameter.
- attention scores and weighted values with a causal mask over s tokens: forward 2*h*s per token per
  layer (QK^T and PV over on average s/2 keys, 2 FLOPs per multiply-add), backward twice that (dQ, dK, dS,
  dV are all activation gradients).
- the recomputation of gradient checkpointing is not model work: it is counted only in the hardware FLOPs
  (HFU: + 2*(N_mm - V*h) + 2*L*h*s per token with checkpointing).

MFU = F x tokens/s / peak, with the peak dense bf16 rate of the device from its datasheet (H100 SXM and
H200: 989e12; H100 PCIe 756e12; H100 NVL 835e12; A100 312e12). The conventional 6N figure
(6 x all parameters x tokens/s / peak, which counts weight gradients a frozen base never computes) is
printed too, labelled `_6n_`.

Memory: `torch.cuda.max_memory_allocated` and `max_memory_reserved` of the training process, and its
device footprint = peak reserved + what the process holds outside PyTorch's allocator (CUDA context,
cuBLAS workspaces: device memory in use minus PyTorch's reserved memory at the end of the run). The
footprint is what a GPU must have, so the sizing error is (predicted - footprint) / footprint, with
predicted = `sizing.estimate_memory(spec, method).per_gpu(1)` for the same spec with the nominal size
("1B", "7B"). The table's 7B QLoRA cell is 1x12GB.

Usage: python bench/gpu_bench.py [--log FILE] [--deadline-s 540] [--work-dir DIR] [--keep] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchlib import mlp_width

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO / "trainer-image", REPO / "operator"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

GIB = 1024**3
VOCAB = 32_000
HEAD_DIM = 128
#: Peak dense bf16 FLOP/s by device-name fragment (first match wins; datasheet figures, no sparsity).
PEAK_BF16: list[tuple[str, float]] = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
]
HEALTHCARE_LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
EXPANDABLE = "expandable_segments:True"
QLORA_7B_EXAMPLE_LORA = {"r": 64, "alpha": 16, "dropout": 0.05, "targetModules": ["all_linear"]}


@dataclass
class Case:
    """One training measurement."""

    name: str
    size: str  # nominal size: the model built and the spec's baseModel.parameters
    method: str
    lora: dict[str, Any]
    batch: int
    seq: int
    checkpointing: bool
    steps: int
    warmup: int  # steps left out of the throughput
    expected_s: float  # rough wall time, to skip optional cases near the deadline
    optional: bool = False
    alloc_conf: str = ""  # PYTORCH_CUDA_ALLOC_CONF for the run ("" = PyTorch's default allocator)


@dataclass
class Shape:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    vocab: int = VOCAB

    def matmul_parameters(self) -> int:
        """Parameters of the matrix products: decoder linear layers and the output head."""
        h, m = self.hidden, self.intermediate
        return self.layers * (4 * h * h + 3 * h * m) + self.vocab * h

    def parameters(self) -> int:
        """All parameters (untied embeddings and head, RMSNorm weights)."""
        h = self.hidden
        return self.matmul_parameters() + self.vocab * h + (2 * self.layers + 1) * h


@dataclass
class Result:
    case: str
    ok: bool
    error: str = ""
    tokens_per_second: float | None = None
    measured_steps: int = 0
    tokens_per_step: float = 0
    peak_allocated_gib: float = 0
    peak_reserved_gib: float = 0
    outside_allocator_gib: float = 0
    model_gib: float = 0  # allocated once the model is loaded and prepared (weights, adapters), before training
    trainable_parameters: int = 0
    lora_parameters: int = 0
    wall_s: float = 0
    extra: dict[str, Any] = field(default_factory=dict)


def shape_for(size: str, smoke: bool) -> Shape:
    """The model shape the sizing model assumes for `size` (tiny stand-ins with --smoke)."""
    if smoke:
        return Shape(hidden=128, layers=2, intermediate=384, heads=2)
    from finetune_operator import sizing
    from finetune_operator.quantity import parse_parameters

    hidden, layers = sizing.shape(parse_parameters(size))
    # 3*h*m = 8*h^2: the 12*L*h^2 that sizing assumes
    return Shape(hidden=hidden, layers=layers, intermediate=mlp_width(hidden), heads=hidden // HEAD_DIM)


def peak_flops(device_name: str) -> float | None:
    for fragment, peak in PEAK_BF16:
        if fragment in device_name:
            return peak
    return None


def lora_flops_per_token(shape: Shape, lora_params: int, seq: int, checkpointing: bool) -> dict[str, float]:
    """Model FLOPs per token (see the module docstring), the hardware FLOPs, and the 6N convention."""
    attention = 2.0 * shape.layers * shape.hidden * seq  # causal forward, per token
    model = 4.0 * shape.matmul_parameters() + 6.0 * lora_params + 3 * attention
    hardware = model
    if checkpointing:  # decoder layers run forward twice; the head does not
        hardware += 2.0 * (shape.matmul_parameters() - shape.vocab * shape.hidden) + attention
    return {"model": model, "hardware": hardware, "six_n": 6.0 * shape.parameters()}


def job_spec(case: Case, model_uri: str, data_uri: str) -> dict[str, Any]:
    """The FineTuneJob spec of a case (used both to train and to ask the sizing model)."""
    return {
        "baseModel": {"uri": model_uri, "parameters": case.size},
        "method": case.method,
        "lora": case.lora,
        "dataset": {"train": data_uri, "format": "instruction"},
        "hyperparameters": {
            "maxSteps": case.steps,
            "batchSize": case.batch,
            "gradientAccumulationSteps": 1,
            "maxSeqLength": case.seq,
            "precision": "bf16",
            "gradientCheckpointing": case.checkpointing,
            "learningRate": 2e-4,
            "warmupRatio": 0.03,
            "seed": 42,
        },
        # No generation (it measures nothing here) and one test example for the base/tuned loss.
        "evaluation": {"enabled": False, "maxExamples": 1},
        "checkpoint": {"everySteps": 100_000, "keep": 1},
        "output": {"uri": "pvc://bench/out/"},  # replaced by a local directory when the run starts
    }


def make_job(case: Case, model_uri: str, data_uri: str) -> Any:
    from finetune_operator.spec import FineTuneJob

    name = case.name.replace("_", "-")
    return FineTuneJob.model_validate({"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
                                       "metadata": {"name": name}, "spec": job_spec(case, model_uri, data_uri)})


def predicted_parts(case: Case) -> Any:
    """The memory model's MemoryEstimate for the case's spec (nominal size)."""
    from finetune_operator import sizing

    job = make_job(case, "file:///tmp/model", "file:///tmp/train.jsonl")
    return sizing.estimate_memory(job.spec, case.method)  # type: ignore[arg-type]


def predicted_gib(case: Case) -> float:
    return float(predicted_parts(case).per_gpu(1))


# ------------------------------------------------------------------------------------------------
# Child tasks (each in its own process)
# ------------------------------------------------------------------------------------------------


def task_info(out: Path) -> None:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__}
    for module in ("transformers", "peft", "accelerate", "bitsandbytes"):
        try:
            info[module] = __import__(module).__version__
        except Exception as err:  # reported, not fatal here
            info[module] = f"unavailable ({type(err).__name__})"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(name=torch.cuda.get_device_name(0), total_gib=props.total_memory / GIB,
                    sms=props.multi_processor_count, capability=f"{props.major}.{props.minor}")
        n = 8192
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        for _ in range(5):
            a @ b
        times = []
        for _ in range(20):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        times.sort()
        info["matmul_tflops"] = 2 * n**3 / times[len(times) // 2] / 1e12
    else:
        info.update(name="cpu", total_gib=0.0)
    out.write_text(json.dumps(info))


def task_build(size: str, model_dir: Path, smoke: bool) -> None:
    """A randomly initialised Llama of the sizing model's shape, bf16, built on the device and saved."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from finetune_trainer import tiny

    shape = shape_for(size, smoke)
    tokenizer = tiny.build_tokenizer(tiny.default_corpus(), shape.vocab, 8192)
    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
        max_position_embeddings=8192, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, dtype="bfloat16",
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    start = time.perf_counter()
    # Built directly on the device in bf16: 7B of random weights in seconds instead of minutes on CPU.
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id, do_sample=False)
    built = time.perf_counter() - start
    count = sum(p.numel() for p in model.parameters())
    if count != shape.parameters():
        raise RuntimeError(f"built {count} parameters, expected {shape.parameters()} for {shape}")
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    print(json.dumps({"parameters": count, "build_s": built, "total_s": time.perf_counter() - start}))


def task_train(case: Case, model_dir: Path, data_path: Path, out_dir: Path, result_path: Path) -> None:
    import logging

    import torch

    from finetune_operator.contract import resolve
    from finetune_operator.sizing import plan
    from finetune_trainer.train import Run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from finetune_trainer import modeling

    # Measurement only: note the memory the prepared model holds (weights, upcast norms and embeddings,
    # adapters) before the optimizer and the first batch, by wrapping the function train.py calls.
    loaded: dict[str, int] = {}
    prepare = modeling.prepare_for_training

    def traced(*args: Any, **kwargs: Any) -> Any:
        model = prepare(*args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            loaded["allocated"] = torch.cuda.memory_allocated()
        return model

    modeling.prepare_for_training = traced  # type: ignore[assignment]
    job = make_job(case, f"file://{model_dir}", f"file://{data_path}")
    config = resolve(job, plan(job.spec))
    start = time.perf_counter()
    run = Run(config, str(out_dir), work_dir=out_dir.parent / "work")
    outcome = run.run()
    result = Result(case=case.name, ok=True, wall_s=time.perf_counter() - start)
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line]
    steps = [r for r in records if "tokens" in r and r.get("tokens_per_second")]
    measured = [r for r in steps if r["step"] > case.warmup]
    if measured:
        tokens = sum(r["tokens"] for r in measured)
        seconds = sum(r["tokens"] / r["tokens_per_second"] for r in measured)
        result.tokens_per_second = tokens / seconds
        result.measured_steps = len(measured)
        result.tokens_per_step = tokens / len(measured)
    result.extra["final_loss"] = outcome.final_loss
    result.extra["step_seconds"] = [round(r["tokens"] / r["tokens_per_second"], 4) for r in steps]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        result.peak_allocated_gib = torch.cuda.max_memory_allocated() / GIB
        result.peak_reserved_gib = torch.cuda.max_memory_reserved() / GIB
        result.outside_allocator_gib = (total - free - torch.cuda.memory_reserved()) / GIB
        result.model_gib = loaded.get("allocated", 0) / GIB
    trainable, _total = modeling.trainable_parameters(run.model)
    result.trainable_parameters = result.lora_parameters = trainable  # LoRA: the adapters alone train
    result_path.write_text(json.dumps(asdict(result)))


# ------------------------------------------------------------------------------------------------
# The parent: data, cases, report
# ------------------------------------------------------------------------------------------------


def write_data(path: Path, rows: int, seq: int, seed: int = 0) -> None:
    """Instruction rows with a short prompt and an answer of more than `seq` words (every word is at least
    one token), so each row is truncated to exactly `seq` tokens with answer tokens left to learn."""
    from finetune_trainer import tiny

    words = sorted({w for text in tiny.default_corpus() for w in text.split() if w.isalpha()})
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(rows):
            instruction = f"Summarise clinical note {i} for the care team: " + " ".join(rng.choices(words, k=20))
            output = " ".join(rng.choices(words, k=seq + 64))
            fh.write(json.dumps({"instruction": instruction, "input": "", "output": output}) + "\n")


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.smoke = args.smoke
        self.deadline = time.monotonic() + args.deadline_s
        self.work = Path(tempfile.mkdtemp(prefix="gpu-bench-", dir=args.work_dir))
        self.log = open(args.log, "a", encoding="utf-8") if args.log else None  # noqa: SIM115
        self.env = dict(os.environ)
        paths = [str(REPO / "trainer-image"), str(REPO / "operator")]
        self.env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p])
        self.env["FT_CACHE_DIR"] = str(self.work / "cache")
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.info: dict[str, Any] = {}

    def emit(self, name: str, value: Any) -> None:
        if isinstance(value, float):
            value = f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
        print(f"{'smoke_' if self.smoke else ''}{name}={value}", flush=True)

    def comment(self, text: str) -> None:
        print(f"# {text}", flush=True)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def child(self, label: str, argv: list[str], timeout: float,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=max(timeout, 1))
        except subprocess.TimeoutExpired as err:
            text = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
            text += (err.stderr or b"").decode() if isinstance(err.stderr, bytes) else (err.stderr or "")
            self._log(label, text + f"\n[timed out after {timeout:.0f} s]")
            raise
        self._log(label, proc.stdout + proc.stderr + f"\n[exit {proc.returncode}, {time.perf_counter() - start:.1f} s]")
        return proc

    def _log(self, label: str, text: str) -> None:
        if self.log:
            self.log.write(f"\n===== {label} =====\n{text}\n")
            self.log.flush()

    def run(self) -> int:
        import shutil

        try:
            return self._run()
        finally:
            if self.log:
                self.log.close()
            if not self.args.keep:  # the 7B model alone is 14.7 GB of the temp dir
                shutil.rmtree(self.work, ignore_errors=True)

    def _run(self) -> int:
        info_path = self.work / "info.json"
        proc = self.child("info", ["--task", "info", "--result", str(info_path)], min(120, self.left()))
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        self.info = json.loads(info_path.read_text())
        self.emit("gpu_device", self.info["name"].replace(" ", "_"))
        self.comment(", ".join(f"{k} {self.info[k]}" for k in ("torch", "transformers", "peft", "accelerate",
                                                               "bitsandbytes")))
        if "matmul_tflops" in self.info:
            self.comment(f"{self.info['sms']} SMs, {self.info['total_gib']:.1f} GiB, capability "
                         f"{self.info['capability']}")
            self.emit("gpu_bf16_matmul_tflops_measured", self.info["matmul_tflops"])
        peak = peak_flops(self.info["name"])
        if peak:
            self.comment(f"peak bf16 dense used for MFU: {peak:.3g} FLOP/s (datasheet, {self.info['name']})")
        else:
            self.comment(f"no datasheet peak known for {self.info['name']}: MFU not reported")
        self.peak = peak

        small = "1B"
        seq = 128 if self.smoke else 2048
        seq_short = 96 if self.smoke else 512
        steps_small, warm_small = (4, 1) if self.smoke else (30, 5)
        steps_big, warm_big = (3, 1) if self.smoke else (5, 2)
        lora_cases = [
            Case("lora_1b_gc", small, "lora", HEALTHCARE_LORA, 4, seq, True, steps_small, warm_small, 60),
            Case("lora_1b_nogc", small, "lora", HEALTHCARE_LORA, 4, seq, False, steps_small, warm_small, 60),
        ]
        qlora_cases = [
            Case("qlora_7b_seq512", "7B", "qlora", HEALTHCARE_LORA, 4, seq_short, True, steps_big, warm_big, 120),
            Case("qlora_7b_seq2048", "7B", "qlora", HEALTHCARE_LORA, 4, seq, True, steps_big, warm_big, 120),
            Case("qlora_7b_example_r64", "7B", "qlora", QLORA_7B_EXAMPLE_LORA, 4, seq, True, steps_big, warm_big,
                 120, optional=True),
            # The same two at 2048 with the expandable-segments allocator (less fragmentation).
            Case("qlora_7b_seq2048_expseg", "7B", "qlora", HEALTHCARE_LORA, 4, seq, True, steps_big, warm_big, 80,
                 optional=True, alloc_conf=EXPANDABLE),
            Case("qlora_7b_example_r64_expseg", "7B", "qlora", QLORA_7B_EXAMPLE_LORA, 4, seq, True, steps_big,
                 warm_big, 80, optional=True, alloc_conf=EXPANDABLE),
        ]
        data = self.work / "train.jsonl"
        rows = max(steps_small, steps_big) * 4 + 16
        write_data(data, rows, seq)
        self.comment(f"data: {rows} synthetic instruction rows, each truncated to exactly maxSeqLength tokens")

        results: dict[str, Result] = {}
        for size, cases in ((small, lora_cases), ("7B", qlora_cases)):
            model_dir = self.work / f"model-{size}"
            if not self.build(size, model_dir):
                continue
            for case in cases:
                if case.optional and self.left() < case.expected_s * 1.5:
                    self.comment(f"{case.name}: skipped, {self.left():.0f} s left of the deadline")
                    continue
                results[case.name] = self.train(case, model_dir, data)
                self.report(case, results[case.name])  # as each case ends: a killed run keeps what it had
        return 0 if all(r.ok for r in results.values()) and results else 1

    def build(self, size: str, model_dir: Path) -> bool:
        shape = shape_for(size, self.smoke)
        self.comment(f"model {size}: Llama hidden {shape.hidden}, {shape.layers} layers, intermediate "
                     f"{shape.intermediate}, {shape.heads} heads of {HEAD_DIM}, vocab {shape.vocab}, "
                     f"{shape.parameters() / 1e9:.3f}B parameters, random init in bf16")
        try:
            proc = self.child(f"build {size}", ["--task", "build", "--size", size, "--model", str(model_dir)]
                              + (["--smoke"] if self.smoke else []), min(300, self.left()))
        except subprocess.TimeoutExpired:
            self.comment(f"model {size}: build timed out")
            return False
        if proc.returncode != 0:
            self.comment(f"model {size}: build failed: {proc.stderr.strip().splitlines()[-1:]}")
            return False
        built = json.loads(proc.stdout.strip().splitlines()[-1])
        self.comment(f"model {size}: built in {built['build_s']:.1f} s, built and saved in {built['total_s']:.1f} s")
        return True

    def train(self, case: Case, model_dir: Path, data: Path) -> Result:
        out_dir = self.work / f"out-{case.name}"
        result_path = self.work / f"{case.name}.json"
        argv = ["--task", "train", "--case", json.dumps(asdict(case)), "--model", str(model_dir),
                "--data", str(data), "--out", str(out_dir), "--result", str(result_path)]
        try:
            proc = self.child(case.name, argv, self.left(),
                              {"PYTORCH_CUDA_ALLOC_CONF": case.alloc_conf} if case.alloc_conf else None)
        except subprocess.TimeoutExpired:
            return Result(case=case.name, ok=False, error="timed out at the deadline")
        if proc.returncode != 0 or not result_path.is_file():
            tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1:]
            return Result(case=case.name, ok=False, error=f"exit {proc.returncode}: {' '.join(tail)[:300]}")
        return Result(**json.loads(result_path.read_text()))

    def report(self, case: Case, result: Result) -> None:
        settings = (f"{case.method}, r {case.lora['r']} on {','.join(case.lora['targetModules'])}, batch "
                    f"{case.batch} x {case.seq}, gradient checkpointing {'on' if case.checkpointing else 'off'}, "
                    f"bf16, {case.steps} steps ({case.warmup} warm-up steps left out of tokens/s)"
                    + (f", PYTORCH_CUDA_ALLOC_CONF={case.alloc_conf}" if case.alloc_conf else ""))
        self.comment(f"{case.name}: {settings}")
        if not result.ok:
            self.comment(f"{case.name}: FAILED: {result.error}")
            return
        self.comment(f"{case.name}: {result.wall_s:.0f} s in Run.run(); step seconds {result.extra['step_seconds']}; "
                     f"final loss {result.extra['final_loss']:.4f}; adapter parameters {result.lora_parameters:,}")
        shape = shape_for(case.size, self.smoke)
        suffix = case.name.split("_", 1)[1]  # 1b_gc, 7b_seq512 ...
        if case.method == "lora":
            self.lora_figures(case, result, shape, suffix)
        self.memory_figures(case, result, suffix)

    def lora_figures(self, case: Case, result: Result, shape: Shape, suffix: str) -> None:
        if result.tokens_per_second is None:
            return
        tps = result.tokens_per_second
        key = "1b" if case.checkpointing else "1b_nogc"
        self.emit(f"gpu_lora_tokens_per_second_{key}", tps)
        flops = lora_flops_per_token(shape, result.lora_parameters, case.seq, case.checkpointing)
        if case.checkpointing:
            self.comment("model FLOPs/token F = 4*N_mm + 6*N_lora + 6*L*h*s (frozen base: forward 2N + activation "
                         "gradients 2N, no weight gradients; causal attention fwd 2Lhs + bwd 4Lhs; recompute not "
                         f"counted): N_mm {shape.matmul_parameters():,}, N_lora {result.lora_parameters:,}, "
                         f"L {shape.layers}, h {shape.hidden}, s {case.seq} -> {flops['model'] / 1e9:.3f} GFLOP/token")
        if self.peak:
            self.emit(f"gpu_lora_mfu_pct_{key}", 100 * flops["model"] * tps / self.peak)
            self.emit(f"gpu_lora_hfu_pct_{key}", 100 * flops["hardware"] * tps / self.peak)
            self.emit(f"gpu_lora_mfu_6n_pct_{key}", 100 * flops["six_n"] * tps / self.peak)
            if case.checkpointing:
                self.comment("hfu adds the checkpointing recompute (2*(N_mm - V*h) + 2*L*h*s); mfu_6n is the "
                             f"conventional 6 x {shape.parameters():,} parameters, which counts weight gradients "
                             "a frozen base never computes (an overstatement for LoRA)")

    def memory_figures(self, case: Case, result: Result, suffix: str) -> None:
        if not result.peak_reserved_gib and not self.smoke:
            return
        method = case.method
        footprint = result.peak_reserved_gib + result.outside_allocator_gib
        predicted = predicted_gib(case)
        parts = predicted_parts(case)
        self.emit(f"gpu_{method}_peak_gib_{suffix}", result.peak_allocated_gib)
        if result.model_gib:
            # The model as loaded and prepared (base weights, upcast norms/embeddings, fp32 adapters) vs the
            # memory model's weights + 4-byte adapters; the rest of the peak (activations, logits and loss,
            # adapter gradients and AdamW moments, temporaries) vs its activations + 12 bytes per adapter
            # parameter. Both without the overhead terms.
            adapters = parts.trainable_parameters * 4 / GIB
            self.emit(f"gpu_{method}_model_gib_{suffix}", result.model_gib)
            self.emit(f"gpu_{method}_predicted_model_gib_{suffix}", parts.weights + adapters)
            self.emit(f"gpu_{method}_peak_minus_model_gib_{suffix}", result.peak_allocated_gib - result.model_gib)
            self.emit(f"gpu_{method}_predicted_rest_gib_{suffix}", parts.activations + 3 * adapters)
        self.emit(f"gpu_{method}_peak_reserved_gib_{suffix}", result.peak_reserved_gib)
        self.emit(f"gpu_{method}_footprint_gib_{suffix}", footprint)
        self.emit(f"gpu_{method}_predicted_gib_{suffix}", predicted)
        if footprint > 0:
            self.emit(f"gpu_sizing_error_pct_{method}_{suffix}", 100 * (predicted - footprint) / footprint)
        if result.tokens_per_second is not None and method == "qlora":
            self.emit(f"gpu_qlora_tokens_per_second_{suffix}", result.tokens_per_second)
        if case.size == "7B" and method == "qlora":
            self.emit(f"gpu_qlora_fits_table_12gib_{suffix}", "yes" if footprint <= 12 else "no")
        if case.name == "qlora_7b_seq512":
            self.emit("gpu_qlora_table_gib_7b", 12)
            self.comment("peak = max_memory_allocated; footprint = max_memory_reserved + memory outside the "
                         "allocator (CUDA context, library workspaces) = what the GPU must hold; sizing error = "
                         "(predicted - footprint) / footprint, predicted = sizing.estimate_memory(spec).per_gpu(1)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log", help="append every child process's output to this file")
    parser.add_argument("--deadline-s", type=float, default=540.0, help="skip optional cases past this (s)")
    parser.add_argument("--work-dir", default=None, help="where models and runs go (default: the temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (models, runs, logs)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on any device (tests the harness)")
    parser.add_argument("--task", choices=["info", "build", "train"], help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.task == "info":
        task_info(Path(args.result))
        return 0
    if args.task == "build":
        task_build(args.size, Path(args.model), args.smoke)
        return 0
    if args.task == "train":
        task_train(Case(**json.loads(args.case)), Path(args.model), Path(args.data), Path(args.out),
                   Path(args.result))
        return 0

    if not args.smoke:
        try:
            import torch
        except ImportError:
            print("# gpu_bench: torch is not installed, skipped")
            return 0
        if not torch.cuda.is_available():
            print("# gpu_bench: no CUDA device, skipped")
            return 0
    return Bench(args).run()


if __name__ == "__main__":
    sys.exit(main())
