"""A model's architecture read from its files: `config.json` and the safetensors headers, without torch.

`read_architecture(directory)` returns an `Architecture`: the exact parameter count, layers, hidden size,
MLP (intermediate) size, vocabulary, attention and key/value heads (GQA), whether the input embeddings and
the output head share one matrix, and the weights' dtype. The sizing planner uses it instead of guessing the
shape from a parameter count (`sizing.estimate_memory`), and `finetune plan --inspect` prints it.

Where the numbers come from:

- The shape from `config.json` (Hugging Face field names; `text_config` when the model nests its language
  model there, as multimodal models do): `hidden_size`, `num_hidden_layers`, `intermediate_size`,
  `vocab_size`, `num_attention_heads`, `num_key_value_heads` (absent: as many as the attention heads,
  multi-head attention), `head_dim` (absent: hidden / heads), `tie_word_embeddings`, `dtype` (older files:
  `torch_dtype`). GPT-2-style names (`n_embd`, `n_layer`, `n_head`, `n_inner`) are read as well.
- The parameter count from the safetensors headers when the weights are there: each `*.safetensors` file
  starts with an 8-byte little-endian header length N and N bytes of JSON mapping each tensor name to its
  `dtype`, `shape` and `data_offsets`; only those 8 + N bytes are read, never the tensors. A sharded model's
  `model.safetensors.index.json` (`weight_map`: tensor -> shard file) names the shards. Tied weights are
  saved once, so the count equals torch's `sum(p.numel() for p in model.parameters())`.
- Without weight files (only the config and perhaps the index downloaded), or for a quantized checkpoint
  (`quantization_config`: packed 4-bit tensors hold two parameters per byte), the count is computed from
  the config for a Llama-style decoder: embeddings V*h, per layer q and o (h * heads*head_dim each), k and v
  (h * kv_heads*head_dim each), a gated MLP (3*h*I), two RMSNorms (2h), a final norm (h), and the head
  (V*h) unless tied; biases where `attention_bias` or `mlp_bias` say so.

Every problem is an `ArchitectureError` naming the file and the field.
"""

from __future__ import annotations

import json
import math
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
#: The safetensors reference implementation refuses headers above 100 MB; so does this reader.
MAX_HEADER_BYTES = 100 * 1024 * 1024
_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "F8_E4M3": "float8_e4m3fn",
           "F8_E5M2": "float8_e5m2"}
#: Config field -> other names models use for it (first found wins).
_ALIASES = {
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads"),
    "intermediate_size": ("intermediate_size", "n_inner", "ffn_dim"),
    "vocab_size": ("vocab_size",),
}


class ArchitectureError(ValueError):
    """A model directory whose architecture cannot be read; the message names the file and the field."""


@dataclass(frozen=True)
class Architecture:
    """A decoder's shape and exact size, as read from its files."""

    parameters: int
    #: "safetensors" (the tensor shapes) or "config" (computed from config.json; see the module docstring)
    parameters_source: str
    layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    attention_heads: int
    kv_heads: int
    head_dim: int
    tied_embeddings: bool
    #: torch's name of the weights' dtype (`bfloat16`), or None when neither the config nor a header says
    dtype: str | None
    model_type: str | None = None
    #: the directory read (shown in plans)
    path: str = ""

    @property
    def q_dim(self) -> int:
        """Width of the query projection's output: attention heads x head dim."""
        return self.attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of the key (and of the value) projection's output: KV heads x head dim (< q_dim with GQA)."""
        return self.kv_heads * self.head_dim

    def describe(self) -> str:
        """One line for plans and the CLI."""
        attention = (f"{self.attention_heads} attention heads" if self.kv_heads == self.attention_heads
                     else f"{self.attention_heads} attention / {self.kv_heads} KV heads (GQA)")
        return (f"{self.parameters:,} parameters (from the {self.parameters_source}), {self.layers} layers, hidden "
                f"{self.hidden_size}, MLP {self.intermediate_size}, vocabulary {self.vocab_size:,}, {attention}, "
                f"{'tied' if self.tied_embeddings else 'untied'} embeddings, {self.dtype or 'dtype not given'}")


# ------------------------------------------------------------------------------------------------
# config.json
# ------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArchitectureError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ArchitectureError(f"{path}: cannot be read: {err}") from None
    except json.JSONDecodeError as err:
        raise ArchitectureError(f"{path}: not valid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None


def _positive_int(config: dict[str, Any], field: str, where: Path) -> int:
    names = _ALIASES.get(field, (field,))
    for name in names:
        value = config.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ArchitectureError(f"{where}: field {name!r} must be a positive whole number (got {value!r})")
        return value
    also = f" (also looked for {', '.join(repr(n) for n in names[1:])})" if len(names) > 1 else ""
    raise ArchitectureError(f"{where}: field {field!r} is missing{also}; the planner needs it to size the model")


def _language_config(config: Any, where: Path) -> dict[str, Any]:
    if not isinstance(config, dict):
        raise ArchitectureError(f"{where}: must be a JSON object of the model's settings")
    nested = config.get("text_config")
    if not any(n in config for n in _ALIASES["hidden_size"]) and isinstance(nested, dict):
        # the top level's dtype and tie apply where the nested config leaves them out
        inherited = {k: config[k] for k in ("dtype", "torch_dtype", "tie_word_embeddings")
                     if config.get(k) is not None and nested.get(k) is None}
        return {**nested, **inherited}
    return config


def config_parameters(*, layers: int, hidden: int, intermediate: int, vocab: int, q_dim: int, kv_dim: int,
                      tied: bool, attention_bias: bool = False, mlp_bias: bool = False) -> int:
    """Parameters of a Llama-style decoder of this shape (see the module docstring)."""
    attention = hidden * q_dim * 2 + hidden * kv_dim * 2
    if attention_bias:
        attention += q_dim + 2 * kv_dim + hidden
    mlp = 3 * hidden * intermediate + ((2 * intermediate + hidden) if mlp_bias else 0)
    per_layer = attention + mlp + 2 * hidden
    return vocab * hidden * (1 if tied else 2) + layers * per_layer + hidden


# ------------------------------------------------------------------------------------------------
# safetensors headers
# ------------------------------------------------------------------------------------------------


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of one safetensors file (tensor name -> dtype, shape, data_offsets), reading only it."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise ArchitectureError(f"{path}: shorter than the 8-byte header length; not a safetensors file")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise ArchitectureError(
                    f"{path}: header length {length:,} bytes does not fit the file ({size:,} bytes); "
                    "not a safetensors file, or a truncated download")
            raw = fh.read(length)
    except FileNotFoundError:
        raise ArchitectureError(f"{path}: no such file") from None
    except OSError as err:
        raise ArchitectureError(f"{path}: cannot be read: {err}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArchitectureError(f"{path}: the safetensors header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise ArchitectureError(f"{path}: the safetensors header must be a JSON object")
    data_size = size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
                or not isinstance(entry.get("dtype"), str)):
            raise ArchitectureError(f"{path}: tensor {name!r} needs a 'dtype' string and a 'shape' list of sizes")
        if isinstance(offsets, list) and len(offsets) == 2 and isinstance(offsets[1], int) and offsets[1] > data_size:
            # Checked against the file size only (no tensor bytes are read): catches a partial download.
            raise ArchitectureError(
                f"{path}: tensor {name!r} ends at byte {offsets[1]:,} of the data but the file holds "
                f"{data_size:,}; a truncated download?")
    return header


def _tensors(header: dict[str, Any]) -> dict[str, tuple[str, int]]:
    return {name: (entry["dtype"], math.prod(entry["shape"])) for name, entry in header.items()
            if name != "__metadata__"}


def _weight_files(directory: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files holding the model, and the index's tensor -> file map for a sharded model."""
    index_path = directory / INDEX
    if index_path.exists():
        index = _read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map or not all(
                isinstance(v, str) and "/" not in v and v not in ("", ".", "..") for v in weight_map.values()):
            raise ArchitectureError(f"{index_path}: field 'weight_map' must map tensor names to shard file names")
        shards = sorted(set(weight_map.values()))
        present = [s for s in shards if (directory / s).exists()]
        if not present:
            return [], weight_map  # only the index was downloaded: count from the config
        if len(present) < len(shards):
            missing = [s for s in shards if s not in present]
            raise ArchitectureError(f"{index_path}: shard {missing[0]!r} named in 'weight_map' is not in {directory} "
                                    f"({len(missing)} of {len(shards)} missing); an incomplete download?")
        return [directory / s for s in shards], weight_map
    # adapter_model.safetensors is a peft adapter saved next to a model, not part of the base
    files = sorted(p for p in directory.glob("*.safetensors") if not p.name.startswith("adapter_"))
    return files, None


# ------------------------------------------------------------------------------------------------
# The whole model
# ------------------------------------------------------------------------------------------------


def read_architecture(directory: str | Path) -> Architecture:
    """Read the architecture of the model in `directory` (see the module docstring)."""
    root = Path(directory)
    if root.is_file() and root.name == CONFIG:
        root = root.parent
    if not root.is_dir():
        raise ArchitectureError(f"{root}: not a directory; inspection needs the model's folder with {CONFIG}")
    where = root / CONFIG
    config = _language_config(_read_json(where), where)

    hidden = _positive_int(config, "hidden_size", where)
    layers = _positive_int(config, "num_hidden_layers", where)
    heads = _positive_int(config, "num_attention_heads", where)
    vocab = _positive_int(config, "vocab_size", where)
    intermediate = _positive_int(config, "intermediate_size", where)
    kv_heads = _positive_int(config, "num_key_value_heads", where) if config.get("num_key_value_heads") else heads
    if heads % kv_heads:
        raise ArchitectureError(f"{where}: field 'num_key_value_heads' ({kv_heads}) must divide "
                                f"'num_attention_heads' ({heads})")
    if config.get("head_dim"):
        head_dim = _positive_int(config, "head_dim", where)
    elif hidden % heads:
        raise ArchitectureError(f"{where}: field 'hidden_size' ({hidden}) is not a multiple of 'num_attention_heads' "
                                f"({heads}) and 'head_dim' is not given")
    else:
        head_dim = hidden // heads

    files, weight_map = _weight_files(root)
    tensors: dict[str, tuple[str, int]] = {}
    for file in files:
        found = _tensors(read_safetensors_header(file))
        if weight_map is not None:
            for name, shard in weight_map.items():
                if shard == file.name and name not in found:
                    raise ArchitectureError(f"{root / INDEX}: tensor {name!r} is mapped to {file.name!r}, whose "
                                            "header does not list it; the index and the shards disagree")
        tensors.update(found)

    tie = config.get("tie_word_embeddings")
    if tie is not None and not isinstance(tie, bool):
        raise ArchitectureError(f"{where}: field 'tie_word_embeddings' must be true or false (got {tie!r})")
    if tie is None:
        # Not in the config: the saved tensors tell (a tied head is not saved); without them, count it untied
        # (the larger estimate).
        tie = bool(tensors) and not any(name.endswith("lm_head.weight") for name in tensors)

    dtype = config.get("dtype") or config.get("torch_dtype")
    if dtype is not None and not isinstance(dtype, str):
        raise ArchitectureError(f"{where}: field 'dtype' must be a string such as 'bfloat16' (got {dtype!r})")
    if dtype is None and tensors:
        weighted: Counter[str] = Counter()
        for kind, count in tensors.values():
            weighted[kind] += count
        top = weighted.most_common(1)[0][0]
        dtype = _DTYPES.get(top, top)

    quantized = "quantization_config" in config
    if tensors and not quantized:
        parameters, source = sum(count for _, count in tensors.values()), "safetensors headers"
    else:
        parameters = config_parameters(layers=layers, hidden=hidden, intermediate=intermediate, vocab=vocab,
                                       q_dim=heads * head_dim, kv_dim=kv_heads * head_dim, tied=tie,
                                       attention_bias=bool(config.get("attention_bias")),
                                       mlp_bias=bool(config.get("mlp_bias")))
        source = "config.json" + (" (quantized checkpoint: packed tensors do not give the count)" if quantized else "")
    model_type = config.get("model_type")
    return Architecture(
        parameters=parameters, parameters_source=source, layers=layers, hidden_size=hidden,
        intermediate_size=intermediate, vocab_size=vocab, attention_heads=heads, kv_heads=kv_heads,
        head_dim=head_dim, tied_embeddings=tie, dtype=dtype,
        model_type=model_type if isinstance(model_type, str) else None, path=str(root),
    )
