"""The training run: a custom accelerate loop with exact checkpoints, resume, evaluation and artifacts.

A custom loop (not transformers' Trainer) because resume must be exact: the checkpoint records the data
position (epoch and micro-batches consumed) next to optimizer, scheduler and RNG states, and batches come
from a deterministic plan (`dataset.batch_plan`, sharded by rank) rather than a sampler's hidden state.

Order of a run (every process runs every phase; rank 0 alone writes to the output):

1. world check (`world.check_size`), output already complete? -> nothing to do
2. data and base model fetched (one process per machine first, then the others from the cache)
3. provenance.json uploaded when `compliance.provenanceRequired` (the run fails if it cannot)
4. resume from the newest complete checkpoint, if any (incomplete ones are deleted); the objective
   (`objectives.build`): for dpo with a precomputed reference, its table is computed here on a fresh run (before
   the base evaluation and the first step) and read from the checkpoint on resume
5. base-model evaluation (fresh runs: the model at step 0, seen through the method's `as_base`: LoRA's
   adapters start at zero, prefix and prompt tuning's virtual tokens are switched off)
6. training (`loop.py`): AdamW, warmup + cosine/linear/constant (`transformers.get_scheduler`), gradient
   accumulation with the loss averaged over the step's items on all ranks (supervised tokens for sft, pairs for dpo),
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

The pieces: this module sets a run up and drives it (the phases above); `loop.py` is the optimizer-step
loop, which talks to the objective (`objectives/`, chosen from `spec.objective` by `objectives.build`: the
batch layout, the loss and its evaluation) and calls back into the run only through `loop.Hooks`;
`assess.py` scores the model, `artifacts.py` publishes the output. Those read the run through
`runtypes.RunContext`, so none of them imports this module.

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
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from finetune_operator.contract import ENV_OUTPUT_URI, TrainerConfig, at_rung
from finetune_operator.spec import Adjustment, CheckpointRecord, MemoryRung
from finetune_trainer import checkpoint as ckpt
from finetune_trainer import dataset as ds
from finetune_trainer import methods, modeling, oom
from finetune_trainer import world as world_mod
from finetune_trainer.inputs import load_inputs
from finetune_trainer.loop import MAX_GRAD_NORM, Loop, Preempted, StopFlag
from finetune_trainer.objectives.build import StoredReference
from finetune_trainer.objectives.build import build as build_objective
from finetune_trainer.objectives.sft import mean_loss, step_loss
from finetune_trainer.report import Reporter, now

log = logging.getLogger(__name__)

#: Importable from here as before the loop and the sft loss moved out (the entrypoint, tests, benches).
__all__ = ["MAX_GRAD_NORM", "Outcome", "Preempted", "Run", "StopFlag", "make_accelerator", "mean_loss", "step_loss"]


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
# The run
# ------------------------------------------------------------------------------------------------


class Run:
    """One training run of `config` writing to `output_uri`."""

    def __init__(self, config: TrainerConfig, output_uri: str | None = None, *, work_dir: Path | None = None):
        from finetune_trainer import storage

        #: The config as given; `self.config` is the one training runs with (`_use_rung`): from the start at the
        #: planned rung, so what reads it before the first attempt (provenance with provenanceRequired) records the
        #: micro-batch and gradient checkpointing that run, never the spec's unset gradientCheckpointing.
        self.requested = config
        self.adjustments = list(config.adjustments)
        self._use_rung(config.start_rung())
        self.method = methods.get(config.method)
        self.output_uri = output_uri or os.environ.get(ENV_OUTPUT_URI) or config.spec.output.uri
        self.store = storage.Store.for_uri(self.output_uri)
        self.cache = modeling.cache_dir()
        self.work = work_dir or self.cache / "work"
        self.started_at = now()
        # Local scratch and checkpoint copies are keyed by the output, so runs of the same job name with
        # different outputs sharing a cache never mix.
        self._output_key = hashlib.sha256(self.output_uri.encode()).hexdigest()[:12]
        #: The objective of the current attempt (`_use_objective`), and its stored dpo reference, if any.
        self.objective: Any = None
        self._reference: StoredReference | None = None
        self._loop: Loop | None = None

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
            # The base model, with a chained stage's earlier adapters merged in (spec.baseModel.fromJob).
            self.start = modeling.materialize_start(self.config, self.cache)
            model_dir = self.start.path
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
                                          in_window=lambda: self._loop is not None and self._loop.oom_window,
                                          release=self._release,
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
        spec = at_rung(self.requested.spec, rung)
        self.config = self.requested.model_copy(update={"spec": spec, "adjustments": list(self.adjustments)})
        self.spec, self.hp = self.config.spec, spec.hyperparameters

    def _attempt(self, rung: MemoryRung) -> tuple[float | None, ckpt.Restored | None]:
        """Model, optimizer and data position at `rung` (from the newest checkpoint, if any), the base
        evaluation of a fresh run, and training; returns the final loss and the checkpoint resumed from."""
        from accelerate.utils import set_seed

        from finetune_trainer import assess

        accelerator, precision = self.accelerator, self.precision
        self._loop = None  # its oom_window is set until its first checkpoint is written
        self.state = ckpt.TrainState()
        restored = self._restore()
        if self._gpu_base is None:  # once per process: a later restore (the ladder) holds this process's time
            self._gpu_base = restored.state.gpu_seconds if restored is not None else 0.0
        if restored is not None:
            # The checkpoint's rung when it is lower: what fitted then fits again, what did not still does not.
            # (Checkpoints from before the ladder trained at the spec's rung.)
            restored.state.rung = restored.state.rung or self.requested.ladder_start().wire()
            rung = oom.lower(rung, MemoryRung.model_validate(restored.state.rung))
            saved = [Adjustment.model_validate(a) for a in restored.state.adjustments]
            self.adjustments[:] = saved + [a for a in self.adjustments if a not in saved]
        self._use_rung(rung)
        self.reporter.update(adjustments=self.adjustments)
        set_seed(self.hp.seed)
        # A checkpoint holds the whole model (full) or an adapter to put on the base (the others).
        base_dir = restored.model_dir if restored is not None and not self.method.adapter else self.model_dir
        model = modeling.load_base(base_dir, self.config.method, precision, accelerator.device, self.config)
        modeling.use_attention(model, accelerator.device.type, self.inputs.train)
        adapter = restored.model_dir if restored is not None and self.method.adapter else None
        model = modeling.prepare_for_training(model, self.config, adapter_dir=adapter)
        trainable, total = modeling.trainable_parameters(model)
        log.info("method %s: %d of %d parameters trainable (%.2f%%)", self.config.method, trainable, total,
                 100.0 * trainable / max(total, 1))

        optimizer = self._optimizer(model)
        model, optimizer = accelerator.prepare(model, optimizer)
        # After prepare: under FSDP only rank 0 loaded the weights, and a precomputed reference's forward passes
        # are collective (every rank computes every pair).
        self._use_objective(model, restored)
        per_rank = self._batches_per_rank()
        steps_per_epoch = ds.steps_per_epoch(per_rank, self.hp.gradient_accumulation_steps)
        total_steps = self.hp.max_steps or max(1, math.ceil(self.hp.epochs * steps_per_epoch))
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

    def _use_objective(self, model: Any, restored: ckpt.Restored | None) -> None:
        """The objective of this attempt (`objectives.build`): for dpo with a precomputed reference, the table
        is computed here on a fresh run, before any step and before the base evaluation, or read from the
        checkpoint resumed from; then the objective adjusts the model (dpo: dropout off)."""
        with self.accelerator.autocast():  # the precision the training forward computes in
            built = build_objective(
                self.spec, self.config.method, selective=self.method.selective_logits, model=model,
                train=self.inputs.train if self.inputs.objective == "dpo" else (), validation=self.inputs.validation
                if self.inputs.objective == "dpo" else (), batch_size=self.hp.batch_size,
                pad_id=self.tokenizer.pad_token_id, device=self.accelerator.device,
                restored_dir=restored.directory if restored is not None else None, known=self._reference)
        self.objective, self._reference = built.objective, built.reference
        self.objective.prepare(model)

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
        lengths = [self.objective.length(item) for item in self.inputs.train]
        packed = self.objective.packable and self.hp.packing
        plan = ds.batch_plan(lengths, self.hp.batch_size, self.hp.seed, 0, not packed,
                             self.hp.gradient_accumulation_steps, self.world)
        per_rank = len(plan) // self.world
        if per_rank == 0:
            from finetune_trainer.errors import DataError

            raise DataError(
                f"{len(self.inputs.train)} training {'pairs' if self.inputs.objective == 'dpo' else 'rows'} make {len(plan)} batch(es) of "
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
        """The optimizer steps from `self.state` to `total_steps` (`loop.Loop`, this run its hooks)."""
        if self.state.step < total_steps:
            self.reporter.phase("training", step=self.state.step)
        self._loop = Loop(objective=self.objective, items=self.inputs.train, accelerator=self.accelerator,
                          model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, state=self.state,
                          hp=self.hp, every=self.spec.checkpoint.every_steps, rank=self.rank, world=self.world,
                          pad_id=self.tokenizer.pad_token_id, per_rank=per_rank, total_steps=total_steps)
        return self._loop.run(self)

    # -- loop.Hooks: what the loop asks of the run (the private methods are what benches and tests patch) --

    def log_metric(self, record: dict[str, Any]) -> None:
        self._metric(record)

    def report_progress(self, **fields: Any) -> None:
        self.reporter.update(**fields, gpu_hours=round(self.gpu_hours(), 6))

    def should_stop(self, flag: StopFlag) -> bool:
        return self._stop_agreed(flag)

    def over_budget(self) -> bool:
        return self._over_budget()

    def budget_exceeded(self, step: int, total_steps: int) -> Exception:
        from finetune_trainer.errors import BudgetExceeded

        budget = self.spec.budget
        assert budget is not None
        return BudgetExceeded(
            f"used {self.gpu_hours():.4g} GPU-hours, reaching spec.budget.maxGpuHours "
            f"({budget.max_gpu_hours:g}), at step {step} of {total_steps}; checkpoint "
            f"{ckpt.prefix(step)} is saved: a FineTuneJob with the same output.uri and a larger "
            "spec.budget.maxGpuHours resumes from it")

    def save_checkpoint(self) -> None:
        self._checkpoint(self.spec.checkpoint.keep)

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
        # The objective's loss on the validation split (dpo: the DPO loss against the training reference, with
        # the validation pairs' preference accuracy and margin beside it, logged as eval_*).
        scores = self.objective.evaluate(self.accelerator.unwrap_model(self.model), self.inputs.validation,
                                         self.hp.batch_size, self.tokenizer.pad_token_id, self.accelerator.device)
        eval_loss = scores.get("eval_loss")
        if eval_loss is not None:
            if self.accelerator.is_main_process:
                extra = {f"eval_{k}": v for k, v in sorted(scores.items()) if k != "eval_loss"}
                self._metric({"step": self.state.step, "eval_loss": eval_loss, **extra})
            self.reporter.report.eval_loss = eval_loss
        self.state.gpu_seconds = self.gpu_hours() * 3600
        uri = ckpt.save(accelerator=self.accelerator, model=self.model, optimizer=self.optimizer,
                        scheduler=self.scheduler, state=self.state, store=self.store, staging=self.work / "staging",
                        metrics_path=self.metrics_path, fsdp=self.fsdp, save_state=self.method.save_state,
                        extra=self._reference.save if self._reference is not None else None)
        if self.accelerator.is_main_process:
            ckpt.enforce_retention(self.store, keep)
            self.tracker.checkpoint()
            log.info("checkpoint %s", uri)
        self.accelerator.wait_for_everyone()
        self.reporter.update(checkpoints=self._checkpoint_records())
