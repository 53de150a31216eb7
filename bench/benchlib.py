"""Small helpers the benchmark scripts share (imported as `benchlib`: each script runs with bench/ first on
sys.path, as `python bench/<script>.py`)."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else what `platform` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


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
