"""The training run: a custom accelerate loop with exact checkpoints, resume, evaluation and artifacts.

A custom loop (not transformers' Trainer) because resume must be exact: the checkpoint records the data
position (epoch and micro-batches consumed) next to optimizer, scheduler and RNG states, and batches come
from a deterministic plan (`dataset.batch_plan`, sharded by rank) rather than a sampler's hidden state.

Order of a run (every process runs every phase; rank 0 alone writes to the output):

1. world check (`world.check_size`), output already complete? -> nothing to do
2. data and base model fetched (one process per machine first, then the others from the cache)
3. provenance.json uploaded when `compliance.provenanceRequired` (the run fails if it cannot)
4. resume from the newest complete checkpoint, if any (incomplete ones are deleted)
5. base-model evaluation (fresh runs: the model at step 0, seen through the method's `as_base`: LoRA's
   adapters start at zero, prefix and prompt tuning's virtual tokens are switched off)
6. training: AdamW, warmup + cosine/linear/constant (`transformers.get_scheduler`), gradient accumulation
   with token-weighted loss (each optimizer step averages over all its supervised tokens, on all ranks),
   gradient clipping at 1.0, checkpoints every `checkpoint.everySteps` and after the last step. Steps 4-6
   run at a memory rung (micro-batch, accumulation, gradient checkpointing: `_attempt`); out of memory
   before the first checkpoint, they run again one rung lower (`oom.Ladder`, the out-of-memory ladder)
7. fine-tuned evaluation, gates (GatesFailed, exit 4, naming the metric)
8. artifacts, the export check (`export.py`: the saved adapter reloaded, and merged/, against the trained
   model's logits; ExportCheckFailed, exit 3, beyond its tolerance), then the output's `_COMPLETE` marker (last)

Distributed: DDP through accelerate; FSDP (v2, full sharding of each decoder layer) for `method: full`
with several GPU processes. On CPU (gloo) full fine-tuning uses DDP too: FSDP's CPU path is slow and
exists for offloading, and the CPU runs this trainer supports (tests, `finetune run --local`) use models
that fit every process anyway.

SIGTERM (and SIGINT): the loop finishes the optimizer step in progress, all ranks agree to stop (one
all-reduce per step), a checkpoint is saved unless the step already has one, and the process exits
EXIT_PREEMPTED (143).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from finetune_operator.contract import ENV_OUTPUT_URI, TrainerConfig, spec_rung
from finetune_operator.spec import Adjustment, CheckpointRecord, MemoryRung
from finetune_trainer import checkpoint as ckpt
from finetune_trainer import dataset as ds
from finetune_trainer import methods, modeling, oom
from finetune_trainer import world as world_mod
from finetune_trainer.inputs import load_inputs
from finetune_trainer.report import Reporter, log_every, now

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


@dataclass
class Outcome:
    """What a run produced (for in-process callers and tests)."""

    state: ckpt.TrainState
    final_loss: float | None
    artifacts: dict[str, str]
    evaluation: Any
    resumed_from: int | None
    already_complete: bool = False


def make_accelerator(config: TrainerConfig, fsdp: bool | None = None) -> tuple[Any, modeling.Precision, bool]:
    """The Accelerator for this process, the precision, and whether FSDP is on (None: the rule in the
    module docstring)."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin, InitProcessGroupKwargs

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    precision = modeling.resolve_precision(config.spec.hyperparameters.precision, device_type)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if fsdp is None:
        fsdp = device_type == "cuda" and config.method == "full" and world > 1
    plugin = None
    if fsdp:
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",  # one shard unit per decoder layer (_no_split_modules)
            reshard_after_forward=True,
            state_dict_type="FULL_STATE_DICT",
            activation_checkpointing=False,  # done by the model itself (gradient_checkpointing)
            # Only rank 0 reads the weights from disk; the others start on the meta device and receive
            # their shards. Without it every process holds a full fp32 copy in host memory (70B: 280 GB).
            cpu_ram_efficient_loading=True,
        )
    # cpu=True is what makes accelerate form a gloo world on CPU: without it, processes started by torchrun
    # on a machine without GPUs each come up as a world of one (world.check_size catches that).
    # A bounded wait in every collective: a peer lost without a word must fail the survivors (exit 1, the
    # Job restarts the group) instead of blocking them for 30 minutes (world.ENV_COLLECTIVE_TIMEOUT).
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=world_mod.collective_timeout()))
    accelerator = Accelerator(mixed_precision=precision.mixed, fsdp_plugin=plugin, cpu=device_type == "cpu",
                              kwargs_handlers=[timeout])
    if precision.warning:
        log.warning(precision.warning)
    return accelerator, precision, fsdp


# ------------------------------------------------------------------------------------------------
# Loss helpers
# ------------------------------------------------------------------------------------------------


def _supervised(batch: dict[str, Any]) -> int:
    # labels[:, 0] is never predicted (the model shifts labels by one)
    return int((batch["labels"][:, 1:] != ds.IGNORE_INDEX).sum())


def _model_inputs(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    return {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "labels", "attention_mask", "position_ids")}


def step_loss(model: Any, batch: dict[str, Any], device: Any, num_items: Any, selective: bool) -> Any:
    """A training micro-batch's loss: the sum of its supervised tokens' cross-entropy over `num_items`.

    `selective`: the logits are computed only at the positions (columns of the batch) where some row's next
    token is supervised (transformers' `logits_to_keep` with the positions' indices), and the loss from
    them as transformers' causal-LM loss computes it (float32 logits, sum, divided by `num_items`): the
    same loss, without the output projection and its vocabulary-wide logits for prompt tokens and padding
    (about two thirds of the positions of the bundled instruction sample in length-grouped micro-batches of
    4: 34.5% kept). The logits tensor is the largest activation of a large-vocabulary model (batch x sequence
    x vocabulary floats), so this saves memory too. The forward goes through the wrapped model (DDP, FSDP, peft) as usual."""
    import torch
    import torch.nn.functional as F

    inputs = _model_inputs(batch, device)
    if not selective:
        return model(**inputs, use_cache=False, num_items_in_batch=num_items).loss
    labels = inputs.pop("labels")
    targets = labels[:, 1:]  # position p predicts token p + 1
    keep = (targets != ds.IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    if keep.numel() == 0:
        keep = torch.zeros(1, dtype=torch.long, device=labels.device)  # nothing supervised: a zero loss
    logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets[:, keep].flatten(),
                           ignore_index=ds.IGNORE_INDEX, reduction="sum")
    return loss / num_items


def mean_loss(model: Any, items: list[ds.Encoded], batch_size: int, pad_id: int, device: Any) -> float | None:
    """Mean token loss of `items` (every process computes the same value on the same items)."""
    import torch

    if not items:
        return None
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            batch = ds.collate(items[start:start + batch_size], pad_id)
            n = _supervised(batch)
            out = model(**_model_inputs(batch, device), use_cache=False, num_items_in_batch=1)
            total += out.loss.detach().double().cpu()  # a sum: num_items_in_batch=1
            count += n
    model.train(was_training)
    return float(total / max(count, 1))


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


class Run:
    """One training run of `config` writing to `output_uri`."""

    def __init__(self, config: TrainerConfig, output_uri: str | None = None, *, work_dir: Path | None = None):
        from finetune_trainer import storage

        #: The config as given; `self.config` is the one training runs with (`_use_rung`).
        self.requested = config
        self.config = config
        self.spec = config.spec
        self.method = methods.get(config.method)
        self.hp = config.spec.hyperparameters
        self.output_uri = output_uri or os.environ.get(ENV_OUTPUT_URI) or config.spec.output.uri
        self.store = storage.Store.for_uri(self.output_uri)
        self.cache = modeling.cache_dir()
        self.work = work_dir or self.cache / "work"
        self.started_at = now()
        # Local scratch and checkpoint copies are keyed by the output, so runs of the same job name with
        # different outputs sharing a cache never mix.
        self._output_key = hashlib.sha256(self.output_uri.encode()).hexdigest()[:12]

    # -- setup -------------------------------------------------------------------------------------

    def run(self) -> Outcome:
        from finetune_trainer import assess

        self._started = time.monotonic()  # this process's share of the GPU-hours counts from here
        self._gpu_base: float | None = None  # GPU-seconds of earlier attempts, from the first checkpoint restored
        accelerator, precision, fsdp = make_accelerator(self.config)
        self.accelerator, self.precision, self.fsdp = accelerator, precision, fsdp
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.reporter = Reporter(self.store, enabled=accelerator.is_main_process, job_uid=self.config.uid)
        world_mod.check_size(self.world)
        world_mod.check_rendezvous(self.config.rendezvous_id)
        self.work = self.work / f"{self.config.name}-{self._output_key}-rank{self.rank}"
        self.work.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.work / "metrics.jsonl"

        if self.store.is_complete(""):
            log.info("%s is already complete; nothing to do", self.output_uri)
            return Outcome(ckpt.TrainState(), None, {}, None, None, already_complete=True)
        self.reporter.phase("starting", world_size=self.world)

        with accelerator.local_main_process_first():
            model_dir = modeling.materialize_model(self.spec.base_model.resolved_uri(), self.spec.base_model.revision,
                                                   self.cache)
            tokenizer = modeling.load_tokenizer(model_dir)
            inputs = load_inputs(self.config, tokenizer, self.cache)
        self.tokenizer, self.inputs, self.model_dir = tokenizer, inputs, model_dir
        log.info("data: %d training examples (%s), %d validation, %d test; %d invalid row(s) skipped, %d "
                 "example(s) truncated to maxSeqLength (%d of them dropped: no answer token left)",
                 inputs.train_examples, inputs.format, len(inputs.validation), len(inputs.test_rows),
                 inputs.skipped_rows, inputs.truncated, inputs.truncated_away)
        self.reporter.update(data_stats=inputs.stats())

        if self.spec.compliance.provenance_required and accelerator.is_main_process:
            self._upload_provenance()  # before the first training step; raises if it cannot
        accelerator.wait_for_everyone()
        from finetune_trainer import tracking

        self.tracker = tracking.start(self)  # TensorBoard, and MLflow with spec.tracking.mlflow (rank 0)

        # Setup and training, again one rung lower after an out-of-memory error in the first steps (oom.py).
        self.adjustments: list[Adjustment] = list(self.requested.adjustments)
        self.reporter.update(adjustments=self.adjustments)
        ladder = oom.Ladder(self.requested, world=self.world, adjustments=self.adjustments,
                            step=lambda: self.state.step)
        final_loss, restored = ladder.run(self.requested.start_rung(), self._attempt,
                                          in_window=lambda: self._oom_window, release=self._release,
                                          on_adjust=lambda _: self.reporter.update(adjustments=self.adjustments))
        state = self.state
        if final_loss is None:  # resumed after the last step (evaluation or upload had failed)
            final_loss = self._last_logged_loss()

        self.reporter.phase("evaluating", step=state.step)
        tuned = assess.score(self, label="fine-tuned")
        evaluation = assess.evaluation_status(self, state.base_scores, tuned)
        self.reporter.update(evaluation=evaluation)
        failed = list(evaluation.failed_gates)

        from finetune_trainer import artifacts, export

        self.reporter.phase("uploading")
        uris = artifacts.publish(self, evaluation, final_loss, complete=not failed)
        self.reporter.update(artifacts=uris)
        self.tracker.finish(evaluation, uris, passed=not failed and export.passed(self))
        if failed:
            from finetune_trainer.errors import GatesFailed

            raise GatesFailed("; ".join(failed))
        export.raise_if_failed(self)  # ExportCheckFailed (no marker, as with gates) when the export check failed
        self.reporter.phase("complete")
        return Outcome(state, final_loss, uris, evaluation, restored.step if restored else None)

    def _use_rung(self, rung: MemoryRung) -> None:
        """Train at `rung`: `self.config` becomes the requested config with its micro-batch, accumulation and
        gradient checkpointing (what the methods, the loop, the model card and provenance read), and the
        adjustments so far."""
        self.rung = rung
        hp = self.requested.spec.hyperparameters.model_copy(update={
            "batch_size": rung.micro_batch, "gradient_accumulation_steps": rung.grad_accum,
            "gradient_checkpointing": rung.gradient_checkpointing})
        spec = self.requested.spec.model_copy(update={"hyperparameters": hp})
        self.config = self.requested.model_copy(update={"spec": spec, "adjustments": list(self.adjustments)})
        self.spec, self.hp = self.config.spec, hp

    def _attempt(self, rung: MemoryRung) -> tuple[float | None, ckpt.Restored | None]:
        """Model, optimizer and data position at `rung` (from the newest checkpoint, if any), the base
        evaluation of a fresh run, and training; returns the final loss and the checkpoint resumed from."""
        from accelerate.utils import set_seed

        from finetune_trainer import assess

        accelerator, precision = self.accelerator, self.precision
        self._oom_window = False  # set by _train until its first checkpoint is written
        self.state = ckpt.TrainState()
        restored = self._restore()
        if self._gpu_base is None:  # once per process: a later restore (the ladder) holds this process's time
            self._gpu_base = restored.state.gpu_seconds if restored is not None else 0.0
        if restored is not None:
            # The checkpoint's rung when it is lower: what fitted then fits again, what did not still does not.
            # (Checkpoints from before the ladder trained at the spec's rung.)
            restored.state.rung = restored.state.rung or spec_rung(self.requested.spec).wire()
            rung = oom.lower(rung, MemoryRung.model_validate(restored.state.rung))
            saved = [Adjustment.model_validate(a) for a in restored.state.adjustments]
            self.adjustments[:] = saved + [a for a in self.adjustments if a not in saved]
        self._use_rung(rung)
        self.reporter.update(adjustments=self.adjustments)
        set_seed(self.hp.seed)
        # A checkpoint holds the whole model (full) or an adapter to put on the base (the others).
        base_dir = restored.model_dir if restored is not None and not self.method.adapter else self.model_dir
        model = modeling.load_base(base_dir, self.config.method, precision, accelerator.device, self.config)
        adapter = restored.model_dir if restored is not None and self.method.adapter else None
        model = modeling.prepare_for_training(model, self.config, adapter_dir=adapter)
        trainable, total = modeling.trainable_parameters(model)
        log.info("method %s: %d of %d parameters trainable (%.2f%%)", self.config.method, trainable, total,
                 100.0 * trainable / max(total, 1))

        per_rank = self._batches_per_rank()
        steps_per_epoch = ds.steps_per_epoch(per_rank, self.hp.gradient_accumulation_steps)
        total_steps = self.hp.max_steps or max(1, math.ceil(self.hp.epochs * steps_per_epoch))
        optimizer = self._optimizer(model)
        model, optimizer = accelerator.prepare(model, optimizer)
        scheduler = self._scheduler(optimizer, total_steps)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler

        if restored is not None:
            ckpt.load_training_state(restored, accelerator=accelerator, model=model, optimizer=optimizer,
                                     scheduler=scheduler, fsdp=self.fsdp, seed=self.hp.seed)
            state = restored.state.regroup(rung.micro_batch, rung.grad_accum).rescale(self.world)
            state.total_steps = total_steps
            if accelerator.is_main_process and (restored.directory / "metrics.jsonl").is_file():
                self.metrics_path.write_bytes((restored.directory / "metrics.jsonl").read_bytes())
        else:
            state = ckpt.TrainState(world_size=self.world, total_steps=total_steps,
                                    base_scores=getattr(self, "_base_scores", None))
            self.metrics_path.unlink(missing_ok=True)
            set_seed(self.hp.seed + self.rank)  # dropout differs per rank, reproducibly
        state.rung = rung.wire()
        state.adjustments = [a.wire() for a in self.adjustments]
        self.state = state
        self.reporter.update(total_steps=total_steps, step=state.step,
                             resumed_from_step=restored.step if restored else None,
                             checkpoints=self._checkpoint_records())

        if state.base_scores is None and restored is None:
            self.reporter.phase("evaluating")
            with self.method.as_base(accelerator.unwrap_model(model)):
                state.base_scores = assess.score(self, label="base")
            self.reporter.update(evaluation=assess.evaluation_status(self, state.base_scores, None))
            self._base_scores = state.base_scores
            # Where a fresh attempt one rung lower starts training from: the same random state as this one.
            self._fresh_rng = ckpt.rng_state()
        elif restored is None and getattr(self, "_fresh_rng", None) is not None:
            ckpt.set_rng_state(self._fresh_rng)
        return self._train(per_rank, total_steps), restored

    def _release(self) -> None:
        """Drop the references of an attempt that ran out of memory (oom.Ladder frees the memory)."""
        self.model = self.optimizer = self.scheduler = None
        self.accelerator.free_memory()

    def _upload_provenance(self) -> None:
        from finetune_trainer import artifacts

        artifacts.upload_provenance(self)

    def _restore(self) -> ckpt.Restored | None:
        accelerator = self.accelerator
        if accelerator.is_main_process:
            ckpt.discard_incomplete(self.store)
        accelerator.wait_for_everyone()
        step = ckpt.latest_complete(self.store)
        if step is None:
            return None
        local_root = self.cache / "checkpoints" / f"{self.config.name}-{self._output_key}"
        with accelerator.local_main_process_first():  # one download per machine, the others reuse it
            restored = ckpt.download(self.store, step, local_root, fresh=accelerator.is_local_main_process)
        log.info("resuming from %s", self.store.child(ckpt.prefix(step)))
        return restored

    def _checkpoint_records(self) -> list[CheckpointRecord]:
        return [CheckpointRecord(step=s, uri=str(self.store.child(ckpt.prefix(s)) + "/"))
                for s in ckpt.complete_steps(self.store)]

    def _batches_per_rank(self) -> int:
        lengths = [len(item.input_ids) for item in self.inputs.train]
        plan = ds.batch_plan(lengths, self.hp.batch_size, self.hp.seed, 0, not self.hp.packing,
                             self.hp.gradient_accumulation_steps)
        per_rank = len(plan) // self.world
        if per_rank == 0:
            from finetune_trainer.errors import DataError

            raise DataError(
                f"{len(self.inputs.train)} training rows make {len(plan)} batch(es) of "
                f"{self.hp.batch_size}, fewer than the {self.world} processes; add data or lower "
                "spec.hyperparameters.batchSize", reason="EmptyDataset")
        return per_rank

    def _optimizer(self, model: Any) -> Any:
        import torch

        decay: list[Any] = []
        no_decay: list[Any] = []
        for name, param in model.named_parameters():
            if param.requires_grad:
                # Norms and biases are not weight-decayed (standard AdamW practice).
                (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
        groups = [{"params": decay, "weight_decay": self.hp.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]],
                                 lr=self.hp.learning_rate_for(self.config.method))

    def _scheduler(self, optimizer: Any, total_steps: int) -> Any:
        from transformers import get_scheduler

        warmup = math.ceil(self.hp.warmup_ratio * total_steps)
        name = "constant_with_warmup" if self.hp.lr_scheduler == "constant" else self.hp.lr_scheduler
        # Not passed through accelerator.prepare: its wrapper steps once per process per step.
        return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)

    # -- the loop ----------------------------------------------------------------------------------

    def _stop_agreed(self, flag: StopFlag) -> bool:
        return self._agreed(flag.requested)

    def _agreed(self, wanted: bool) -> bool:
        """True on every rank when it is true on any (so all stop after the same step)."""
        if self.world == 1:
            return wanted
        import torch

        value = torch.tensor([1.0 if wanted else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(value, "max").item() > 0)

    def gpu_hours(self) -> float:
        """GPU-hours used by every attempt so far: earlier attempts up to their last checkpoint, plus this
        process's wall time times the number of training processes (one per GPU)."""
        return ((self._gpu_base or 0.0) + (time.monotonic() - self._started) * self.world) / 3600

    def _over_budget(self) -> bool:
        """Whether any rank's clock reached spec.budget.maxGpuHours (agreed, so all stop after the same step).
        Without a budget, which every rank's spec says alike, no collective is run: the step loop pays nothing."""
        budget = self.spec.budget
        if budget is None:
            return False
        return self._agreed(self.gpu_hours() >= budget.max_gpu_hours)

    def _train(self, per_rank: int, total_steps: int) -> float | None:
        import torch

        accelerator, model, optimizer, scheduler = self.accelerator, self.model, self.optimizer, self.scheduler
        state, hp = self.state, self.hp
        accumulation = hp.gradient_accumulation_steps
        lengths = [len(item.input_ids) for item in self.inputs.train]
        pad_id = self.tokenizer.pad_token_id
        every, keep = self.spec.checkpoint.every_steps, self.spec.checkpoint.keep
        report_every = log_every(total_steps)
        final_loss: float | None = None
        window_loss, window_steps, window_tokens, window_time = 0.0, 0, 0, 0.0
        run_start, start_step = time.monotonic(), state.step

        if state.step < total_steps:
            self.reporter.phase("training", step=state.step)
        self._oom_window = True  # until the first checkpoint: an OOM steps down the ladder (oom.py)
        model.train()
        with StopFlag() as flag:
            while state.step < total_steps:
                step_start = time.monotonic()
                if state.batches_in_epoch >= per_rank:
                    state.epoch, state.batches_in_epoch = state.epoch + 1, 0
                plan = ds.batch_plan(lengths, hp.batch_size, hp.seed, state.epoch, not hp.packing, accumulation)
                mine = ds.shard(plan, self.rank, self.world)
                group = mine[state.batches_in_epoch:state.batches_in_epoch + accumulation]
                batches = [ds.collate([self.inputs.train[i] for i in b], pad_id) for b in group]

                # Token-weighted loss over the whole optimizer step on every rank: each micro-batch's
                # summed loss is divided by the step's supervised tokens per rank (DDP averages ranks).
                local = torch.tensor([float(sum(_supervised(b) for b in batches))], device=accelerator.device)
                global_count = accelerator.reduce(local, "sum") if self.world > 1 else local
                per_rank_items = global_count[0] / self.world
                step_total = torch.zeros((), device=accelerator.device)
                tokens = 0
                for j, batch in enumerate(batches):
                    sync = j == len(batches) - 1
                    oom.probe(micro_batch=hp.batch_size, step=state.step)
                    with nullcontext() if sync else accelerator.no_sync(model):
                        loss = step_loss(model, batch, accelerator.device, per_rank_items,
                                         self.method.selective_logits)
                        accelerator.backward(loss)
                    step_total += loss.detach().float()
                    tokens += batch["num_tokens"]
                accelerator.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.batches_in_epoch += len(group)

                if self.world > 1:
                    summed = accelerator.reduce(torch.stack([step_total, torch.tensor(float(tokens),
                                                             device=accelerator.device)]), "sum")
                    loss_value, tokens = float(summed[0]) / self.world, int(summed[1])
                else:
                    loss_value = float(step_total)
                final_loss = loss_value
                window_loss += loss_value
                window_steps += 1
                window_tokens += tokens
                epoch = state.epoch + state.batches_in_epoch / per_rank
                lr = float(scheduler.get_last_lr()[0])

                step_time = time.monotonic() - step_start
                window_time += step_time
                if accelerator.is_main_process:
                    self._metric({"step": state.step, "epoch": round(epoch, 4), "loss": loss_value,
                                  "learning_rate": lr, "tokens": tokens,
                                  "tokens_per_second": tokens / step_time if step_time > 0 else None})
                if state.step % report_every == 0 or state.step == total_steps:
                    # Throughput over the window's step time only (checkpoints and reports excluded).
                    rate = window_tokens / window_time if window_time > 0 else None
                    done = state.step - start_step
                    eta = (time.monotonic() - run_start) / done * (total_steps - state.step) if done else None
                    self.reporter.update(step=state.step, epoch=round(epoch, 4), loss=window_loss / window_steps,
                                         learning_rate=lr, tokens_per_second=rate,
                                         eta_seconds=int(eta) if eta is not None else None,
                                         gpu_hours=round(self.gpu_hours(), 6))
                    window_loss, window_steps, window_tokens, window_time = 0.0, 0, 0, 0.0

                stop = self._stop_agreed(flag)
                # The budget is checked after the step, so a run always makes progress it can keep.
                spent = state.step < total_steps and self._over_budget()
                if state.step % every == 0 or state.step == total_steps or stop or spent:
                    self._checkpoint(keep)
                    self._oom_window = False
                    # A SIGTERM during the checkpoint: this step is saved, so stop now rather than one step
                    # and one more checkpoint later (a big model's checkpoint can take most of the grace period).
                    stop = stop or self._stop_agreed(flag)
                if stop:
                    raise Preempted(state.step)
                if spent:
                    from finetune_trainer.errors import BudgetExceeded

                    budget = self.spec.budget
                    assert budget is not None
                    raise BudgetExceeded(
                        f"used {self.gpu_hours():.4g} GPU-hours, reaching spec.budget.maxGpuHours "
                        f"({budget.max_gpu_hours:g}), at step {state.step} of {total_steps}; checkpoint "
                        f"{ckpt.prefix(state.step)} is saved: a FineTuneJob with the same output.uri and a larger "
                        "spec.budget.maxGpuHours resumes from it")
        return final_loss

    def _last_logged_loss(self) -> float | None:
        if not self.metrics_path.is_file():
            return None
        losses = [json.loads(line).get("loss") for line in self.metrics_path.read_text().splitlines() if line]
        return next((loss for loss in reversed(losses) if loss is not None), None)

    def _metric(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        self.tracker.metric(record)

    def _checkpoint(self, keep: int) -> None:
        eval_loss = mean_loss(self.accelerator.unwrap_model(self.model), self.inputs.validation,
                              self.hp.batch_size, self.tokenizer.pad_token_id, self.accelerator.device)
        if eval_loss is not None:
            if self.accelerator.is_main_process:
                self._metric({"step": self.state.step, "eval_loss": eval_loss})
            self.reporter.report.eval_loss = eval_loss
        self.state.gpu_seconds = self.gpu_hours() * 3600
        uri = ckpt.save(accelerator=self.accelerator, model=self.model, optimizer=self.optimizer,
                        scheduler=self.scheduler, state=self.state, store=self.store, staging=self.work / "staging",
                        metrics_path=self.metrics_path, fsdp=self.fsdp, save_state=self.method.save_state)
        if self.accelerator.is_main_process:
            ckpt.enforce_retention(self.store, keep)
            self.tracker.checkpoint()
            log.info("checkpoint %s", uri)
        self.accelerator.wait_for_everyone()
        self.reporter.update(checkpoints=self._checkpoint_records())
