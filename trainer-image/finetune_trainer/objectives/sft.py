"""`sft`: supervised fine-tuning, the token-level cross-entropy on the supervised tokens of each example.

The batch layout is `dataset.py`'s (`collate`; packed rows when `hyperparameters.packing`), the loss the
causal-LM cross-entropy on answer tokens (`step_loss`), the evaluation the mean token loss of held-out
examples (`mean_loss`, also the test set's eval loss and perplexity in `assess`).

The step's loss is token-weighted: each micro-batch's summed token loss is divided by the supervised tokens
of the whole optimizer step (`weight`), so every supervised token counts the same whatever its micro-batch.

The loss itself is computed one of three ways (`step_loss`): transformers' loss on every position
(`selective` off: prompt and prefix tuning), logits at the supervised columns only (`selective`), or, within
selective, the fused output projection and cross-entropy of `fused_loss` at the exact supervised positions,
which never materialises vocabulary-wide logits (`fused`; default `fused_default`: on accelerators always,
on CPU per `FUSED_ON_CPU`). All three give the same loss and gradients (tests/trainer/test_fused_loss.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from finetune_trainer.objectives.base import StepLoss

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # dataset.IGNORE_INDEX; repeated so importing this module does not import dataset
#: Whether the fused loss is the default on CPU (it is on accelerators, for memory). Set from an A/B of
#: forward + backward on one thread (docs/design.md, "Fused loss and packed attention").
FUSED_ON_CPU = True
_unsupported_logged: set[str] = set()


def fused_default(device: Any) -> bool:
    """Whether `step_loss` fuses the loss on `device` when not told (`fused=None`)."""
    kind = device.type if hasattr(device, "type") else str(device).split(":")[0]
    return kind != "cpu" or FUSED_ON_CPU


def supervised(batch: dict[str, Any]) -> int:
    """Supervised tokens of a batch: labels[:, 0] is never predicted (the model shifts labels by one)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def model_inputs(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    """The batch's tensors the model's forward takes, on `device`."""
    return {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "labels", "attention_mask", "position_ids")}


def step_loss(model: Any, batch: dict[str, Any], device: Any, num_items: Any, selective: bool,
              fused: bool | None = None) -> Any:
    """A training micro-batch's loss: the sum of its supervised tokens' cross-entropy over `num_items`.

    `selective`: the logits are computed only at the positions (columns of the batch) where some row's next
    token is supervised (transformers' `logits_to_keep` with the positions' indices), and the loss from
    them as transformers' causal-LM loss computes it (float32 logits, sum, divided by `num_items`): the
    same loss, without the output projection and its vocabulary-wide logits for prompt tokens and padding
    (about two thirds of the positions of the bundled instruction sample in length-grouped micro-batches of
    4: 34.5% kept). The logits tensor is the largest activation of a large-vocabulary model (batch x sequence
    x vocabulary floats), so this saves memory too. The forward goes through the wrapped model (DDP, FSDP, peft) as usual.

    `fused` (within selective; None: `fused_default(device)`): the output head computes the summed loss at
    the exact supervised (row, position) pairs in chunks (`fused_loss.computing_loss`), never holding more
    than `fused_loss.CHUNK_BYTES` of logits; models it does not support (`fused_loss.unsupported`) take the
    selective path, said once in the log."""
    import torch
    import torch.nn.functional as F

    inputs = model_inputs(batch, device)
    if not selective:
        return model(**inputs, use_cache=False, num_items_in_batch=num_items).loss
    labels = inputs.pop("labels")
    targets = labels[:, 1:]  # position p predicts token p + 1
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    if keep.numel() == 0:
        keep = torch.zeros(1, dtype=torch.long, device=labels.device)  # nothing supervised: a zero loss
    kept = targets[:, keep]
    if fused_default(device) if fused is None else fused:
        from finetune_trainer import fused_loss

        reason = fused_loss.unsupported(model)
        if reason is None:
            # The same kept columns as the selective path, so the head's input (and a LoRA head's dropout
            # masks) are the same; the head then picks the supervised (row, column) pairs among them.
            rows, cols = (kept != IGNORE_INDEX).nonzero(as_tuple=True)
            with fused_loss.computing_loss(model, rows, cols, kept[rows, cols]):
                total = model(**inputs, use_cache=False, logits_to_keep=keep).logits
            return total / num_items
        if reason not in _unsupported_logged:
            _unsupported_logged.add(reason)
            log.info("fused loss off: %s; logits at the supervised positions instead", reason)
    logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
    loss = F.cross_entropy(logits.float().flatten(0, 1), kept.flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / num_items


def mean_loss(model: Any, items: Sequence[Any], batch_size: int, pad_id: int, device: Any,
              selective: bool = False, fused: bool | None = None) -> float | None:
    """Mean token loss of `items` (every process computes the same value on the same items).

    `selective` (the method's `selective_logits`; off by default, for callers that do not know the method):
    the summed loss of each batch from `step_loss` with `fused`, so evaluation too never holds
    vocabulary-wide logits for every position (without it, transformers' loss on all positions: batch x
    sequence x vocabulary logits, in float32 as well, which can outgrow the training step's memory)."""
    import torch

    from finetune_trainer import dataset as ds

    if not items:
        return None
    items = list(items)
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            batch = ds.collate(items[start:start + batch_size], pad_id)
            n = supervised(batch)
            if selective:
                loss = step_loss(model, batch, device, 1, True, fused)
            else:
                loss = model(**model_inputs(batch, device), use_cache=False, num_items_in_batch=1).loss
            total += loss.detach().double().cpu()  # a sum: num_items 1
            count += n
    model.train(was_training)
    return float(total / max(count, 1))


class SftObjective:
    """The `sft` objective for the training loop (`objectives.base.Objective`).

    `selective`: logits only where a next token is supervised (`TrainingMethod.selective_logits`);
    `fused`: the fused loss within selective (`step_loss`; None: `fused_default` of the device)."""

    name = "sft"
    packable = True

    def __init__(self, selective: bool = True, fused: bool | None = None):
        self.selective = selective
        self.fused = fused

    def prepare(self, model: Any) -> None:
        return None

    def length(self, item: Any) -> int:
        return len(item.input_ids)

    def batch(self, items: Sequence[Any], indices: Sequence[int], pad_id: int) -> dict[str, Any]:
        from finetune_trainer import dataset

        return dataset.collate([items[i] for i in indices], pad_id)

    def weight(self, batch: dict[str, Any]) -> int:
        return supervised(batch)

    def loss(self, model: Any, batch: dict[str, Any], device: Any, num_items: Any) -> StepLoss:
        return StepLoss(step_loss(model, batch, device, num_items, self.selective, self.fused))

    def evaluate(self, model: Any, items: Sequence[Any], batch_size: int, pad_id: int,
                 device: Any) -> dict[str, float]:
        loss = mean_loss(model, items, batch_size, pad_id, device, self.selective, self.fused)
        return {} if loss is None else {"eval_loss": loss}
