"""The out-of-memory ladder, in the trainer: step down and train again when the first steps run out of memory.

Training starts at the plan's rung (status.plan.rung, `sizing.choose_rung`: the fastest rung the memory model
fits on the planned GPU with headroom; `TrainerConfig.start_rung`), and the ladder steps down from there.
The rule (`contract.next_rung`, shared with the operator): halve the micro-batch and double the gradient
accumulation; once halved, turn gradient checkpointing on (not for prefix tuning); keep halving down to a
micro-batch of 1. Every rung keeps micro-batch x accumulation, and `dataset.batch_plan` gives each optimizer
step the same examples at every such split, so the loss curve is that of a run started at the new rung.

When it applies: a `torch.OutOfMemoryError` (`torch.cuda.OutOfMemoryError` is the same class) raised in the
training loop before the attempt's first checkpoint is written (the checkpoint's validation pass included).
Before then, starting again costs at most the steps since the attempt began; after it, an OOM (a longer
batch than any before) fails the pod retryably, and the next pod resumes from the checkpoint one rung lower
when the operator passes one. A resumed run starts at the lower of the checkpoint's rung and the config's.
Then `Ladder.run`:

1. records an `Adjustment` (the step, the rung that failed, the next rung, the error's first line),
2. drops every reference to the model, optimizer and scheduler (`accelerator.free_memory`), collects
   garbage and empties the CUDA cache,
3. runs the attempt again at the next rung: from step 0 with the same seeds, or from the checkpoint the
   attempt resumed from.

After the last rung, or for an OOM after the first checkpoint, or with several processes (ranks would have
to agree to step down together; one rank's OOM leaves the others in a collective), it fails with reason
`OutOfMemory` naming every rung tried (`errors.OutOfMemory`): final (exit 3) after the last rung, else
retryable (exit 1) so the next pod can start one rung lower (`TrainerConfig.adjustments`, set by the
operator).

Tests inject the error by replacing `probe` (called before every forward pass of the training loop) with
`pytest.MonkeyPatch`; it does nothing otherwise.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from finetune_operator.contract import checkpointing_allowed, describe, lower, next_rung
from finetune_operator.spec import Adjustment, MemoryRung
from finetune_trainer.errors import OutOfMemory

log = logging.getLogger(__name__)

T = TypeVar("T")

__all__ = ["Ladder", "MemoryRung", "describe", "free_memory", "is_oom", "lower", "next_rung", "probe"]


def probe(*, micro_batch: int, step: int) -> None:
    """Called before every forward pass of the training loop; tests replace it to raise an OOM."""


def is_oom(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.OutOfMemoryError)


def free_memory(accelerator: Any = None) -> None:
    """Drop accelerate's references to prepared objects, collect garbage, empty the CUDA cache."""
    import torch

    if accelerator is not None:
        accelerator.free_memory()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:512]


class Ladder:
    """Runs attempts down the ladder. `attempt(rung)` trains at `rung`; `in_window()` says whether an OOM it
    raised came before its first checkpoint; `release()` drops the run's references to the failed attempt."""

    def __init__(self, config: Any, *, world: int, adjustments: list[Adjustment], step: Callable[[], int]):
        # where the ladder began (the plan's rung): gradient checkpointing comes after a halving below it
        self.start = config.ladder_start()
        self.checkpointing = checkpointing_allowed(config.method)
        self.world = world
        self.adjustments = adjustments  # appended to in place (the run's list, reported as it grows)
        self.step = step

    def run(self, rung: MemoryRung, attempt: Callable[[MemoryRung], T], *, in_window: Callable[[], bool],
            release: Callable[[], None], on_adjust: Callable[[Adjustment], None]) -> T:
        tried = [rung]
        while True:
            try:
                return attempt(rung)
            except Exception as err:
                if not is_oom(err):
                    raise
                # Only what the message needs leaves this block: the traceback holds the failed attempt's
                # tensors, and Python drops it (and `err`) when the block ends.
                error, recoverable, step = _first_line(err), in_window(), self.step()
            release()
            free_memory()
            following = next_rung(rung, self.start, checkpointing=self.checkpointing)
            if not recoverable or self.world > 1 or following is None:
                raise self._failure(error, tried, step, recoverable, following) from None
            adjustment = Adjustment(step=step, from_=rung, to=following, by="trainer",
                                    reason=f"{error} (in the first steps, before the first checkpoint)")
            log.warning("out of memory at step %d with %s; training again with %s", step, describe(rung),
                        describe(following))
            self.adjustments.append(adjustment)
            on_adjust(adjustment)
            rung = following
            tried.append(rung)

    def _failure(self, error: str, tried: list[MemoryRung], step: int, recoverable: bool,
                 following: MemoryRung | None) -> OutOfMemory:
        rungs = "; ".join(describe(r) for r in tried)
        if following is None:
            return OutOfMemory(
                f"out of memory at step {step} on every rung of the ladder, down to a micro-batch of 1 "
                f"(tried: {rungs}); last error {error}. Use GPUs with more memory (spec.resources), a smaller "
                "spec.hyperparameters.maxSeqLength, or a method that trains less (lora, qlora)", final=True)
        why = ("with several processes the trainer does not step down in-process" if recoverable and self.world > 1
               else "after the first checkpoint, where the first steps' memory peak has passed")
        return OutOfMemory(
            f"out of memory at step {step} with {describe(tried[-1])} ({why}; tried: {rungs}); last error "
            f"{error}. The next attempt can start at {describe(following)}", final=False)
