"""Table tests of the pure status function (`finetune_operator.status`) and of `conditions.set_condition`."""

from __future__ import annotations

from typing import Any

import pytest

from finetune_operator import conditions as c
from finetune_operator.contract import TrainerReport
from finetune_operator.spec import FineTuneJobStatus, Plan
from finetune_operator.status import (
    Children,
    compute_status,
    event_name,
    status_changed,
    status_patch,
    transition_events,
)

NOW = "2026-03-01T12:00:00Z"
LATER = "2026-03-01T12:05:00Z"
CREATED = "2026-03-01T10:00:00Z"
PLAN = Plan(
    method="qlora", gpus=2, gpu_memory_gib=24, nodes=2, gpus_per_node=1, estimated_memory_gib=30.0,
    source="table", reason="test plan",
)


def ftj(status: dict[str, Any] | None = None, *, suspend: bool = False, queue: str | None = None,
        generation: int = 3) -> dict[str, Any]:
    labels = {"kueue.x-k8s.io/queue-name": queue} if queue else {}
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "demo", "namespace": "default", "uid": "u1", "generation": generation,
                     "creationTimestamp": CREATED, "labels": labels},
        "spec": {"suspend": suspend},
        "status": status or {},
    }


def job(*, suspend: bool = False, conditions: list[dict[str, Any]] | None = None, **status: Any) -> dict[str, Any]:
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "demo"},
            "spec": {"suspend": suspend}, "status": {"conditions": conditions or [], **status}}


def jcond(type_: str, reason: str = "", message: str = "") -> dict[str, Any]:
    return {"type": type_, "status": "True", "reason": reason, "message": message,
            "lastTransitionTime": "2026-03-01T11:00:00Z"}


def pod(phase: str = "Running", *, name: str = "demo-0-x", conditions: list[dict[str, Any]] | None = None,
        containers: list[dict[str, Any]] | None = None, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if deleting:
        meta["deletionTimestamp"] = NOW
    return {"metadata": meta, "status": {"phase": phase, "conditions": conditions or [],
                                         "containerStatuses": containers or []}}


def exited(code: int, message: str = "") -> list[dict[str, Any]]:
    return [{"name": "trainer", "state": {"terminated": {"exitCode": code, "message": message}}}]


def report(**fields: Any) -> TrainerReport:
    base: dict[str, Any] = {"phase": "training", "step": 450, "total_steps": 1000, "loss": 1.5,
                            "eval_loss": 1.7, "tokens_per_second": 1234.5, "eta_seconds": 90,
                            "updated_at": "2026-03-01T11:59:00Z"}
    base.update(fields)
    return TrainerReport.model_validate(base)


def cond(status: dict[str, Any], type_: str) -> tuple[str, str] | None:
    found = c.find(status.get("conditions"), type_)
    return (found["status"], found["reason"]) if found else None


# Each row: id, compute_status kwargs (without `now`), expected phase, expected {type: (status, reason)}.
ROWS: list[tuple[str, dict[str, Any], str, dict[str, tuple[str, str] | None]]] = [
    ("invalid spec", dict(job=ftj(), plan=None, validation_error="spec.quantization: only with qlora"),
     "Failed", {"Valid": ("False", "InvalidSpec"), "Failed": ("True", "InvalidSpec"), "Created": None}),
    ("planning failed", dict(job=ftj(), plan=None, planning_error="spec.resources.gpus: cannot split"),
     "Failed", {"Valid": ("True", "ValidSpec"), "Planned": ("False", "PlanningFailed"),
                "Failed": ("True", "PlanningFailed")}),
    ("foreign child", dict(job=ftj(), plan=PLAN, children=Children(foreign=("ConfigMap x is someone's",))),
     "Pending", {"Created": ("False", "ForeignChild"), "Running": ("False", "ForeignChild")}),
    ("job missing", dict(job=ftj(), plan=PLAN, children=Children()),
     "Pending", {"Created": ("False", "ChildrenMissing"), "Running": ("False", "Starting")}),
    ("just created", dict(job=ftj(), plan=PLAN, children=Children(job=job(), created=("Job/demo",))),
     "Pending", {"Planned": ("True", "Planned"), "Created": ("True", "ChildrenCreated"),
                 "Running": ("False", "Starting"), "Complete": None, "Failed": None}),
    ("adopted", dict(job=ftj(), plan=PLAN, children=Children(job=job(), adopted=("ConfigMap/demo-config",))),
     "Pending", {"Created": ("True", "AdoptedChildren")}),
    ("pod running", dict(job=ftj(), plan=PLAN, children=Children(job=job(active=1, startTime=CREATED),
                                                                  pods=[pod()])),
     "Running", {"Running": ("True", "Running")}),
    ("ready without pods listed", dict(job=ftj(), plan=PLAN, children=Children(job=job(ready=2))),
     "Running", {"Running": ("True", "Running")}),
    ("pod pending", dict(job=ftj(), plan=PLAN, children=Children(job=job(active=1), pods=[pod("Pending")])),
     "Pending", {"Running": ("False", "Starting")}),
    ("terminating pod is not running", dict(job=ftj(), plan=PLAN,
                                            children=Children(job=job(), pods=[pod(deleting=True)])),
     "Pending", {"Running": ("False", "Starting")}),
    ("complete", dict(job=ftj(), plan=PLAN, children=Children(job=job(conditions=[jcond("Complete")],
                                                                       completionTime="2026-03-01T11:30:00Z"))),
     "Succeeded", {"Complete": ("True", "TrainingSucceeded"), "Running": ("False", "TrainingSucceeded"),
                   "Failed": None}),
    ("backoff limit", dict(job=ftj(), plan=PLAN, children=Children(
        job=job(conditions=[jcond("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")],
                failed=4))),
     "Failed", {"Failed": ("True", "BackoffLimitExceeded"), "Complete": None}),
    ("deadline", dict(job=ftj(), plan=PLAN, children=Children(
        job=job(conditions=[jcond("Failed", "DeadlineExceeded", "Job was active longer than specified deadline")]))),
     "Failed", {"Failed": ("True", "DeadlineExceeded")}),
    ("pod failure policy with the trainer's report", dict(
        job=ftj(), plan=PLAN, report=report(phase="failed", error={"reason": "InvalidData", "message": "row 7 bad"}),
        children=Children(job=job(conditions=[jcond("Failed", "PodFailurePolicy", "exit code 3")]))),
     "Failed", {"Failed": ("True", "InvalidData")}),
    ("budget reached", dict(
        job=ftj(), plan=PLAN, report=report(phase="failed", gpu_hours=2.0, error={
            "reason": "BudgetExceeded", "message": "used 2 GPU-hours, reaching spec.budget.maxGpuHours (2)"}),
        children=Children(job=job(conditions=[jcond("Failed", "PodFailurePolicy", "exit code 3")]))),
     "Failed", {"Failed": ("True", c.BUDGET_EXCEEDED)}),
    ("pod failure policy, gates exit code", dict(job=ftj(), plan=PLAN, children=Children(
        job=job(conditions=[jcond("Failed", "PodFailurePolicy", "exit code 4")]),
        pods=[pod("Failed", containers=exited(4, "accuracy 0.41 < min 0.6"))])),
     "Failed", {"Failed": ("True", "GatesFailed")}),
    ("pod failure policy, config exit code", dict(job=ftj(), plan=PLAN, children=Children(
        job=job(conditions=[jcond("Failed", "PodFailurePolicy", "exit code 3")]), pods=[pod("Failed", containers=exited(3))])),
     "Failed", {"Failed": ("True", "TrainerConfigError")}),
    ("pod failure policy, nothing known", dict(job=ftj(), plan=PLAN, children=Children(
        job=job(conditions=[jcond("Failed", "PodFailurePolicy", "exit code 3")]))),
     "Failed", {"Failed": ("True", "PodFailurePolicy")}),
    ("failed without a reason", dict(job=ftj(), plan=PLAN, children=Children(job=job(conditions=[jcond("Failed")]))),
     "Failed", {"Failed": ("True", "JobFailed")}),
    ("suspended", dict(job=ftj(suspend=True), plan=PLAN, children=Children(job=job(suspend=True))),
     "Suspended", {"Suspended": ("True", "Suspended"), "Running": ("False", "Suspended"), "Queued": None}),
    ("kueue waiting", dict(job=ftj(queue="team-a"), plan=PLAN, kueue_managed=True,
                           children=Children(job=job(suspend=True))),
     "Queued", {"Queued": ("True", "WaitingForAdmission"), "Running": ("False", "WaitingForAdmission"),
                "Suspended": None}),
    ("kueue admitted", dict(job=ftj(queue="team-a"), plan=PLAN, kueue_managed=True,
                            children=Children(job=job(), pods=[pod()])),
     "Running", {"Queued": ("False", "Admitted"), "Running": ("True", "Running")}),
    ("kueue with spec.suspend", dict(job=ftj(queue="team-a", suspend=True), plan=PLAN, kueue_managed=True,
                                     children=Children(job=job(), pods=[pod()])),
     "Running", {"Suspended": ("False", "KueueManaged")}),
    ("resumed", dict(job=ftj({"phase": "Suspended", "conditions": [
        {"type": "Suspended", "status": "True", "reason": "Suspended", "message": "", "lastTransitionTime": CREATED}]}),
        plan=PLAN, children=Children(job=job())),
     "Pending", {"Suspended": ("False", "Resumed")}),
]


@pytest.mark.parametrize(("kwargs", "phase", "expected"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_phase_and_conditions(kwargs: dict[str, Any], phase: str, expected: dict[str, Any]) -> None:
    kwargs = dict(kwargs)
    status = compute_status(kwargs.pop("job"), now=NOW, **kwargs)
    assert status["phase"] == phase
    for type_, want in expected.items():
        assert cond(status, type_) == want, (type_, status["conditions"])
    FineTuneJobStatus.model_validate(status)  # always fits the CRD's status schema
    assert status["observedGeneration"] == 3


def test_invalid_spec_message_names_the_field() -> None:
    status = compute_status(ftj(), plan=None, validation_error="spec.quantization: only with method qlora", now=NOW)
    assert "spec.quantization" in c.find(status["conditions"], "Valid")["message"]
    assert "plan" not in status and status["completionTime"] == NOW


def test_failure_messages_carry_the_trainers_words() -> None:
    gates = compute_status(ftj(), plan=PLAN, now=NOW, children=Children(
        job=job(conditions=[jcond("Failed", "PodFailurePolicy", "exit code 4")]),
        pods=[pod("Failed", containers=exited(4, "accuracy 0.41 < min 0.6"))]))
    assert c.find(gates["conditions"], "Failed")["message"] == "accuracy 0.41 < min 0.6"
    crash = compute_status(ftj(), plan=PLAN, now=NOW, report=report(error={"reason": "Crash", "message": "CUDA OOM"}),
                           children=Children(job=job(conditions=[jcond("Failed", "BackoffLimitExceeded", "limit")])))
    failed = c.find(crash["conditions"], "Failed")
    assert failed["reason"] == "BackoffLimitExceeded"
    assert failed["message"] == "limit; last trainer error: Crash: CUDA OOM"
    assert crash["completionTime"] == "2026-03-01T11:00:00Z"


def test_waiting_message_says_why_pods_do_not_run() -> None:
    unscheduled = pod("Pending", conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                              "message": "0/3 nodes have nvidia.com/gpu"}])
    status = compute_status(ftj(), plan=PLAN, now=NOW, children=Children(job=job(active=1), pods=[unscheduled]))
    assert "Unschedulable: 0/3 nodes have nvidia.com/gpu" in c.find(status["conditions"], "Running")["message"]
    pulling = pod("Pending", containers=[{"name": "trainer", "state": {"waiting": {"reason": "ImagePullBackOff",
                                                                                  "message": "not found"}}}])
    status = compute_status(ftj(), plan=PLAN, now=NOW, children=Children(job=job(active=1), pods=[pulling]))
    assert "ImagePullBackOff: not found" in c.find(status["conditions"], "Running")["message"]


def test_times() -> None:
    running = compute_status(ftj(), plan=PLAN, now=NOW, children=Children(job=job(startTime=CREATED), pods=[pod()]))
    assert running["startTime"] == CREATED and "completionTime" not in running
    no_job_time = compute_status(ftj(), plan=PLAN, now=NOW, children=Children(job=job(), pods=[pod()]))
    assert no_job_time["startTime"] == NOW
    done = compute_status(ftj(running), plan=PLAN, now=LATER, children=Children(
        job=job(conditions=[jcond("Complete")], completionTime="2026-03-01T11:30:00Z")))
    assert done["startTime"] == CREATED and done["completionTime"] == "2026-03-01T11:30:00Z"


def test_restarts_count_failures_and_preemptions_and_never_decrease() -> None:
    disrupted = pod("Failed", name="demo-0-a", conditions=[{"type": "DisruptionTarget", "status": "True"}])
    status = compute_status(ftj(), plan=PLAN, now=NOW, children=Children(job=job(failed=2), pods=[disrupted, pod()]))
    assert status["restarts"] == 3
    later = compute_status(ftj(status), plan=PLAN, now=LATER, children=Children(job=job(failed=0), pods=[pod()]))
    assert later["restarts"] == 3


def test_progress_from_the_report() -> None:
    status = compute_status(ftj(), plan=PLAN, now=NOW, report=report(
        epoch=1.25, checkpoints=[{"step": 400, "uri": "s3://b/o/checkpoints/step-400/"}],
        artifacts={"model": "s3://b/o/model/"}), children=Children(job=job(), pods=[pod()]))
    assert status["progress"] == {
        "step": 450, "totalSteps": 1000, "percent": 45, "summary": "45% 450/1000", "epoch": 1.25, "loss": 1.5,
        "evalLoss": 1.7, "tokensPerSecond": 1234.5, "etaSeconds": 90, "updatedAt": "2026-03-01T11:59:00Z",
    }
    assert status["checkpoints"] == [{"step": 400, "uri": "s3://b/o/checkpoints/step-400/"}]
    assert status["artifacts"] == {"model": "s3://b/o/model/"}
    assert "45% 450/1000" in c.find(status["conditions"], "Running")["message"]


def test_gpu_hours_from_the_report() -> None:
    status = compute_status(ftj(), plan=PLAN, now=NOW, report=report(gpu_hours=0.123456789),
                            children=Children(job=job(active=1), pods=[pod()]))
    assert status["progress"]["gpuHours"] == 0.1235
    assert "gpuHours" not in compute_status(ftj(), plan=PLAN, now=NOW, report=report(),
                                            children=Children(job=job(active=1), pods=[pod()]))["progress"]


def test_out_of_memory_adjustments_from_the_report() -> None:
    step_down = {"step": 0, "from": {"microBatch": 4, "gradAccum": 4, "gradientCheckpointing": False},
                 "to": {"microBatch": 2, "gradAccum": 8, "gradientCheckpointing": False},
                 "reason": "CUDA out of memory in the first steps", "by": "trainer"}
    status = compute_status(ftj(), plan=PLAN, now=NOW, report=report(adjustments=[step_down]),
                            children=Children(job=job(), pods=[pod()]))
    assert status["adjustments"] == [step_down]
    # Kept when a later pass has no report to read; none without any.
    later = compute_status(ftj(status), plan=PLAN, now=LATER, report=None, children=Children(job=job(), pods=[pod()]))
    assert later["adjustments"] == [step_down]
    assert "adjustments" not in compute_status(ftj(), plan=PLAN, now=NOW, report=report(),
                                               children=Children(job=job(), pods=[pod()]))


@pytest.mark.parametrize(("step", "total", "summary", "percent"), [
    (0, 0, "starting", 0), (0, 1000, "0% 0/1000", 0), (999, 1000, "99% 999/1000", 99),
    (1000, 1000, "100% 1000/1000", 100), (1200, 1000, "100% 1200/1000", 100),
])
def test_progress_summary(step: int, total: int, summary: str, percent: int) -> None:
    phase = "starting" if total == 0 else "training"
    status = compute_status(ftj(), plan=PLAN, now=NOW, report=report(phase=phase, step=step, total_steps=total),
                            children=Children(job=job()))
    assert (status["progress"]["summary"], status["progress"]["percent"]) == (summary, percent)


def test_without_a_report_the_last_progress_stays() -> None:
    first = compute_status(ftj(), plan=PLAN, now=NOW, report=report(), children=Children(job=job(), pods=[pod()]))
    second = compute_status(ftj(first), plan=PLAN, now=LATER, report=None, children=Children(job=job(), pods=[pod()]))
    assert second["progress"] == first["progress"]


def test_a_report_older_than_the_job_is_from_another_run() -> None:
    stale = report(phase="complete", step=1000, updated_at="2026-02-01T00:00:00Z", artifacts={"model": "s3://old/"})
    status = compute_status(ftj(), plan=PLAN, now=NOW, report=stale, children=Children(job=job()))
    assert "progress" not in status and "artifacts" not in status


def test_success_drops_the_eta_and_keeps_the_scores() -> None:
    evaluation = {"accuracy_metric": "rougeL", "examples": 10, "tuned": {"accuracy": 0.8}, "gates_passed": True}
    final = report(phase="complete", step=1000, eta_seconds=0, evaluation=evaluation)
    status = compute_status(ftj(), plan=PLAN, now=NOW, report=final,
                            children=Children(job=job(conditions=[jcond("Complete")])))
    assert status["phase"] == "Succeeded" and "etaSeconds" not in status["progress"]
    assert status["evaluation"]["tuned"]["accuracy"] == 0.8 and status["evaluation"]["gatesPassed"] is True


def test_terminal_phases_stick() -> None:
    done = compute_status(ftj(), plan=PLAN, now=NOW, children=Children(job=job(conditions=[jcond("Complete")])))
    # The Job is gone (TTL) and a report with artifacts arrives late: the phase stays, the artifacts land.
    late = compute_status(ftj(done), plan=None, now=LATER, children=Children(),
                          report=report(phase="complete", step=1000, artifacts={"model": "s3://b/o/model/"}))
    assert late["phase"] == "Succeeded" and late["artifacts"] == {"model": "s3://b/o/model/"}
    assert [x for x in late["conditions"] if x["type"] != "Valid"] == [
        x for x in done["conditions"] if x["type"] != "Valid"]
    failed = compute_status(ftj(), plan=None, now=NOW, validation_error="spec.x: bad")
    assert compute_status(ftj(failed), plan=None, now=LATER, validation_error="spec.x: bad")["phase"] == "Failed"


def test_recomputing_the_same_observation_changes_nothing() -> None:
    kwargs: dict[str, Any] = dict(plan=PLAN, report=report(), children=Children(job=job(startTime=CREATED), pods=[pod()]))
    first = compute_status(ftj(), now=NOW, **kwargs)
    second = compute_status(ftj(first), now=LATER, **kwargs)
    assert not status_changed(first, second)
    assert second["conditions"] == first["conditions"]  # lastTransitionTime kept


def test_created_reason_is_kept_once_true() -> None:
    first = compute_status(ftj(), plan=PLAN, now=NOW, children=Children(job=job(), adopted=("Job/demo",)))
    second = compute_status(ftj(first), plan=PLAN, now=LATER, children=Children(job=job()))
    assert cond(second, "Created") == ("True", "AdoptedChildren")


# --- status_changed / status_patch / transition_events -----------------------------------------------


def test_status_changed_ignores_empty_values_and_foreign_keys() -> None:
    assert not status_changed({"phase": "Running", "artifacts": {}, "checkpoints": []}, {"phase": "Running"})
    assert not status_changed({"phase": "Running", "kopf": {"progress": {}}}, {"phase": "Running"})
    assert not status_changed(None, {})
    assert status_changed({"phase": "Running"}, {"phase": "Succeeded"})
    assert status_changed({"progress": {"step": 1}}, {"progress": {"step": 2}})
    assert status_changed({"restarts": 1}, {"restarts": 2})


def test_status_patch_deletes_what_is_gone_at_any_depth() -> None:
    old = {"phase": "Running", "progress": {"step": 1, "etaSeconds": 5}, "startTime": "t", "kopf": {"x": 1},
           "conditions": [{"type": "A"}]}
    new = {"phase": "Succeeded", "progress": {"step": 2}, "conditions": [{"type": "A"}, {"type": "B"}]}
    assert status_patch(old, new) == {"status": {
        "phase": "Succeeded", "progress": {"step": 2, "etaSeconds": None}, "startTime": None,
        "conditions": [{"type": "A"}, {"type": "B"}],
    }}
    assert status_patch(new, new) == {"status": {}}


def test_transition_events() -> None:
    pending = compute_status(ftj(), plan=PLAN, now=NOW, children=Children(job=job(), created=("Job/demo",)))
    running = compute_status(ftj(pending), plan=PLAN, now=LATER, children=Children(job=job(), pods=[pod()]))
    events = transition_events(pending, running)
    assert [(e.type, e.reason) for e in events] == [("Normal", "Running")]
    assert events[0].message.startswith("Running: 1 of 2 training pod(s) running")
    assert transition_events(running, running) == []

    failed = compute_status(ftj(running), plan=PLAN, now=LATER, children=Children(
        job=job(conditions=[jcond("Failed", "DeadlineExceeded", "too long")])))
    assert [(e.type, e.reason, e.message) for e in transition_events(running, failed)] == [
        ("Warning", "DeadlineExceeded", "Failed: too long")]

    foreign = compute_status(ftj(), plan=PLAN, now=NOW, children=Children(foreign=("ConfigMap demo-config: theirs",)))
    assert [(e.type, e.reason) for e in transition_events({}, foreign)] == [("Warning", "ForeignChild")]
    again = compute_status(ftj(foreign), plan=PLAN, now=LATER, children=Children(foreign=("ConfigMap demo-config: theirs",)))
    assert transition_events(foreign, again) == []


def test_event_names_are_deterministic_per_transition() -> None:
    """The same transition out of the same status gets the same name (a repeat is refused by the API);
    another transition, another object or a later pass through the same phase gets another."""
    pending = compute_status(ftj(), plan=PLAN, now=NOW, children=Children(job=job(), created=("Job/demo",)))
    running = compute_status(ftj(pending), plan=PLAN, now=LATER, children=Children(job=job(), pods=[pod()]))
    (event,) = transition_events(pending, running)
    name = event_name("demo", "uid-1", pending, event)
    assert name == event_name("demo", "uid-1", dict(pending), event)
    assert name.startswith("demo.") and len(name) == len("demo.") + 16
    assert all(ch in "0123456789abcdef" for ch in name.split(".", 1)[1])
    assert event_name("demo", "uid-2", pending, event) != name  # a re-created object of the same name
    (failed_event,) = transition_events(running, compute_status(ftj(running), plan=PLAN, now=LATER, children=Children(
        job=job(conditions=[jcond("Failed", "DeadlineExceeded", "too long")]))))
    assert event_name("demo", "uid-1", running, failed_event) != name
    # Pending again later (e.g. after a suspension): its conditions moved on, so the name differs.
    later = {**pending, "conditions": [{**cond, "lastTransitionTime": "2030-01-01T00:00:00Z"}
                                       for cond in pending["conditions"]]}
    assert event_name("demo", "uid-1", later, event) != name


# --- set_condition ---------------------------------------------------------------------------------


def test_set_condition_adds_a_new_condition() -> None:
    assert c.set_condition([], "Running", "True", "Running", "1 pod", 2, NOW) == [
        {"type": "Running", "status": "True", "reason": "Running", "message": "1 pod", "lastTransitionTime": NOW,
         "observedGeneration": 2}]


def test_set_condition_keeps_the_transition_time_while_the_status_holds() -> None:
    first = c.set_condition([], "Running", "False", "Starting", "waiting", 1, NOW)
    same = c.set_condition(first, "Running", "False", "Suspended", "paused", 2, LATER)
    assert same[0]["lastTransitionTime"] == NOW
    assert (same[0]["reason"], same[0]["message"], same[0]["observedGeneration"]) == ("Suspended", "paused", 2)
    flipped = c.set_condition(same, "Running", "True", "Running", "go", 2, LATER)
    assert flipped[0]["lastTransitionTime"] == LATER


def test_set_condition_is_pure_and_ordered() -> None:
    original = [{"type": "Custom", "status": "True", "reason": "X", "message": "", "lastTransitionTime": NOW},
                {"type": "Failed", "status": "False", "reason": "Y", "message": "", "lastTransitionTime": NOW}]
    snapshot = [dict(x) for x in original]
    result = c.set_condition(original, "Valid", "True", "ValidSpec", "", None, LATER)
    assert original == snapshot
    assert [x["type"] for x in result] == ["Valid", "Failed", "Custom"]
    assert "observedGeneration" not in result[0]


def test_set_condition_rejects_a_bad_status() -> None:
    with pytest.raises(ValueError, match="True, False or Unknown"):
        c.set_condition([], "Running", "yes", "Running", "", None, NOW)


# --- HallucinationHigh -------------------------------------------------------------------------------

RUNNING_JOB = Children(job=job(), pods=[pod()])


def evaluated(tuned: float | None, base: float | None = 0.9) -> TrainerReport:
    return report(phase="uploading", evaluation={"accuracy_metric": "rougeL-f1", "examples": 50,
                                                 "base": {"hallucination": base}, "tuned": {"hallucination": tuned}})


def with_spec(status: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    obj = ftj(status)
    obj["spec"].update(spec)
    return obj


# id, spec, report, expected HallucinationHigh (status, reason) or None (absent), and the message fragments.
HALLUCINATION_ROWS: list[tuple[str, dict[str, Any], TrainerReport, tuple[str, str] | None, list[str]]] = [
    ("above-the-default", {}, evaluated(0.83), ("True", "HallucinationAboveThreshold"),
     ["83.0%", "base model 90.0%", "above evaluation.hallucinationThreshold 50.0%", "spec.retrieval",
      "gates decide failure"]),
    ("at-the-default", {}, evaluated(0.5), ("False", "HallucinationWithinThreshold"), ["50.0%", "at or below"]),
    ("below-a-set-threshold", {"evaluation": {"hallucinationThreshold": 0.9}}, evaluated(0.83),
     ("False", "HallucinationWithinThreshold"), ["83.0%", "90.0%"]),
    ("above-a-set-threshold", {"evaluation": {"hallucinationThreshold": 0.2}}, evaluated(0.3, base=None),
     ("True", "HallucinationAboveThreshold"), ["30.0%", "20.0%"]),
    ("with-retrieval-no-recommendation", {"retrieval": {"corpus": "s3://b/c/"}}, evaluated(0.83), None, []),
    ("base-only-evaluated-yet", {}, evaluated(None), None, []),
    ("no-evaluation", {}, report(), None, []),
]


@pytest.mark.parametrize(("spec", "rep", "expected", "fragments"), [r[1:] for r in HALLUCINATION_ROWS],
                         ids=[r[0] for r in HALLUCINATION_ROWS])
def test_hallucination_high(spec: dict[str, Any], rep: TrainerReport, expected: tuple[str, str] | None,
                            fragments: list[str]) -> None:
    status = compute_status(with_spec(**spec), plan=PLAN, now=NOW, report=rep, children=RUNNING_JOB)
    assert status["phase"] == "Running"  # a recommendation: never a phase
    assert cond(status, "HallucinationHigh") == expected
    if expected:
        message = c.find(status["conditions"], "HallucinationHigh")["message"]
        assert all(f in message for f in fragments), message


def test_hallucination_high_posts_one_warning_and_survives_success() -> None:
    before = compute_status(ftj(), plan=PLAN, now=NOW, report=report(), children=RUNNING_JOB)
    high = compute_status(ftj(before), plan=PLAN, now=LATER, report=evaluated(0.83), children=RUNNING_JOB)
    events = transition_events(before, high)
    assert [(e.type, e.reason) for e in events] == [("Warning", "HallucinationHigh")]
    assert "83.0%" in events[0].message and "spec.retrieval" in events[0].message
    assert transition_events(high, compute_status(ftj(high), plan=PLAN, now=LATER, report=evaluated(0.83),
                                                  children=RUNNING_JOB)) == []
    # The Job completes: Succeeded (gates decide failure), the condition stays, no second warning.
    done = compute_status(ftj(high), plan=PLAN, now=LATER, report=evaluated(0.83),
                          children=Children(job=job(conditions=[jcond("Complete")])))
    assert done["phase"] == "Succeeded" and cond(done, "HallucinationHigh") == ("True", "HallucinationAboveThreshold")
    assert [(e.type, e.reason) for e in transition_events(high, done)] == [("Normal", "TrainingSucceeded")]
    # The evaluation first seen after success (the Job finished before the last report was read).
    late = compute_status(ftj(compute_status(ftj(), plan=PLAN, now=NOW, children=Children(
        job=job(conditions=[jcond("Complete")])))), plan=None, now=LATER, report=evaluated(0.83))
    assert late["phase"] == "Succeeded" and cond(late, "HallucinationHigh") == ("True", "HallucinationAboveThreshold")
