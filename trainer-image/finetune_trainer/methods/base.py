"""What every training method module provides (`TrainingMethod`), and helpers several of them share."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from finetune_operator.contract import TrainerConfig
    from finetune_operator.spec import FineTuneJobSpec
    from finetune_trainer.modeling import Precision

#: Non-reentrant activation checkpointing (works with frozen inputs and with peft's wrappers).
CHECKPOINTING_KWARGS = {"use_reentrant": False}


@contextmanager
def unchanged(model: Any) -> Iterator[Any]:
    """The model as it is: adapters that start at zero (LoRA's B = 0) compute as the base at step 0."""
    yield model


def no_rows(spec: FineTuneJobSpec) -> list[tuple[str, Any]]:
    return []


@dataclass(frozen=True)
class TrainingMethod:
    """One training method: loading, preparation and what the rest of the trainer needs to know."""

    name: str
    #: Human name, used in the model card ("LoRA", "prefix tuning").
    title: str
    #: `model/` (and each checkpoint's model/) is a peft adapter to load on the base, not a whole model.
    adapter: bool
    #: The adapter can be merged into the base weights (spec.output.saveMerged).
    mergeable: bool
    #: Keyword arguments for `AutoModelForCausalLM.from_pretrained` (dtype, quantization, device map).
    load_kwargs: Callable[[TrainerConfig | None, Precision, Any], dict[str, Any]]
    #: (model, config, checkpoint model dir or None) -> the model to train; resumes from the checkpoint.
    prepare: Callable[[Any, TrainerConfig, Path | None], Any]
    #: Rows of the model card's "Method and plan" table for this method's settings.
    card_rows: Callable[[FineTuneJobSpec], list[tuple[str, Any]]] = no_rows
    #: A context in which the prepared model computes as the untrained base (the base evaluation).
    as_base: Callable[[Any], AbstractContextManager[Any]] = unchanged
    #: Writes what a checkpoint needs beyond `save_pretrained` to resume exactly (model, model dir).
    save_state: Callable[[Any, Path], None] | None = None
    #: One paragraph for the model card's usage section: what serving this artifact needs.
    usage_note: str = ""
    #: The model's output positions are the input's, so training may compute logits only at the positions
    #: whose next token is supervised (`objectives.sft.step_loss`). False for prompt tuning, whose peft forward puts
    #: virtual tokens before the input, and prefix tuning, whose forward goes through peft's KV-cache path.
    selective_logits: bool = True


def enable_checkpointing(model: Any, config: TrainerConfig) -> None:
    """Activation checkpointing at a rung with gradient checkpointing on (`TrainerConfig.gradient_checkpointing`:
    the spec's as the trainer set it to the rung, else the plan's)."""
    if config.gradient_checkpointing():
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=CHECKPOINTING_KWARGS)


def frozen_base_kwargs(config: TrainerConfig | None, precision: Precision, device: Any) -> dict[str, Any]:
    """A frozen 16-bit (or fp32) base in the training precision (lora, prefix, prompt)."""
    return {"dtype": precision.base_dtype}
