"""`full`: every weight trains.

With `precision: bf16` the weights, gradients and AdamW states are all bf16 (as torchtune trains by
default): 8 bytes per parameter, which is what the model-size table's 7B full = 4x24GB assumes; fp32
master weights would need 16 and not fit. With fp16 or fp32 the weights are fp32 (fp16 autocasts on top:
pure fp16 training diverges) at 16 bytes per parameter. A checkpoint's model/ is the whole model, so a
resumed run loads its base from there (train.py) and prepares it like a fresh one.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_trainer.methods.base import TrainingMethod, enable_checkpointing

if TYPE_CHECKING:
    from finetune_operator.contract import TrainerConfig
    from finetune_trainer.modeling import Precision


def load_kwargs(config: TrainerConfig | None, precision: Precision, device: Any) -> dict[str, Any]:
    from finetune_trainer.modeling import full_weights_dtype

    return {"dtype": full_weights_dtype(precision)}


def prepare(model: Any, config: TrainerConfig, adapter_dir: Path | None) -> Any:
    enable_checkpointing(model, config)
    return model


METHOD = TrainingMethod(
    name="full",
    title="full fine-tuning",
    adapter=False,
    mergeable=False,
    load_kwargs=load_kwargs,
    prepare=prepare,
    usage_note="`model/` is the whole fine-tuned model: load it with transformers alone.",
)
