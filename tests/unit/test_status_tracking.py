"""status.tracking and the `Tracking` condition from the trainer's report (spec.tracking.mlflow): table tests
of the pure status function, and the Warning event when tracking fails."""

from __future__ import annotations

from typing import Any

import pytest

from finetune_operator import conditions as c
from finetune_operator.contract import TrainerReport
from finetune_operator.status import Children, compute_status, transition_events
from tests.unit.test_status import LATER, NOW, PLAN, RUNNING_JOB, cond, ftj, jcond, job, report

URL = "http://mlflow.ml:5000/#/experiments/3/runs/abc"
RUN = {"run_id": "abc", "experiment_id": "3", "run_url": URL}
DOWN = "spec.tracking.mlflow.trackingUri http://mlflow.ml:5000: creating the run failed: ConnectionError"


def tracked(**tracking: Any) -> TrainerReport:
    return report(tracking=tracking)


# id, report, expected status.tracking, expected Tracking (status, reason) or None, message fragments.
ROWS: list[tuple[str, TrainerReport, dict[str, Any] | None, tuple[str, str] | None, list[str]]] = [
    ("no-tracking", report(), None, None, []),
    ("run-exists", tracked(**RUN), {"runId": "abc", "experimentId": "3", "runUrl": URL}, ("True", "Tracked"),
     [f"MLflow run {URL}"]),
    ("registered", tracked(**RUN, registered_model="tiny", model_version="2"),
     {"runId": "abc", "experimentId": "3", "runUrl": URL, "registeredModel": "tiny", "modelVersion": "2"},
     ("True", "Tracked"), ["registered tiny version 2"]),
    ("server-down-before-any-run", tracked(error=DOWN), {"error": DOWN}, ("False", "TrackingFailed"),
     [DOWN, "training is not affected"]),
    ("failed-after-the-run-existed", tracked(**RUN, error=DOWN), {"runId": "abc", "experimentId": "3",
                                                                  "runUrl": URL, "error": DOWN},
     ("False", "TrackingFailed"), [DOWN]),
]


@pytest.mark.parametrize(("rep", "expected", "condition", "fragments"), [r[1:] for r in ROWS],
                         ids=[r[0] for r in ROWS])
def test_tracking_from_the_report(rep: TrainerReport, expected: dict[str, Any] | None,
                                  condition: tuple[str, str] | None, fragments: list[str]) -> None:
    status = compute_status(ftj(), plan=PLAN, now=NOW, report=rep, children=RUNNING_JOB)
    assert status["phase"] == "Running"  # tracking never decides a phase
    assert status.get("tracking") == expected
    assert cond(status, c.TRACKING) == condition
    if condition:
        message = c.find(status["conditions"], c.TRACKING)["message"]
        assert all(f in message for f in fragments), message


def test_a_failure_posts_one_warning_and_the_job_still_succeeds() -> None:
    running = compute_status(ftj(), plan=PLAN, now=NOW, report=tracked(**RUN), children=RUNNING_JOB)
    assert [(e.type, e.reason) for e in transition_events(ftj()["status"], running)] == [("Normal", "Running")]
    failed = compute_status(ftj(running), plan=PLAN, now=LATER, report=tracked(**RUN, error=DOWN),
                            children=RUNNING_JOB)
    events = transition_events(running, failed)
    assert [(e.type, e.reason) for e in events] == [("Warning", "TrackingFailed")]
    assert DOWN in events[0].message
    # Still failing: no second warning. The Job completes: Succeeded, the condition stays False.
    again = compute_status(ftj(failed), plan=PLAN, now=LATER, report=tracked(**RUN, error=DOWN),
                           children=RUNNING_JOB)
    assert transition_events(failed, again) == []
    done = compute_status(ftj(again), plan=PLAN, now=LATER, report=tracked(**RUN, error=DOWN),
                          children=Children(job=job(conditions=[jcond("Complete")])))
    assert done["phase"] == "Succeeded" and cond(done, c.TRACKING) == ("False", "TrackingFailed")
    assert [(e.type, e.reason) for e in transition_events(again, done)] == [("Normal", "TrainingSucceeded")]
    # The trainer reached the server again (the error cleared): True, no event.
    recovered = compute_status(ftj(done), plan=None, now=LATER, report=tracked(**RUN, model_version="1",
                                                                             registered_model="tiny"))
    assert recovered["phase"] == "Succeeded" and cond(recovered, c.TRACKING) == ("True", "Tracked")
    assert transition_events(done, recovered) == []


def test_a_failure_first_seen_after_success_still_warns() -> None:
    """The Job finished before the operator read the last report: the terminal phase applies it too."""
    done = compute_status(ftj(), plan=PLAN, now=NOW, children=Children(job=job(conditions=[jcond("Complete")])))
    late = compute_status(ftj(done), plan=None, now=LATER, report=tracked(error=DOWN))
    assert late["phase"] == "Succeeded" and late["tracking"] == {"error": DOWN}
    assert [(e.type, e.reason) for e in transition_events(done, late)] == [("Warning", "TrackingFailed")]
