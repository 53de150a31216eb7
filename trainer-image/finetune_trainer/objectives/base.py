"""What every training objective provides (`Objective`), and the one value its loss step returns (`StepLoss`).

An objective owns three things the training loop must not know about: the batch layout (what one example
is, how examples become a batch, what a batch's loss is averaged over), the loss of a micro-batch, and the
evaluation of held-out examples. The loop plans batches by length, accumulates gradients, steps the
optimizer, checkpoints and logs; it asks the objective for everything else through this interface.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class StepLoss:
    """One micro-batch's loss, ready for `backward()`, and what the loop logs about it.

    `loss` is the batch's summed per-item loss divided by the step's `num_items` (so the micro-batches of an
    optimizer step add up to the step's mean); `metrics` are detached scalar tensors on the device, sums over
    the batch's items: the loop adds them over the step's micro-batches (and ranks), then divides by the
    step's weight to log means, reading them once per step rather than waiting for the device per batch."""

    loss: Any
    metrics: dict[str, Any] = field(default_factory=dict)


class Objective(Protocol):
    """One training objective (`sft`, `dpo`): batch layout, loss and evaluation.

    The loop calls, per run: `prepare(model)` once after the method has prepared the model; per optimizer
    step: `batch` for each micro-batch of the plan (planned with `length` of every item, packed first only
    when `packable`), `weight` of each to count the step's items (all-reduced across ranks), then `loss`
    with that count; at checkpoints and at the end, `evaluate` on the held-out items.
    """

    #: The spec's name for it (`spec.objective`).
    name: str
    #: Whether items may be packed several to a row (`hyperparameters.packing`).
    packable: bool

    def prepare(self, model: Any) -> None:
        """Adjust the prepared model for this objective (e.g. DPO turns dropout off)."""

    def length(self, item: Any) -> int:
        """The item's length in tokens as the batch planner groups by (the row width it needs)."""

    def batch(self, items: Sequence[Any], indices: Sequence[int], pad_id: int) -> dict[str, Any]:
        """Tensors for the micro-batch of `items[i] for i in indices` (indices into the whole split)."""

    def weight(self, batch: dict[str, Any]) -> int:
        """What the batch's loss is averaged over: supervised tokens (sft), pairs (dpo)."""

    def loss(self, model: Any, batch: dict[str, Any], device: Any, num_items: Any) -> StepLoss:
        """The micro-batch's loss: its summed per-item loss over `num_items` (the step's weight per rank)."""

    def evaluate(self, model: Any, items: Sequence[Any], batch_size: int, pad_id: int,
                 device: Any) -> dict[str, float]:
        """Metrics of the model on held-out `items` (every process computes the same values)."""
