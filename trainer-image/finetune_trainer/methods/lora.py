"""`lora`: the base is loaded in the training precision and frozen; peft adds LoRA adapters (kept in fp32
by peft's `autocast_adapter_dtype`) on `spec.lora.targetModules` (`all_linear` -> peft's "all-linear").
Adapters start at zero (B = 0), so the model at step 0 computes as the base."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_trainer.errors import ConfigError
from finetune_trainer.methods.base import TrainingMethod, enable_checkpointing, frozen_base_kwargs

if TYPE_CHECKING:
    from finetune_operator.contract import TrainerConfig
    from finetune_operator.spec import FineTuneJobSpec


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


def add_adapters(model: Any, config: TrainerConfig, adapter_dir: Path | None) -> Any:
    """LoRA adapters on `model`: new ones, or a checkpoint's to train on (lora and qlora)."""
    from peft import PeftModel, get_peft_model

    from finetune_trainer.modeling import linear_module_names

    try:
        if adapter_dir is not None:
            return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
        return get_peft_model(model, lora_config(config))
    except ValueError as err:
        # peft names the missing modules; add which field to change and what the model has.
        raise ConfigError(f"spec.lora.targetModules {config.spec.lora.target_modules}: {err} Linear modules "
                          f"of this model: {', '.join(linear_module_names(model))} (or all-linear)",
                          reason="InvalidConfig") from None


def prepare(model: Any, config: TrainerConfig, adapter_dir: Path | None) -> Any:
    enable_checkpointing(model, config)
    return add_adapters(model, config, adapter_dir)


def card_rows(spec: FineTuneJobSpec) -> list[tuple[str, Any]]:
    return [
        ("LoRA rank r / alpha", f"{spec.lora.r} / {spec.lora.alpha}"),
        ("LoRA dropout", spec.lora.dropout),
        ("target modules", spec.lora.target_modules),
    ]


ADAPTER_USAGE = "`model/` is a peft adapter: load the base model, then the adapter on it."

METHOD = TrainingMethod(
    name="lora",
    title="LoRA",
    adapter=True,
    mergeable=True,
    load_kwargs=frozen_base_kwargs,
    prepare=prepare,
    card_rows=card_rows,
    usage_note=ADAPTER_USAGE + " `merge_and_unload()` folds it into the weights.",
)
