"""The status refresher works only where something can change (`finetune_operator.refresh`).

The operator runs against the emulator with a counting stand-in for its S3 report reader (the test
decides what each job's report says and sees every read), and the emulator's request journal shows the
operator's pod lists and FineTuneJob reads. Counts are taken over several status intervals (0.3 s in
these tests); the only bounds on time are lower bounds, which a slow machine cannot break.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from finetune_operator import handlers
from finetune_operator.contract import TrainerReport
from finetune_operator.refresh import BACKOFF_CAP
from tests.api.conftest import FTJ, NAMESPACE, Cluster, ftj_manifest, operator, wait_for
from tests.api.faults import Call
from tests.api.test_operator import finish_job, phase_is, start_pod, status

INTERVAL = 0.3  # FT_STATUS_INTERVAL in tests/api/conftest.py


class Reports:
    """The operator's ReportReader for these tests: serves `reports[uri]`, records each read."""

    def __init__(self) -> None:
        self.reports: dict[str, TrainerReport] = {}
        self.reads: list[tuple[float, str]] = []
        self._lock = threading.Lock()

    def read(self, output_uri: str, uid: str | None = None) -> TrainerReport | None:
        with self._lock:
            self.reads.append((time.monotonic(), output_uri))
            raw = self.reports.get(output_uri)
        return raw

    def put(self, uri: str, **fields: Any) -> None:
        body = {"phase": "training", "totalSteps": 100,
                "updatedAt": (datetime.now(UTC) + timedelta(seconds=5)).isoformat(), **fields}
        report = TrainerReport.model_validate(body)  # a bad report is the test's bug: fail here, not there
        with self._lock:
            self.reports[uri] = report

    def times(self, uri: str, since: float = 0.0) -> list[float]:
        with self._lock:
            return [t for t, u in self.reads if u == uri and t >= since]


@pytest.fixture
def reports(monkeypatch: pytest.MonkeyPatch) -> Iterator[Reports]:
    fake = Reports()

    class Factory:
        @classmethod
        def from_env(cls) -> Reports:
            return fake

    monkeypatch.setattr(handlers, "ReportReader", Factory)
    yield fake


def uri(name: str) -> str:
    return f"s3://out/{name}/"


def create(cluster: Cluster, name: str, **spec: Any) -> None:
    cluster.create(FTJ, ftj_manifest(name, uid=None, output={"uri": uri(name)}, **spec))


def pod_lists(calls: list[Call], name: str) -> list[Call]:
    return [c for c in calls if c.verb == "list" and c.plural == "pods" and c.namespace == NAMESPACE
            and f"finetune.dev/job={name}" in (c.selector or "")]


def ftj_reads(calls: list[Call], name: str) -> list[Call]:
    return [c for c in calls if c.verb == "fetch" and c.plural == "finetunejobs" and c.name == name]


def summary(cluster: Cluster, name: str) -> str | None:
    return status(cluster, name).get("progress", {}).get("summary")


def test_suspended_and_finished_jobs_are_left_alone_while_a_running_one_is_refreshed(
    cluster: Cluster, reports: Reports
) -> None:
    with operator():
        create(cluster, "idle", suspend=True)
        wait_for(phase_is(cluster, "Suspended", "idle"), "idle Suspended")

        create(cluster, "done")
        wait_for(lambda: cluster.get("batch/v1/jobs", "done"), "done's Job")
        start_pod(cluster, name="done")
        wait_for(phase_is(cluster, "Running", "done"), "done Running")
        reports.put(uri("done"), phase="complete", step=100, artifacts={"adapter": "s3://out/done/adapter/"})
        cluster.patch("v1/pods", "done-0-abcde", {"status": {"phase": "Succeeded"}}, sub="status")
        finish_job(cluster, "Complete", "CompletionsReached", name="done")
        st = wait_for(phase_is(cluster, "Succeeded", "done"), "done Succeeded")
        assert st["artifacts"] == {"adapter": "s3://out/done/adapter/"}

        create(cluster, "run")
        wait_for(lambda: cluster.get("batch/v1/jobs", "run"), "run's Job")
        start_pod(cluster, name="run")
        reports.put(uri("run"), step=10)
        wait_for(lambda: summary(cluster, "run") == "10% 10/100", "run's progress")

        # Quiet: no event for any of the three from here on.
        time.sleep(2 * INTERVAL)
        start, seq = time.monotonic(), len(cluster.chaos.journal)
        reports.put(uri("run"), step=20)  # the running job's trainer goes on
        wait_for(lambda: summary(cluster, "run") == "20% 20/100", "run's progress from the refresher")
        time.sleep(10 * INTERVAL)
        calls = [c for c in cluster.chaos.calls() if c.seq >= seq]

    for name in ("idle", "done"):
        assert reports.times(uri(name), start) == [], f"{name}'s report was read"
        assert pod_lists(calls, name) == [], f"{name}'s pods were listed"
        assert ftj_reads(calls, name) == [], f"{name} was reconciled"
    # The refresher was at work all along: the running job was read, its pods listed.
    assert len(reports.times(uri("run"), start)) >= 2
    assert pod_lists(calls, "run") and ftj_reads(calls, "run")
    assert status(cluster, "idle")["phase"] == "Suspended" and status(cluster, "done")["phase"] == "Succeeded"


def test_an_unchanged_report_is_read_less_and_less_often(cluster: Cluster, reports: Reports) -> None:
    with operator():
        create(cluster, "run")
        wait_for(lambda: cluster.get("batch/v1/jobs", "run"), "the Job")
        start_pod(cluster, name="run")
        reports.put(uri("run"), step=10)
        wait_for(lambda: summary(cluster, "run") == "10% 10/100", "progress")

        # Nothing changes: the passes back off, doubling the interval up to BACKOFF_CAP intervals.
        start = time.monotonic()
        window = (2 + 4 + BACKOFF_CAP + BACKOFF_CAP) * INTERVAL
        time.sleep(window)
        reads = reports.times(uri("run"), start)

        # And a change still shows up (within BACKOFF_CAP intervals, then the interval again).
        reports.put(uri("run"), step=30)
        wait_for(lambda: summary(cluster, "run") == "30% 30/100", "progress after the change")

    gaps = [b - a for a, b in itertools.pairwise(reads)]
    # Every interval, there would be about window / INTERVAL = 18 reads, none more than an interval or
    # two apart; backing off, about 5, the later ones BACKOFF_CAP intervals apart.
    assert 1 <= len(reads) <= window / (2 * INTERVAL), (len(reads), gaps)
    assert gaps and max(gaps) >= (BACKOFF_CAP - 1) * INTERVAL, gaps


def test_a_new_job_costs_its_children_one_status_write_and_one_event(cluster: Cluster, reports: Reports) -> None:
    """A suspended FineTuneJob from create to Suspended: no read of it or of its children (the watch event's
    body is fresh on a first pass, the children are created without a read first), nothing written to the
    FineTuneJob but its status (no kopf annotations: the operator has no change handlers), and neither the
    events of its own status write nor the Job events that change nothing the status shows (the echo of
    the create, the controller's Suspended condition) cause a pass."""
    with operator():
        create(cluster, "idle", suspend=True)
        wait_for(phase_is(cluster, "Suspended", "idle"), "idle Suspended")
        # The Job controller's bookkeeping on a suspended Job.
        cluster.patch("batch/v1/jobs", "idle", {"status": {"conditions": [{
            "type": "Suspended", "status": "True", "reason": "JobSuspended", "message": "Job suspended",
            "lastTransitionTime": "2026-01-01T00:00:00Z"}]}}, sub="status")
        # A metadata change (a GitOps tool labels the object): no spec change, so no pass either.
        cluster.patch(FTJ, "idle", {"metadata": {"labels": {"team": "a"}}})
        time.sleep(5 * INTERVAL)
        calls = [str(c) for c in cluster.chaos.calls() if c.verb not in ("watch", "list") and c.plural]
        reads = len(reports.times(uri("idle")))
        # Then a change the status does read (the Job fails): a pass, with its reads.
        finish_job(cluster, "Failed", "BackoffLimitExceeded", "too many failures", name="idle")
        wait_for(phase_is(cluster, "Failed", "idle"), "idle Failed")

    assert sorted(calls) == sorted([
        "create configmaps", "create services", "create networkpolicies", "create jobs",  # the children
        "update finetunejobs/status idle",  # one status write
        "create events",  # one event (Pending -> Suspended)
    ]), calls
    assert reads == 0  # never read: no trainer of this Job has run (and none runs while it is suspended)
