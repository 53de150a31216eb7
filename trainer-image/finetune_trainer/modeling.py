"""Loading the base model and tokenizer, and turning them into what a method trains.

- `full`: every weight trains. With `precision: bf16` the weights, gradients and AdamW states are all
  bf16 (as torchtune trains by default): 8 bytes per parameter, which is what the model-size table's
  7B full = 4x24GB assumes; fp32 master weights would need 16 and not fit. With fp16 or fp32 the weights
  are fp32 (fp16 autocasts on top: pure fp16 training diverges) at 16 bytes per parameter.
- `lora`: the base is loaded in the training precision and frozen; peft adds adapters (kept in fp32 by
  peft's `autocast_adapter_dtype`) on `spec.lora.targetModules` (`all_linear` -> peft's "all-linear").
- `qlora`: the base is loaded 4- (or 8-) bit with bitsandbytes per `spec.quantization` (nf4 and double
  quantization by default), prepared with `prepare_model_for_kbit_training` (norms upcast, base frozen),
  then LoRA as above.

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
from finetune_trainer.errors import ConfigError

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


def _quantization_config(config: TrainerConfig, device_type: str) -> tuple[Any, str | None]:
    import torch
    from transformers import BitsAndBytesConfig

    q = config.spec.resolved_quantization()
    compute = getattr(torch, q.compute_dtype)
    warning = None
    if device_type == "cpu" and compute == torch.float16:
        compute, warning = torch.float32, "quantization.computeDtype float16 is not supported on CPU; using float32"
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True), warning
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=torch.uint8,
    ), warning


def load_base(model_dir: Path, method: str, precision: Precision, device: Any, config: TrainerConfig,
              quantized: bool | None = None) -> Any:
    """The base causal LM for `method` (quantized for qlora unless `quantized=False`)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    if quantized if quantized is not None else method == "qlora":
        kwargs["quantization_config"], warning = _quantization_config(config, device.type)
        if warning:
            log.warning(warning)
        kwargs["device_map"] = {"": device}
        kwargs["dtype"] = kwargs["quantization_config"].bnb_4bit_compute_dtype \
            if getattr(kwargs["quantization_config"], "load_in_4bit", False) else precision.base_dtype
    else:
        kwargs["dtype"] = full_weights_dtype(precision) if method == "full" else precision.base_dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load the base model from {model_dir}: {err}", reason="InvalidModel") from None
    # No KV cache while training: it is useless there, and with packing it would disable the
    # per-example attention masks (see data.py).
    model.config.use_cache = False
    return model


def target_modules(config: TrainerConfig) -> list[str] | str:
    targets = list(config.spec.lora.target_modules)
    return "all-linear" if targets == ["all_linear"] else targets


def lora_config(config: TrainerConfig) -> Any:
    from peft import LoraConfig

    lora = config.spec.lora
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target_modules(config),
        bias="none",
        task_type="CAUSAL_LM",
    )


def prepare_for_training(model: Any, config: TrainerConfig, adapter_dir: Path | None = None) -> Any:
    """Freeze/adapt `model` for the method; `adapter_dir` resumes an adapter from a checkpoint."""
    method = config.method
    checkpointing = config.spec.hyperparameters.gradient_checkpointing
    gc_kwargs = {"use_reentrant": False}
    if method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs=gc_kwargs)
        keep_4bit_weights_unpacked(model)  # the model is evaluated before and during training
    elif checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=gc_kwargs)
    if method == "full":
        return model
    from peft import PeftModel, get_peft_model

    try:
        if adapter_dir is not None:
            return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
        return get_peft_model(model, lora_config(config))
    except ValueError as err:
        # peft names the missing modules; add which field to change and what the model has.
        raise ConfigError(f"spec.lora.targetModules {config.spec.lora.target_modules}: {err} Linear modules "
                          f"of this model: {', '.join(linear_module_names(model))} (or all-linear)",
                          reason="InvalidConfig") from None


def keep_4bit_weights_unpacked(model: Any) -> int:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference; returns how many layers it touched.

    On a CPU with AVX512-BF16, bitsandbytes' Linear4bit converts its weight to a CPU inference layout on the
    first forward in eval mode without gradients (the base evaluation, eval losses at checkpoints) and
    never converts it back. Training after that runs on the repacked data, and its backward dequantizes it
    as if it were not repacked: the adapters get wrong gradients (measured on a tiny Llama: gradient norm
    0.66 instead of 1.64 after one evaluation; QLoRA then trained to a held-out loss 0.045 above the same
    recipe in HF Trainer, which does not evaluate first; bench/throughput_bench.py). Related: bitsandbytes
    issue #2078 (the same packing, not undone by `.to()`). A no-op without 4-bit layers and on GPUs.
    """
    touched = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            touched += 1
    return touched


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
