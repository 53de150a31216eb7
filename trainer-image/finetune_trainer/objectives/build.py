"""The run's objective from the spec (`spec.objective`), and for `dpo` its reference, once per attempt.

`sft`: `SftObjective`. `dpo` (`spec.resolved_dpo()`): `DpoObjective` with the reference the spec and the
method call for:

- `referenceFree`: `ZeroReference`
- `precomputes(method)` (method full, or `precomputeReference: always`): `PrecomputedReference`. A fresh run
  computes the table once, before the first training step, from the model as loaded (the base, or the
  chain's starting model), in eval mode: one table over the training pairs followed by the validation pairs
  (each objective reference reads its own rows). The table goes into every checkpoint
  (`objectives.dpo.REFERENCE_FILE`, fingerprinted by the pairs' token ids) and a resumed run loads it from
  the checkpoint it resumes from: the weights there have trained, so recomputing would give another
  reference. A checkpoint without it, or for other pairs, is an error that says so.
- otherwise (lora, qlora): `AdapterReference`, the model with its adapter switched off.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_trainer.errors import DataError
from finetune_trainer.objectives import dpo
from finetune_trainer.objectives.base import Objective
from finetune_trainer.objectives.sft import SftObjective

log = logging.getLogger(__name__)


def dpo_settings(spec: Any) -> dpo.DpoSettings:
    """`spec.dpo` (defaults when unset: also the beta of preference metrics of an sft job)."""
    resolved = spec.resolved_dpo()
    return dpo.DpoSettings(beta=resolved.beta, loss=resolved.loss, reference_free=resolved.reference_free)


@dataclass
class StoredReference:
    """A precomputed reference table and the fingerprint of the pairs it is for (train then validation)."""

    table: Any
    fingerprint: str

    def save(self, directory: Path) -> Path:
        """Write it into a checkpoint's (or any) directory."""
        return dpo.save_reference(Path(directory) / dpo.REFERENCE_FILE, self.table, self.fingerprint)


@dataclass
class Built:
    """The objective of an attempt, and the stored reference it reads (precomputed only)."""

    objective: Objective
    reference: StoredReference | None = None


def build(spec: Any, method: str, *, selective: bool, model: Any = None, train: Sequence[Any] = (),
          validation: Sequence[Any] = (), batch_size: int = 1, pad_id: int = 0, device: Any = "cpu",
          restored_dir: Path | None = None, known: StoredReference | None = None) -> Built:
    """The objective for `spec.objective`. For a precomputed dpo reference: read from `restored_dir` (a
    checkpoint being resumed), else `known` (an earlier attempt of this process, before any step trained:
    the out-of-memory ladder), else computed now from `model`."""
    if spec.objective == "sft":
        return Built(SftObjective(selective))
    if spec.objective != "dpo":
        raise ValueError(f"no training objective {spec.objective!r}; known: sft, dpo")
    settings = dpo_settings(spec)
    resolved = spec.resolved_dpo()
    if resolved.reference_free:
        return Built(dpo.DpoObjective(settings, dpo.ZeroReference(), selective=selective))
    if not resolved.precomputes(method):
        return Built(dpo.DpoObjective(settings, dpo.AdapterReference(selective), selective=selective))
    pairs = [*train, *validation]
    fingerprint = dpo.pairs_fingerprint(pairs)
    if restored_dir is not None:
        path = Path(restored_dir) / dpo.REFERENCE_FILE
        if not path.is_file():
            raise DataError(f"checkpoint {restored_dir.name} has no {dpo.REFERENCE_FILE}: the DPO reference "
                            "log-probabilities cannot be recomputed from trained weights; start a new run (another "
                            "spec.output.uri) or restore the file", reason="InvalidCheckpoint")
        stored = StoredReference(dpo.load_reference(path, fingerprint), fingerprint)
        log.info("DPO reference log-probabilities of %d pairs loaded from checkpoint %s (not recomputed)",
                 len(pairs), restored_dir.name)
    elif known is not None and known.fingerprint == fingerprint:
        stored = known
    else:
        log.info("computing the DPO reference log-probabilities of %d pairs (%d training, %d validation)",
                 len(pairs), len(train), len(validation))
        table = dpo.precompute_reference(model, pairs, batch_size, pad_id, device, selective)
        stored = StoredReference(table, fingerprint)
    n = len(train)
    objective = dpo.DpoObjective(settings, dpo.PrecomputedReference(stored.table[:n]),
                                 eval_reference=dpo.PrecomputedReference(stored.table[n:]), selective=selective)
    return Built(objective, stored)
