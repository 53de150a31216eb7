"""A chained job's wait for its base job (`finetune_operator.chain_wait`), its status (`status.compute_status` with
`chain=`) and its refresh schedule: table tests of the pure decisions."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from finetune_operator import chain_wait, render, sizing
from finetune_operator import conditions as c
from finetune_operator.refresh import BACKOFF_CAP, Next, Outcome, next_refresh
from finetune_operator.settings import OperatorSettings
from finetune_operator.spec import BaseJobStatus, FineTuneJob
from finetune_operator.status import compute_status, transition_events

NOW = "2026-03-01T12:00:00Z"
BASE_UID = "base-uid-1"
OUTPUT = "s3://out/sft/"


def base_job(phase: str | None = None, *, uid: str = BASE_UID, method: str = "lora", output: str = OUTPUT,
             artifacts: dict[str, str] | None = None, gates_passed: bool | None = None,
             failed: tuple[str, str] | None = None, deleting: bool = False) -> dict[str, Any]:
    """The base FineTuneJob as the API returns it: an SFT stage on a 1.1B model, with the status given."""
    status: dict[str, Any] = {}
    if phase is not None:
        status["phase"] = phase
    if artifacts is not None:
        status["artifacts"] = artifacts
    if gates_passed is not None:
        status["evaluation"] = {"gatesPassed": gates_passed, "failedGates": [] if gates_passed else ["accuracy 0.1 < 0.5"]}
    if failed is not None:
        status["conditions"] = [{"type": "Failed", "status": "True", "reason": failed[0], "message": failed[1],
                                 "lastTransitionTime": NOW}]
    meta: dict[str, Any] = {"name": "sft", "namespace": "default", "uid": uid}
    if deleting:
        meta["deletionTimestamp"] = NOW
    return {
        "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": meta,
        "spec": {"baseModel": {"uri": "hf://TinyLlama/TinyLlama-1.1B-Chat-v1.0", "parameters": "1.1B"},
                 "method": method, "dataset": {"train": "s3://data/train.jsonl"}, "output": {"uri": output}},
        "status": status,
    }


def dependent(status: dict[str, Any] | None = None) -> dict[str, Any]:
    """The chained DPO stage (spec.baseModel.fromJob: sft) as the API returns it."""
    return {
        "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": "dpo", "namespace": "default", "uid": "dpo-uid", "generation": 1,
                     "creationTimestamp": NOW},
        "spec": {"baseModel": {"fromJob": "sft"}, "objective": "dpo", "method": "lora",
                 "dataset": {"train": "s3://data/pairs.jsonl", "format": "preference"},
                 "output": {"uri": "s3://out/dpo/"}},
        "status": status or {},
    }


SEEN = BaseJobStatus(name="sft", uid=BASE_UID, phase="Running")
MODEL = {"model": f"{OUTPUT}model/"}


# Each row: id, recorded status.baseJob, the base job now (None: absent), expected (action, reason, words).
ROWS: list[tuple[str, BaseJobStatus | None, dict[str, Any] | None, tuple[str, str, tuple[str, ...]]]] = [
    ("not created yet", None, None, ("wait", c.BASE_JOB_NOT_FOUND, ("sft", "to be created", "namespace default"))),
    ("never started", None, base_job(), ("wait", c.BASE_JOB_RUNNING, ("sft", "not reported yet"))),
    ("pending", None, base_job("Pending"), ("wait", c.BASE_JOB_RUNNING, ("sft", "phase Pending"))),
    ("running", SEEN, base_job("Running"), ("wait", c.BASE_JOB_RUNNING, ("sft", "phase Running"))),
    ("suspended", SEEN, base_job("Suspended"), ("wait", c.BASE_JOB_RUNNING, ("phase Suspended",))),
    ("deleted after seen", SEEN, None, ("fail", c.BASE_JOB_DELETED, ("sft", BASE_UID, "was deleted"))),
    ("recreated", SEEN, base_job("Pending", uid="other-uid"),
     ("fail", c.BASE_JOB_DELETED, ("sft", "recreated", BASE_UID, "other-uid"))),
    ("being deleted", None, base_job("Running", deleting=True), ("fail", c.BASE_JOB_DELETED, ("being deleted",))),
    ("failed", SEEN, base_job("Failed", failed=("BackoffLimitExceeded", "pods kept failing")),
     ("fail", c.BASE_JOB_FAILED, ("sft", "BackoffLimitExceeded", "pods kept failing"))),
    ("failed its gates", SEEN, base_job("Failed", failed=(c.GATES_FAILED, "accuracy 0.1 < 0.5")),
     ("fail", c.BASE_JOB_FAILED, ("sft", c.GATES_FAILED, "accuracy 0.1 < 0.5"))),
    ("succeeded, gates failed", SEEN, base_job("Succeeded", artifacts=MODEL, gates_passed=False),
     ("fail", c.BASE_JOB_FAILED, ("sft", "gates failed", "accuracy 0.1 < 0.5"))),
    ("succeeded, artifacts not read yet", SEEN, base_job("Succeeded"),
     ("wait", c.BASE_JOB_ARTIFACTS_PENDING, ("sft", "status.artifacts.model", OUTPUT))),
    ("succeeded on pvc, no artifacts ever", SEEN, base_job("Succeeded", output="pvc://claim/sft/"),
     ("fail", c.BASE_JOB_UNCHAINABLE, ("sft", "pvc://claim/sft/", "give the base job an s3:// spec.output.uri"))),
    ("prefix tuning", SEEN, base_job("Succeeded", method="prefix", artifacts=MODEL),
     ("fail", c.BASE_JOB_UNCHAINABLE, ("sft", "virtual tokens"))),
    ("succeeded", SEEN, base_job("Succeeded", artifacts=MODEL, gates_passed=True),
     ("start", c.BASE_JOB_SUCCEEDED, ("sft", "hf://TinyLlama/TinyLlama-1.1B-Chat-v1.0", f"{OUTPUT}model/"))),
    ("succeeded without gates", None, base_job("Succeeded", artifacts={**MODEL, "merged": f"{OUTPUT}merged/"}),
     ("start", c.BASE_JOB_SUCCEEDED, (f"starting from {OUTPUT}merged/",))),
]


@pytest.mark.parametrize(("previous", "base", "expected"), [row[1:] for row in ROWS], ids=[row[0] for row in ROWS])
def test_decide(previous: BaseJobStatus | None, base: dict[str, Any] | None,
                expected: tuple[str, str, tuple[str, ...]]) -> None:
    action, reason, words = expected
    verdict = chain_wait.decide("dpo", "default", "sft", previous, base)
    assert (verdict.action, verdict.reason) == (action, reason), verdict.message
    for word in words:
        assert word in verdict.message
    assert verdict.base_job.name == "sft"


def test_the_base_jobs_uid_is_recorded_when_first_seen_and_kept() -> None:
    first = chain_wait.decide("dpo", "default", "sft", None, base_job("Pending"))
    assert (first.base_job.uid, first.base_job.phase) == (BASE_UID, "Pending")
    gone = chain_wait.decide("dpo", "default", "sft", first.base_job, None)
    assert gone.action == "fail" and gone.base_job.uid == BASE_UID and gone.base_job.phase == "Pending"


def test_a_succeeded_base_resolves_to_its_model_adapters_and_chain() -> None:
    verdict = chain_wait.decide("dpo", "default", "sft", SEEN,
                                base_job("Succeeded", artifacts=MODEL, gates_passed=True))
    resolved = verdict.base_job
    assert resolved.model_uri == "hf://TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    assert resolved.adapters == [f"{OUTPUT}model/"]
    assert resolved.parameters == 1_100_000_000
    assert [(s.name, s.uid, s.method) for s in resolved.chain] == [("sft", BASE_UID, "lora")]


def test_a_recorded_resolution_is_kept_without_the_base_job() -> None:
    """Resolved once: a later verdict starts from the recording even when the base job is gone or changed."""
    resolved = chain_wait.decide("dpo", "default", "sft", SEEN,
                                 base_job("Succeeded", artifacts=MODEL, gates_passed=True)).base_job
    for base in (None, base_job("Failed", uid="other", failed=("JobFailed", "x"))):
        again = chain_wait.decide("dpo", "default", "sft", resolved, base)
        assert again.action == "start" and again.base_job == resolved


def test_a_cycle_fails() -> None:
    links = {"sft": "dpo"}
    cycle = chain_wait.find_cycle("dpo", "sft", links.get)
    assert cycle == ["dpo", "sft", "dpo"]
    verdict = chain_wait.decide("dpo", "default", "sft", None, base_job("Pending"), cycle)
    assert verdict.action == "fail" and verdict.reason == c.BASE_JOB_UNCHAINABLE and "dpo -> sft -> dpo" in verdict.message


@pytest.mark.parametrize(("links", "expected"), [
    ({}, None),  # the base job is not chained
    ({"sft": "pre"}, None),  # a chain of three, no cycle
    ({"sft": "pre", "pre": "dpo"}, ["dpo", "sft", "pre", "dpo"]),
    ({"sft": "pre", "pre": "sft"}, None),  # a cycle upstream, not through this job: those jobs' passes say so
])
def test_find_cycle(links: dict[str, str], expected: list[str] | None) -> None:
    assert chain_wait.find_cycle("dpo", "sft", links.get) == expected


def test_base_view_ignores_progress_but_not_phase_gates_artifacts_or_identity() -> None:
    running = base_job("Running")
    progressed = copy.deepcopy(running)
    progressed["status"]["progress"] = {"step": 5}
    assert chain_wait.base_view(progressed) == chain_wait.base_view(running)
    for changed in (base_job("Succeeded"), base_job("Running", uid="x"), base_job("Running", deleting=True),
                    base_job("Running", artifacts=MODEL), base_job("Running", gates_passed=False)):
        assert chain_wait.base_view(changed) != chain_wait.base_view(running)
    assert chain_wait.base_view(None) != chain_wait.base_view(running)


def test_applied_uses_the_recorded_resolution_only() -> None:
    job = FineTuneJob.model_validate(dependent())
    assert chain_wait.applied(job, {}) is job
    waiting = {"baseJob": {"name": "sft", "uid": BASE_UID, "phase": "Running"}}
    assert chain_wait.applied(job, waiting) is job
    resolved = chain_wait.decide("dpo", "default", "sft", SEEN,
                                 base_job("Succeeded", artifacts=MODEL, gates_passed=True)).base_job
    started = chain_wait.applied(job, {"baseJob": resolved.wire()})
    assert started.spec.base_model.from_job is None
    assert started.spec.base_model.resolved_uri() == resolved.model_uri
    assert started.spec.base_model.parameters == "1.1B"


# --- the status of a chained job before it starts -----------------------------------------------------


def conds(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {x["type"]: (x["status"], x["reason"]) for x in status.get("conditions") or []}


def test_waiting_status_and_its_event() -> None:
    verdict = chain_wait.decide("dpo", "default", "sft", None, base_job("Running"))
    new = compute_status(dependent(), plan=None, chain=verdict, now=NOW)
    assert new["phase"] == "Pending"
    assert new["baseJob"] == {"name": "sft", "uid": BASE_UID, "phase": "Running"}
    # Nothing else: no plan, no children, no pre-flight.
    assert conds(new) == {c.VALID: ("True", c.VALID_SPEC), c.WAITING_FOR_BASE_JOB: ("True", c.BASE_JOB_RUNNING),
                          c.RUNNING: ("False", c.WAITING_FOR_BASE_JOB)}
    assert "plan" not in new and "stage" not in new
    events = transition_events({}, new)
    assert [(e.type, e.reason) for e in events] == [("Normal", c.WAITING_FOR_BASE_JOB)]
    assert "sft" in events[0].message and "phase Running" in events[0].message
    # Still waiting, the base job now Succeeded without artifacts read: the message changes, no new event.
    later = chain_wait.decide("dpo", "default", "sft", verdict.base_job, base_job("Succeeded"))
    again = compute_status(dependent(new), plan=None, chain=later, now=NOW)
    assert conds(again)[c.WAITING_FOR_BASE_JOB] == ("True", c.BASE_JOB_ARTIFACTS_PENDING)
    assert transition_events(new, again) == []


@pytest.mark.parametrize(("base", "reason"), [
    (None, c.BASE_JOB_DELETED),
    (base_job("Failed", failed=("BackoffLimitExceeded", "pods kept failing")), c.BASE_JOB_FAILED),
    (base_job("Succeeded", method="prompt", artifacts=MODEL), c.BASE_JOB_UNCHAINABLE),
])
def test_failed_because_of_the_base_job(base: dict[str, Any] | None, reason: str) -> None:
    waiting = compute_status(dependent(), plan=None, now=NOW,
                             chain=chain_wait.decide("dpo", "default", "sft", None, base_job("Running")))
    verdict = chain_wait.decide("dpo", "default", "sft", chain_wait.recorded(waiting), base)
    new = compute_status(dependent(waiting), plan=None, chain=verdict, now=NOW)
    assert new["phase"] == "Failed" and new["completionTime"] == NOW
    assert conds(new)[c.FAILED] == ("True", reason)
    assert conds(new)[c.WAITING_FOR_BASE_JOB] == ("False", reason)
    assert "sft" in c.find(new["conditions"], c.FAILED)["message"]
    events = transition_events(waiting, new)
    assert [(e.type, e.reason) for e in events] == [("Warning", reason)]
    assert reason in c.TERMINAL_FAILURE_REASONS


def test_resolved_status_records_the_resolution_and_says_so() -> None:
    waiting = compute_status(dependent(), plan=None, now=NOW,
                             chain=chain_wait.decide("dpo", "default", "sft", None, base_job("Running")))
    verdict = chain_wait.decide("dpo", "default", "sft", chain_wait.recorded(waiting),
                                base_job("Succeeded", artifacts=MODEL, gates_passed=True))
    new = compute_status(dependent(waiting), plan=None, chain=verdict, now=NOW)
    assert new["phase"] == "Pending"
    assert conds(new)[c.WAITING_FOR_BASE_JOB] == ("False", c.BASE_JOB_SUCCEEDED)
    assert new["baseJob"]["modelUri"] == "hf://TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    assert new["baseJob"]["adapters"] == [f"{OUTPUT}model/"]
    assert chain_wait.resolution(new) == verdict.base_job
    events = transition_events(waiting, new)
    assert [(e.type, e.reason) for e in events] == [("Normal", c.BASE_JOB_SUCCEEDED)]
    assert f"starting from hf://TinyLlama/TinyLlama-1.1B-Chat-v1.0 with adapter(s) {OUTPUT}model/" in events[0].message


def test_the_resolution_survives_the_normal_flow() -> None:
    """Later passes compute the status without `chain=`: status.baseJob and the condition stay as recorded."""
    resolved = chain_wait.decide("dpo", "default", "sft", SEEN,
                                 base_job("Succeeded", artifacts=MODEL, gates_passed=True))
    started = compute_status(dependent(), plan=None, chain=resolved, now=NOW)
    job = chain_wait.applied(FineTuneJob.model_validate(dependent(started)), started)
    later = compute_status(dependent(started), plan=sizing.plan(job.spec), now=NOW)
    assert later["baseJob"] == started["baseJob"]
    assert conds(later)[c.WAITING_FOR_BASE_JOB] == ("False", c.BASE_JOB_SUCCEEDED)
    assert conds(later)[c.PLANNED][0] == "True"


# --- the refresh schedule of a waiting job ----------------------------------------------------------------


@pytest.mark.parametrize(("outcome", "expected"), [
    (Outcome("Pending", waiting_for_base=True), Next(10.0 * BACKOFF_CAP, 0)),  # a fallback: events wake it
    (Outcome("Failed", waiting_for_base=False), Next(None, 0)),
])
def test_next_refresh_while_waiting(outcome: Outcome, expected: Next) -> None:
    assert next_refresh(outcome, 3, 10.0) == expected


# --- what the trainer is given ------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [None, "preflight"])
def test_every_stages_snapshot_carries_the_applied_spec_and_the_resolution(stage: str | None) -> None:
    resolved = chain_wait.decide("dpo", "default", "sft", SEEN,
                                 base_job("Succeeded", artifacts=MODEL, gates_passed=True)).base_job
    status = {"baseJob": resolved.wire()}
    job = chain_wait.applied(FineTuneJob.model_validate(dependent(status)), status)
    children = render.render_children(job, sizing.plan(job.spec), OperatorSettings.from_env({}), stage,
                                      base=chain_wait.resolution(status))
    (config_map,) = [child for child in children if child["kind"] == "ConfigMap"]
    snapshot = json.loads(config_map["data"]["job.json"])
    assert snapshot["spec"]["baseModel"]["uri"] == "hf://TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    assert "fromJob" not in snapshot["spec"]["baseModel"]
    assert snapshot["base"]["adapters"] == [f"{OUTPUT}model/"]
    assert [s["name"] for s in snapshot["base"]["chain"]] == ["sft"]
