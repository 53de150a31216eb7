"""When a FineTuneJob needs another look without an event, and what a pass may skip. Pure.

Events drive almost everything: the operator watches FineTuneJobs, their batch/v1 Jobs and their training
pods, and reconciles the owning FineTuneJob on each event. Only the trainer's progress report (S3) changes
without one, so only jobs whose trainer can be writing it are polled:

==============================================  ===========================================================
after a pass the job is                         next periodic refresh
==============================================  ===========================================================
(the pass failed)                               after one interval (an event pass is not retried by kopf)
Running, or with pods that have not finished    after interval x 2^k, capped at `BACKOFF_CAP` x interval,
                                                k = passes in a row whose report changed nothing
                                                (0 after a pass that changed status.progress & co.)
Pending with children missing or foreign        the same backoff (the foreign object's removal sends no
                                                event the operator watches)
Succeeded without artifacts (report readable)   every `BACKOFF_CAP` x interval (the report may show up)
Succeeded with spec.serving.apply and its       the backoff above (`serving_apply`: nothing about the
LLMInferenceService not Ready, its CRD not      LLMInferenceService reaches the operator but a read)
installed, or a foreign one in its place
Pending, waiting for its base job               every `BACKOFF_CAP` x interval, a fallback only: the base
(spec.baseModel.fromJob)                        job's own watch events wake its dependents at once
                                                (`handlers.track`, `chain_wait.base_view`)
Pending with its Job and no pods, Suspended,    never: Job and pod events bring every change
Queued, Succeeded, Failed
==============================================  ===========================================================

`skip_pods` and `skip_report` decide what a pass may leave out for a job with no pods: a suspended Job's
pods are known from the pod watch, and a report with no trainer to write it only needs reading once
after the last pod went away. `job_view` decides which Job events need a pass at all: only those that
change what `status.compute_status` reads from the Job (the controller's own bookkeeping, e.g. its
`Suspended` condition or the echo of the operator's own create, changes nothing the status shows).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from finetune_operator.render import KUEUE_QUEUE_LABEL
from finetune_operator.status import FAILED, PENDING, QUEUED, RUNNING, SUCCEEDED, SUSPENDED

#: The longest wait between two refreshes of a running job, in status intervals.
BACKOFF_CAP = 6
#: Status keys filled from the trainer's report.
REPORT_KEYS: tuple[str, ...] = ("progress", "checkpoints", "artifacts", "evaluation", "adjustments", "pilot")

_POD_DONE = frozenset({"Succeeded", "Failed"})


@dataclass(frozen=True)
class Outcome:
    """What one reconcile pass left behind, as far as the refresh schedule cares."""

    phase: str | None
    children_ready: bool = True  # the children exist and are ours (Created=True)
    pods_active: bool = False  # training pods exist that have not finished
    report_changed: bool = False  # the pass changed what the status shows from the report
    awaiting_artifacts: bool = False  # Succeeded, no artifacts yet, the report is readable by the operator
    failed: bool = False  # the pass raised
    serving_pending: bool = False  # finished, its LLMInferenceService (spec.serving.apply) not Ready yet or not made
    waiting_for_base: bool = False  # Pending: spec.baseModel.fromJob's base job has not succeeded yet


@dataclass(frozen=True)
class Next:
    """The decision: `delay` seconds until the next refresh (None: none, events only); `idle`: passes in a
    row that changed nothing (the backoff exponent to carry into the next decision)."""

    delay: float | None
    idle: int = 0


def next_refresh(outcome: Outcome, idle: int, interval: float, cap: int = BACKOFF_CAP) -> Next:
    """When to refresh a job after a pass with `outcome`, `idle` unchanged passes before it."""
    longest = interval * cap
    if outcome.failed:
        return Next(interval, idle)
    if outcome.phase in (SUCCEEDED, FAILED):
        if outcome.serving_pending:
            idle = 0 if outcome.report_changed else idle + 1
            return Next(min(interval * 2 ** min(idle, 16), longest), idle)
        if outcome.phase == SUCCEEDED and outcome.awaiting_artifacts:
            return Next(longest, 0)
        return Next(None, 0)
    if outcome.phase in (SUSPENDED, QUEUED):
        return Next(None, 0)
    if outcome.phase == PENDING and outcome.waiting_for_base:
        return Next(longest, 0)
    if outcome.phase == RUNNING or outcome.pods_active or (outcome.phase == PENDING and not outcome.children_ready):
        idle = 0 if outcome.report_changed else idle + 1
        return Next(min(interval * 2 ** min(idle, 16), longest), idle)
    return Next(None, 0)


def pods_active(pods: Any) -> bool:
    """Whether any of these pods has not finished (and is not being deleted)."""
    for pod in pods:
        meta = pod.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            continue
        if (pod.get("status") or {}).get("phase") not in _POD_DONE:
            return True
    return False


def report_changed(old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> bool:
    """Whether the report-fed part of the status differs between `old` and `new`."""
    return {k: (old or {}).get(k) for k in REPORT_KEYS} != {k: (new or {}).get(k) for k in REPORT_KEYS}


#: The Job conditions the status is computed from (its phase, failure reason and times).
_JOB_CONDITIONS = ("Complete", "Failed")
#: The Job's status fields the status is computed from (`startTime`, restarts from `failed`, running
#: from `ready`; `active` and `succeeded` as the controller's view of the pods).
_JOB_STATUS_FIELDS = ("startTime", "completionTime", "ready", "failed", "active", "succeeded")


def job_view(job: Mapping[str, Any] | None) -> int:
    """A fingerprint of what the FineTuneJob's status can depend on in its Job: identity, suspension, the
    Kueue queue label, the finishing conditions (whole) and the counters and times in
    `_JOB_STATUS_FIELDS`. Two Jobs with the same view give the same status (with the same pods and
    report), so a Job event whose view equals the one the last pass used needs no pass. Hashed: only an
    int is kept per job."""
    if job is None:
        return hash(None)
    meta = job.get("metadata") or {}
    status = job.get("status") or {}
    conditions = sorted(
        (str(cond.get("type")), str(cond.get("status")), str(cond.get("reason")), str(cond.get("message")),
         str(cond.get("lastTransitionTime")))
        for cond in status.get("conditions") or []
        if cond.get("type") in _JOB_CONDITIONS
    )
    return hash((
        meta.get("uid"),
        bool((job.get("spec") or {}).get("suspend")),
        (meta.get("labels") or {}).get(KUEUE_QUEUE_LABEL),
        tuple(conditions),
        tuple(_scalar(status.get(key)) for key in _JOB_STATUS_FIELDS),
    ))


def _scalar(value: Any) -> str:
    """A Job status field as the status reads it: an absent counter is 0 (the Job controller's first sync
    writes `ready: 0` and friends onto a Job whose status was empty, which changes nothing)."""
    return "0" if value in (None, 0, "") else str(value)


def skip_pods(job_suspended: bool, known_pods: int) -> bool:
    """A pass need not list pods of a suspended Job when the pod watch knows of none (each pod event
    triggers a pass of its own, so a pod that appears later is seen by that pass)."""
    return job_suspended and known_pods == 0


def skip_report(pods: int, settled: bool) -> bool:
    """A pass need not read the report when no pod exists and the report was read since the last pod
    event (`settled`): nobody can have written it since."""
    return pods == 0 and settled


__all__ = ["BACKOFF_CAP", "REPORT_KEYS", "Next", "Outcome", "job_view", "next_refresh", "pods_active",
           "report_changed", "skip_pods", "skip_report"]
