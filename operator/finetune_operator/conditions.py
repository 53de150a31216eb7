"""Condition types and reasons of a FineTuneJob, and the metav1.Condition update rule.

The vocabulary follows Kubeflow Trainer's TrainJob: one condition per question a user asks
(`kubectl wait --for=condition=Complete`, `--for=condition=Failed`), each with a CamelCase reason.

Types (each is `True`, `False` or `Unknown`):

- `Valid`: the spec passed validation. False/InvalidSpec names the field; nothing is created.
- `WaitingForBaseJob` (only with spec.baseModel.fromJob, `finetune_operator.chain_wait`): True while the job
  waits for its base job (BaseJobRunning: it exists and has not finished; BaseJobNotFound: not created yet;
  BaseJobArtifactsPending: it Succeeded and its report's artifacts are not read yet), phase Pending and nothing
  created; False/BaseJobSucceeded once the base job Succeeded with its gates passed (status.baseJob then says what
  this job starts from), or False with the failure reason (BaseJobFailed, BaseJobDeleted, BaseJobUnchainable)
  when this job fails because of it.
- `Planned`: the sizing plan exists (status.plan). False/PlanningFailed says why it cannot.
- `Created`: the ConfigMap, Service and Job exist and are ours. False/ForeignChild names an object of
  the same name that something else controls (it is left alone).
- `PreflightPassed` (when the operator runs the CPU pre-flight, `finetune_operator.preflight`): Unknown/
  PreflightRunning while it runs, True/PreflightSucceeded once the model, data and output checked out (the plan
  is then completed from its counts), False with its reason (DataInvalid, ModelUnreadable, OutputNotWritable,
  PreflightFailed) when they did not: no GPU Job is ever created.
- `PilotPassed` (only with spec.pilot): Unknown/PilotRunning while the LoRA pilot runs, True/PilotGatesPassed
  once its Job completed with pilot.gates held (the main Job is created then), False/PilotGatesFailed or
  False/PilotFailed when it did not (no main Job is ever created).
- `Queued`: Kueue manages the job. True/WaitingForAdmission while Kueue keeps the Job suspended,
  False/Admitted once it runs.
- `Running`: training pods run. False with the reason it is not (Starting, Suspended, or the terminal reason).
- `Suspended`: True/Suspended while spec.suspend holds the Job; False/Resumed after; False/KueueManaged
  when spec.suspend cannot be applied because Kueue owns the Job's suspension.
- `Complete`: True/TrainingSucceeded when the Job completed. Terminal.
- `Failed`: True with the failure reason (InvalidSpec, PlanningFailed, BackoffLimitExceeded,
  DeadlineExceeded, GatesFailed, TrainerConfigError, the trainer's own reason such as InvalidData,
  PilotGatesFailed, PilotFailed, the pre-flight's reasons, BudgetExceeded: refused before start when the
  estimate exceeds spec.budget.maxGpuHours, or stopped by the trainer when the cap was reached, the base
  job's BaseJobFailed, BaseJobDeleted and BaseJobUnchainable, ...). Terminal.
- `HallucinationHigh`: only for jobs without spec.retrieval, once the fine-tuned model is evaluated.
  True/HallucinationAboveThreshold when its hallucination score is above evaluation.hallucinationThreshold
  (default 0.5; a Warning event recommends spec.retrieval with the measured score), else
  False/HallucinationWithinThreshold. A recommendation only: gates decide failure.
- `Serving` (only with spec.serving.apply, once the job finished): True/ServingReady when the
  LLMInferenceService the operator created is Ready; Unknown/ServingCreated or ServingPending, False/
  ServingNotReady, ServingCRDMissing (KServe not installed), ServingFailed (the API server refused a request),
  ForeignChild, GatesFailed or NotServed (nothing served). See `finetune_operator.serving_apply`.
- `Tracking` (only with spec.tracking.mlflow, once the trainer reports on it): True/Tracked while the MLflow
  run exists and the last tracking call worked, False/TrackingFailed with the trainer's error when it did not
  (a Warning event when it turns False). Training goes on either way.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

# --- types -------------------------------------------------------------------------------------
VALID = "Valid"
PLANNED = "Planned"
CREATED = "Created"
PREFLIGHT_PASSED = "PreflightPassed"
PILOT_PASSED = "PilotPassed"
QUEUED = "Queued"
RUNNING = "Running"
SUSPENDED = "Suspended"
COMPLETE = "Complete"
FAILED = "Failed"
HALLUCINATION_HIGH = "HallucinationHigh"
#: spec.serving.apply: the LLMInferenceService the operator created for a finished job (`serving_apply`).
SERVING = "Serving"
#: spec.tracking.mlflow: whether the trainer's MLflow tracking works (`status.tracking`).
TRACKING = "Tracking"
#: spec.baseModel.fromJob: whether the job still waits for its base job (`finetune_operator.chain_wait`).
WAITING_FOR_BASE_JOB = "WaitingForBaseJob"

#: Display order in status.conditions (also the order `kubectl describe` shows them).
TYPES: tuple[str, ...] = (VALID, WAITING_FOR_BASE_JOB, PREFLIGHT_PASSED, PLANNED, CREATED, PILOT_PASSED, QUEUED, RUNNING, SUSPENDED, COMPLETE, FAILED,
                          HALLUCINATION_HIGH, SERVING, TRACKING)

TRUE = "True"
FALSE = "False"
UNKNOWN = "Unknown"

# --- reasons -----------------------------------------------------------------------------------
VALID_SPEC = "ValidSpec"
INVALID_SPEC = "InvalidSpec"
PLANNED_REASON = "Planned"
PLANNING_FAILED = "PlanningFailed"
#: The namespace's FineTunePolicy does not exist, or the plan needs more GPUs than it allows.
POLICY_VIOLATION = "PolicyViolation"
CHILDREN_CREATED = "ChildrenCreated"
ADOPTED_CHILDREN = "AdoptedChildren"
CHILDREN_MISSING = "ChildrenMissing"
FOREIGN_CHILD = "ForeignChild"
WAITING_FOR_ADMISSION = "WaitingForAdmission"
ADMITTED = "Admitted"
STARTING = "Starting"
RUNNING_REASON = "Running"
SUSPENDED_REASON = "Suspended"
RESUMED = "Resumed"
KUEUE_MANAGED = "KueueManaged"
TRAINING_SUCCEEDED = "TrainingSucceeded"
BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
DEADLINE_EXCEEDED = "DeadlineExceeded"
POD_FAILURE_POLICY = "PodFailurePolicy"
GATES_FAILED = "GatesFailed"
TRAINER_CONFIG_ERROR = "TrainerConfigError"
JOB_FAILED = "JobFailed"
SPEC_IMMUTABLE = "SpecImmutable"
PREFLIGHT_RUNNING = "PreflightRunning"
PREFLIGHT_SUCCEEDED = "PreflightSucceeded"
#: The pre-flight's verdicts (`finetune_operator.preflight`), and its failure without one.
DATA_INVALID = "DataInvalid"
MODEL_UNREADABLE = "ModelUnreadable"
OUTPUT_NOT_WRITABLE = "OutputNotWritable"
#: spec.serving's adapter has target modules vLLM does not load as LoRA for the model's architecture.
SERVING_UNSUPPORTED = "ServingUnsupported"
PREFLIGHT_FAILED = "PreflightFailed"
PILOT_RUNNING = "PilotRunning"
PILOT_GATES_PASSED = "PilotGatesPassed"
PILOT_GATES_FAILED = "PilotGatesFailed"
PILOT_FAILED = "PilotFailed"
#: The trainer's reason when spec.budget.maxGpuHours was reached (a checkpoint was saved first).
BUDGET_EXCEEDED = "BudgetExceeded"
HALLUCINATION_ABOVE_THRESHOLD = "HallucinationAboveThreshold"
HALLUCINATION_WITHIN_THRESHOLD = "HallucinationWithinThreshold"
#: The `Serving` condition's reasons (`finetune_operator.serving_apply`; GatesFailed and ForeignChild are shared).
SERVING_PENDING = "ServingPending"
SERVING_CRD_MISSING = "ServingCRDMissing"
SERVING_CREATED = "ServingCreated"
SERVING_NOT_READY = "ServingNotReady"
SERVING_READY = "ServingReady"
SERVING_FAILED = "ServingFailed"
NOT_SERVED = "NotServed"
#: The `Tracking` condition's reasons.
TRACKED = "Tracked"
TRACKING_FAILED = "TrackingFailed"
#: The `WaitingForBaseJob` condition's reasons (`finetune_operator.chain_wait`). While it waits:
BASE_JOB_RUNNING = "BaseJobRunning"
BASE_JOB_NOT_FOUND = "BaseJobNotFound"
BASE_JOB_ARTIFACTS_PENDING = "BaseJobArtifactsPending"
#: ... once it may start (also the Normal event's reason):
BASE_JOB_SUCCEEDED = "BaseJobSucceeded"
#: ... and when the base job fails this one (also the Failed condition's reasons):
BASE_JOB_FAILED = "BaseJobFailed"
BASE_JOB_DELETED = "BaseJobDeleted"
BASE_JOB_UNCHAINABLE = "BaseJobUnchainable"
#: Warning events (no condition): a progress report or pre-flight result at the job's output was ignored
#: (another job's, without a jobUid, too large, or invalid: `finetune_operator.progress`).
REPORT_IGNORED = "ReportIgnored"
PREFLIGHT_RESULT_IGNORED = "PreflightResultIgnored"

#: Reasons that end a FineTuneJob for good (besides the trainer's own reasons on PodFailurePolicy).
TERMINAL_FAILURE_REASONS = frozenset(
    {
        INVALID_SPEC,
        PLANNING_FAILED,
        POLICY_VIOLATION,
        BACKOFF_LIMIT_EXCEEDED,
        DEADLINE_EXCEEDED,
        POD_FAILURE_POLICY,
        GATES_FAILED,
        TRAINER_CONFIG_ERROR,
        JOB_FAILED,
        PILOT_GATES_FAILED,
        PILOT_FAILED,
        DATA_INVALID,
        MODEL_UNREADABLE,
        OUTPUT_NOT_WRITABLE,
        SERVING_UNSUPPORTED,
        PREFLIGHT_FAILED,
        BUDGET_EXCEEDED,
        BASE_JOB_FAILED,
        BASE_JOB_DELETED,
        BASE_JOB_UNCHAINABLE,
    }
)

Condition = dict[str, Any]


def find(conditions: Iterable[Mapping[str, Any]] | None, type_: str) -> Condition | None:
    """The condition of this type, or None."""
    for cond in conditions or ():
        if cond.get("type") == type_:
            return dict(cond)
    return None


def is_true(conditions: Iterable[Mapping[str, Any]] | None, type_: str) -> bool:
    cond = find(conditions, type_)
    return cond is not None and cond.get("status") == TRUE


def set_condition(
    conditions: Iterable[Mapping[str, Any]] | None,
    type_: str,
    status: str,
    reason: str,
    message: str,
    generation: int | None,
    now: str,
) -> list[Condition]:
    """Return a new list with the condition of `type_` set (pure; the input is not modified).

    metav1.Condition semantics: `lastTransitionTime` changes only when `status` changes; reason,
    message and observedGeneration are always updated. The list is kept in `TYPES` order, with
    unknown types (written by someone else) after ours in their original order.
    """
    if status not in (TRUE, FALSE, UNKNOWN):
        raise ValueError(f"condition status must be True, False or Unknown, not {status!r}")
    current = [dict(c) for c in conditions or ()]
    old = find(current, type_)
    transition = old["lastTransitionTime"] if old and old.get("status") == status and old.get(
        "lastTransitionTime"
    ) else now
    new: Condition = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": transition,
    }
    if generation is not None:
        new["observedGeneration"] = generation
    rest = [c for c in current if c.get("type") != type_]
    return _ordered([*rest, new])


def remove_condition(conditions: Iterable[Mapping[str, Any]] | None, type_: str) -> list[Condition]:
    """Return a new list without the condition of `type_`."""
    return [dict(c) for c in conditions or () if c.get("type") != type_]


def _ordered(conditions: list[Condition]) -> list[Condition]:
    rank = {t: i for i, t in enumerate(TYPES)}
    ours = sorted((c for c in conditions if c.get("type") in rank), key=lambda c: rank[c["type"]])
    theirs = [c for c in conditions if c.get("type") not in rank]
    return ours + theirs
