"""A LoRA adapter merged into its base model tensor by tensor: `merged/` without two models in memory.

peft's `PeftModel.from_pretrained(base).merge_and_unload()` followed by `save_pretrained` holds the whole base
model (a 7B model in bf16: about 14 GB of host memory) for a merge that only changes the adapted matrices.
This merge never builds a model. For each safetensors file of the base it writes the output file's header
first (a merged tensor keeps its name, dtype and shape, so the header is known from the input's), then
streams the tensors through in file order: read one (`safetensors.safe_open`), add the adapter's update if it
has a LoRA pair, write its bytes, drop it. What it holds at once is one tensor plus, for a merged weight, its
fp32 update and the pair A, B: `Merged.peak_bytes` counts exactly that (a `Ledger` of the tensors held), and
`Merged.bound_bytes` is that bound for the largest weight, well within "one shard plus one layer" whatever
the shard size.

The update is peft's (`tuners/lora/layer.py`, `Linear.get_delta_weight` and `merge`, peft 0.21):
`W += transpose(B @ A, fan_in_fan_out) * scaling` with `scaling = alpha / r` (`alpha / sqrt(r)` with
use_rslora), the update computed in fp32 and added in place to the weight in its own dtype from disk (so a
bf16 base gets `bf16(float(W) + update)`, as peft's `weight.data += delta` does); the result is bit-identical
to peft's merge of an fp32 adapter. Embedding adapters (`lora_embedding_A/B`) get peft's
`transpose(B @ A, True) * scaling`. Where peft saved a copy of an adapted embedding layer's weight
(`<module>.base_layer.weight`, for embed_tokens and lm_head), that copy is what peft loads and so what is
merged into. QLoRA adapters merge the same way into the 16-bit base on disk: the 4-bit weights exist only in
the training process and are never merged into.

Anything this merge cannot reproduce exactly (DoRA, LoRA biases, rank or alpha patterns, `modules_to_save`,
adapter tensors of another kind, a target the base files do not hold, a quantized base, adapters on a matrix
tied to the input embeddings) raises `MergeUnsupported` naming what and the way out, rather than writing a
merge that differs from the adapter.

Output: one file per base file, named as transformers names them (`model.safetensors`, or
`model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`), in the safetensors format (8-byte
little-endian header length, JSON header with each tensor's dtype, shape and data offsets, then the data),
then `config.json` (the weights' dtype, `use_cache` on) and `generation_config.json`. The tokenizer is the
caller's to save. The files are written here rather than with `safetensors.torch.save_file` because that
takes a whole file's tensors at once (a single-file 7B base: the whole model); reading goes through the
library (`safe_open`), and the tests read every written file back with it.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_trainer.errors import MergeUnsupported

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
#: safetensors dtype -> the config's dtype name, for the float dtypes a merged model can be in.
CONFIG_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
#: The adapter's prefix before the module path (peft's PeftModelForCausalLM: base_model.model.<module>).
PEFT_PREFIX = "base_model.model."
#: adapter_config.json fields (peft 0.21) whose set values make the adapter's model something other than
#: base + scaling * B @ A on the base as stored: each one refused, the variants named where known.
UNSUPPORTED_CONFIG = {
    "use_dora": "DoRA, which rescales each merged column by a learned magnitude",
    "lora_bias": "LoRA biases, which add to the base layer's bias",
    "modules_to_save": "modules_to_save, which replace whole modules",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens",
    "layer_replication": "replicated layers",
    "alora_invocation_tokens": "activated LoRA, active only after its invocation tokens",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "a LoRA variant (use_bdlora)",
    "arrow_config": "Arrow routing between adapters",
    "kasa_config": "a LoRA variant (kasa_config)",
    "monteclora_config": "a LoRA variant (monteclora_config)",
    "velora_config": "a LoRA variant (velora_config)",
}
#: init_lora_weights values that leave the base weights as stored (PiSSA, OLoRA, LoftQ, CorDA change them).
PLAIN_INIT = (True, False, "gaussian")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file, from its header."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class Pair:
    """One LoRA pair of the adapter and the base weight it updates."""

    target: str  # the base tensor, e.g. model.layers.0.self_attn.q_proj.weight
    a_key: str
    b_key: str
    embedding: bool  # lora_embedding_A/B: peft's Embedding layer (update transposed)


@dataclass
class Ledger:
    """Bytes of tensors held at once: what the merge holds, counted where it allocates and drops."""

    held: int = 0
    peak: int = 0

    def hold(self, nbytes: int) -> None:
        self.held += nbytes
        self.peak = max(self.peak, self.held)

    def drop(self, nbytes: int) -> None:
        self.held -= nbytes


@dataclass
class Merged:
    """What `merge_adapter` wrote and held."""

    out_dir: Path
    files: list[str]
    merged: list[str]  # base tensors that got an update
    dtype: str  # config dtype name of the merged weights
    peak_bytes: int  # bytes of tensors held at once (Ledger)
    bound_bytes: int  # the largest tensor, or the largest merged weight with its fp32 update, A and B


# ------------------------------------------------------------------------------------------------
# Reading headers and the adapter
# ------------------------------------------------------------------------------------------------


def read_header(path: Path) -> list[TensorInfo]:
    """The tensors of a safetensors file in file order (the format's header: 8-byte length, then JSON)."""
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    header.pop("__metadata__", None)
    infos = []
    for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        start, end = entry["data_offsets"]
        infos.append(TensorInfo(name, entry["dtype"], tuple(entry["shape"]), end - start))
    return infos


def base_files(base_dir: Path) -> list[Path]:
    """The base's safetensors files (the index's shards in name order, or the single file)."""
    index = base_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [base_dir / name for name in sorted(set(weight_map.values()))]
    if (base_dir / SINGLE_FILE).is_file():
        return [base_dir / SINGLE_FILE]
    raise MergeUnsupported(
        f"the base model at {base_dir} has no safetensors weights ({SINGLE_FILE} or {INDEX_FILE}): the merge "
        "reads them shard by shard. Save the base with save_pretrained(safe_serialization=True), or set "
        "spec.output.saveMerged: false and serve model/ as an adapter")


def scaling(config: Mapping[str, Any]) -> float:
    """peft's LoRA scaling: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora."""
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def check_config(config: Mapping[str, Any]) -> None:
    """Refuse adapter configs whose merge is not `W += scaling * B @ A` (see UNSUPPORTED_CONFIG)."""
    if config.get("peft_type") != "LORA":
        raise MergeUnsupported(f"the adapter is {config.get('peft_type')}, not LoRA: only LoRA adapters merge into "
                               "weights; set spec.output.saveMerged: false")
    for key, what in UNSUPPORTED_CONFIG.items():
        if config.get(key):
            raise MergeUnsupported(f"the adapter uses {what} ({key}={config[key]!r}), which the streaming merge "
                                   "does not reproduce; set spec.output.saveMerged: false and serve model/ as an adapter")
    if config.get("init_lora_weights", True) not in PLAIN_INIT:
        raise MergeUnsupported(f"the adapter was initialized with init_lora_weights={config['init_lora_weights']!r}, "
                               "which trains against changed base weights; set spec.output.saveMerged: false")


def pairs(adapter_keys: Iterable[str]) -> tuple[list[Pair], dict[str, str]]:
    """The LoRA pairs among the adapter's tensor names, and the base weights the adapter stores a copy of
    (peft saves `<module>.base_layer.weight` of embedding layers it adapts; base tensor -> adapter key). Any
    other tensor is refused (MergeUnsupported)."""
    kinds = {".lora_A.weight": ("A", False), ".lora_B.weight": ("B", False),
             ".lora_embedding_A": ("A", True), ".lora_embedding_B": ("B", True)}
    found: dict[tuple[str, bool], dict[str, str]] = {}
    copies: dict[str, str] = {}
    for key in sorted(adapter_keys):
        if key.startswith(PEFT_PREFIX) and key.endswith(".base_layer.weight"):
            copies[key[len(PEFT_PREFIX):-len(".base_layer.weight")] + ".weight"] = key
            continue
        for suffix, (half, embedding) in kinds.items():
            if key.endswith(suffix) and key.startswith(PEFT_PREFIX):
                module = key[len(PEFT_PREFIX):-len(suffix)]
                found.setdefault((module, embedding), {})[half] = key
                break
        else:
            raise MergeUnsupported(
                f"adapter tensor {key} is not a LoRA A/B matrix of a Linear or Embedding layer: the streaming merge "
                "cannot merge it exactly. Set spec.output.saveMerged: false and serve model/ as an adapter")
    out = []
    for (module, embedding), halves in sorted(found.items()):
        if set(halves) != {"A", "B"}:
            raise MergeUnsupported(f"adapter module {module} has lora_{''.join(halves)} without its pair")
        out.append(Pair(f"{module}.weight", halves["A"], halves["B"], embedding))
    return out, copies


# ------------------------------------------------------------------------------------------------
# Output files (pure)
# ------------------------------------------------------------------------------------------------


def header_bytes(infos: list[TensorInfo]) -> bytes:
    """The safetensors header of a file holding `infos` in this order: the 8-byte little-endian length, then
    the JSON (data offsets contiguous from 0, `__metadata__` format pt as transformers writes it), padded with
    spaces to a multiple of 8 bytes as the safetensors library pads it."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for info in infos:
        header[info.name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def shard_names(count: int) -> list[str]:
    """transformers' file names: one file, or model-0000i-of-0000n.safetensors."""
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def merged_dtype(files: list[list[TensorInfo]]) -> str:
    """The config dtype of the merged model: the float dtype holding most of its bytes."""
    totals: dict[str, int] = {}
    for tensors in files:
        for info in tensors:
            if info.dtype in CONFIG_DTYPES:
                totals[info.dtype] = totals.get(info.dtype, 0) + info.nbytes
    if not totals:
        raise MergeUnsupported("the base model holds no float32, bfloat16 or float16 weights to merge into")
    return CONFIG_DTYPES[max(totals, key=lambda d: totals[d])]


# ------------------------------------------------------------------------------------------------
# The merge
# ------------------------------------------------------------------------------------------------


def _check_base_config(config: Any, targets: list[Pair], stored: set[str]) -> None:
    if getattr(config, "quantization_config", None):
        raise MergeUnsupported(
            "the base model on disk is quantized (quantization_config in its config.json): LoRA merges into 16- or "
            "32-bit weights only. Point spec.baseModel.uri at the unquantized model, or set spec.output.saveMerged: "
            "false")
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for pair in targets:
        module = pair.target.rsplit(".", 1)[0]
        if tied and (pair.embedding or module.rsplit(".", 1)[-1] == "lm_head" or pair.target not in stored):
            raise MergeUnsupported(
                f"the adapter updates {module}, whose matrix the base ties to the input embeddings "
                "(tie_word_embeddings): merged into the one shared matrix it would change both ends of the model. "
                f"Leave {module.rsplit('.', 1)[-1]} out of spec.lora.targetModules, or set spec.output.saveMerged: false")
        if pair.target not in stored:
            raise MergeUnsupported(
                f"the adapter updates {module}, but the base model's files hold no tensor {pair.target}: the "
                "streaming merge cannot place the update. Set spec.output.saveMerged: false and serve model/ as an "
                "adapter")


def _stored_copy(name: str, tensor: Any, copy: Any) -> Any:
    """The adapter's stored copy of a base weight, in the base's dtype: peft loads it over the base's (a
    qlora run stores its 16-bit rounding of lm_head, say), so the adapter's model is built on it. A copy of
    another shape (a resized vocabulary) is refused."""
    if tuple(copy.shape) != tuple(tensor.shape):
        raise MergeUnsupported(
            f"the adapter stores its own {name} of shape {tuple(copy.shape)}, the base's is {tuple(tensor.shape)} "
            "(a resized vocabulary): set spec.output.saveMerged: false")
    return copy.to(tensor.dtype)


def _update(pair: Pair, weight: Any, a: Any, b: Any, scale: float, fan_in_fan_out: bool, ledger: Ledger) -> Any:
    """weight += transpose(B @ A) * scale, as peft merges it (fp32 update, added in the weight's dtype)."""
    import torch

    if weight.dim() != 2:
        raise MergeUnsupported(f"{pair.target} has shape {tuple(weight.shape)}: only 2-D (Linear, Embedding) "
                               "weights are merged; set spec.output.saveMerged: false")
    delta = b.to(torch.float32) @ a.to(torch.float32)
    ledger.hold(delta.nbytes)
    delta.mul_(scale)  # in place: the same rounding as peft's `(B @ A) * scaling`, one fp32 buffer less
    if pair.embedding or fan_in_fan_out:
        delta = delta.T
    if tuple(delta.shape) != tuple(weight.shape):
        raise MergeUnsupported(f"the adapter's update for {pair.target} has shape {tuple(delta.shape)}, the base "
                               f"weight {tuple(weight.shape)}: the adapter was trained on another model")
    weight.add_(delta)
    ledger.drop(delta.nbytes)
    return weight


def merge_adapter(base_dir: Path, adapter_dir: Path, out_dir: Path) -> Merged:
    """Merge the LoRA adapter in `adapter_dir` into the base in `base_dir`, writing `out_dir` tensor by tensor."""
    from safetensors import safe_open
    from transformers import AutoConfig

    adapter_config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    check_config(adapter_config)
    scale, fan_in_fan_out = scaling(adapter_config), bool(adapter_config.get("fan_in_fan_out"))
    adapter_path = adapter_dir / ADAPTER_WEIGHTS
    if not adapter_path.is_file():
        raise MergeUnsupported(f"no {ADAPTER_WEIGHTS} in {adapter_dir}: the adapter was not saved as safetensors")
    with safe_open(str(adapter_path), framework="pt") as adapter:
        targets, copies = pairs(adapter.keys())
        # A and B as the merge holds them: upcast to fp32 at most
        pair_bytes = {p.target: sum(4 * math.prod(adapter.get_slice(k).get_shape()) for k in (p.a_key, p.b_key))
                      for p in targets}
    by_target = {p.target: p for p in targets}

    files = base_files(base_dir)
    inputs = [read_header(path) for path in files]
    infos = {info.name: info for tensors in inputs for info in tensors}
    _check_base_config(AutoConfig.from_pretrained(str(base_dir)), targets, set(infos))
    for pair in targets:
        if infos[pair.target].dtype not in CONFIG_DTYPES:
            raise MergeUnsupported(f"{pair.target} is {infos[pair.target].dtype} in the base files: LoRA merges "
                                   "into 16- or 32-bit weights only; set spec.output.saveMerged: false")
    dtype = merged_dtype(inputs)
    # Held at once, at most: the largest tensor, or a merged weight with its fp32 update, A and B.
    bound = max(info.nbytes + (4 * math.prod(info.shape) + pair_bytes[name] if name in by_target else 0)
                for name, info in infos.items())

    names = shard_names(len(files))
    out_dir.mkdir(parents=True, exist_ok=True)
    ledger = Ledger()
    merged: list[str] = []
    with safe_open(str(adapter_path), framework="pt") as adapter:
        for path, tensors, name in zip(files, inputs, names, strict=True):
            with open(out_dir / name, "wb") as out:
                out.write(header_bytes(tensors))
                for info in tensors:
                    # One open per tensor: the base file's memory map is released at once, so its pages never
                    # stay mapped (and resident) in this process beyond the tensor being read.
                    with safe_open(str(path), framework="pt") as fh:
                        tensor = fh.get_tensor(info.name)
                    ledger.hold(tensor.nbytes)
                    if info.name in copies:
                        tensor = _stored_copy(info.name, tensor, adapter.get_tensor(copies[info.name]))
                    pair = by_target.get(info.name)
                    if pair is not None:
                        a, b = adapter.get_tensor(pair.a_key), adapter.get_tensor(pair.b_key)
                        ledger.hold(pair_bytes[info.name])
                        tensor = _update(pair, tensor, a, b, scale, fan_in_fan_out, ledger)
                        ledger.drop(pair_bytes[info.name])
                        del a, b
                        merged.append(info.name)
                    _write_tensor(out, info, tensor)
                    ledger.drop(info.nbytes)
                    del tensor
            log.info("merged %s (%d tensors)", name, len(tensors))
    if len(names) > 1:
        weight_map = {info.name: name for tensors, name in zip(inputs, names, strict=True) for info in tensors}
        (out_dir / INDEX_FILE).write_text(json.dumps(
            {"metadata": {"total_size": sum(i.nbytes for i in infos.values())},
             "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    _write_config(base_dir, out_dir, dtype)
    return Merged(out_dir, names, merged, dtype, ledger.peak, bound)


def _write_tensor(out: Any, info: TensorInfo, tensor: Any) -> None:
    """The tensor's bytes, as the header announced them (same shape and size: a merge keeps both)."""
    import torch

    data = tensor.contiguous().reshape(-1).view(torch.uint8)
    if tuple(tensor.shape) != info.shape or data.numel() != info.nbytes:
        raise RuntimeError(f"{info.name}: {tuple(tensor.shape)} of {data.numel()} bytes, the header says "
                           f"{info.shape} of {info.nbytes}")
    out.write(data.numpy().data)


def _write_config(base_dir: Path, out_dir: Path, dtype: str) -> None:
    """config.json as the base's, with the merged weights' dtype and the KV cache on (training turned it off);
    generation_config.json copied."""
    config = json.loads((base_dir / "config.json").read_text())
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
    for key in keys:
        config[key] = dtype
    config["use_cache"] = True
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if (base_dir / "generation_config.json").is_file():
        shutil.copy(base_dir / "generation_config.json", out_dir / "generation_config.json")
