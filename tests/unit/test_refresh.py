"""The refresh schedule and the skips of a pass (`finetune_operator.refresh`): table tests."""

from __future__ import annotations

from typing import Any

import pytest

from finetune_operator.refresh import (
    BACKOFF_CAP,
    Next,
    Outcome,
    job_view,
    next_refresh,
    pods_active,
    report_changed,
    skip_pods,
    skip_report,
)

I = 10.0  # the status interval  # noqa: E741


@pytest.mark.parametrize(("outcome", "idle", "expected"), [
    # Event-driven only: nothing can change without an event the operator watches.
    (Outcome("Suspended"), 0, Next(None, 0)),
    (Outcome("Suspended"), 4, Next(None, 0)),
    (Outcome("Queued"), 0, Next(None, 0)),
    (Outcome("Pending"), 0, Next(None, 0)),  # its Job exists, no pods yet
    (Outcome("Failed"), 3, Next(None, 0)),
    (Outcome("Succeeded"), 0, Next(None, 0)),
    (Outcome(None), 0, Next(None, 0)),
    # A success whose artifacts were not read yet: a slow retry.
    (Outcome("Succeeded", awaiting_artifacts=True), 0, Next(I * BACKOFF_CAP, 0)),
    (Outcome("Failed", awaiting_artifacts=True), 0, Next(None, 0)),
    # Running: the interval after a change, then doubling up to the cap while nothing changes.
    (Outcome("Running", report_changed=True), 0, Next(I, 0)),
    (Outcome("Running", report_changed=True), 5, Next(I, 0)),
    (Outcome("Running"), 0, Next(2 * I, 1)),
    (Outcome("Running"), 1, Next(4 * I, 2)),
    (Outcome("Running"), 2, Next(6 * I, 3)),
    (Outcome("Running"), 3, Next(6 * I, 4)),
    (Outcome("Running"), 1000, Next(6 * I, 1001)),
    # Pods that have not finished (pulling, starting) count as running.
    (Outcome("Pending", pods_active=True), 0, Next(2 * I, 1)),
    (Outcome("Pending", pods_active=True, report_changed=True), 2, Next(I, 0)),
    # A foreign or missing child: its removal sends no event the operator watches.
    (Outcome("Pending", children_ready=False), 0, Next(2 * I, 1)),
    (Outcome("Pending", children_ready=False), 2, Next(6 * I, 3)),
    # A failed pass is retried after one interval, keeping the backoff it had.
    (Outcome(None, failed=True), 2, Next(I, 2)),
    (Outcome("Suspended", failed=True), 0, Next(I, 0)),
])
def test_next_refresh(outcome: Outcome, idle: int, expected: Next) -> None:
    assert next_refresh(outcome, idle, I) == expected


def test_the_cap_is_a_parameter() -> None:
    assert next_refresh(Outcome("Running"), 5, 1.0, cap=3) == Next(3.0, 6)
    assert next_refresh(Outcome("Succeeded", awaiting_artifacts=True), 0, 1.0, cap=3) == Next(3.0, 0)


def test_backoff_sequence_and_reset() -> None:
    idle, delays = 0, []
    for changed in (True, False, False, False, False, True, False):
        decision = next_refresh(Outcome("Running", report_changed=changed), idle, 1.0)
        idle = decision.idle
        delays.append(decision.delay)
    assert delays == [1.0, 2.0, 4.0, 6.0, 6.0, 1.0, 2.0]


def pod(phase: str | None, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "p"}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta, "status": {"phase": phase} if phase else {}}


@pytest.mark.parametrize(("pods", "active"), [
    ([], False),
    ([pod("Succeeded")], False),
    ([pod("Failed"), pod("Succeeded")], False),
    ([pod("Running", deleting=True)], False),
    ([pod("Pending")], True),
    ([pod(None)], True),
    ([pod("Failed"), pod("Running")], True),
])
def test_pods_active(pods: list[dict[str, Any]], active: bool) -> None:
    assert pods_active(pods) is active


@pytest.mark.parametrize(("old", "new", "changed"), [
    ({}, {}, False),
    ({"phase": "Running"}, {"phase": "Suspended"}, False),  # not from the report
    ({"progress": {"step": 1}}, {"progress": {"step": 1}, "phase": "Running"}, False),
    ({"progress": {"step": 1}}, {"progress": {"step": 2}}, True),
    ({}, {"progress": {"step": 0}}, True),
    ({"checkpoints": []}, {"checkpoints": [{"step": 2, "uri": "s3://o/c/"}]}, True),
    ({"artifacts": {}}, {"artifacts": {"adapter": "s3://o/a/"}}, True),
    (None, {"evaluation": {"x": 1}}, True),
])
def test_report_changed(old: dict[str, Any] | None, new: dict[str, Any], changed: bool) -> None:
    assert report_changed(old, new) is changed


@pytest.mark.parametrize(("suspended", "known", "skip"), [
    (True, 0, True),
    (True, 1, False),  # pods still going away: list them (restarts, disruptions)
    (False, 0, False),  # running or pending: always a fresh list
    (False, 2, False),
])
def test_skip_pods(suspended: bool, known: int, skip: bool) -> None:
    assert skip_pods(suspended, known) is skip


@pytest.mark.parametrize(("pods", "settled", "skip"), [
    (0, True, True),
    (0, False, False),  # the first pass after the last pod went away reads the final report
    (1, True, False),
    (1, False, False),
])
def test_skip_report(pods: int, settled: bool, skip: bool) -> None:
    assert skip_report(pods, settled) is skip


def _job(**changes: Any) -> dict[str, Any]:
    job: dict[str, Any] = {
        "metadata": {"name": "demo", "uid": "u1", "resourceVersion": "7", "labels": {"finetune.dev/job": "demo"}},
        "spec": {"suspend": True, "parallelism": 1},
        "status": {},
    }
    for path, value in changes.items():
        where = job
        *parents, leaf = path.split("__")
        for part in parents:
            where = where.setdefault(part, {})
        where[leaf] = value
    return job


SUSPENDED_CONDITION = {"type": "Suspended", "status": "True", "reason": "JobSuspended", "message": "Job suspended",
                       "lastTransitionTime": "2026-12-02T00:00:00Z"}
FAILED_CONDITION = {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "too many",
                    "lastTransitionTime": "2026-12-02T00:01:00Z"}


@pytest.mark.parametrize(("changed", "differs"), [
    # The controller's bookkeeping and the object's own revision: the status reads none of it.
    (_job(status__conditions=[SUSPENDED_CONDITION]), False),
    (_job(metadata__resourceVersion="8", metadata__generation=2), False),
    (_job(spec__parallelism=2), False),
    (_job(status__uncountedTerminatedPods={}), False),
    (_job(status__ready=0, status__terminating=0, status__active=0), False),  # the controller's first sync
    # What the status is computed from.
    (_job(spec__suspend=False), True),
    (_job(metadata__uid="u2"), True),  # a Job of the same name replaced
    (_job(metadata__labels={"kueue.x-k8s.io/queue-name": "q"}), True),
    (_job(status__conditions=[SUSPENDED_CONDITION, FAILED_CONDITION]), True),
    (_job(status__conditions=[{**FAILED_CONDITION, "type": "Complete", "reason": "Completed"}]), True),
    (_job(status__startTime="2026-12-02T00:00:00Z"), True),
    (_job(status__completionTime="2026-12-02T00:02:00Z"), True),
    (_job(status__ready=1), True),
    (_job(status__failed=1), True),
    (_job(status__active=2), True),
    (_job(status__succeeded=1), True),
])
def test_job_view_changes_only_with_what_the_status_reads(changed: dict[str, Any], differs: bool) -> None:
    assert (job_view(changed) != job_view(_job())) is differs


def test_job_view_of_no_job() -> None:
    assert job_view(None) == job_view(None) != job_view(_job())
    # Equal Jobs read at different times (the create's answer, the watch's copy) have equal views.
    assert job_view(_job()) == job_view(_job())
