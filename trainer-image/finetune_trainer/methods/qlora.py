"""`qlora`: the base is loaded 4- (or 8-) bit with bitsandbytes per `spec.quantization` (nf4 and double
quantization by default), prepared with `prepare_model_for_kbit_training` (norms upcast, base frozen),
then LoRA as in `lora`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_trainer.methods import lora
from finetune_trainer.methods.base import CHECKPOINTING_KWARGS, TrainingMethod

if TYPE_CHECKING:
    from finetune_operator.contract import TrainerConfig
    from finetune_operator.spec import FineTuneJobSpec
    from finetune_trainer.modeling import Precision

log = logging.getLogger(__name__)


def quantization_config(config: TrainerConfig, device_type: str) -> tuple[Any, str | None]:
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


def load_kwargs(config: TrainerConfig | None, precision: Precision, device: Any) -> dict[str, Any]:
    assert config is not None, "qlora needs the spec's quantization settings"
    quantization, warning = quantization_config(config, device.type)
    if warning:
        log.warning(warning)
    four_bit = getattr(quantization, "load_in_4bit", False)
    return {"quantization_config": quantization, "device_map": {"": device},
            "dtype": quantization.bnb_4bit_compute_dtype if four_bit else precision.base_dtype}


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


def prepare(model: Any, config: TrainerConfig, adapter_dir: Path | None) -> Any:
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=config.gradient_checkpointing(),
        gradient_checkpointing_kwargs=CHECKPOINTING_KWARGS)
    keep_4bit_weights_unpacked(model)  # the model is evaluated before and during training
    return lora.add_adapters(model, config, adapter_dir)


def card_rows(spec: FineTuneJobSpec) -> list[tuple[str, Any]]:
    q = spec.resolved_quantization()
    quantization = f"{q.bits}-bit {q.type}, double quant {q.double_quant}, compute {q.compute_dtype}"
    return [*lora.card_rows(spec), ("quantization", quantization)]


METHOD = TrainingMethod(
    name="qlora",
    title="QLoRA (4-bit base + LoRA)",
    adapter=True,
    mergeable=True,
    load_kwargs=load_kwargs,
    prepare=prepare,
    card_rows=card_rows,
    usage_note=lora.ADAPTER_USAGE + " It was trained on a 4-bit base; it also loads on the 16-bit base, and "
    "`merged/` (spec.output.saveMerged) is the 16-bit merge.",
)
