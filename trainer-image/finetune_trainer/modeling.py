"""Loading the base model and tokenizer, and turning them into what a method trains.

Each method's loading and preparation lives in its own module under `finetune_trainer.methods` (full,
lora, qlora, prefix, prompt: one recipe per method); `load_base` and `prepare_for_training` dispatch to the
method the config names. What is shared stays here: model and tokenizer materialization, precision.

Precision: bf16 and fp16 are autocast by accelerate. On CPU, bf16 autocast works but fp16 does not, so fp16
on CPU falls back to fp32 with a warning. A GPU without bf16 support falls back to fp16.

Model URIs (`hf://org/name` with the spec's revision, `s3://`, `pvc://`, `file://`, plain directories) are
materialized by `storage.fetch` under FT_CACHE_DIR.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_operator.contract import ENV_CACHE_DIR, TrainerConfig
from finetune_trainer import methods
from finetune_trainer.errors import ConfigError
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
