"""`prefix`: prefix tuning (peft `PrefixTuningConfig`). Trainable keys and values for `spec.prefix.
virtualTokens` positions are prepended to every attention layer; the base is frozen in the training
precision. `projection` trains them through peft's two-layer MLP (`prefix_projection`).

Limits, refused by the spec before a pod starts (finetune_operator.spec): no gradient checkpointing (peft
passes the prefix as a KV cache, which checkpointed layers drop; peft raises), no packing (the cache turns
off transformers' per-example masks of packed rows), nothing to merge. Several GPUs or nodes train it
data-parallel (DDP), like LoRA; FSDP is only used for `full`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_trainer.errors import ConfigError
from finetune_trainer.methods import virtual
from finetune_trainer.methods.base import TrainingMethod, frozen_base_kwargs

if TYPE_CHECKING:
    from finetune_operator.contract import TrainerConfig
    from finetune_operator.spec import FineTuneJobSpec


def peft_config(config: TrainerConfig) -> Any:
    from peft import PrefixTuningConfig

    prefix = config.spec.resolved_prefix()
    return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=prefix.virtual_tokens,
                              prefix_projection=prefix.projection)


def prepare(model: Any, config: TrainerConfig, adapter_dir: Path | None) -> Any:
    if config.gradient_checkpointing():  # the spec and the plan refuse it; a hand-written config may not
        raise ConfigError("spec.hyperparameters.gradientCheckpointing cannot be used with method prefix; set it "
                          "to false", reason="InvalidConfig")
    return virtual.wrap(model, peft_config(config), adapter_dir)


def card_rows(spec: FineTuneJobSpec) -> list[tuple[str, Any]]:
    prefix = spec.resolved_prefix()
    return [("virtual tokens (per layer)", prefix.virtual_tokens), ("prefix projection", prefix.projection)]


METHOD = TrainingMethod(
    name="prefix",
    title="prefix tuning",
    adapter=True,
    mergeable=False,
    load_kwargs=frozen_base_kwargs,
    prepare=prepare,
    card_rows=card_rows,
    as_base=virtual.as_base,
    save_state=virtual.save_state,
    usage_note=virtual.USAGE,
    selective_logits=False,
)
