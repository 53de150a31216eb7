"""Sizing accuracy on CPU: the planner's memory model (operator/finetune_operator/sizing.py) against the
memory our trainer really uses, for models small enough to train here.

For each size (default 0.1B; `--sizes 0.1,0.3` adds 0.3B), architecture (`--shapes`, default both), method
(full, LoRA, QLoRA) and gradient checkpointing (on, off) one subprocess trains a few steps with our trainer
(`train.Run`, in the process, as the tests run it) on a Llama built here. `sizing.shape(P)` gives hidden
size h and layers L for both architectures:

- `mha`: the shape the memory model assumes without an architecture: MLP width 8/3 h (rounded to a multiple
  of 64, so 12*L*h^2 layer parameters), 64-wide heads, one key/value head per attention head, vocabulary
  32,000 (`sizing.VOCAB`), untied head;
- `gqa`: grouped-query attention (a quarter as many key/value heads as attention heads), an MLP of 3h, a
  vocabulary of 49,152 and the head tied to the input embeddings: the terms an architecture changes.

Data: text rows longer than maxSeqLength,
so every example is truncated to exactly maxSeqLength tokens and every batch is b x s (the memory model's
worst case). The spec is the healthcare example's (LoRA r=16 on q,k,v,o; bf16) with batch 4 x 512,
gradient accumulation 1, 2 optimizer steps (the second one runs with the AdamW states allocated).

Precision (`--precision`, default bf16 on every CPU, printed as `# precision: ...` with whether this CPU runs
bf16 natively): unlike the throughput benchmark, which picks fp32 where bf16 is only emulated because it
times the work, this one measures memory, and the precision is part of what it measures: the memory model
is of the example's bf16 run (the table's assumption; its activation term does not scale with precision),
and an emulated bf16 tensor is as large as a native one. On a CPU without AVX512-BF16 or AMX (e.g. an AMD
EPYC without AVX512) the same configurations run slower, not larger. `--precision fp32` (or `auto`: bf16
where native, else fp32) measures an fp32 run against the model's fp32 prediction, the same precision on
both sides.

Prediction: `estimate_memory(spec, method, architecture, device="cpu")` and its `body(1)`: the tensors one
process holds at its peak (weights, optimizer state, and the larger of the start of the backward, with every
stored activation and the loss, and its end or the optimizer step, with every gradient), with the
architecture read from the saved model's config.json and safetensors headers (`finetune_operator.
architecture`, as `finetune plan --inspect` reads it): the exact parameter count, h, L, MLP width,
key/value width, vocabulary and tied embeddings. Without it the memory model guesses (h, L) from the count
as if every parameter sat in the layers; at 0.1B the 32,000-row embeddings and head are 39% of the
parameters, so that guess would measure the guess, not the memory model. `device="cpu"` changes one term,
AdamW's step temporaries (torch runs the for-loop AdamW on CPU, foreach on CUDA). The GPU overhead
(`per_gpu`: CUDA context, communication buffers, allocator reserve) is left out: it has no CPU counterpart.

Measurement, in the training process (`/proc/self/status`), by wrapping the trainer's own functions
without changing what they do. The worker imports the modeling libraries (transformers' Llama, peft,
bitsandbytes) first: loading would import them (~160 MiB of Python objects for the Llama code alone), and
code is no training memory. `before_load` = VmRSS just before the first `modeling.load_base` (the run loads
the base again after training, for the export check: not counted); after `modeling.prepare_for_training`
the peak is reset (`/proc/self/clear_refs` 5) so loading transients, which on a GPU happen in host memory,
do not count; `peak` = VmHWM when the run reaches its first checkpoint, after the last training step.
`runtime` = at the start of the last step, VmRSS - before_load - the bytes of every live tensor (parameters,
buffers, bitsandbytes' quantization constants, AdamW state; no gradients between steps): the process's own
memory (oneDNN's kernel caches, the data, Python objects, library pages), ~50 MiB here, which a GPU run keeps
in host memory. measured = peak - before_load - runtime: the tensors at the peak, what
`torch.cuda.max_memory_allocated` is on a GPU. Each row also prints the error against the process peak
(runtime included). Also printed per config (as comments): the weights measured as RSS after preparing minus
before loading, and the process peak after training (the export check's load included).

The C allocator: every worker runs with glibc's `MALLOC_MMAP_THRESHOLD_` fixed at 1 MiB and at most 2 arenas
(`MALLOC_ARENA_MAX=2`), so blocks of 1 MiB and more (every activation tensor) are mapped on allocation and
given back when freed, and RSS follows the memory tensors really hold, as `torch.cuda.max_memory_allocated`
does on a GPU. By default glibc raises its threshold to 32 MiB after the first large frees and then keeps
freed tensors in its heap: the same configurations measured 31% (LoRA) and 45% (QLoRA) above the model that
way, all of it memory no tensor held. `--malloc-default` measures with glibc's defaults.

Figures: `sizing_error_pct_<method>` = (predicted - measured) / measured x 100, the mean over the configs
of that method, and `sizing_error_pct_<method>_worst` the signed error of largest magnitude; the same per
architecture (`sizing_error_pct_<shape>_<method>`); `sizing_configs_within_20pct`, `sizing_rows_within_10pct`
= how many configs are within +-20% / +-10%, of how many; `sizing_worst_under_pct` the most negative error
(0 when none is under) and `sizing_rows_under_more_than_5pct` how many are under by more than 5% (the
targets: every row within +-10%, none under by more than 5%). Configs run in separate processes; each line
`# config ...` shows the parts, the config's own error and its verdicts.

Usage: python bench/sizing_accuracy_bench.py [--sizes 0.1] [--shapes mha,gqa] [--methods full,lora,qlora] [--gc on,off]
       [--batch 4] [--seq 512] [--steps 2] [--threads 2] [--malloc-default] [--precision bf16]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchlib import bench_precision, count_parameters, cpu_model, mlp_width, scratch_dir

MIB = 1024**2
GIB = 1024**3
#: The targets (issue 24): every row within +-10% of the measured peak, none under it by more than 5%.
WITHIN_PCT, UNDER_PCT = 10.0, 5.0


# ------------------------------------------------------------------------------------------------
# /proc measurements
# ------------------------------------------------------------------------------------------------


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------
# Set-up (parent)
# ------------------------------------------------------------------------------------------------


#: The GQA architecture's vocabulary (a multiple of 64, as bitsandbytes' CPU kernels need; SmolLM's size).
GQA_VOCAB = 49_152


def build_model(out: Path, parameters_b: float, seq: int, kind: str) -> tuple[Path, Any]:
    """A Llama of `kind` (mha, gqa; see the docstring) for `parameters_b`; returns (dir, its Architecture)."""
    from finetune_operator.architecture import read_architecture
    from finetune_operator.sizing import VOCAB, shape
    from finetune_trainer import tiny

    hidden, layers = shape(parameters_b)
    heads = hidden // 64
    if kind == "mha":
        widths = {"intermediate_size": mlp_width(hidden), "vocab_size": VOCAB, "num_kv_heads": heads,
                  "tie_word_embeddings": False}
    elif kind == "gqa":
        widths = {"intermediate_size": 3 * hidden, "vocab_size": GQA_VOCAB, "num_kv_heads": max(1, heads // 4),
                  "tie_word_embeddings": True}
    else:
        raise ValueError(f"unknown shape {kind!r}: expected mha or gqa")
    model = tiny.build_tiny_model(out, seed=0, hidden_size=hidden, num_layers=layers, num_heads=heads,
                                  max_position_embeddings=max(1024, seq), **widths)
    arch = read_architecture(model)
    if arch.parameters != count_parameters(model):  # the inspector against the safetensors library's count
        raise RuntimeError(f"architecture reader counts {arch.parameters:,}, safetensors {count_parameters(model):,}")
    return model, arch


def write_data(path: Path, rows: int, seq: int) -> None:
    """Text rows each longer than `seq` tokens (the sample's answers, concatenated), so all truncate to seq."""
    from finetune_trainer import tiny

    answers = [json.loads(line)["output"] for line in
               (tiny.DATA_DIR / "healthcare_train.jsonl").read_text().splitlines() if line.strip()]
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(rows):
            text, j = "", i
            while len(text) < 12 * seq:  # ~4 characters per token: at least 3x the tokens needed
                text += answers[j % len(answers)] + " "
                j += 7
            fh.write(json.dumps({"text": text}) + "\n")


def make_config(model: Path, data: Path, parameters: int, method: str, gc: bool, batch: int, seq: int,
                steps: int, precision: str) -> Any:
    from finetune_operator.contract import resolve
    from finetune_operator.sizing import plan
    from finetune_operator.spec import FineTuneJob

    spec = {
        "baseModel": {"uri": f"file://{model}", "parameters": f"{parameters / 1e6:.3f}M"},
        "method": method,
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "dataset": {"train": f"file://{data}", "format": "text"},
        "hyperparameters": {"maxSteps": steps, "batchSize": batch, "gradientAccumulationSteps": 1,
                            "maxSeqLength": seq, "precision": precision, "gradientCheckpointing": gc,
                            "warmupRatio": 0.0, "seed": 42},
        "checkpoint": {"everySteps": 100_000, "keep": 1},
        "evaluation": {"enabled": False, "maxExamples": 1},
        "output": {"uri": "s3://sizing-bench/out/", "saveMerged": False},
    }
    if method == "qlora" and precision == "fp32":  # QLoRA computes in the training precision (default bf16)
        spec["quantization"] = {"computeDtype": "float32"}
    job = FineTuneJob.model_validate({"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
                                      "metadata": {"name": "sizing"}, "spec": spec})
    return resolve(job, plan(job.spec))


# ------------------------------------------------------------------------------------------------
# Worker (one configuration, its own process)
# ------------------------------------------------------------------------------------------------


def live_tensor_bytes(model: Any, optimizer: Any) -> int:
    """Bytes of the distinct storages of the model's parameters, gradients and buffers, bitsandbytes' 4-bit
    quantization constants (absmax, code; nested with double quantization) and the optimizer's state."""
    import torch

    storages: dict[int, int] = {}

    def add(t: Any) -> None:
        if torch.is_tensor(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    for t in [*model.parameters(), *model.buffers()]:
        add(t)
        add(t.grad)
        state = getattr(t, "quant_state", None)
        while state is not None:
            add(getattr(state, "absmax", None))
            add(getattr(state, "code", None))
            state = getattr(state, "state2", None)
    for values in optimizer.state.values():
        for v in values.values():
            add(v)
    return sum(storages.values())


def worker(config_path: Path, output: Path, threads: int) -> dict[str, Any]:
    import torch

    from finetune_operator.contract import TrainerConfig
    from finetune_trainer import loop, modeling, train

    torch.set_num_threads(threads)
    # Imported before the baseline: loading would import them (the Llama modeling code alone is ~160 MiB of
    # Python objects), and code is not training memory on any device.
    import peft  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    with contextlib.suppress(ImportError):
        import bitsandbytes  # noqa: F401
    config = TrainerConfig.model_validate_json(config_path.read_text())
    marks: dict[str, Any] = {}
    load_base, prepare, checkpoint = modeling.load_base, modeling.prepare_for_training, train.Run._checkpoint
    step = loop.Loop.step

    def measured_load_base(*args: Any, **kwargs: Any) -> Any:
        # The first load only: the run loads the base again after training (the export check), and the
        # baseline is the process before the training model.
        marks.setdefault("before_load_kib", status_kib("VmRSS"))
        return load_base(*args, **kwargs)

    def measured_prepare(*args: Any, **kwargs: Any) -> Any:
        model = prepare(*args, **kwargs)
        if "after_prepare_kib" not in marks:
            marks["after_prepare_kib"] = status_kib("VmRSS")
            marks["peak_load_kib"] = status_kib("VmHWM")
            marks["peak_reset"] = reset_peak()
        return model

    def measured_step(self: Any) -> Any:
        # Before each step (the last one's counts): RSS not held by a tensor = RSS - the bytes of every live
        # tensor (weights, bitsandbytes' quantization constants, buffers, AdamW state; no gradients between
        # steps). That is the process's runtime memory (oneDNN's kernel caches, the data, Python objects,
        # library pages), which the first step grows and a GPU keeps in host memory.
        if "peak_kib" not in marks:
            live = live_tensor_bytes(self.model, self.optimizer)
            marks["runtime_kib"] = status_kib("VmRSS") - marks["before_load_kib"] - live // 1024
            marks["live_tensor_bytes"] = live
        return step(self)

    def measured_checkpoint(self: Any, keep: int) -> Any:
        if "peak_kib" not in marks:
            marks["peak_kib"] = status_kib("VmHWM")
            marks["rss_file_kib"] = status_kib("RssFile")
            params = list(self.model.parameters())
            marks["weights_bytes"] = sum(p.numel() * p.element_size() for p in params)
            marks["grad_bytes"] = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
            marks["optimizer_bytes"] = sum(t.numel() * t.element_size() for s in self.optimizer.state.values()
                                           for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
            marks["steps"] = self.state.step
        return checkpoint(self, keep)

    modeling.load_base = measured_load_base
    modeling.prepare_for_training = measured_prepare
    train.Run._checkpoint = measured_checkpoint
    loop.Loop.step = measured_step
    start = time.perf_counter()
    train.Run(config, str(output)).run()
    marks["seconds"] = time.perf_counter() - start
    marks["process_peak_kib"] = status_kib("VmHWM")
    return marks


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def predict(config: Any, model_dir: Path) -> dict[str, float]:
    from finetune_operator.architecture import read_architecture
    from finetune_operator.sizing import estimate_memory

    # device cpu: AdamW's step temporaries of the trainer's CPU run (torch's for-loop AdamW; CUDA's is foreach)
    mem = estimate_memory(config.spec, config.method, architecture=read_architecture(model_dir), device="cpu")
    body = mem.body(1)  # the tensors at the peak: no CUDA context, no allocator reserve (the GPU overhead)
    return {"weights": mem.weights * GIB / MIB, "trainable_state": mem.trainable_state * GIB / MIB,
            "activations": (body - mem.weights - mem.trainable_state) * GIB / MIB}


def run_config(config: Any, work: Path, env: dict[str, str], threads: int) -> dict[str, Any]:
    from finetune_operator.contract import config_json

    path = work / "config.json"
    path.write_text(config_json(config))
    output = work / "out"
    shutil.rmtree(output, ignore_errors=True)
    output.mkdir()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(path), str(output), str(threads)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    shutil.rmtree(output, ignore_errors=True)
    shutil.rmtree(work / "cache" / "work", ignore_errors=True)
    shutil.rmtree(work / "cache" / "checkpoints", ignore_errors=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        tail = "\n".join((result.stderr + result.stdout).splitlines()[-30:])
        raise RuntimeError(f"worker failed (exit {result.returncode}):\n{tail}")
    return json.loads(lines[-1])


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        marks = worker(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
        print(json.dumps(marks), flush=True)
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0.1", help="parameter counts in billions, comma-separated")
    parser.add_argument("--shapes", default="mha,gqa", help="architectures: mha (the memory model's default "
                        "shape), gqa (GQA, wider MLP, 49,152 tokens, tied embeddings)")
    parser.add_argument("--methods", default="full,lora,qlora")
    parser.add_argument("--gc", default="on,off", help="gradient checkpointing settings to run")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each training process")
    parser.add_argument("--malloc-default", action="store_true",
                        help="glibc's default malloc settings (RSS then includes freed memory glibc keeps)")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="bf16",
                        help="training precision of every config, predicted and measured (default bf16: "
                        "the memory model's case; auto: bf16 where the CPU runs it natively, else fp32)")
    args = parser.parse_args()
    precision, precision_why = bench_precision(args.precision)
    sizes = [float(s) for s in args.sizes.split(",") if s]
    shapes = [s for s in args.shapes.split(",") if s]
    methods = [m for m in args.methods.split(",") if m]
    gcs = [g == "on" for g in args.gc.split(",") if g]

    start = time.perf_counter()
    with scratch_dir("sizing-bench-") as work:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FT_")}
        env.update({"OMP_NUM_THREADS": str(args.threads), "FT_CACHE_DIR": str(work / "cache"),
                    "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "FT_LOG_LEVEL": "WARNING"})
        if not args.malloc_default:
            env.update({"MALLOC_MMAP_THRESHOLD_": str(1024 * 1024), "MALLOC_ARENA_MAX": "2"})
        else:
            env = {k: v for k, v in env.items() if not k.startswith("MALLOC_")}
        print(f"# machine: nproc={os.cpu_count()} cpu={cpu_model()!r} load_avg_at_start={os.getloadavg()[0]:.2f}")
        print(f"# settings: batch {args.batch} x seq {args.seq} (every row truncated to seq), gradient accumulation 1, "
              f"{args.steps} optimizer steps, {precision}, LoRA r=16 on q,k,v,o, threads={args.threads}; compared: "
              "the memory model's tensors at the peak (MemoryEstimate.body, without its GPU overhead) against the "
              "measured peak less the process's runtime memory; "
              + ("glibc malloc defaults" if args.malloc_default else
                 "glibc MALLOC_MMAP_THRESHOLD_=1MiB, MALLOC_ARENA_MAX=2 (RSS follows live memory)"))
        print(f"# precision: {precision_why}; predicted and measured alike", flush=True)
        errors: dict[str, list[float]] = {m: [] for m in methods}
        by_shape: dict[tuple[str, str], list[float]] = {}
        data = work / "train.jsonl"
        write_data(data, rows=8 * args.batch * args.steps, seq=args.seq)
        for size, kind in itertools.product(sizes, shapes):
            model_dir, arch = build_model(work / f"model-{size:g}B-{kind}", size, args.seq, kind)
            hidden, count = arch.hidden_size, arch.parameters
            embeddings = arch.vocab_size * hidden * (1 if arch.tied_embeddings else 2)
            print(f"# model {size:g}B {kind}: {arch.describe()} ({(count - embeddings) / 1e6:.1f}M in the layers, "
                  f"{embeddings / 1e6:.1f}M embeddings{'' if arch.tied_embeddings else ' + head'})", flush=True)
            for method in methods:
                for gc in gcs:
                    config = make_config(model_dir, data, count, method, gc, args.batch, args.seq, args.steps,
                                         precision)
                    pred = predict(config, model_dir)
                    m = run_config(config, work, env, args.threads)
                    process = (m["peak_kib"] - m["before_load_kib"]) / 1024
                    runtime = m["runtime_kib"] / 1024
                    measured = process - runtime
                    predicted = sum(pred.values())
                    error = (predicted - measured) / measured * 100
                    errors[method].append(error)
                    by_shape.setdefault((kind, method), []).append(error)
                    weights_rss = (m["after_prepare_kib"] - m["before_load_kib"]) / 1024
                    state = (m["grad_bytes"] + m["optimizer_bytes"]) / MIB
                    rest = measured - m["weights_bytes"] / MIB - state
                    verdict = ("within +-10%" if abs(error) <= WITHIN_PCT else "OUTSIDE +-10%") + "; " + (
                        "never under 5%: yes" if error >= -UNDER_PCT else "never under 5%: NO (under)")
                    print(f"# config {size:g}B {kind} {method} gc={'on' if gc else 'off'}: predicted {predicted:.0f} MiB "
                          f"(weights {pred['weights']:.0f} + state {pred['trainable_state']:.0f} + working memory at the peak "
                          f"{pred['activations']:.0f}); measured {measured:.0f} MiB = process peak {process:.0f} - "
                          f"runtime {runtime:.0f} (weights: tensors {m['weights_bytes'] / MIB:.0f}, by RSS "
                          f"{weights_rss:.0f}; grads and AdamW state {state:.0f} [tensors]; the rest, activations "
                          f"and temporaries, {rest:.0f}); error {error:+.1f}% ({verdict}); against the process "
                          f"peak {(predicted - process) / process * 100:+.1f}%; process peak to the end (export check incl.) "
                          f"{(m['process_peak_kib'] - m['before_load_kib']) / 1024:.0f} MiB; steps {m['steps']}; "
                          f"{m['seconds']:.0f} s", flush=True)
                    if not m["peak_reset"]:
                        print("# (peak could not be reset after loading: the figure includes loading)")
            shutil.rmtree(model_dir, ignore_errors=True)
        for method in methods:
            values = errors[method]
            if values:
                print(f"sizing_error_pct_{method}={statistics.mean(values):+.1f}")
                print(f"sizing_error_pct_{method}_worst={max(values, key=abs):+.1f}")
        for (kind, method), values in by_shape.items():
            print(f"sizing_error_pct_{kind}_{method}={statistics.mean(values):+.1f}")
            print(f"sizing_error_pct_{kind}_{method}_worst={max(values, key=abs):+.1f}")
        every = [e for values in errors.values() for e in values]
        within = sum(abs(e) <= 20 for e in every)
        print(f"sizing_configs_within_20pct={within}/{len(every)}")
        within10 = sum(abs(e) <= WITHIN_PCT for e in every)
        print(f"sizing_rows_within_10pct={within10}/{len(every)}")
        print(f"sizing_worst_abs_error_pct={max(abs(e) for e in every):.1f}")
        print(f"sizing_worst_under_pct={min(min(every), 0.0):+.1f}")
        print(f"sizing_rows_under_more_than_5pct={sum(e < -UNDER_PCT for e in every)}/{len(every)}")
        print(f"# every row within +-10% and none under by more than 5%: "
              f"{'yes' if within10 == len(every) and min(every) >= -UNDER_PCT else 'no'}")
        print(f"# load_avg_at_end={os.getloadavg()[0]:.2f}; total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
