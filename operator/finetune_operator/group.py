"""Which training pods of a multi-node job to stop so the Job controller restarts the whole group. Pure.

The pods of one multi-node attempt form one torch.distributed world: when one of them dies, the others
cannot go on, and they cannot take in a replacement either (a new member means a new world, from the
newest checkpoint). The Indexed Job replaces only the pod that failed. That is enough when the survivors
fail by themselves (a lost TCP peer fails gloo/NCCL collectives at once, and torchrun's agent then exits;
measured in tests/e2e/test_multinode.py), but not when they cannot notice: a peer that vanished without
closing its connections (a node lost, a network partition, a frozen process) leaves them blocked in a
collective for the process group's timeout (gloo 30 minutes by default), and meanwhile the replacement
pod waits for a rendezvous the old group no longer serves.

`stale_peers` decides that case: given a multi-node Job and its pods, it names the pods of the broken
attempt that are still alive `grace` seconds after a peer failed retryably. The operator then evicts
them (the Eviction API adds `DisruptionTarget`, which the Job's podFailurePolicy ignores, so the restart
does not use up backoffLimit; SIGTERM lets each save a checkpoint first), and the Job controller recreates
them, so the whole group rendezvouses afresh and resumes from the newest complete checkpoint.

A peer is a pod created before the failed pod's trainer started (they were meant to be one world).
Never named: pods created later (the new attempt, even where it overlapped the failed pod), pods already terminating or finished, and
anything when the Job is single-node, finished, suspended, or failed on a non-retryable exit code (the
Job fails as a whole then, and its controller stops the rest).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from finetune_operator.contract import EXIT_CONFIG_ERROR, EXIT_GATES_FAILED

#: Seconds survivors get to fail by themselves before the operator stops them (they usually take a few).
DEFAULT_GRACE_SECONDS = 60.0
NON_RETRYABLE = frozenset({EXIT_CONFIG_ERROR, EXIT_GATES_FAILED})


@dataclass(frozen=True)
class GroupRestart:
    """Pods to stop (sorted names) and why, for the event the operator posts."""

    pods: tuple[str, ...]
    reason: str


def _time(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass(frozen=True, order=True)
class _Failure:
    finished: datetime
    started: datetime
    name: str
    code: int | None


def _failure(pod: Mapping[str, Any]) -> _Failure | None:
    """When a failed pod's trainer started and ended, and its exit code; None unless the pod is Failed."""
    status = pod.get("status") or {}
    if status.get("phase") != "Failed":
        return None
    meta = pod.get("metadata") or {}
    created = _time(meta.get("creationTimestamp"))
    when: datetime | None = None
    started: datetime | None = None
    code: int | None = None
    for container in status.get("containerStatuses") or []:
        terminated = (container.get("state") or {}).get("terminated") or {}
        finished = _time(terminated.get("finishedAt"))
        if finished is not None and (when is None or finished > when):
            when, code = finished, terminated.get("exitCode")
            started = _time(terminated.get("startedAt"))
    if when is None:  # failed without a container status (e.g. lost before it started): use the conditions
        for cond in status.get("conditions") or []:
            at = _time(cond.get("lastTransitionTime"))
            if at is not None and (when is None or at > when):
                when = at
    when = when or created
    started = started or _time(status.get("startTime")) or created
    if when is None or started is None:
        return None
    return _Failure(when, started, meta.get("name", ""), code)


def _job_finished_or_held(job: Mapping[str, Any]) -> bool:
    spec, status = job.get("spec") or {}, job.get("status") or {}
    if spec.get("suspend"):
        return True
    return any(c.get("type") in ("Complete", "Failed", "FailureTarget", "SuccessCriteriaMet")
               and c.get("status") == "True" for c in status.get("conditions") or [])


def stale_peers(job: Mapping[str, Any], pods: Sequence[Mapping[str, Any]], now: datetime,
                grace_seconds: float = DEFAULT_GRACE_SECONDS) -> GroupRestart | None:
    """The live pods of a broken multi-node attempt to stop, or None (see the module docstring).

    `pods` are the Job's pods (any order, terminating ones included); `now` is timezone-aware.
    """
    spec = job.get("spec") or {}
    if (spec.get("completions") or 1) < 2 or spec.get("completionMode") != "Indexed" or _job_finished_or_held(job):
        return None
    failures: list[_Failure] = []
    for pod in pods:
        failed = _failure(pod)
        if failed is None:
            continue
        if failed.code in NON_RETRYABLE:
            return None  # the Job fails as a whole; nothing to restart
        failures.append(failed)
    if not failures:
        return None
    stale: list[str] = []
    causes: list[_Failure] = []
    for pod in pods:
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        if meta.get("deletionTimestamp") or status.get("phase") in ("Succeeded", "Failed"):
            continue
        created = _time(meta.get("creationTimestamp"))
        if created is None:
            continue
        # A peer of a failed pod: it existed before that pod's trainer started (so they were one world;
        # a replacement created later that merely overlapped it is not), and the failure is older than
        # the grace.
        older = [f for f in failures
                 if created <= f.started and (now - f.finished).total_seconds() >= grace_seconds]
        if older:
            stale.append(meta["name"])
            causes.append(min(older))
    if not stale:
        return None
    cause = min(causes)
    waited = (now - cause.finished).total_seconds()
    reason = (f"training pod {cause.name} failed (exit code {cause.code}) {waited:.0f}s ago and its peers "
              f"{', '.join(sorted(stale))} are still running; stopping them so the group restarts together "
              "from the newest checkpoint")
    return GroupRestart(tuple(sorted(stale)), reason)
