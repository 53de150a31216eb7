"""The status function: what a FineTuneJob's status is, given what the operator observed. Pure.

`compute_status` takes the FineTuneJob (its old status included), the outcome of validation and planning,
the observed children (the batch/v1 Job and its pods) and the trainer's progress report, and returns the
complete new status. It does no I/O and reads no clock (`now` is passed in), so every situation is a row
in a table test, and the operator is a thin loop around it (KAITO's pattern).

Phases (status.phase) and the condition that decides each:

==========  ===================================================================  =====================
phase       when                                                                 deciding condition
==========  ===================================================================  =====================
Failed      the spec is invalid (nothing is created), it cannot be planned, or   Failed=True/<reason>
            the Job failed (BackoffLimitExceeded, DeadlineExceeded, the
            trainer's own reason on PodFailurePolicy, e.g. InvalidData,
            GatesFailed; TrainerConfigError/GatesFailed from the exit code when
            no report can be read)
Succeeded   the Job has condition Complete=True                                  Complete=True/TrainingSucceeded
Queued      Kueue manages the job and keeps its Job suspended (not admitted)     Queued=True/WaitingForAdmission
Suspended   the Job is suspended by spec.suspend                                 Suspended=True/Suspended
Running     at least one training pod runs (or is ready)                         Running=True/Running
Pending     children missing or foreign, or pods not running yet; or, with      Created=False or Running=False/Starting;
            spec.baseModel.fromJob, waiting for the base job                     WaitingForBaseJob=True
==========  ===================================================================  =====================

With spec.baseModel.fromJob the job first waits for its base job (`finetune_operator.chain_wait`): phase Pending,
WaitingForBaseJob True with the reason it waits (BaseJobRunning, BaseJobNotFound, BaseJobArtifactsPending), Running
False/WaitingForBaseJob, status.baseJob the base job's name, uid when first seen and phase when last seen, and no
other condition (nothing is planned or created). A base job that failed, was deleted (or recreated) while this
job waited, or whose result cannot be started from fails this job (Failed=True/BaseJobFailed, BaseJobDeleted or
BaseJobUnchainable, naming it). Once it Succeeded with its gates passed, status.baseJob holds the resolution
(`chain.resolve`: model, adapters, chain) and WaitingForBaseJob turns False/BaseJobSucceeded; everything after
that is as for any job, planned from `chain.apply(spec, status.baseJob)`.

The CPU pre-flight (`finetune_operator.preflight`, when the operator runs it) comes first: stage `Preflight`,
condition PreflightPassed Unknown/PreflightRunning while its Job runs (the phase is that Job's: Pending,
Running or Suspended), `status.plan` the preliminary plan from the model's size (or none with Planned
Unknown when no size is known before the pre-flight reads it). Its Job failing ends the FineTuneJob Failed
with the pre-flight's reason (DataInvalid, ModelUnreadable, OutputNotWritable; PreflightFailed for a Job that
failed without a verdict, with the pod's termination message); its Job completing sets
PreflightPassed=True/PreflightSucceeded, `status.preflight` (counts, the result's URI) and the completed
plan, or fails the job with BudgetExceeded when the plan's estimate is above spec.budget.maxGpuHours. The
status written then is the last of the stage: the next stage follows in the same pass.

With spec.pilot the job has two GPU stages (`status.stage`): while the LoRA pilot runs (`Pilot`), the phase
is decided by the pilot's Job as above and its plan, progress, evaluation and artifacts go to
`status.pilot`; condition PilotPassed is Unknown/PilotRunning. The pilot's Job Complete means its gates held
(the trainer fails the Job otherwise): PilotPassed=True/PilotGatesPassed, `status.pilot.phase` Succeeded,
and the main stage (`Main`) follows from the main Job exactly as without a pilot. The pilot's Job Failed
ends the FineTuneJob Failed with reason PilotGatesFailed (the trainer's GatesFailed, or exit code 4),
naming the missed gates and the pilot's scores, or PilotFailed (any other failure, its reason in the
message); the main Job is never created.

Succeeded and Failed are terminal: once reached, later observations (the Job deleted by its TTL, a
stray report) change only progress, checkpoints, artifacts and evaluation, never the phase.

Restarts count training-pod failures (Job status.failed) plus preemptions and evictions (pods with
condition DisruptionTarget=True, which the Job's podFailurePolicy ignores, so they are not in
status.failed). Pods can be garbage-collected, so the count never goes below its previous value.

HallucinationHigh (jobs without spec.retrieval): once status.evaluation has the fine-tuned model's
hallucination score, True/HallucinationAboveThreshold when it is above evaluation.hallucinationThreshold
(default `spec.DEFAULT_HALLUCINATION_THRESHOLD`), else False/HallucinationWithinThreshold; it turning True
posts a Warning event that recommends spec.retrieval and gives the score. It changes no phase: gates
decide failure.

Tracking (spec.tracking.mlflow): status.tracking is the report's (MLflow run, registered version, last
failure); the condition is False/TrackingFailed with the trainer's error while the report carries one (it
turning False posts a Warning event), else True/Tracked once the run exists. It changes no phase: tracking
failures never fail training.

Progress, checkpoints, artifacts and evaluation come from the trainer's report
(`<output.uri>/status/report.json`). Without a readable report (pvc:// outputs, S3 trouble) they keep
their previous values. A report older than the FineTuneJob is from an earlier run with the same
output URI and is ignored.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from finetune_operator import chain_wait
from finetune_operator import conditions as c
from finetune_operator import preflight as preflight_mod
from finetune_operator.contract import EXIT_CONFIG_ERROR, EXIT_GATES_FAILED, PreflightResult, TrainerReport
from finetune_operator.spec import DEFAULT_HALLUCINATION_THRESHOLD, FineTuneJobStatus, Plan

PENDING = "Pending"
QUEUED = "Queued"
RUNNING = "Running"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
SUSPENDED = "Suspended"
PHASES: tuple[str, ...] = (PENDING, QUEUED, RUNNING, SUCCEEDED, FAILED, SUSPENDED)
TERMINAL_PHASES = frozenset({SUCCEEDED, FAILED})
STAGE_PREFLIGHT = "Preflight"
STAGE_PILOT = "Pilot"
STAGE_MAIN = "Main"

#: Status keys this module owns (camelCase, as on the wire): exactly FineTuneJobStatus' fields.
OWNED_KEYS: tuple[str, ...] = tuple(
    f.alias or name for name, f in FineTuneJobStatus.model_fields.items()
)

_MAX_CHECKPOINTS = 100
_MAX_MESSAGE = 2048


@dataclass(frozen=True)
class Children:
    """What the operator found (and did) for a FineTuneJob's children in one reconcile pass.

    `job` is the batch/v1 Job as read from the API (None when it does not exist), `pods` its training pods.
    `created`/`adopted` list "Kind/name" of children created or adopted in this pass; `foreign` holds one
    message per child that exists under our name but is controlled by something else (left untouched).
    """

    job: Mapping[str, Any] | None = None
    pods: Sequence[Mapping[str, Any]] = ()
    created: tuple[str, ...] = ()
    adopted: tuple[str, ...] = ()
    foreign: tuple[str, ...] = ()


@dataclass(frozen=True)
class PilotView:
    """What the operator observed of the pilot stage (spec.pilot) in one pass: its plan (None with
    `planning_error`), its children and its report (`<output.uri>/pilot/status/report.json`). Ignored once
    status.pilot.phase is Succeeded."""

    plan: Plan | None = None
    children: Children = field(default_factory=Children)
    report: TrainerReport | None = None
    planning_error: str | None = None


@dataclass(frozen=True)
class PreflightView:
    """What the operator observed of the CPU pre-flight (`finetune_operator.preflight`) in one pass: its
    children, its result once its Job finished (None before, or when unreadable), the plan completed from
    that result (or `planning_error`), and whether the operator can read results at this output at all
    (`readable`: False for pvc:// outputs, whose plan stays the one from the model's size)."""

    children: Children = field(default_factory=Children)
    result: PreflightResult | None = None
    plan: Plan | None = None
    planning_error: str | None = None
    readable: bool = True
    result_uri: str | None = None


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post for a status transition."""

    type: str  # Normal or Warning
    reason: str
    message: str


@dataclass
class _Builder:
    old: dict[str, Any]
    generation: int | None
    now: str
    conditions: list[dict[str, Any]] = field(default_factory=list)

    def set(self, type_: str, status: str, reason: str, message: str) -> None:
        self.conditions = c.set_condition(
            self.conditions, type_, status, reason, _clip(message), self.generation, self.now
        )

    def clear(self, type_: str, reason: str, message: str) -> None:
        """Set a condition False only if it exists (conditions that never applied stay absent)."""
        if c.find(self.conditions, type_) is not None:
            self.set(type_, c.FALSE, reason, message)


def compute_status(
    job: Mapping[str, Any],
    *,
    plan: Plan | None,
    validation_error: str | None = None,
    planning_error: str | None = None,
    children: Children | None = None,
    report: TrainerReport | None = None,
    kueue_managed: bool = False,
    pilot: PilotView | None = None,
    preflight: PreflightView | None = None,
    policy_violation: str | None = None,
    chain: chain_wait.Verdict | None = None,
    now: str,
) -> dict[str, Any]:
    """The new status of FineTuneJob `job` (a dict as read from the API). See the module docstring.

    `preflight`: the pre-flight stage runs (its status is not Succeeded yet); `plan` is then the preliminary
    plan from the model's size (None when no size is known before the pre-flight reads it).
    `chain`: spec.baseModel.fromJob's verdict in a pass that has not resolved it before (`chain_wait.decide`);
    the status is then that verdict's alone (waiting, failed, or resolved and about to start)."""
    meta = job.get("metadata") or {}
    spec = job.get("spec") or {}
    old: dict[str, Any] = dict(job.get("status") or {})
    children = children or Children()
    b = _Builder(old, meta.get("generation"), now, [dict(x) for x in old.get("conditions") or []])
    new: dict[str, Any] = {k: v for k, v in old.items() if k in OWNED_KEYS}
    new["observedGeneration"] = meta.get("generation")
    report = report if _fresh(report, meta.get("creationTimestamp")) else None

    if validation_error is not None:
        b.set(c.VALID, c.FALSE, c.INVALID_SPEC, validation_error)
        _fail(new, b, c.INVALID_SPEC, validation_error, None)
        return _finish(new, b)
    b.set(c.VALID, c.TRUE, c.VALID_SPEC, "the spec is valid")

    if old.get("phase") in TERMINAL_PHASES:
        _apply_report(new, report, terminal=True)
        _hallucination(new, b, spec)
        _tracking(b, new.get("tracking"))
        return _finish(new, b)

    if chain is not None:
        _chain_stage(new, b, chain)
        return _finish(new, b)
    if policy_violation is not None:
        # Before any child: the namespace's FineTunePolicy refuses the job (finetune_operator.policy).
        b.set(c.PLANNED, c.FALSE, c.POLICY_VIOLATION, policy_violation)
        _fail(new, b, c.POLICY_VIOLATION, policy_violation, None)
        return _finish(new, b)
    if preflight is not None:
        if planning_error is not None:
            b.set(c.PLANNED, c.FALSE, c.PLANNING_FAILED, planning_error)
            _fail(new, b, c.PLANNING_FAILED, planning_error, None)
            return _finish(new, b)
        if _preflight_stage(new, b, plan, preflight, meta, spec):
            return _finish(new, b)
        return _finish(new, b)  # passed: the caller writes this (the completed plan) and goes on
    if planning_error is not None or plan is None:
        message = planning_error or "no sizing plan"
        b.set(c.PLANNED, c.FALSE, c.PLANNING_FAILED, message)
        _fail(new, b, c.PLANNING_FAILED, message, None)
        return _finish(new, b)
    new["plan"] = plan.wire()
    b.set(c.PLANNED, c.TRUE, c.PLANNED_REASON, _plan_message(plan))
    if pilot is not None:
        if _pilot_stage(new, b, plan, pilot, meta, spec, kueue_managed):
            return _finish(new, b)
        new["stage"] = STAGE_MAIN
    elif new.get("stage") == STAGE_PREFLIGHT:
        new["stage"] = STAGE_MAIN

    _apply_report(new, report, terminal=False)
    _hallucination(new, b, spec)
    _tracking(b, new.get("tracking"))
    job_obj = children.job
    if children.foreign:
        b.set(c.CREATED, c.FALSE, c.FOREIGN_CHILD, "; ".join(children.foreign))
        _pending(new, b, c.FOREIGN_CHILD, "waiting for the conflicting objects to be removed")
        return _finish(new, b)
    if job_obj is None:
        b.set(c.CREATED, c.FALSE, c.CHILDREN_MISSING, "the Job does not exist yet")
        _pending(new, b, c.STARTING, "the Job does not exist yet")
        return _finish(new, b)
    _set_created(b, children)

    jstatus = job_obj.get("status") or {}
    jconds = jstatus.get("conditions") or []
    new["restarts"] = max(int(old.get("restarts") or 0), _restarts(jstatus, children.pods))

    complete = _true_condition(jconds, "Complete")
    failed = _true_condition(jconds, "Failed")
    if complete is not None:
        new["phase"] = SUCCEEDED
        new["completionTime"] = jstatus.get("completionTime") or complete.get("lastTransitionTime") or now
        new["startTime"] = new.get("startTime") or jstatus.get("startTime") or new["completionTime"]
        message = "training finished"
        if new.get("progress", {}).get("summary"):
            message += f" ({new['progress']['summary']})"
        b.set(c.COMPLETE, c.TRUE, c.TRAINING_SUCCEEDED, message)
        b.set(c.RUNNING, c.FALSE, c.TRAINING_SUCCEEDED, message)
        b.clear(c.QUEUED, c.ADMITTED, "admitted by Kueue")
        _drop_eta(new)
        return _finish(new, b)
    if failed is not None:
        reason, message = _failure(failed, report, children.pods)
        new["startTime"] = new.get("startTime") or jstatus.get("startTime")
        _fail(new, b, reason, message, jstatus.get("completionTime") or failed.get("lastTransitionTime"))
        b.clear(c.QUEUED, c.ADMITTED, "admitted by Kueue")
        _drop_eta(new)
        return _finish(new, b)

    _active_phase(new, b, job_obj, children.pods, plan.nodes, meta, spec, kueue_managed, "training")
    return _finish(new, b)


def _active_phase(new: dict[str, Any], b: _Builder, job_obj: Mapping[str, Any], pods: Sequence[Mapping[str, Any]],
                  nodes: int, meta: Mapping[str, Any], spec: Mapping[str, Any], kueue_managed: bool,
                  what: str) -> None:
    """The phase of a stage whose Job has not finished: Queued, Suspended, Running or Pending."""
    now = b.now
    jstatus = job_obj.get("status") or {}
    progress: Mapping[str, Any] = ((new.get("pilot") or {}).get("progress") if what == "pilot" else new.get("progress")) or {}
    wants_suspend = bool(spec.get("suspend"))
    if kueue_managed and wants_suspend:
        b.set(
            c.SUSPENDED,
            c.FALSE,
            c.KUEUE_MANAGED,
            "spec.suspend is not applied: Kueue owns this Job's suspension; deactivate its Workload "
            "(kubectl patch workload <name> --type=merge -p '{\"spec\":{\"active\":false}}') instead",
        )
    job_suspended = bool((job_obj.get("spec") or {}).get("suspend"))
    if job_suspended and kueue_managed:
        queue = (meta.get("labels") or {}).get("kueue.x-k8s.io/queue-name", "")
        message = f"waiting for Kueue to admit the workload (queue {queue!r})"
        new["phase"] = QUEUED
        b.set(c.QUEUED, c.TRUE, c.WAITING_FOR_ADMISSION, message)
        b.set(c.RUNNING, c.FALSE, c.WAITING_FOR_ADMISSION, message)
        return
    if job_suspended:
        message = "spec.suspend is true: training pods are stopped; unset it to resume from the newest checkpoint"
        new["phase"] = SUSPENDED
        b.set(c.SUSPENDED, c.TRUE, c.SUSPENDED_REASON, message)
        b.set(c.RUNNING, c.FALSE, c.SUSPENDED_REASON, message)
        return

    if kueue_managed:
        b.set(c.QUEUED, c.FALSE, c.ADMITTED, "admitted by Kueue")
    if c.is_true(b.conditions, c.SUSPENDED):
        b.set(c.SUSPENDED, c.FALSE, c.RESUMED, "resumed; the trainer continues from the newest checkpoint")
    running = [p for p in pods if _pod_running(p)]
    ready = int(jstatus.get("ready") or 0)
    if running or ready:
        count = max(len(running), ready)
        message = f"{count} of {nodes} {what} pod(s) running"
        if progress.get("summary"):
            message += f"; {progress['summary']}"
        new["phase"] = RUNNING
        new["startTime"] = new.get("startTime") or jstatus.get("startTime") or now
        b.set(c.RUNNING, c.TRUE, c.RUNNING_REASON, message)
        return
    _pending(new, b, c.STARTING, _waiting_message(pods, nodes, what))


def _pilot_stage(new: dict[str, Any], b: _Builder, plan: Plan, pilot: PilotView, meta: Mapping[str, Any],
                 spec: Mapping[str, Any], kueue_managed: bool) -> bool:
    """The pilot stage (see the module docstring): True when it decides the status (the pilot has not
    passed), False once it has, when the main stage decides."""
    p: dict[str, Any] = dict(new.get("pilot") or {})
    if p.get("phase") == SUCCEEDED:
        return False
    new["pilot"] = p
    new["stage"] = STAGE_PILOT
    if pilot.plan is None:
        message = f"the pilot cannot be planned: {pilot.planning_error or 'no sizing plan'}"
        b.set(c.PLANNED, c.FALSE, c.PLANNING_FAILED, message)
        p["phase"] = FAILED
        _fail(new, b, c.PLANNING_FAILED, message, None)
        return True
    p["plan"] = pilot.plan.wire()
    b.set(c.PLANNED, c.TRUE, c.PLANNED_REASON, f"{_plan_message(plan)}; pilot first: {_plan_message(pilot.plan)}")
    report = pilot.report if _fresh(pilot.report, meta.get("creationTimestamp")) else None
    _apply_pilot_report(p, report)
    children = pilot.children
    job_obj = children.job
    if _stage_waits(new, b, p, children, "pilot", c.PILOT_PASSED, c.PILOT_RUNNING) or job_obj is None:
        return True
    jstatus = job_obj.get("status") or {}
    jconds = jstatus.get("conditions") or []
    p["restarts"] = max(int(p.get("restarts") or 0), _restarts(jstatus, children.pods))
    p["startTime"] = p.get("startTime") or jstatus.get("startTime")
    complete = _true_condition(jconds, "Complete")
    failed = _true_condition(jconds, "Failed")
    if complete is not None:
        p["phase"] = SUCCEEDED
        p["completionTime"] = jstatus.get("completionTime") or complete.get("lastTransitionTime") or b.now
        _drop_eta(p)
        scores = _scores_text(p.get("evaluation"))
        b.set(c.PILOT_PASSED, c.TRUE, c.PILOT_GATES_PASSED,
              "the pilot passed pilot.gates" + (f" ({scores})" if scores else "") + "; the main run starts")
        return False
    if failed is not None:
        reason, message = _failure(failed, report, children.pods)
        scores = _scores_text(p.get("evaluation"))
        missed = report is not None and report.error is not None and report.error.reason == c.GATES_FAILED
        if reason == c.GATES_FAILED or missed:  # missed: also when the Job gave up by its backoffLimit
            reason, message = c.PILOT_GATES_FAILED, f"the pilot missed pilot.gates: {message}"
        else:
            reason, message = c.PILOT_FAILED, f"the pilot failed ({reason}): {message}"
        if scores:
            message += f"; pilot scores: {scores}"
        message += "; the main run was not started"
        when = jstatus.get("completionTime") or failed.get("lastTransitionTime")
        p["phase"] = FAILED
        p["completionTime"] = when or b.now
        _drop_eta(p)
        new["startTime"] = new.get("startTime") or p.get("startTime")
        b.set(c.PILOT_PASSED, c.FALSE, reason, message)
        _fail(new, b, reason, message, when)
        b.clear(c.QUEUED, c.ADMITTED, "admitted by Kueue")
        return True
    b.set(c.PILOT_PASSED, c.UNKNOWN, c.PILOT_RUNNING,
          "the LoRA pilot runs; the main run starts once it passes pilot.gates")
    _active_phase(new, b, job_obj, children.pods, pilot.plan.nodes, meta, spec, kueue_managed, "pilot")
    p["phase"] = new["phase"]
    return True


def _chain_stage(new: dict[str, Any], b: _Builder, verdict: chain_wait.Verdict) -> None:
    """spec.baseModel.fromJob before the job starts (see `finetune_operator.chain_wait`): waiting (Pending, nothing
    created), failed because of the base job, or resolved (Pending, about to start: the caller writes this, then
    goes on with the normal flow from the resolution in status.baseJob)."""
    new["baseJob"] = {k: v for k, v in verdict.base_job.wire().items() if not _empty(v)}
    if verdict.action == "wait":
        b.set(c.WAITING_FOR_BASE_JOB, c.TRUE, verdict.reason, verdict.message)
        _pending(new, b, c.WAITING_FOR_BASE_JOB, verdict.message)
    elif verdict.action == "fail":
        b.set(c.WAITING_FOR_BASE_JOB, c.FALSE, verdict.reason, verdict.message)
        _fail(new, b, verdict.reason, verdict.message, None)
    else:
        b.set(c.WAITING_FOR_BASE_JOB, c.FALSE, c.BASE_JOB_SUCCEEDED, verdict.message)
        _pending(new, b, c.STARTING, verdict.message)


def _preflight_stage(new: dict[str, Any], b: _Builder, plan: Plan | None, view: PreflightView,
                     meta: Mapping[str, Any], spec: Mapping[str, Any]) -> bool:
    """The pre-flight stage (see `finetune_operator.preflight`): True when it decides the status (it runs,
    or failed, or refused the run), False once it passed: `new` then holds the completed plan, and the
    caller writes it before creating any GPU Job."""
    p: dict[str, Any] = dict(new.get("preflight") or {})
    new["preflight"] = p
    new["stage"] = STAGE_PREFLIGHT
    if plan is not None:
        new["plan"] = plan.wire()
        b.set(c.PLANNED, c.TRUE, c.PLANNED_REASON,
              f"preliminary, from the model's size until the pre-flight completes it: {_plan_message(plan)}")
    else:
        b.set(c.PLANNED, c.UNKNOWN, c.PREFLIGHT_RUNNING,
              "the model's size is not in the spec or its name: the pre-flight reads it from config.json")
    children = view.children
    job_obj = children.job
    if _stage_waits(new, b, p, children, "pre-flight", c.PREFLIGHT_PASSED, c.PREFLIGHT_RUNNING) or job_obj is None:
        return True
    jstatus = job_obj.get("status") or {}
    jconds = jstatus.get("conditions") or []
    complete = _true_condition(jconds, "Complete")
    failed = _true_condition(jconds, "Failed")
    verdict = preflight_mod.failure(view.result)
    if failed is not None or (complete is not None and verdict is not None):
        if verdict is None:
            reason, message = _failure(failed or {}, None, children.pods)
            if reason in (c.TRAINER_CONFIG_ERROR, c.POD_FAILURE_POLICY, c.JOB_FAILED):
                reason = c.PREFLIGHT_FAILED
            verdict = (reason if reason in preflight_mod.REASONS else c.PREFLIGHT_FAILED,
                       f"the pre-flight's Job failed ({reason}): {message}")
        reason, message = verdict
        when = jstatus.get("completionTime") or (failed or complete or {}).get("lastTransitionTime")
        p.update(phase=FAILED, reason=reason, message=_clip(message), completionTime=when or b.now)
        if view.result is not None:
            p.update(preflight_mod.summary(view.result, view.result_uri))
        full = f"{message}; no GPU was requested"
        b.set(c.PREFLIGHT_PASSED, c.FALSE, reason, full)
        _fail(new, b, reason, full, when)
        return True
    if complete is None:
        p["phase"] = PENDING
        b.set(c.PREFLIGHT_PASSED, c.UNKNOWN, c.PREFLIGHT_RUNNING,
              "the pre-flight checks the model, data and output on CPU; the GPU Job follows once they pass")
        _active_phase(new, b, job_obj, children.pods, 1, meta, spec, False, "pre-flight")
        p["phase"] = new["phase"]
        return True
    # Complete: every check passed.
    if view.result is None and view.readable:
        p["phase"] = PENDING
        message = (f"the pre-flight passed; waiting to read its result {view.result_uri or ''} (the operator needs "
                   "s3:GetObject on it, as on status/report.json)").replace("  ", " ")
        b.set(c.PREFLIGHT_PASSED, c.UNKNOWN, c.PREFLIGHT_RUNNING, message)
        _pending(new, b, c.STARTING, message)
        return True
    completed = view.plan if view.result is not None else plan
    when = jstatus.get("completionTime") or complete.get("lastTransitionTime") or b.now
    p.update(phase=SUCCEEDED, completionTime=when)
    p.pop("reason", None)
    p.pop("message", None)
    if view.result is not None:
        p.update(preflight_mod.summary(view.result, view.result_uri))
    if completed is None:
        message = view.planning_error or "no sizing plan after the pre-flight"
        b.set(c.PREFLIGHT_PASSED, c.TRUE, c.PREFLIGHT_SUCCEEDED, "the model, data and output checked out")
        b.set(c.PLANNED, c.FALSE, c.PLANNING_FAILED, message)
        _fail(new, b, c.PLANNING_FAILED, message, None)
        return True
    new["plan"] = completed.wire()
    found = _preflight_words(p, completed)
    b.set(c.PREFLIGHT_PASSED, c.TRUE, c.PREFLIGHT_SUCCEEDED, found)
    b.set(c.PLANNED, c.TRUE, c.PLANNED_REASON, _plan_message(completed))
    refusal = preflight_mod.over_budget((spec.get("budget") or {}).get("maxGpuHours"), completed)
    if refusal is not None:
        _fail(new, b, c.BUDGET_EXCEEDED, refusal, None)
        return True
    _pending(new, b, c.STARTING, "the pre-flight passed; creating the GPU Job")
    return False


def _stage_waits(new: dict[str, Any], b: _Builder, p: dict[str, Any], children: Children, what: str,
                 passed_type: str, running_reason: str) -> bool:
    """A stage (pre-flight, pilot) whose children are foreign or its Job missing: Pending, and True. Else
    Created is set from `children` and False."""
    if children.foreign:
        b.set(c.CREATED, c.FALSE, c.FOREIGN_CHILD, "; ".join(children.foreign))
        _pending(new, b, c.FOREIGN_CHILD, "waiting for the conflicting objects to be removed")
        p["phase"] = PENDING
        return True
    if children.job is None:
        b.set(c.CREATED, c.FALSE, c.CHILDREN_MISSING, f"the {what}'s Job does not exist yet")
        b.set(passed_type, c.UNKNOWN, running_reason, f"the {what} has not started")
        _pending(new, b, c.STARTING, f"the {what}'s Job does not exist yet")
        p["phase"] = PENDING
        return True
    _set_created(b, children)
    return False


def _preflight_words(p: Mapping[str, Any], plan: Plan) -> str:
    """The PreflightPassed message: what the pre-flight found and what the run will cost."""
    parts = []
    if p.get("parameters"):
        parts.append(f"{p['parameters']:,} parameters")
    if p.get("examples") is not None:
        parts.append(f"{p['examples']:,} training examples, {p.get('tokens', 0):,} tokens"
                     + (" (extrapolated from a sample)" if p.get("sampled") else ""))
    est = plan.estimate
    if est is not None:
        parts.append(f"{est.steps:,} steps, about {est.hours:g} h and {est.gpu_hours:g} GPU-hours on {plan.gpus} GPU(s)")
    if not parts:
        return "the model, data and output checked out (the operator cannot read the result at this output: the plan " \
               "is the one from the model's size)"
    return "the model, data and output checked out: " + "; ".join(parts)


_SCORE_KEYS = ("accuracy", "terminology", "hallucination", "formatCompliance", "evalLoss", "perplexity")


def _scores_text(evaluation: Mapping[str, Any] | None) -> str:
    """`evalLoss 1.38 (base 6.24), accuracy 0.526 (base 0.016)`: the tuned scores beside the base's."""
    if not evaluation:
        return ""
    tuned = evaluation.get("tuned") or {}
    base = evaluation.get("base") or {}
    parts = []
    for key in _SCORE_KEYS:
        if tuned.get(key) is None:
            continue
        text = f"{key} {tuned[key]:.4g}"
        if base.get(key) is not None:
            text += f" (base {base[key]:.4g})"
        parts.append(text)
    return ", ".join(parts)


def status_changed(old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> bool:
    """Whether writing `new` would change the stored status: owned keys compared after dropping empty
    values (an absent key, None, [] and {} all mean "unset"), so equal statuses never cause a write."""
    return _normalize(_owned(old)) != _normalize(_owned(new))


def status_patch(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch (RFC 7386) body `{"status": ...}` turning the owned part of `old` into `new`.

    Merge patches merge maps, so every key `new` no longer has, at any depth, is sent as None (deletion);
    lists are replaced whole. Keys this module does not own are left alone."""
    return {"status": _merge_diff(_owned(old), {k: v for k, v in _owned(new).items() if not _empty(v)})}


def transition_events(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[Event]:
    """Events to post for the change from `old` to `new`: one per phase transition (Warning for Failed),
    plus a Warning when a foreign child or an unappliable suspend first shows up, and a Normal event when
    the pre-flight or the pilot passed."""
    old = old or {}
    warnings: list[Event] = []
    high = c.find(new.get("conditions"), c.HALLUCINATION_HIGH)
    if high and high.get("status") == c.TRUE and not c.is_true(old.get("conditions"), c.HALLUCINATION_HIGH):
        warnings.append(Event("Warning", c.HALLUCINATION_HIGH, high.get("message", "")))
    tracking = c.find(new.get("conditions"), c.TRACKING)
    if tracking and tracking.get("status") == c.FALSE and not _is_false(old.get("conditions"), c.TRACKING):
        warnings.append(Event("Warning", c.TRACKING_FAILED, tracking.get("message", "")))
    for type_, reason in ((c.CREATED, c.FOREIGN_CHILD), (c.SUSPENDED, c.KUEUE_MANAGED)):
        now_cond = c.find(new.get("conditions"), type_)
        was = c.find(old.get("conditions"), type_)
        if now_cond and now_cond.get("reason") == reason and (
            not was or was.get("reason") != reason or was.get("message") != now_cond.get("message")
        ):
            warnings.append(Event("Warning", reason, now_cond.get("message", "")))
    checked = c.find(new.get("conditions"), c.PREFLIGHT_PASSED)
    if checked and checked.get("status") == c.TRUE and not c.is_true(old.get("conditions"), c.PREFLIGHT_PASSED):
        warnings.append(Event("Normal", c.PREFLIGHT_SUCCEEDED, checked.get("message", "")))
    pilot = c.find(new.get("conditions"), c.PILOT_PASSED)
    if pilot and pilot.get("status") == c.TRUE and not c.is_true(old.get("conditions"), c.PILOT_PASSED):
        warnings.append(Event("Normal", c.PILOT_GATES_PASSED, pilot.get("message", "")))
    waiting = c.find(new.get("conditions"), c.WAITING_FOR_BASE_JOB)
    was_waiting = c.find(old.get("conditions"), c.WAITING_FOR_BASE_JOB)
    if waiting and waiting.get("status") == c.TRUE and not c.is_true(old.get("conditions"), c.WAITING_FOR_BASE_JOB):
        warnings.append(Event("Normal", c.WAITING_FOR_BASE_JOB, waiting.get("message", "")))
    started = (was_waiting or {}).get("reason") == c.BASE_JOB_SUCCEEDED
    if waiting and waiting.get("reason") == c.BASE_JOB_SUCCEEDED and not started:
        warnings.append(Event("Normal", c.BASE_JOB_SUCCEEDED, waiting.get("message", "")))
    phase = new.get("phase")
    if phase and phase != old.get("phase"):
        cond = _deciding_condition(new)
        reason = cond.get("reason", phase) if cond else phase
        message = cond.get("message", "") if cond else ""
        # The Warning already says it (e.g. Pending because of a foreign child): one event, not two.
        if reason not in {w.reason for w in warnings}:
            kind = "Warning" if phase == FAILED else "Normal"
            return [Event(kind, reason, f"{phase}: {message}".rstrip(": ")), *warnings]
    return warnings


def event_name(obj_name: str, uid: str, old: Mapping[str, Any] | None, event: Event) -> str:
    """A deterministic Event name for `event` on the way out of status `old`.

    The operator posts a transition's events before it writes the status that records the transition;
    a pass that dies in between is repeated by the next one from the same `old` status, which names its
    events the same, so the API refuses the repeat (409) instead of storing a duplicate, and nothing is
    lost either. `old` is identified by its phase and its conditions' transition times (each transition
    changes at least one); the name is `<object>.<16 hex digits>` (<= 80 characters, a valid name).
    """
    old = old or {}
    state = [str(uid), str(old.get("phase")), event.type, event.reason]
    state += sorted(f"{cond.get('type')}={cond.get('status')}@{cond.get('lastTransitionTime')}"
                    for cond in old.get("conditions") or [] if isinstance(cond, Mapping))
    digest = hashlib.sha256("\n".join(state).encode()).hexdigest()[:16]
    return f"{obj_name}.{digest}"


# --- helpers -------------------------------------------------------------------------------------


def _finish(new: dict[str, Any], b: _Builder) -> dict[str, Any]:
    new["conditions"] = b.conditions
    return {k: v for k, v in new.items() if not _empty(v)}


def _fail(new: dict[str, Any], b: _Builder, reason: str, message: str, when: str | None) -> None:
    new["phase"] = FAILED
    new["completionTime"] = new.get("completionTime") or when or b.now
    b.set(c.FAILED, c.TRUE, reason, message)
    b.clear(c.RUNNING, reason, message)


def _pending(new: dict[str, Any], b: _Builder, reason: str, message: str) -> None:
    new["phase"] = PENDING
    b.set(c.RUNNING, c.FALSE, reason, message)


def _set_created(b: _Builder, children: Children) -> None:
    if children.adopted:
        b.set(c.CREATED, c.TRUE, c.ADOPTED_CHILDREN, "adopted " + ", ".join(children.adopted))
    elif children.created:
        b.set(c.CREATED, c.TRUE, c.CHILDREN_CREATED, "created " + ", ".join(children.created))
    elif not c.is_true(b.conditions, c.CREATED):
        b.set(c.CREATED, c.TRUE, c.CHILDREN_CREATED, "the ConfigMap, Service and Job exist")


def _plan_message(plan: Plan) -> str:
    return f"{plan.method} on {plan.gpus}x{plan.gpu_memory_gib}GiB GPU(s), {plan.nodes} node(s): {plan.reason}"


def _true_condition(conds: Iterable[Mapping[str, Any]], type_: str) -> dict[str, Any] | None:
    cond = c.find(conds, type_)
    return cond if cond and cond.get("status") == c.TRUE else None


def _failure(
    cond: Mapping[str, Any], report: TrainerReport | None, pods: Sequence[Mapping[str, Any]]
) -> tuple[str, str]:
    """(reason, message) of a failed Job; the trainer's own words win when it left them."""
    reason = str(cond.get("reason") or c.JOB_FAILED)
    message = str(cond.get("message") or "the Job failed")
    error = report.error if report is not None else None
    if reason == c.POD_FAILURE_POLICY:
        if error is not None:
            return error.reason, error.message
        code, text = _trainer_exit(pods)
        if code == EXIT_GATES_FAILED:
            return c.GATES_FAILED, text or message
        if code == EXIT_CONFIG_ERROR:
            return c.TRAINER_CONFIG_ERROR, text or message
        return reason, message
    if error is not None:
        message = f"{message}; last trainer error: {error.reason}: {error.message}"
    return reason, message


def _trainer_exit(pods: Sequence[Mapping[str, Any]]) -> tuple[int | None, str]:
    """The exit code and termination message of a trainer container that stopped with a contract code."""
    found: tuple[int | None, str] = (None, "")
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
            if term and term.get("exitCode") in (EXIT_CONFIG_ERROR, EXIT_GATES_FAILED):
                found = (term["exitCode"], str(term.get("message") or "").strip())
                if found[1]:
                    return found
    return found


def _restarts(jstatus: Mapping[str, Any], pods: Sequence[Mapping[str, Any]]) -> int:
    disrupted = sum(1 for p in pods if c.is_true((p.get("status") or {}).get("conditions"), "DisruptionTarget"))
    return int(jstatus.get("failed") or 0) + disrupted


def _pod_running(pod: Mapping[str, Any]) -> bool:
    meta = pod.get("metadata") or {}
    return (pod.get("status") or {}).get("phase") == "Running" and not meta.get("deletionTimestamp")


def _waiting_message(pods: Sequence[Mapping[str, Any]], nodes: int, what: str = "training") -> str:
    """Why pods are not running yet, from the first pod that says (scheduling or container waits)."""
    for pod in pods:
        name = (pod.get("metadata") or {}).get("name", "?")
        pstatus = pod.get("status") or {}
        for cond in pstatus.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == c.FALSE:
                return f"pod {name} is not scheduled: {cond.get('reason', '')}: {cond.get('message', '')}".rstrip(": ")
        for cs in pstatus.get("containerStatuses") or []:
            waiting = (cs.get("state") or {}).get("waiting")
            if waiting and waiting.get("reason"):
                return f"pod {name} is waiting: {waiting['reason']}: {waiting.get('message', '')}".rstrip(": ")
    if pods:
        return f"waiting for {nodes} {what} pod(s) to start ({len(pods)} created)"
    job = f"the {what}'s Job" if what != "training" else "the Job"
    return f"waiting for {job} to create {nodes} {what} pod(s)"


def _fresh(report: TrainerReport | None, created: str | None) -> bool:
    """A report written before the FineTuneJob existed belongs to an earlier run; ignore it."""
    return report is not None and written_since(report.updated_at, created)


def written_since(when: str, created: str | None) -> bool:
    """Whether an object of the output (a report, the pre-flight's result) stamped `when` (RFC 3339) was
    written after the FineTuneJob's `created`: one stamped earlier is an earlier run's at the same output URI.
    A time that cannot be read, or no creation time, counts as written since."""
    if not created:
        return True
    try:
        return _parse_time(when) >= _parse_time(created)
    except ValueError:
        return True


def _parse_time(text: str) -> datetime:
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        raise ValueError(f"time {text!r} has no zone")
    return parsed


def _progress(report: TrainerReport) -> dict[str, Any]:
    total = report.total_steps
    step = report.step
    percent = min(100, math.floor(step * 100 / total)) if total > 0 else 0
    progress: dict[str, Any] = {
        "step": step,
        "totalSteps": total,
        "percent": percent,
        "summary": f"{percent}% {step}/{total}" if total > 0 else report.phase,
        "epoch": report.epoch,
        "loss": report.loss,
        "evalLoss": report.eval_loss,
        "tokensPerSecond": report.tokens_per_second,
        "etaSeconds": report.eta_seconds,
        "gpuHours": round(report.gpu_hours, 4) if report.gpu_hours is not None else None,
        "updatedAt": report.updated_at,
    }
    return {k: v for k, v in progress.items() if v is not None}


def _apply_pilot_report(pilot: dict[str, Any], report: TrainerReport | None) -> None:
    """The pilot's report into status.pilot: progress, artifacts (the adapter under pilot/) and scores."""
    if report is None:
        return
    pilot["progress"] = _progress(report)
    pilot["artifacts"] = dict(report.artifacts)
    if report.evaluation is not None:
        pilot["evaluation"] = report.evaluation.wire()


def _apply_report(new: dict[str, Any], report: TrainerReport | None, *, terminal: bool) -> None:
    if report is None:
        return
    new["progress"] = _progress(report)
    if terminal:
        _drop_eta(new)
    new["checkpoints"] = [cp.wire() for cp in report.checkpoints[-_MAX_CHECKPOINTS:]]
    new["artifacts"] = dict(report.artifacts)
    if report.adjustments:
        # The trainer's out-of-memory steps (and the operator's, passed to it in its config), as reported;
        # the newest 16 when there were more (the schema's bound).
        new["adjustments"] = [a.wire() for a in report.adjustments[-16:]]
    if report.evaluation is not None:
        new["evaluation"] = report.evaluation.wire()
    if report.export is not None:  # the trainer's export check (finetune_trainer.export)
        new["export"] = report.export.wire()
    if report.tracking is not None:  # the MLflow run (finetune_trainer.tracking)
        new["tracking"] = report.tracking.wire()


def _hallucination(new: dict[str, Any], b: _Builder, spec: Mapping[str, Any]) -> None:
    """HallucinationHigh from the fine-tuned model's score (see the module docstring)."""
    if spec.get("retrieval"):
        return
    evaluation = new.get("evaluation") or {}
    score = (evaluation.get("tuned") or {}).get("hallucination")
    if not isinstance(score, int | float):
        return
    configured = (spec.get("evaluation") or {}).get("hallucinationThreshold")
    threshold = float(configured) if isinstance(configured, int | float) else DEFAULT_HALLUCINATION_THRESHOLD
    base = (evaluation.get("base") or {}).get("hallucination")
    measured = f"the fine-tuned model's hallucination score is {score:.1%}" + (
        f" (base model {base:.1%})" if isinstance(base, int | float) else "")
    if score > threshold:
        b.set(c.HALLUCINATION_HIGH, c.TRUE, c.HALLUCINATION_ABOVE_THRESHOLD,
              f"{measured}, above evaluation.hallucinationThreshold {threshold:.1%}: its answers use domain terms "
              "and numbers found in neither the question nor the reference. Consider spec.retrieval (a document "
              "corpus whose top-k passages every prompt carries, trained RAFT-style) to ground the answers. "
              "A recommendation: evaluation.gates decide failure.")
    else:
        b.set(c.HALLUCINATION_HIGH, c.FALSE, c.HALLUCINATION_WITHIN_THRESHOLD,
              f"{measured}, at or below evaluation.hallucinationThreshold {threshold:.1%}")


def _tracking(b: _Builder, tracking: Mapping[str, Any] | None) -> None:
    """Tracking from status.tracking (spec.tracking.mlflow): False with the trainer's last failure, True once the
    MLflow run exists, absent before either."""
    tracking = tracking or {}
    if tracking.get("error"):
        b.set(c.TRACKING, c.FALSE, c.TRACKING_FAILED, f"{tracking['error']} (training is not affected)")
    elif tracking.get("runId"):
        version = (f"; registered {tracking.get('registeredModel')} version {tracking['modelVersion']}"
                   if tracking.get("modelVersion") else "")
        b.set(c.TRACKING, c.TRUE, c.TRACKED, f"MLflow run {tracking.get('runUrl') or tracking['runId']}{version}")


def _drop_eta(new: dict[str, Any]) -> None:
    if isinstance(new.get("progress"), dict):
        new["progress"] = {k: v for k, v in new["progress"].items() if k != "etaSeconds"}


def _is_false(conditions: Iterable[Mapping[str, Any]] | None, type_: str) -> bool:
    cond = c.find(conditions, type_)
    return cond is not None and cond.get("status") == c.FALSE


def _deciding_condition(status: Mapping[str, Any]) -> dict[str, Any] | None:
    conds = status.get("conditions")
    phase = status.get("phase")
    by_phase = {FAILED: c.FAILED, SUCCEEDED: c.COMPLETE, QUEUED: c.QUEUED, SUSPENDED: c.SUSPENDED, RUNNING: c.RUNNING}
    if phase in by_phase:
        return c.find(conds, by_phase[phase])
    created = c.find(conds, c.CREATED)
    if created and created.get("status") == c.FALSE:
        return created
    return c.find(conds, c.RUNNING)


def _clip(message: str) -> str:
    return message if len(message) <= _MAX_MESSAGE else message[: _MAX_MESSAGE - 3] + "..."


def _empty(value: Any) -> bool:
    return value is None or value == [] or value == {} or value == ""


def _normalize(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {
            k: _normalize(v)
            for k, v in value.items()
            if not _empty(v) and not (isinstance(v, Mapping) and _empty(_normalize(v)))
        }
    if isinstance(value, list):
        return [_normalize(v) for v in value]
    return value


def _merge_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    patch: dict[str, Any] = {}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            sub = _merge_diff(before, value)
            if sub:
                patch[key] = sub
        elif value != before:
            patch[key] = value
    for key in old:
        if key not in new:
            patch[key] = None
    return patch


def _owned(status: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (status or {}).items() if k in OWNED_KEYS}
