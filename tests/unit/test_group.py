"""`group.stale_peers`: which live pods of a broken multi-node attempt the operator stops."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from finetune_operator.group import DEFAULT_GRACE_SECONDS, stale_peers

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def at(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def job(completions: int = 2, **status: Any) -> dict[str, Any]:
    return {"spec": {"completions": completions, "parallelism": completions, "completionMode": "Indexed"},
            "status": status}


def pod(name: str, phase: str, created: float, *, exit_code: int | None = None, finished: float | None = None,
        started: float | None = None, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "creationTimestamp": at(created)}
    if deleting:
        meta["deletionTimestamp"] = at(created + 1)
    status: dict[str, Any] = {"phase": phase}
    if exit_code is not None:
        status["containerStatuses"] = [{"name": "trainer", "state": {
            "terminated": {"exitCode": exit_code, "startedAt": at(started if started is not None else created + 2),
                           "finishedAt": at(finished if finished is not None else created)}}}]
    return {"metadata": meta, "status": status}


def later(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_a_survivor_still_running_after_the_grace_is_named() -> None:
    pods = [pod("j-0-a", "Running", 0), pod("j-1-a", "Failed", 0, exit_code=137, finished=100)]
    decision = stale_peers(job(), pods, later(100 + DEFAULT_GRACE_SECONDS))
    assert decision is not None and decision.pods == ("j-0-a",)
    assert "j-1-a failed (exit code 137)" in decision.reason


def test_within_the_grace_nothing_is_stopped() -> None:
    pods = [pod("j-0-a", "Running", 0), pod("j-1-a", "Failed", 0, exit_code=137, finished=100)]
    assert stale_peers(job(), pods, later(100 + DEFAULT_GRACE_SECONDS - 1)) is None


def test_the_replacement_pod_is_not_a_stale_peer() -> None:
    pods = [pod("j-0-a", "Running", 0), pod("j-1-a", "Failed", 0, exit_code=1, finished=100),
            pod("j-1-b", "Running", 110)]
    decision = stale_peers(job(), pods, later(300))
    assert decision is not None and decision.pods == ("j-0-a",)


def test_a_new_attempt_after_both_failed_is_left_alone() -> None:
    pods = [pod("j-0-a", "Failed", 0, exit_code=1, finished=103), pod("j-1-a", "Failed", 0, exit_code=137, finished=100),
            pod("j-0-b", "Running", 120), pod("j-1-b", "Pending", 121)]
    assert stale_peers(job(), pods, later(600)) is None


@pytest.mark.parametrize("code", [3, 4])
def test_non_retryable_exit_fails_the_job_instead(code: int) -> None:
    pods = [pod("j-0-a", "Running", 0), pod("j-1-a", "Failed", 0, exit_code=code, finished=100)]
    assert stale_peers(job(), pods, later(600)) is None


def test_terminating_and_succeeded_pods_are_not_named() -> None:
    pods = [pod("j-0-a", "Running", 0, deleting=True), pod("j-2-a", "Succeeded", 0, exit_code=0),
            pod("j-1-a", "Failed", 0, exit_code=1, finished=100)]
    assert stale_peers(job(3), pods, later(600)) is None


@pytest.mark.parametrize("the_job", [
    job(1),  # single node: the Job's own retry is the group restart
    {**job(), "spec": {**job()["spec"], "suspend": True}},
    job(conditions=[{"type": "Failed", "status": "True"}]),
    job(conditions=[{"type": "FailureTarget", "status": "True"}]),
    job(conditions=[{"type": "Complete", "status": "True"}]),
    {"spec": {"completions": 2, "parallelism": 2, "completionMode": "NonIndexed"}, "status": {}},
])
def test_jobs_without_a_group_to_restart(the_job: dict[str, Any]) -> None:
    pods = [pod("j-0-a", "Running", 0), pod("j-1-a", "Failed", 0, exit_code=137, finished=100)]
    assert stale_peers(the_job, pods, later(600)) is None


def test_healthy_group_is_left_alone() -> None:
    assert stale_peers(job(), [pod("j-0-a", "Running", 0), pod("j-1-a", "Running", 0)], later(600)) is None


def test_several_survivors_sorted_and_failure_without_container_status() -> None:
    failed = {"metadata": {"name": "j-2-a", "creationTimestamp": at(0)},
              "status": {"phase": "Failed", "conditions": [{"type": "Ready", "status": "False",
                                                             "lastTransitionTime": at(50)}]}}
    pods = [pod("j-1-a", "Running", 0), pod("j-0-a", "Pending", 0), failed]
    decision = stale_peers(job(3), pods, later(50 + DEFAULT_GRACE_SECONDS))
    assert decision is not None and decision.pods == ("j-0-a", "j-1-a")
    assert stale_peers(job(3), pods, later(50 + DEFAULT_GRACE_SECONDS), grace_seconds=120) is None


def test_a_replacement_that_only_overlapped_the_failed_pod_is_not_its_peer() -> None:
    """After a group restart: the new pod 0 came up while the old replacement of index 1 (which had waited
    for the old group's store) was failing; they were never one world, so the new pod 0 is left alone."""
    pods = [pod("j-1-b", "Failed", 110, exit_code=1, started=111, finished=205), pod("j-0-c", "Running", 200),
            pod("j-1-c", "Running", 215)]
    assert stale_peers(job(), pods, later(900)) is None


def test_the_earliest_failure_is_the_cause() -> None:
    pods = [pod("j-0-a", "Running", 0), pod("j-1-a", "Failed", 0, exit_code=137, finished=100),
            pod("j-2-a", "Failed", 0, exit_code=1, finished=104)]
    decision = stale_peers(job(3), pods, later(400))
    assert decision is not None and decision.pods == ("j-0-a",) and "j-1-a failed (exit code 137)" in decision.reason
