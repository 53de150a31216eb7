"""Training objectives, one module each (as `finetune_trainer/methods/` has one per method).

The method (`full`, `lora`, `qlora`, ...) says which weights train; the objective (`spec.objective`) says what
they are trained to do, and owns everything that depends on it: the batch layout, the loss and the evaluation.
The loop knows none of them; it talks to an `Objective` (`objectives.base`):

- `prepare(model)`: once, after the method prepared the model (DPO turns dropout off)
- `length(item)`, `packable`: how the batch planner groups items (pairs are never packed)
- `batch(items, indices, pad_id)`: the tensors of one micro-batch of the plan
- `weight(batch)`: what a step's loss averages over (supervised tokens for sft, pairs for dpo); the loop sums
  it over the step's micro-batches (and ranks) and passes it to `loss` as `num_items`
- `loss(model, batch, device, num_items)` -> `StepLoss(loss, metrics)`: backward on `loss`, log `metrics`
  (sums over the batch; divide by the step's weight)
- `evaluate(model, items, batch_size, pad_id, device)` -> metrics of held-out items (`eval_loss`; for dpo also
  `preference_accuracy`, `reward_margin`)

Objectives are built from the spec by `build.build`: `sft.SftObjective(selective)`, `dpo.DpoObjective(settings,
reference)` with the reference the method calls for (`AdapterReference` for lora/qlora, `PrecomputedReference`
for full, `ZeroReference` when `referenceFree`), the precomputed table stored with the checkpoints and read
back on resume. `REGISTRY` maps `spec.objective` to the class.

Adding an objective: a module here with its class, one line in `REGISTRY`, the spec field and its memory model.
"""

from __future__ import annotations

from finetune_trainer.objectives.base import Objective, StepLoss
from finetune_trainer.objectives.dpo import DpoObjective
from finetune_trainer.objectives.sft import SftObjective

REGISTRY: dict[str, type] = {"sft": SftObjective, "dpo": DpoObjective}


def get(name: str) -> type:
    """The objective class registered as `name` (a `spec.objective` value)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"no training objective {name!r}; known: {', '.join(REGISTRY)}") from None


__all__ = ["REGISTRY", "DpoObjective", "Objective", "SftObjective", "StepLoss", "get"]
