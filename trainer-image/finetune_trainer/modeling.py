"""Loading the base model and tokenizer, and turning them into what a method trains.

Each method's loading and preparation lives in its own module under `finetune_trainer.methods` (full,
lora, qlora, prefix, prompt: one recipe per method); `load_base` and `prepare_for_training` dispatch to the
method the config names. What is shared stays here: model and tokenizer materialization, precision.

Precision: bf16 and fp16 are autocast by accelerate. On CPU, bf16 autocast works but fp16 does not, so fp16
on CPU falls back to fp32 with a warning. A GPU without bf16 support falls back to fp16.

Model URIs (`hf://org/name` with the spec's revision, `s3://`, `pvc://`, `file://`, plain directories) are
materialized by `storage.fetch` under FT_CACHE_DIR.

Chained stages (`TrainerConfig.base`, from spec.baseModel.fromJob): `materialize_start` fetches the base model and
the chain's adapters and merges the adapters into the base, in order, with the streaming merge (`merge.py`) into a
cache directory keyed by the sha256 of the base's files and of each adapter's. The merge is on the 16-bit (or 32-bit)
weights on disk, before any loading: a QLoRA stage then quantizes the merged model, which is the model the earlier
stages produced, rather than merging into 4-bit weights (which would round the earlier updates away). Loading and the
method's preparation then proceed on that directory as on any base model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_operator.contract import ENV_CACHE_DIR, TrainerConfig
from finetune_trainer import methods, provenance
from finetune_trainer.errors import ConfigError, MergeUnsupported
from finetune_trainer.methods.qlora import (
    keep_4bit_weights_unpacked as keep_4bit_weights_unpacked,  # re-exported
)

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where models and data are materialized (FT_CACHE_DIR, else a directory under the temp dir)."""
    path = Path(os.environ.get(ENV_CACHE_DIR) or Path(tempfile.gettempdir()) / "finetune-cache")
    path.mkdir(parents=True, exist_ok=True)
    return path


def materialize_model(uri: str, revision: str | None, cache: Path) -> Path:
    """A local directory holding the model files at `uri` (hf://, s3://, pvc://, file:// or a path)."""
    from finetune_trainer import storage

    path = Path(storage.fetch(uri, cache, revision=revision))
    if not (path / "config.json").is_file():
        raise ConfigError(f"{uri} holds no model (no config.json); point spec.baseModel.uri at a directory "
                          "saved with save_pretrained", reason="InvalidModel")
    return path


@dataclass(frozen=True)
class ChainAdapter:
    """One adapter of a chain as it was merged: its URI and the sha256 of its files (provenance)."""

    uri: str
    files: dict[str, str]  # relative path -> sha256

    @property
    def sha256(self) -> str:
        return provenance.sha256_manifest(self.files)


@dataclass
class StartingModel:
    """What a run loads: `path`, the base model (`base_dir`, spec.baseModel.uri as fetched) with the chain's
    `adapters` merged in, in order; `path` is `base_dir` when there is nothing to merge."""

    path: Path
    base_dir: Path
    adapters: tuple[ChainAdapter, ...] = field(default=())
    _base_files: dict[str, str] | None = field(default=None, repr=False)

    @property
    def base_files(self) -> dict[str, str]:
        """{relative path: sha256} of the base model's files, computed once: the merge's cache key and provenance
        both need them, and a large base takes minutes to hash."""
        if self._base_files is None:
            self._base_files = provenance.sha256_tree(self.base_dir)
        return self._base_files

    def adapter_records(self) -> list[dict[str, str]]:
        """The merged adapters as provenance records them: [{uri, sha256}], in merge order."""
        return [{"uri": a.uri, "sha256": a.sha256} for a in self.adapters]


#: Under the cache: one directory per (base, adapters) combination, named by the digest of their file hashes.
CHAIN_CACHE = "chain"
#: Written last into a merged directory: what it holds; its presence means the merge finished.
CHAIN_RECORD = "chain.json"
#: Files of a saved model that the merge writes itself (weights and config), and weights in other formats (a hub
#: snapshot may hold .bin or .pth copies of the same weights, which would be the unmerged ones); everything else of the
#: base (the tokenizer's files, the chat template) is copied beside the merged weights as it is.
_MERGE_WRITES = ("config.json", "generation_config.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")


def materialize_start(config: TrainerConfig, cache: Path) -> StartingModel:
    """The model a run starts from: spec.baseModel.uri fetched, with `config.base.adapters` (a chained stage's
    earlier adapters, `finetune_operator.chain`) merged into it in order."""
    spec = config.spec
    base_dir = materialize_model(spec.base_model.resolved_uri(), spec.base_model.revision, cache)
    base = config.base
    uris = list(base.adapters) if base is not None else []
    if base is None or not uris:
        return StartingModel(base_dir, base_dir)
    from finetune_trainer import storage

    adapter_dirs = []
    for uri in uris:
        path = Path(storage.fetch(uri, cache))
        if not (path / "adapter_config.json").is_file():
            raise ConfigError(
                f"the chain's adapter {uri} (status.baseJob.adapters of base job {base.name}) holds no "
                "adapter_config.json: it is not a LoRA adapter saved by the trainer", reason="InvalidModel")
        adapter_dirs.append(path)
    adapters = tuple(ChainAdapter(uri, provenance.sha256_tree(path)) for uri, path in zip(uris, adapter_dirs, strict=True))
    base_files = provenance.sha256_tree(base_dir)
    key = hashlib.sha256(json.dumps({"base": base_files, "adapters": [a.files for a in adapters]},
                                    sort_keys=True).encode()).hexdigest()[:24]
    start = StartingModel(cache / CHAIN_CACHE / key, base_dir, adapters, base_files)
    with storage.locked(start.path.with_suffix(".lock")):  # local ranks sharing the cache merge once
        if not (start.path / CHAIN_RECORD).is_file():
            _merge_chain(adapter_dirs, start)
        else:
            log.info("using the cached merge of the chain's %d adapter(s) at %s", len(adapters), start.path)
    return start


def _merge_chain(adapter_dirs: list[Path], start: StartingModel) -> None:
    """Merge the adapters into the base one after another (each merge reads the previous one's output), staged
    beside `start.path` and moved there when complete, so an interrupted merge is never taken for a finished one."""
    from finetune_trainer import merge

    base_dir, out = start.base_dir, start.path
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        current = base_dir
        for i, (adapter, adapter_dir) in enumerate(zip(start.adapters, adapter_dirs, strict=True)):
            target = staging / f"step-{i}"
            try:
                merged = merge.merge_adapter(current, adapter_dir, target)
            except MergeUnsupported as err:
                raise ConfigError(f"the chain's adapter {adapter.uri} cannot be merged into the model it starts "
                                  f"from: {err.message}", reason="MergeUnsupported") from None
            log.info("chain: merged %s into %d weight(s) of %s", adapter.uri, len(merged.merged), current)
            _copy_other_files(base_dir, target)
            if current != base_dir:
                shutil.rmtree(current)  # only the latest merge is needed: at most two copies on disk at once
            current = target
        (current / CHAIN_RECORD).write_text(json.dumps(
            {"baseFilesSha256": provenance.sha256_manifest(start.base_files), "adapters": start.adapter_records()},
            indent=2, sort_keys=True) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(current, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _copy_other_files(base_dir: Path, target: Path) -> None:
    """The base's files the merge does not write (tokenizer, chat template), copied beside the merged weights."""
    for path in sorted(base_dir.iterdir()):
        if path.is_file() and not path.name.startswith(".") and not path.name.endswith(_WEIGHT_SUFFIXES) \
                and path.name not in _MERGE_WRITES and path.name != CHAIN_RECORD:
            shutil.copy(path, target / path.name)


@dataclass(frozen=True)
class Precision:
    """What accelerate autocasts to (`mixed`: "bf16", "fp16" or "no") and the frozen base's dtype."""

    mixed: str
    base_dtype: Any
    warning: str | None = None


def resolve_precision(requested: str, device_type: str) -> Precision:
    import torch

    if requested == "fp16" and device_type == "cpu":
        return Precision("no", torch.float32,
                         "precision fp16 is not supported on CPU (no fp16 autocast); training in fp32")
    if requested == "bf16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        return Precision("fp16", torch.float16, "this GPU does not support bf16; training in fp16")
    if requested == "bf16":
        return Precision("bf16", torch.bfloat16)
    if requested == "fp16":
        return Precision("fp16", torch.float16)
    return Precision("no", torch.float32)


def full_weights_dtype(precision: Precision) -> Any:
    """Dtype of trainable weights in full fine-tuning: bf16 stays bf16 (pure bf16), anything else fp32."""
    import torch

    return torch.bfloat16 if precision.mixed == "bf16" else torch.float32


#: The longest training row (tokens) up to which a CPU run uses transformers' `eager` attention instead of
#: `sdpa`. On CPU, torch's SDPA runs its flash-attention kernel, whose backward is slow on short rows. Measured
#: (bench/attention_bench.py, 2026-12-07, 2-core AMD EPYC with AVX512-BF16, one thread, bf16, the tiny Llama's
#: whole forward + backward): eager took 0.87-0.93 of SDPA's time at micro-batch 4 x 64 to 4 x 512 tokens and
#: 1.22 at 2 x 1,024; the attention kernels alone, 4 heads of 64, eager 1.4 / 4.9 ms against SDPA 8.0 / 17.2 ms
#: at 4 x 60 / 4 x 150. Eager materializes the batch x heads x rows x rows scores, a few MiB per layer at these
#: lengths; on a GPU SDPA (flash attention) stays, whatever the length.
CPU_EAGER_ATTENTION_MAX_ROW = 512
ENV_ATTENTION = "FT_ATTENTION"  # `sdpa` or `eager` forces one (benchmark A/B); unset or `auto`: the rule above


def longest_row(items: Any) -> int:
    """The widest row a training item makes: an example's or packed row's tokens, or a preference pair's
    prompt plus its longer answer."""
    widest = 0
    for item in items:
        if hasattr(item, "prompt_ids"):
            widest = max(widest, len(item.prompt_ids) + max(len(item.chosen_ids), len(item.rejected_ids)))
        else:
            widest = max(widest, len(item.input_ids))
    return widest


def attention_implementation(device_type: str, longest: int) -> tuple[str, str]:
    """(transformers attention implementation, why) for training rows of at most `longest` tokens."""
    forced = os.environ.get(ENV_ATTENTION, "auto").strip() or "auto"
    if forced in ("sdpa", "eager"):
        return forced, f"{ENV_ATTENTION}={forced}"
    if forced != "auto":
        raise ConfigError(f"{ENV_ATTENTION}={forced!r} is not an attention choice; use sdpa, eager or auto")
    if device_type == "cpu" and longest <= CPU_EAGER_ATTENTION_MAX_ROW:
        return "eager", (f"CPU with rows of at most {longest} tokens (<= {CPU_EAGER_ATTENTION_MAX_ROW}): eager attention "
                         "is faster there than SDPA's CPU flash kernel")
    return "sdpa", "SDPA" + (" (flash attention)" if device_type == "cuda" else "")


def use_attention(model: Any, device_type: str, items: Any) -> str:
    """Set the model's attention implementation for training on `items` (see `attention_implementation`)."""
    impl, why = attention_implementation(device_type, longest_row(items))
    if getattr(model.config, "_attn_implementation", None) != impl:
        model.set_attn_implementation(impl)
    log.info("attention: %s (%s)", impl, why)
    return impl


def load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as err:
        raise ConfigError(f"no usable tokenizer in the base model at {model_dir}: {err}",
                          reason="InvalidModel") from None
    if tokenizer.pad_token_id is None:
        # Padding positions carry no loss and no attention, so any token id serves; EOS is the usual pick.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(model_dir: Path, method: str, precision: Precision, device: Any, config: TrainerConfig | None,
              quantized: bool | None = None) -> Any:
    """The base causal LM for `method`, loaded as its recipe says (`quantized`: force the qlora 4-bit
    loading on or off, e.g. a 16-bit base to merge a qlora adapter into)."""
    from transformers import AutoModelForCausalLM

    if quantized is not None:
        method = "qlora" if quantized else ("lora" if method == "qlora" else method)
    kwargs = methods.get(method).load_kwargs(config, precision, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load the base model from {model_dir}: {err}", reason="InvalidModel") from None
    # No KV cache while training: it is useless there, and with packing it would disable the
    # per-example attention masks (see data.py).
    model.config.use_cache = False
    return model


def prepare_for_training(model: Any, config: TrainerConfig, adapter_dir: Path | None = None) -> Any:
    """Freeze/adapt `model` for the config's method; `adapter_dir` resumes an adapter from a checkpoint."""
    return methods.get(config.method).prepare(model, config, adapter_dir)


def linear_module_names(model: Any) -> list[str]:
    """The distinct last name parts of the model's linear layers (what targetModules can name)."""
    import torch

    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) or module.__class__.__name__ in ("Linear4bit", "Linear8bitLt")})


def trainable_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts (4-bit weights count as their element count)."""
    trainable = total = 0
    for param in model.parameters():
        count = param.numel()
        if param.__class__.__name__ == "Params4bit":
            count *= 2  # two 4-bit values per stored byte
        total += count
        trainable += count if param.requires_grad else 0
    return trainable, total
