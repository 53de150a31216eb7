"""Chained stages (`spec.baseModel.fromJob`): what a job does about its base job in one pass. Pure.

A chained job waits (phase Pending, condition `WaitingForBaseJob` True, nothing created: no pre-flight, no
ConfigMap, no Job) until the FineTuneJob it names, in its own namespace, Succeeded with its gates passed; then
`chain.resolve` says what it starts from, recorded once in status.baseJob, and the normal flow runs on
`chain.apply(spec, resolved)`. `decide` is the table, given what the last status recorded and the base job as read
now (None: it does not exist):

=====================================  ===========================================  =============================
status.baseJob (recorded)              the base job now                             verdict (reason)
=====================================  ===========================================  =============================
modelUri set (resolved earlier)        not read                                     start, from the recording
(fromJob names this very job, or the   any                                          fail (BaseJobUnchainable)
fromJob links close a cycle)
no uid (never seen)                    absent                                       wait (BaseJobNotFound)
uid U                                  absent, or present with another uid          fail (BaseJobDeleted)
any                                    being deleted (deletionTimestamp)            fail (BaseJobDeleted)
any                                    Failed                                       fail (BaseJobFailed, its reason)
any                                    Succeeded, evaluation.gatesPassed false      fail (BaseJobFailed)
any                                    Succeeded, no artifacts yet, s3:// output    wait (BaseJobArtifactsPending)
any                                    Succeeded, `chain.BaseUnchainable`           fail (BaseJobUnchainable)
any                                    Succeeded                                    start (BaseJobSucceeded)
any                                    not finished (Pending, Running, ...)         wait (BaseJobRunning)
=====================================  ===========================================  =============================

Why these rows:

- A base job not created yet is waited for: GitOps tools apply both manifests at once, in any order.
- Once seen, the base job's uid is recorded: a base job deleted, or deleted and recreated under the same name,
  while this job waits is another job (or none), so this job fails rather than starting from whatever comes
  next under that name.
- The resolution is made once and kept (status.baseJob.modelUri): later passes never read the base job again.
  Deleting the base job after this one started therefore changes nothing: what it starts from is in the base
  job's output (S3), which deleting a FineTuneJob does not remove, and in this job's config snapshot.
- A base job that Succeeded but whose report's artifacts the operator has not read yet (its reads are retried)
  is waited for when its output is s3:// (readable); other outputs never report artifacts, so
  `chain.resolve` says it cannot be started from.

`base_view` is what of a FineTuneJob its dependents' verdicts read: the operator wakes the jobs waiting for
one when it changes (`handlers.track`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from pydantic import ValidationError

from finetune_operator import chain
from finetune_operator import conditions as c
from finetune_operator.spec import BaseJobStatus, FineTuneJob, FineTuneJobStatus, Phase

Action = Literal["wait", "fail", "start"]

_SUCCEEDED = "Succeeded"
_FAILED = "Failed"
_PHASES = frozenset(get_args(Phase))


@dataclass(frozen=True)
class Verdict:
    """What a chained job does now: `wait` (phase Pending), `fail` (phase Failed with `reason`) or `start` (the
    normal flow, from `base_job`, which is then the resolution); `base_job` is what status.baseJob records."""

    action: Action
    reason: str
    message: str
    base_job: BaseJobStatus


def from_job(body: Mapping[str, Any]) -> str | None:
    """spec.baseModel.fromJob of a FineTuneJob as read from the API (None when unset or unreadable)."""
    base_model = (body.get("spec") or {}).get("baseModel")
    name = base_model.get("fromJob") if isinstance(base_model, Mapping) else None
    return name if isinstance(name, str) and name else None


def recorded(status: Mapping[str, Any] | None) -> BaseJobStatus | None:
    """status.baseJob as recorded by an earlier pass (None when absent or unreadable)."""
    raw = (status or {}).get("baseJob")
    if not isinstance(raw, Mapping):
        return None
    try:
        return BaseJobStatus.model_validate(raw)
    except ValidationError:
        return None


def resolution(status: Mapping[str, Any] | None) -> BaseJobStatus | None:
    """The recorded resolution (status.baseJob with its modelUri), which later passes start from; None before."""
    found = recorded(status)
    return found if found is not None and found.model_uri else None


def applied(job: FineTuneJob, status: Mapping[str, Any] | None) -> FineTuneJob:
    """`job` with `chain.apply` of its recorded resolution, or `job` as it is (not chained, or not resolved yet)."""
    resolved = resolution(status) if job.spec.base_model.from_job is not None else None
    if resolved is None:
        return job
    return job.model_copy(update={"spec": chain.apply(job.spec, resolved)})


def find_cycle(name: str, base: str, next_of: Callable[[str], str | None]) -> list[str] | None:
    """The fromJob links from job `name` through `base` back to `name` (`name -> base -> ... -> name`), or None.
    `next_of(n)`: job n's fromJob as far as known (None: not chained, or not known)."""
    path = [name]
    current: str | None = base
    while current is not None and len(path) <= chain.MAX_CHAIN:
        path.append(current)
        if current == name:
            return path
        if current in path[:-1]:
            return None  # a cycle upstream that does not pass through this job: that job's own pass says so
        current = next_of(current)
    return None


def decide(name: str, namespace: str, base_name: str, previous: BaseJobStatus | None, base: Mapping[str, Any] | None,
           cycle: list[str] | None = None) -> Verdict:
    """The verdict for job `name` whose spec.baseModel.fromJob is `base_name` (see the module's table).

    `previous`: status.baseJob as recorded (`recorded`); `base`: the base FineTuneJob as read now, None when it
    does not exist; `cycle`: `find_cycle`'s answer."""
    kept = previous if previous is not None and previous.name == base_name else None
    if kept is not None and kept.model_uri:
        return Verdict("start", c.BASE_JOB_SUCCEEDED, _starting(kept), kept)
    uid = kept.uid if kept is not None else None
    seen = BaseJobStatus(name=base_name, uid=uid, phase=kept.phase if kept is not None else None)
    if base_name == name or cycle:
        links = " -> ".join(cycle or [name, name])
        return Verdict("fail", c.BASE_JOB_UNCHAINABLE, f"spec.baseModel.fromJob links form a cycle ({links}): no job "
                       "of it can ever start; delete them and chain them in order", seen)
    if base is None:
        if uid is None:
            return Verdict("wait", c.BASE_JOB_NOT_FOUND,
                           f"waiting for FineTuneJob {base_name} (spec.baseModel.fromJob) to be created in namespace "
                           f"{namespace}; this job starts from its result once it Succeeded with its gates passed",
                           seen)
        return Verdict("fail", c.BASE_JOB_DELETED,
                       f"base job {base_name} (uid {uid}) was deleted while this job waited for it; this job was not "
                       "started. Recreate this job to chain it to a new base job", seen)
    meta = base.get("metadata") or {}
    status = base.get("status") or {}
    phase = status.get("phase") if status.get("phase") in _PHASES else None
    base_uid = str(meta.get("uid")) if meta.get("uid") else None
    if uid is not None and base_uid != uid:
        return Verdict("fail", c.BASE_JOB_DELETED,
                       f"base job {base_name} was deleted and recreated (uid {uid}, now {base_uid}) while this job "
                       "waited for it; this job was not started. Recreate this job to chain it to the new one", seen)
    seen = BaseJobStatus(name=base_name, uid=base_uid, phase=phase)
    if meta.get("deletionTimestamp"):
        return Verdict("fail", c.BASE_JOB_DELETED, f"base job {base_name} (uid {base_uid}) is being deleted; this job "
                       "was not started. Recreate this job to chain it to a new base job", seen)
    if phase == _FAILED:
        failed = c.find(status.get("conditions"), c.FAILED) or {}
        why = f"{failed.get('reason') or c.JOB_FAILED}: {failed.get('message') or 'no message'}"
        return Verdict("fail", c.BASE_JOB_FAILED, f"base job {base_name} failed ({why}); this job was not started",
                       seen)
    if phase != _SUCCEEDED:
        return Verdict("wait", c.BASE_JOB_RUNNING,
                       f"waiting for base job {base_name} (phase {phase or 'not reported yet'}) to succeed with its "
                       "gates passed; this job starts from its result (spec.baseModel.fromJob)", seen)
    evaluation = status.get("evaluation") or {}
    if evaluation.get("gatesPassed") is False:
        missed = ", ".join(str(g) for g in evaluation.get("failedGates") or []) or "see its status.evaluation"
        return Verdict("fail", c.BASE_JOB_FAILED, f"base job {base_name} Succeeded but its evaluation gates failed "
                       f"({c.GATES_FAILED}: {missed}); this job was not started", seen)
    try:
        base_job = FineTuneJob.model_validate(base)
        base_status = FineTuneJobStatus.model_validate(status)
    except ValidationError as err:
        return Verdict("fail", c.BASE_JOB_UNCHAINABLE, f"base job {base_name} cannot be read "
                       f"({err.error_count()} validation error(s): {_first_error(err)}); this job was not started",
                       seen)
    if not base_status.artifacts and base_job.spec.output.uri.startswith("s3://"):
        return Verdict("wait", c.BASE_JOB_ARTIFACTS_PENDING,
                       f"base job {base_name} Succeeded; waiting for its artifacts (status.artifacts.model) to be read "
                       f"from its report under {base_job.spec.output.uri}", seen)
    try:
        resolved = chain.resolve(base_job, base_status, uid=base_uid)
    except chain.BaseUnchainable as err:
        return Verdict("fail", c.BASE_JOB_UNCHAINABLE, f"{err}; this job was not started", seen)
    return Verdict("start", c.BASE_JOB_SUCCEEDED, _starting(resolved), resolved)


def base_view(body: Mapping[str, Any] | None) -> tuple[Any, ...]:
    """What `decide` reads of a base job: its identity, deletion, phase, gates and artifacts. Its dependents need
    another look only when this changes (the base job's progress and conditions change nothing for them)."""
    if body is None:
        return ()
    meta = body.get("metadata") or {}
    status = body.get("status") or {}
    return (
        meta.get("uid"),
        bool(meta.get("deletionTimestamp")),
        status.get("phase"),
        (status.get("evaluation") or {}).get("gatesPassed"),
        tuple(sorted((status.get("artifacts") or {}).items())),
    )


def _starting(resolved: BaseJobStatus) -> str:
    text = f"base job {resolved.name} Succeeded; starting from {resolved.model_uri}"
    if resolved.adapters:
        text += f" with adapter(s) {', '.join(resolved.adapters)} merged in"
    return text


def _first_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(part) for part in first.get("loc") or ())
    return f"{where}: {first.get('msg')}" if where else str(first.get("msg"))


__all__ = ["Verdict", "applied", "base_view", "decide", "find_cycle", "from_job", "recorded", "resolution"]
