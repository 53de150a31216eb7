"""The contract between the operator and the trainer pods.

1. **Config snapshot** (`TrainerConfig`): the operator resolves a FineTuneJob (defaults filled in, `auto`
   resolved, the plan attached) and stores it as JSON in a ConfigMap mounted at `CONFIG_PATH`. Later edits
   of the FineTuneJob cannot change a running job.
2. **World** (environment): `ENV_*` names below. The machine rank comes from `JOB_COMPLETION_INDEX` of the
   Indexed Job; the main address is pod 0's stable DNS name through the headless Service.
3. **Progress report** (`TrainerReport`): rank 0 writes `<output.uri>/REPORT_KEY` (JSON) after every
   logging step, checkpoint and phase change. It lives next to the checkpoints, so it survives pod and
   operator restarts; the operator reads it to fill `status.progress`, `checkpoints`, `artifacts` and
   `evaluation`. `finetune run --local` renders its progress bar from the same object. The report and the
   pre-flight's result carry the FineTuneJob's uid (`jobUid`, from the snapshot's `uid`): the operator reads
   them with its own identity from wherever a spec points, and takes only its own job's, within the size
   and list caps (`MAX_REPORT_*`, `MAX_PREFLIGHT_*`, `progress.MAX_REPORT_BYTES`).
4. **Exit codes** (`EXIT_*`): the Job's podFailurePolicy fails the job at once on `EXIT_CONFIG_ERROR` and
   `EXIT_GATES_FAILED` (retrying cannot help), and retries anything else within backoffLimit.
5. **Completion markers**: a checkpoint or the final artifact set is complete only when its marker object
   (`MARKER_NAME`) exists; markers are written last.
6. **Out-of-memory ladder** (`next_rung`): the rule both sides use to step down after an out-of-memory
   error. The trainer applies it in-process (`finetune_trainer.oom`) and reports every step as an
   `Adjustment` (`TrainerReport.adjustments`); after a pod killed as OOMKilled the operator applies it once
   and passes the result to the next pod in `TrainerConfig.adjustments`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from finetune_operator.spec import (
    Adjustment,
    BaseJobStatus,
    CheckpointRecord,
    EvaluationStatus,
    ExportCheck,
    FineTuneJob,
    FineTuneJobSpec,
    MemoryRung,
    Plan,
    ResolvedMethod,
    TrackingStatus,
    _Model,
)

CONFIG_PATH = "/etc/finetune/job.json"
CONFIG_KEY = "job.json"

ENV_CONFIG = "FT_CONFIG"
ENV_NUM_MACHINES = "FT_NUM_MACHINES"
ENV_MACHINE_RANK = "JOB_COMPLETION_INDEX"  # set by Kubernetes on Indexed Job pods
ENV_MAIN_ADDRESS = "FT_MAIN_ADDRESS"
ENV_MAIN_PORT = "FT_MAIN_PORT"
ENV_PROCS_PER_MACHINE = "FT_PROCS_PER_MACHINE"
ENV_OUTPUT_URI = "FT_OUTPUT_URI"
ENV_CACHE_DIR = "FT_CACHE_DIR"
#: Seconds the c10d rendezvous waits for every machine; a missing peer then fails the pod.
ENV_RDZV_TIMEOUT = "FT_RDZV_TIMEOUT"
DEFAULT_RDZV_TIMEOUT = 300
#: Mount roots a `pvc://claim/path` URI resolves under (`<root>/<claim>/<path>`), and the roots `file://`
#: paths must stay inside.
ENV_PVC_ROOT = "FT_PVC_ROOT"
ENV_ALLOWED_ROOTS = "FT_ALLOWED_ROOTS"
DEFAULT_PVC_ROOT = "/mnt/pvc"
DEFAULT_MAIN_PORT = 29500

REPORT_KEY = "status/report.json"
#: Caps on the lists of a report and of a pre-flight result: the operator reads these objects from storage a
#: tenant names, so one over a cap is refused whole (never truncated); the trainer's own stay well under.
MAX_REPORT_CHECKPOINTS = 128  # spec.checkpoint.keep is at most 100 (one more while the oldest is pruned)
MAX_REPORT_ARTIFACTS = 32  # the kinds of artifact (status.artifacts has the same bound)
MAX_REPORT_ADJUSTMENTS = 64  # the config's (at most 16) and the trainer's own ladder steps
MAX_PREFLIGHT_SPLITS = 8  # train, validation, test set
MAX_PREFLIGHT_FILES = 256  # per split: the trainer lists the first ones (the split's counts cover them all)
#: The CPU pre-flight's result (`PreflightResult`), at `<output.uri>/PREFLIGHT_KEY`.
PREFLIGHT_KEY = "preflight.json"
PREFLIGHT_VERSION = 1
CHECKPOINTS_PREFIX = "checkpoints/"
MARKER_NAME = "_COMPLETE"

EXIT_OK = 0
EXIT_CONFIG_ERROR = 3  # bad spec, data, credentials or missing object: do not retry
EXIT_GATES_FAILED = 4  # evaluation gates missed: do not retry
EXIT_PREEMPTED = 143  # SIGTERM handled: checkpoint saved, pod may be rescheduled

TrainerPhase = Literal["starting", "training", "evaluating", "uploading", "complete", "failed"]


class TrainerConfig(_Model):
    """What the trainer runs: the resolved job, frozen when the workload was created."""

    name: str = Field(description="FineTuneJob name.")
    namespace: str = Field(default="default", description="FineTuneJob namespace.")
    uid: str | None = Field(default=None, description="FineTuneJob UID (recorded in provenance).")
    generation: int | None = Field(default=None, description="Spec generation the snapshot was taken from.")
    method: ResolvedMethod = Field(description="Resolved training method.")
    plan: Plan = Field(description="The sizing plan.")
    spec: FineTuneJobSpec = Field(description="The full spec with every default filled in.")
    image: str | None = Field(default=None, description="Trainer image (recorded in provenance).")
    rendezvous_id: str | None = Field(
        default=None, max_length=64,
        description="Random id of this job's c10d rendezvous (torchrun's --rdzv-id, which names the keys of the "
        "store on machine 0), drawn when the ConfigMap is created. Left at torch's default `none`, any pod that "
        "can reach the rendezvous port could address the store of any job it knows the name of.")
    stage: Literal["pilot", "preflight"] | None = Field(
        default=None, description="`pilot` for the LoRA pilot of spec.pilot (its spec is the derived pilot run); "
        "`preflight` for the CPU pre-flight's snapshot (its plan is the preliminary one); unset for the main run.")
    adjustments: list[Adjustment] = Field(
        default_factory=list, max_length=16,
        description="Out-of-memory adjustments made before this pod, oldest first (the operator adds one after a pod "
        "OOMKilled, from `next_rung`). The trainer starts at the last one's `to` rung (or lower, if a checkpoint "
        "was written at a lower one) and keeps them at the head of its report's adjustments.")

    base: BaseJobStatus | None = Field(
        default=None,
        description="With spec.baseModel.fromJob: what the chain resolved to (spec.baseModel.uri is set to its "
        "modelUri): the adapters to merge into the base before this job's method, and the earlier stages "
        "(recorded in provenance).")

    def start_rung(self) -> MemoryRung:
        """Where training starts: the last adjustment's rung, else the plan's (`sizing.choose_rung`), else, for a
        snapshot of a plan made before plans chose a rung, the spec's hyperparameters."""
        if self.adjustments:
            return self.adjustments[-1].to
        if self.plan.rung is not None:
            return self.plan.rung
        return spec_rung(self.spec)

    def gradient_checkpointing(self) -> bool:
        """Whether this config trains with gradient checkpointing: the spec's, as the trainer sets it to the rung it
        runs (`at_rung`); unset (the plan decides), the start rung's. Never unset-as-off."""
        checkpointing = self.spec.hyperparameters.gradient_checkpointing
        return checkpointing if checkpointing is not None else self.start_rung().gradient_checkpointing

    def ladder_start(self) -> MemoryRung:
        """Where the out-of-memory ladder began: the plan's rung (else the spec's), whatever adjustments followed.
        `next_rung` turns gradient checkpointing on only below this rung's micro-batch."""
        return self.plan.rung if self.plan.rung is not None else spec_rung(self.spec)


class TrainerError(_Model):
    reason: str = Field(description="CamelCase reason, e.g. InvalidData, MissingObject, GatesFailed.")
    message: str = Field(description="What went wrong and how to fix it.")


class DataStats(_Model):
    """What the trainer made of the data, known once it has been read (before the first step)."""

    train_examples: int = Field(description="Training examples trained on (after skipped rows and drops).")
    validation_examples: int = Field(description="Validation examples (eval loss); 0 without validation.")
    skipped_rows: int = Field(
        description="Invalid rows dropped under spec.dataset.invalidRows: skip (train, validation and test).")
    truncated_examples: int = Field(
        description="Training examples longer than maxSeqLength: cut to it, or dropped (and not counted in "
        "trainExamples) when no answer token was left.")


class TrainerReport(_Model):
    """The progress object rank 0 keeps at `<output.uri>/status/report.json`."""

    job_uid: str | None = Field(
        default=None, max_length=128, description="metadata.uid of the FineTuneJob this report is for (the config "
        "snapshot's `uid`). The operator ignores a report whose jobUid is not its FineTuneJob's, or is missing: "
        "another job's report, at an output URI a tenant pointed at someone else's prefix.")
    phase: TrainerPhase = Field(description="Where the trainer is.")
    step: int = 0
    total_steps: int = 0
    epoch: float | None = None
    loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: int | None = None
    gpu_hours: float | None = Field(
        default=None, description="GPU-hours used so far over every attempt: wall-clock hours of the training "
        "processes times their number, as spec.budget.maxGpuHours counts them.")
    world_size: int | None = None
    resumed_from_step: int | None = None
    data_stats: DataStats | None = None
    checkpoints: list[CheckpointRecord] = Field(default_factory=list, max_length=MAX_REPORT_CHECKPOINTS)
    artifacts: dict[str, str] = Field(default_factory=dict, max_length=MAX_REPORT_ARTIFACTS)
    evaluation: EvaluationStatus | None = None
    export: ExportCheck | None = Field(
        default=None, description="The saved adapter and merged model checked against the trained model (the operator "
        "copies it to status.export).")
    tracking: TrackingStatus | None = Field(
        default=None, description="The MLflow run, the registered model version, and the last tracking failure "
        "(status.tracking; a failure sets the Tracking condition False with a Warning event).")
    error: TrainerError | None = None
    adjustments: list[Adjustment] = Field(
        default_factory=list, max_length=MAX_REPORT_ADJUSTMENTS,
        description="Out-of-memory adjustments of this job, oldest first: those passed in the config (operator, after "
        "an OOMKilled pod), then the trainer's own (`torch.OutOfMemoryError` in the first steps: the step, the rung that "
        "ran out of memory, the rung it continued with, and the error). The operator copies them to "
        "status.adjustments.")
    updated_at: str = Field(description="RFC 3339 time of this report.")


class PreflightArchitecture(_Model):
    """The base model's shape as the pre-flight read it (`architecture.Architecture`, torch-free)."""

    parameters: int = Field(description="Exact parameter count (safetensors headers), or computed from config.json.")
    parameters_source: str = Field(description="Where the count came from: safetensors headers or config.json.")
    layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    attention_heads: int
    kv_heads: int
    head_dim: int
    tied_embeddings: bool
    dtype: str | None = None
    model_type: str | None = None


class PreflightFile(_Model):
    """One data file of a split."""

    uri: str
    rows: int = Field(description="Rows read from the file (valid and skipped).")
    tokens: int = Field(description="Tokens of the valid rows with the model's tokenizer, as each example is "
                        "encoded for training but before truncation to maxSeqLength; extrapolated when sampled.")
    sampled: bool = Field(description="Whether `tokens` is extrapolated from the first `sampleRows` valid rows.")
    sample_rows: int = Field(description="Valid rows tokenized.")


class PreflightSplit(_Model):
    """One dataset field (spec.dataset.train, spec.dataset.validation, spec.evaluation.testSet)."""

    field: str = Field(description="The spec field, e.g. spec.dataset.train.")
    uri: str
    format: str = Field(description="The format the rows were checked against (declared or detected).")
    examples: int = Field(description="Valid rows, before any validationSplit or held-out test set is taken.")
    skipped_rows: int = Field(default=0, description="Invalid rows dropped under invalidRows: skip.")
    tokens: int = Field(description="Sum of the files' tokens (extrapolated where sampled).")
    sampled: bool = Field(description="Whether any file's token count is extrapolated from a sample.")
    longer_than_max_seq_length: int = Field(
        default=0, description="Tokenized rows longer than maxSeqLength (counted in the sample only).")
    pairs: int | None = Field(default=None, description="Preference pairs (format preference): equal to examples.")
    tokens_per_pair: float | None = Field(default=None, description="Mean tokens per pair: prompt, chosen and "
                                          "rejected (format preference; over the sample when sampled).")
    length_bias: float | None = Field(default=None, description="Mean chosen minus rejected response tokens "
                                      "(format preference; over the sample when sampled).")
    files: list[PreflightFile] = Field(
        default_factory=list, max_length=MAX_PREFLIGHT_FILES,
        description="The split's first files (all of them up to MAX_PREFLIGHT_FILES); the counts above cover every file.")


class PreflightResult(_Model):
    """What the CPU pre-flight found, at `<output.uri>/preflight.json` (`python -m finetune_trainer.preflight`)."""

    version: int = Field(default=PREFLIGHT_VERSION, description="Schema version of this object.")
    job_uid: str | None = Field(
        default=None, max_length=128, description="metadata.uid of the FineTuneJob checked (the config snapshot's "
        "`uid`); the operator ignores a result that is not its FineTuneJob's, as for `TrainerReport.jobUid`.")
    ok: bool = Field(description="Whether every check passed.")
    model_uri: str
    revision: str | None = None
    output_uri: str
    architecture: PreflightArchitecture | None = None
    splits: list[PreflightSplit] = Field(default_factory=list, max_length=MAX_PREFLIGHT_SPLITS)
    error: TrainerError | None = Field(
        default=None, description="The first failure: reason ModelUnreadable, DataInvalid or OutputNotWritable, and "
        "a message naming the URI, file and line.")
    checked_at: str = Field(description="RFC 3339 time of the check.")


def spec_rung(spec: FineTuneJobSpec) -> MemoryRung:
    """The memory rung the spec asks for, as it ran before plans chose one: gradientCheckpointing unset (the plan
    decides) counts as on, its default then; where there is a plan, `TrainerConfig.start_rung` takes the plan's."""
    hp = spec.hyperparameters
    checkpointing = hp.gradient_checkpointing if hp.gradient_checkpointing is not None else checkpointing_allowed(
        spec.method)
    return MemoryRung(micro_batch=hp.batch_size, grad_accum=hp.gradient_accumulation_steps,
                      gradient_checkpointing=checkpointing)


def at_rung(spec: FineTuneJobSpec, rung: MemoryRung) -> FineTuneJobSpec:
    """`spec` with its hyperparameters' micro-batch, accumulation and gradient checkpointing those of `rung`: what
    the memory model (`sizing.choose_rung`) and the trainer (`finetune_trainer.train`) read for that rung."""
    hp = spec.hyperparameters.model_copy(update={
        "batch_size": rung.micro_batch, "gradient_accumulation_steps": rung.grad_accum,
        "gradient_checkpointing": rung.gradient_checkpointing})
    return spec.model_copy(update={"hyperparameters": hp})


def checkpointing_allowed(method: str) -> bool:
    """Whether the ladder may turn gradient checkpointing on (not for prefix tuning: see the spec)."""
    return method != "prefix"


def next_rung(current: MemoryRung, start: MemoryRung, *, checkpointing: bool = True) -> MemoryRung | None:
    """The next rung down the out-of-memory ladder from `current` (the run began at `start`), or None at
    the bottom.

    In order: halve the micro-batch and double the gradient accumulation; once halved, turn gradient
    checkpointing on (when `checkpointing` allows it); then keep halving down to a micro-batch of 1. A
    micro-batch that is odd goes to its largest divisor at most half of it (6 -> 3, 5 -> 1), so every rung
    keeps microBatch x gradAccum: each optimizer step trains on the same examples, and the loss curve is that
    of a run started at the new rung. Pure: no state, no I/O.
    """
    turn_on = checkpointing and not current.gradient_checkpointing
    if turn_on and current.micro_batch < start.micro_batch:
        return current.model_copy(update={"gradient_checkpointing": True})
    smaller = current.halved()
    if smaller is not None:
        return smaller
    if turn_on:
        return current.model_copy(update={"gradient_checkpointing": True})
    return None


def describe(rung: MemoryRung) -> str:
    """`micro-batch 4 x 4 accumulation, gradient checkpointing on` (the trainer's messages and the operator's
    events name rungs the same way)."""
    return (f"micro-batch {rung.micro_batch} x {rung.grad_accum} accumulation, gradient checkpointing "
            f"{'on' if rung.gradient_checkpointing else 'off'}")


def lower(a: MemoryRung, b: MemoryRung) -> MemoryRung:
    """The rung of `a` and `b` that needs less memory (a smaller micro-batch, then checkpointing on)."""
    return min(a, b, key=lambda r: (r.micro_batch, not r.gradient_checkpointing))


def resolve(job: FineTuneJob, plan: Plan, image: str | None = None, stage: Literal["pilot", "preflight"] | None = None,
            rendezvous_id: str | None = None, base: BaseJobStatus | None = None) -> TrainerConfig:
    """Freeze a job into the trainer's config snapshot. `base`: with spec.baseModel.fromJob, what the chain resolved
    to (`chain.resolve`); `job` is then the applied one (`chain.apply`: spec.baseModel.uri is base.modelUri)."""
    spec = job.spec.model_copy(deep=True)
    spec.method = plan.method  # `auto` resolved once, here
    if plan.method == "qlora" and spec.quantization is None:
        spec.quantization = spec.resolved_quantization()
    if plan.method == "prefix" and spec.prefix is None:
        spec.prefix = spec.resolved_prefix()
    if plan.method == "prompt" and spec.prompt is None:
        spec.prompt = spec.resolved_prompt()
    return TrainerConfig(
        name=job.metadata.name,
        namespace=job.metadata.namespace,
        uid=job.metadata.uid,
        generation=job.metadata.generation,
        method=plan.method,
        plan=plan,
        spec=spec,
        image=image or spec.image,
        stage=stage,
        rendezvous_id=rendezvous_id,
        base=base,
    )


def config_json(config: TrainerConfig) -> str:
    """Stable JSON for the ConfigMap (sorted keys, so the rendered object is deterministic)."""
    import json

    data: dict[str, Any] = config.model_dump(by_alias=True, exclude_none=True, mode="json")
    if not data.get("adjustments"):
        # Only after an OOMKilled pod: a job's first snapshot stays what it was before the field existed.
        data.pop("adjustments", None)
    return json.dumps(data, sort_keys=True, indent=2)
