"""`sft`: supervised fine-tuning, the token-level cross-entropy on the supervised tokens of each example.

A thin wrapper over the loss helpers that live in `train.py` today (`step_loss`, `mean_loss`) and the batch
layout of `dataset.py` (`collate`, packing), so the loop can call both objectives the same way; the helpers
move here when the loop is split out of `train.Run`. `train` is imported inside the methods because it will
import this package.

The step's loss is token-weighted: each micro-batch's summed token loss is divided by the supervised tokens
of the whole optimizer step (`weight`), so every supervised token counts the same whatever its micro-batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from finetune_trainer.objectives.base import StepLoss

IGNORE_INDEX = -100  # dataset.IGNORE_INDEX


class SftObjective:
    """The `sft` objective for the training loop (`objectives.base.Objective`).

    `selective`: logits only where a next token is supervised (`TrainingMethod.selective_logits`)."""

    name = "sft"
    packable = True

    def __init__(self, selective: bool = True):
        self.selective = selective

    def prepare(self, model: Any) -> None:
        return None

    def length(self, item: Any) -> int:
        return len(item.input_ids)

    def batch(self, items: Sequence[Any], indices: Sequence[int], pad_id: int) -> dict[str, Any]:
        from finetune_trainer import dataset

        return dataset.collate([items[i] for i in indices], pad_id)

    def weight(self, batch: dict[str, Any]) -> int:
        # labels[:, 0] is never predicted (the model shifts labels by one)
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def loss(self, model: Any, batch: dict[str, Any], device: Any, num_items: Any) -> StepLoss:
        from finetune_trainer import train

        return StepLoss(train.step_loss(model, batch, device, num_items, self.selective))

    def evaluate(self, model: Any, items: Sequence[Any], batch_size: int, pad_id: int,
                 device: Any) -> dict[str, float]:
        from finetune_trainer import train

        loss = train.mean_loss(model, list(items), batch_size, pad_id, device)
        return {} if loss is None else {"eval_loss": loss}
