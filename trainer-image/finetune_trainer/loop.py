"""The optimizer-step loop: batches from a deterministic plan, gradient accumulation, logging, checkpoints, stop.

It knows the training objective only through `objectives.base.Objective` and the run only through `Hooks`
(logging a metric, reporting progress, agreeing to stop, the budget, saving a checkpoint), so it holds no
knowledge of what a batch is (instruction examples, preference pairs) nor of storage and the report.

Per optimizer step, on every process:

1. the step's micro-batches: the epoch's `dataset.batch_plan` over `objective.length` of every item (grouped
   by length within each step unless the items are packed rows: `objective.packable` and
   `hyperparameters.packing`), sharded by rank, `gradient_accumulation_steps` micro-batches from the data
   position the checkpoint records (`TrainState.batches_in_epoch`)
2. the step's weight: `objective.weight` of every micro-batch (supervised tokens for sft, pairs for dpo),
   summed and all-reduced across ranks; each micro-batch's loss is its summed per-item loss over the step's
   weight per rank (DDP averages the ranks' gradients), so the step's loss is the mean over all its items
3. `StepLoss.loss` backward (gradient sync on the last micro-batch only), clipping at MAX_GRAD_NORM, AdamW,
   scheduler
4. logging: the loss (summed over micro-batches, averaged over ranks) and `StepLoss.metrics` summed over the
   step's micro-batches and ranks, divided by the step's total weight (means per item), one line of
   metrics.jsonl per step; progress to the report every `report.log_every` steps
5. a checkpoint every `checkpoint.everySteps` and after the last step; SIGTERM (all ranks agree after the
   same step) saves one and raises Preempted; spec.budget spent saves one and raises BudgetExceeded.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

from finetune_trainer import checkpoint as ckpt
from finetune_trainer import oom
from finetune_trainer.objectives.base import Objective
from finetune_trainer.report import log_every

log = logging.getLogger(__name__)

MAX_GRAD_NORM = 1.0


class Preempted(Exception):
    """SIGTERM was handled: a checkpoint is saved; exit with EXIT_PREEMPTED."""

    def __init__(self, step: int):
        super().__init__(f"stopped by SIGTERM after step {step}; checkpoint saved")
        self.step = step


class StopFlag:
    """Set by SIGTERM/SIGINT; the handlers are restored when the run ends."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        log.warning("received signal %d: checkpointing and stopping after this step", signum)
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Hooks(Protocol):
    """What the loop asks of the run around it."""

    def log_metric(self, record: dict[str, Any]) -> None:
        """Append one record to metrics.jsonl (rank 0 only is called)."""

    def report_progress(self, **fields: Any) -> None:
        """Progress for the report (step, loss, throughput, ...)."""

    def should_stop(self, flag: StopFlag) -> bool:
        """Whether any rank was asked to stop (every rank gets the same answer)."""

    def over_budget(self) -> bool:
        """Whether spec.budget is spent (every rank gets the same answer)."""

    def budget_exceeded(self, step: int, total_steps: int) -> Exception:
        """The error to raise once the budget is spent (a checkpoint of `step` is saved)."""

    def save_checkpoint(self) -> None:
        """Save a checkpoint of the state now (collective)."""


@dataclass
class Loop:
    """One training attempt's loop state: what it trains, with what, and where it is (`state`)."""

    objective: Objective
    items: list[Any]
    accelerator: Any
    model: Any
    optimizer: Any
    scheduler: Any
    state: ckpt.TrainState
    hp: Any  # spec.hyperparameters at the rung trained at
    every: int  # checkpoint.everySteps
    rank: int
    world: int
    pad_id: int
    per_rank: int  # micro-batches per rank and epoch
    total_steps: int
    #: True until the first checkpoint of this attempt: an out-of-memory error steps down the ladder (oom.py).
    oom_window: bool = False

    def __post_init__(self) -> None:
        self._lengths = [self.objective.length(item) for item in self.items]  # once: the plan of every epoch
        self._epoch_batches: tuple[int, list[list[int]]] | None = None  # (epoch, this rank's batches)

    def _group(self) -> list[list[int]]:
        """This rank's micro-batches (item indices) of the next optimizer step."""
        from finetune_trainer import dataset as ds

        state, hp = self.state, self.hp
        if state.batches_in_epoch >= self.per_rank:
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
        if self._epoch_batches is None or self._epoch_batches[0] != state.epoch:  # the plan once per epoch
            packed = self.objective.packable and hp.packing
            plan = ds.batch_plan(self._lengths, hp.batch_size, hp.seed, state.epoch, not packed,
                                 hp.gradient_accumulation_steps, self.world)
            self._epoch_batches = (state.epoch, ds.shard(plan, self.rank, self.world))
        mine = self._epoch_batches[1]
        return mine[state.batches_in_epoch:state.batches_in_epoch + hp.gradient_accumulation_steps]

    def _reduced(self, values: Any) -> Any:
        return self.accelerator.reduce(values, "sum") if self.world > 1 else values

    def step(self) -> tuple[float, int, dict[str, float]]:
        """One optimizer step; returns its loss, its non-padding tokens and its metrics (means per item)."""
        import torch

        accelerator, model, objective = self.accelerator, self.model, self.objective
        group = self._group()
        batches = [objective.batch(self.items, indices, self.pad_id) for indices in group]
        device = accelerator.device
        local = torch.tensor([float(sum(objective.weight(b) for b in batches))], device=device)
        global_weight = self._reduced(local)[0]
        per_rank_items = global_weight / self.world
        step_total = torch.zeros((), device=device)
        sums: dict[str, Any] = {}
        tokens = 0
        for j, batch in enumerate(batches):
            sync = j == len(batches) - 1
            oom.probe(micro_batch=self.hp.batch_size, step=self.state.step)
            with nullcontext() if sync else accelerator.no_sync(model):
                out = objective.loss(model, batch, device, per_rank_items)
                accelerator.backward(out.loss)
            step_total += out.loss.detach().float()
            for name, value in out.metrics.items():
                sums[name] = sums.get(name, 0) + value.detach().float()
            tokens += batch["num_tokens"]
        accelerator.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.batches_in_epoch += len(group)

        names = sorted(sums)
        packed = torch.stack([step_total, torch.tensor(float(tokens), device=device),
                              *[sums[name].reshape(()) for name in names]])
        summed = self._reduced(packed)
        loss_value, tokens = float(summed[0]) / self.world, int(summed[1])
        weight = float(global_weight)
        metrics = {name: float(summed[2 + i]) / weight if weight else 0.0 for i, name in enumerate(names)}
        return loss_value, tokens, metrics

    def run(self, hooks: Hooks) -> float | None:
        """Train from `state.step` to `total_steps`; returns the last step's loss (None: no step left)."""
        state, accelerator = self.state, self.accelerator
        report_every = log_every(self.total_steps)
        final_loss: float | None = None
        window_loss, window_steps, window_tokens, window_time = 0.0, 0, 0, 0.0
        run_start, start_step = time.monotonic(), state.step
        self.oom_window = True
        self.model.train()
        with StopFlag() as flag:
            while state.step < self.total_steps:
                step_start = time.monotonic()
                loss_value, tokens, metrics = self.step()
                final_loss = loss_value
                window_loss += loss_value
                window_steps += 1
                window_tokens += tokens
                epoch = state.epoch + state.batches_in_epoch / self.per_rank
                lr = float(self.scheduler.get_last_lr()[0])
                step_time = time.monotonic() - step_start
                window_time += step_time
                if accelerator.is_main_process:
                    hooks.log_metric({"step": state.step, "epoch": round(epoch, 4), "loss": loss_value,
                                      "learning_rate": lr, "tokens": tokens,
                                      "tokens_per_second": tokens / step_time if step_time > 0 else None, **metrics})
                if state.step % report_every == 0 or state.step == self.total_steps:
                    # Throughput over the window's step time only (checkpoints and reports excluded).
                    rate = window_tokens / window_time if window_time > 0 else None
                    done = state.step - start_step
                    eta = (time.monotonic() - run_start) / done * (self.total_steps - state.step) if done else None
                    hooks.report_progress(step=state.step, epoch=round(epoch, 4), loss=window_loss / window_steps,
                                          learning_rate=lr, tokens_per_second=rate,
                                          eta_seconds=int(eta) if eta is not None else None)
                    window_loss, window_steps, window_tokens, window_time = 0.0, 0, 0, 0.0

                stop = hooks.should_stop(flag)
                # The budget is checked after the step, so a run always makes progress it can keep.
                spent = state.step < self.total_steps and hooks.over_budget()
                if state.step % self.every == 0 or state.step == self.total_steps or stop or spent:
                    hooks.save_checkpoint()
                    self.oom_window = False
                    # A SIGTERM during the checkpoint: this step is saved, so stop now rather than one step
                    # and one more checkpoint later (a big model's checkpoint can take most of the grace period).
                    stop = stop or hooks.should_stop(flag)
                if stop:
                    raise Preempted(state.step)
                if spent:
                    raise hooks.budget_exceeded(state.step, self.total_steps)
        return final_loss
