"""Parsing of the human-written sizes in a spec and in settings: parameter counts, GPU memory, bytes."""

from __future__ import annotations

import re
from decimal import ROUND_CEILING, Decimal

_PARAMS = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KkMmBbTt])?\s*$")
_SCALE_B = {"k": 1e-6, "m": 1e-3, "b": 1.0, "t": 1e3}
_GPU_MEM = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(Gi|G|GB|GiB|Mi|M|MB|MiB)?\s*$")

MAX_PARAMETERS_B = 10_000.0


def parse_parameters(text: str) -> float:
    """`"7B"` -> 7.0 (billions). Accepts K, M, B, T suffixes; a bare number means billions."""
    match = _PARAMS.match(text)
    if not match:
        raise ValueError(f"parameters {text!r} is not a size; write it like '7B', '1.1B' or '350M'")
    value = float(match.group(1)) * _SCALE_B[(match.group(2) or "b").lower()]
    if value <= 0:
        raise ValueError(f"parameters {text!r} must be greater than zero")
    if value > MAX_PARAMETERS_B:
        raise ValueError(f"parameters {text!r} is larger than {MAX_PARAMETERS_B:.0f}B; check the unit")
    return value


def parse_gpu_memory_gib(text: str) -> float:
    """`"24Gi"`, `"24GB"`, `"24"` -> 24.0. GPU vendors' "GB" is treated as GiB, as GPU labels are."""
    match = _GPU_MEM.match(text)
    if not match:
        raise ValueError(f"gpuMemory {text!r} is not a memory size; write it like '24Gi' or '80GB'")
    value = float(match.group(1))
    unit = match.group(2) or "Gi"
    if unit.startswith("M"):
        value /= 1024.0
    if not 1 <= value <= 1024:
        raise ValueError(f"gpuMemory {text!r} is outside 1Gi..1024Gi")
    return value


_BYTE_SUFFIXES = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
                  "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def parse_quantity_bytes(text: str) -> int:
    """A Kubernetes memory or storage quantity ("8Gi", "500M", "1024") in bytes, rounded up."""
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?", text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a byte quantity like 8Gi, 512Mi or 500M")
    value = Decimal(match.group(1)) * _BYTE_SUFFIXES[match.group(2) or ""]
    return int(value.to_integral_value(rounding=ROUND_CEILING))
