"""Small helpers the benchmark scripts share (imported as `benchlib`: each script runs with bench/ first on
sys.path, as `python bench/<script>.py`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# The settings of examples/healthcare-lora.yaml that the training throughput benches (throughput_bench.py,
# dpo_throughput_bench.py) run both sides with.
EXAMPLE = REPO / "examples" / "healthcare-lora.yaml"
SEED = 42
MAX_LEN = 512
VALIDATION_SPLIT = 0.1
BATCH, ACCUMULATION = 4, 4


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else what `platform` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (`flags` on x86, `Features` on Arm); empty where unreadable."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


#: Flags of CPUs that compute bf16 dot products in hardware: AVX512-BF16 and AMX-BF16 (x86), BF16 (Arm v8.6).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def native_bf16() -> tuple[bool, str]:
    """Whether this CPU runs bf16 matmuls natively, and the evidence, as (answer, text to print).

    Where it does not (e.g. an AMD EPYC without AVX512), torch still accepts bf16 but emulates it: every
    matmul converts to fp32 and back, several times slower than fp32 itself. The flags are read from
    /proc/cpuinfo rather than asked of torch because torch.backends.cpu.get_cpu_capability() only says
    "AVX512" or "AVX2", not whether the AVX512 has BF16; bitsandbytes keys its own CPU bf16 kernels on the
    same instruction (bitsandbytes.functional.has_avx512bf16)."""
    if os.environ.get("FT_BENCH_NO_NATIVE_BF16") == "1":
        # A stand-in for a CPU without AVX512-BF16 on one that has it (with ATEN_CPU_CAPABILITY=avx2 and
        # ONEDNN_MAX_CPU_ISA=AVX2, torch's own and oneDNN's kernels also keep to AVX2), to time that path.
        return False, "treated as emulated (FT_BENCH_NO_NATIVE_BF16=1, standing in for a CPU without it)"
    flags = cpu_flags()
    found = [f for f in NATIVE_BF16_FLAGS if f in flags]
    if found:
        return True, f"native on this CPU ({', '.join(found)} in /proc/cpuinfo)"
    if not flags:
        return False, "no CPU flags readable (/proc/cpuinfo): taken as not native"
    return False, f"emulated on this CPU (none of {', '.join(NATIVE_BF16_FLAGS)} in /proc/cpuinfo)"


def bench_precision(requested: str) -> tuple[str, str]:
    """The training precision a CPU benchmark uses, and a line saying why (print it with the results).

    `auto`: bf16 where the CPU runs it natively, else fp32. A benchmark that times training compares the
    trainer's work, not how well a CPU emulates a number format: with bf16 emulated, the conversions would
    dominate both sides' time and a ratio measured on such a CPU could not be compared with one measured
    where bf16 is native. Each benchmark uses the same precision on both sides of every comparison.
    `bf16` or `fp32` force it (figures then say so)."""
    native, why = native_bf16()
    if requested == "auto":
        chosen = "bf16" if native else "fp32"
        return chosen, f"{chosen} (auto; bf16 is {why})"
    if requested not in ("bf16", "fp32"):
        raise ValueError(f"precision {requested!r}: expected auto, bf16 or fp32")
    return requested, f"{requested} (as requested; bf16 is {why})"


def mlp_width(hidden: int) -> int:
    """The Llama MLP width (8/3 of hidden) rounded to a multiple of 64: with it a layer has the 12*h^2
    parameters the memory model (operator/finetune_operator/sizing.py) assumes."""
    return max(64, round(hidden * 8 / 3 / 64) * 64)


def count_parameters(model_dir: Path) -> int:
    """Parameters in `model_dir`/model.safetensors, read from the tensor shapes (no tensor is loaded)."""
    from safetensors import safe_open

    count = 0
    with safe_open(str(model_dir / "model.safetensors"), framework="np") as fh:
        for name in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
            n = 1
            for dim in fh.get_slice(name).get_shape():
                n *= dim
            count += n
    return count


def worker_env(threads: int, work: Path) -> dict[str, str]:
    """The environment of a benchmark's trainer subprocesses: this one without FT_ settings, `threads` OpenMP
    and MKL threads, quiet logs, a model cache under `work`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FT_")}
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
                "PYTHONUNBUFFERED": "1", "FT_LOG_LEVEL": "WARNING", "FT_CACHE_DIR": str(work / "cache")})
    return env


def status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def peak_rss_bytes() -> int:
    """This process's peak resident memory: VmHWM, the high-water mark of its own address space.

    Not `getrusage(RUSAGE_SELF).ru_maxrss`: Linux carries ru_maxrss over an exec from the parent, so a child
    started by the parent that built the model reports the parent's peak (1.3 GB here) and no delta at all;
    VmHWM starts afresh with the child's address space. The two agree where the parent's peak was smaller."""
    try:
        return status_bytes("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def run_script_worker(script: Path, args: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Run `script --worker ARGS` in a subprocess (each bench side in a fresh process); returns the JSON object it
    prints last, or raises with the tail of its output."""
    cmd = [sys.executable, str(script.resolve()), "--worker", *args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        tail = "\n".join((result.stderr + result.stdout).splitlines()[-30:])
        raise RuntimeError(f"worker {args[:2]} failed (exit {result.returncode}):\n{tail}")
    return dict(json.loads(lines[-1]))


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A temporary folder for a benchmark's files (named `prefix`...), removed however the run ends."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build_tiny_inputs(work: Path, hidden: int, layers: int, data_file: str) -> tuple[Path, Path, int]:
    """The tiny Llama (`hidden` wide, `layers` deep, vocabulary 2048) and a copy of the bundled `data_file` under
    `work`; returns (model dir, data file, parameters)."""
    from finetune_trainer import tiny

    model = tiny.build_tiny_model(work / "model", seed=0, hidden_size=hidden, num_layers=layers,
                                  num_heads=max(1, hidden // 64), intermediate_size=mlp_width(hidden),
                                  vocab_size=2048, max_position_embeddings=2 * MAX_LEN)
    data = work / "data"
    data.mkdir()
    train = data / "train.jsonl"
    shutil.copy(tiny.DATA_DIR / data_file, train)
    return model, train, count_parameters(model)


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a training bench's worker every side takes: its inputs (model and training file, or a
    manifest), steps, threads, seed and precision."""
    parser.add_argument("--model", type=Path)
    parser.add_argument("--train", type=Path)
    parser.add_argument("--manifest", type=Path)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--precision", choices=["bf16", "fp32"], required=True)


def resolve_manifest(manifest: Path, overrides: list[str]) -> Any:
    """The trainer config of `manifest` with `--set`-style `overrides`, validated and resolved as
    `finetune run --local` does."""
    from finetune_operator import manifests
    from finetune_operator.contract import resolve
    from finetune_trainer import local

    doc = local.load_manifest(manifest)
    for text in overrides:
        local.set_path(doc, *local.parse_override(text))
    loaded = manifests.validate_document(doc, str(manifest))  # what `finetune run --local` validates with
    if not loaded.ok:
        raise RuntimeError(f"{manifest} is not a valid FineTuneJob: " + "; ".join(map(str, loaded.issues)))
    return resolve(loaded.job, loaded.plan)


def step_figures(stamps: list[tuple[float, float]], tokens: list[int]) -> dict[str, Any]:
    """Throughput over steps 2..N from each step's end (wall, CPU) stamps and its useful tokens."""
    walls = [stamps[k][0] - stamps[k - 1][0] for k in range(1, len(stamps))]
    cpus = [stamps[k][1] - stamps[k - 1][1] for k in range(1, len(stamps))]
    counted = tokens[1:len(stamps)]
    return {
        "tokens": sum(counted),
        "seconds": sum(walls),
        "cpu_seconds": sum(cpus),
        "tokens_per_second": statistics.median(t / w for t, w in zip(counted, walls, strict=True)),
        "tokens_per_second_total": sum(counted) / sum(walls),
        "tokens_per_cpu_second": sum(counted) / sum(cpus),
    }


def step_clock(stamps: list[tuple[float, float]]) -> Any:
    """A transformers `TrainerCallback` that appends the (wall, CPU) time to `stamps` at the end of every optimizer
    step: the stamps `step_figures` takes."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            stamps.append((time.perf_counter(), time.process_time()))

    return Clock()


def best_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The first run's figures with each throughput the best over `runs`: other work on the machine only ever
    slows a run down, so the fastest run is the one it disturbed least (a median over the pooled steps of
    two runs is not that when a burst of other work covers one of them)."""
    return {**runs[0], **{key: max(r[key] for r in runs)
                          for key in ("tokens_per_second", "tokens_per_second_total", "tokens_per_cpu_second")}}
