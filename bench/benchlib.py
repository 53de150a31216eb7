"""Small helpers the benchmark scripts share (imported as `benchlib`: each script runs with bench/ first on
sys.path, as `python bench/<script>.py`)."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any


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
