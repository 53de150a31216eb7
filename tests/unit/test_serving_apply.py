"""spec.serving.apply's decisions (`finetune_operator.serving_apply`, pure): what a finished job gets served, the
`Serving` condition and status.serving, the events, and the refresh while the service is not Ready. The requests
(`inference_service`) run against a real API server in tests/e2e/test_serving_apply.py."""

from __future__ import annotations

from typing import Any

import pytest

from finetune_operator import conditions as c
from finetune_operator import render, serving, serving_apply
from finetune_operator.refresh import BACKOFF_CAP, Next, Outcome, next_refresh
from finetune_operator.serving_apply import Decision, Verdict
from finetune_operator.spec import FineTuneJob, ServingPlan
from finetune_operator.status import event_name, status_changed

NOW = "2026-03-01T12:00:00Z"
UID = "11111111-2222-4333-8444-555555555555"
OUT = "s3://out/runs/demo/"


def ftj(*, method: str = "lora", save_merged: bool = False, apply: bool = True, adapter_name: str | None = None,
        output: str = OUT) -> FineTuneJob:
    serving_spec: dict[str, Any] = {"apply": apply}
    if adapter_name:
        serving_spec["adapterName"] = adapter_name
    return FineTuneJob.model_validate({
        "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": "demo", "namespace": "team-a", "uid": UID, "generation": 1},
        "spec": {"baseModel": {"uri": "hf://meta-llama/Llama-3.1-8B"}, "method": method,
                 "dataset": {"train": "s3://data/train.jsonl"},
                 "output": {"uri": output, "saveMerged": save_merged}, "serving": serving_spec},
    })


def cond(type_: str, status: str, reason: str, message: str = "") -> dict[str, Any]:
    return {"type": type_, "status": status, "reason": reason, "message": message, "lastTransitionTime": NOW}


def succeeded(method: str = "lora", artifacts: dict[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "phase": "Succeeded",
        "plan": {"method": method},
        "artifacts": {"model": f"{OUT}model/"} if artifacts is None else artifacts,
        "conditions": [cond(c.COMPLETE, c.TRUE, c.TRAINING_SUCCEEDED)],
        **extra,
    }


def failed(reason: str, message: str = "", **extra: Any) -> dict[str, Any]:
    return {"phase": "Failed", "conditions": [cond(c.FAILED, c.TRUE, reason, message)], **extra}


# --- whether anything is to be done --------------------------------------------------------------


@pytest.mark.parametrize(("spec", "status", "expected"), [
    ({"serving": {"apply": True}}, {"phase": "Succeeded"}, True),
    ({"serving": {"apply": True}}, {"phase": "Failed"}, True),
    ({"serving": {"apply": True}}, {"phase": "Running"}, False),  # not finished: nothing yet
    ({"serving": {"apply": False}}, {"phase": "Succeeded"}, False),  # manifests only
    ({"serving": {}}, {"phase": "Succeeded"}, False),
    ({}, {"phase": "Succeeded"}, False),
    (None, {"phase": "Succeeded"}, False),
])
def test_applies_only_to_finished_jobs_with_apply(spec: Any, status: dict[str, Any], expected: bool) -> None:
    assert serving_apply.applies(spec, status) is expected


# --- the decision ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "reason"), [
    (failed(c.GATES_FAILED, "accuracy 0.1 < 0.5"), c.GATES_FAILED),
    (failed(c.PILOT_GATES_FAILED, "the pilot missed its gates"), c.GATES_FAILED),
    (failed(c.BACKOFF_LIMIT_EXCEEDED, "too many restarts"), c.NOT_SERVED),
    (failed(c.INVALID_SPEC, "spec.x"), c.NOT_SERVED),
    ({"phase": "Failed"}, c.NOT_SERVED),  # no Failed condition to read: still nothing served
    # Succeeded with a gate missed (the trainer reported it but did not fail the Job): nothing served either.
    (succeeded(evaluation={"gatesPassed": False, "failedGates": ["accuracy 0.1 < 0.5"]}), c.GATES_FAILED),
])
def test_a_failed_job_is_never_served(status: dict[str, Any], reason: str) -> None:
    decision = serving_apply.decide(ftj(), status, report_readable=True)
    assert decision.plan is None and not decision.pending
    assert decision.verdict is not None
    assert (decision.verdict.status, decision.verdict.reason) == (c.FALSE, reason)
    assert "nothing is served" in decision.verdict.message


def test_gates_failed_names_the_missed_gates() -> None:
    status = failed(c.GATES_FAILED, "gates missed", evaluation={"gatesPassed": False,
                                                                "failedGates": ["accuracy 0.10 < 0.50"]})
    verdict = serving_apply.decide(ftj(), status, report_readable=True).verdict
    assert verdict is not None and "accuracy 0.10 < 0.50" in verdict.message


def test_a_running_job_gets_nothing() -> None:
    assert serving_apply.decide(ftj(), {"phase": "Running"}, report_readable=True) == Decision()


def test_the_adapter_uri_is_the_one_the_trainer_reported() -> None:
    """The plan predicts `<output>/model/`; what is served is status.artifacts.model."""
    reported = "s3://out/runs/demo/model-v2/"
    decision = serving_apply.decide(ftj(), succeeded(artifacts={"model": reported}), report_readable=True)
    assert decision.verdict is None and decision.pending
    assert decision.plan is not None
    assert decision.plan.adapter_uri == reported
    assert decision.plan.model_uri == "hf://meta-llama/Llama-3.1-8B"  # the base: not an artifact
    assert decision.plan.adapter_name == "demo"


def test_the_plan_in_the_status_wins_over_a_fresh_one() -> None:
    planned = ServingPlan(base_model_name="served-base", model_uri="hf://meta-llama/Llama-3.1-8B", adapter_name="med",
                          adapter_uri=f"{OUT}model/", max_rank=16, apply=True)
    status = succeeded()
    status["plan"]["serving"] = planned.wire()
    decision = serving_apply.decide(ftj(), status, report_readable=True)
    assert decision.plan is not None
    assert (decision.plan.base_model_name, decision.plan.adapter_name, decision.plan.max_rank) == ("served-base", "med", 16)


@pytest.mark.parametrize(("method", "save_merged", "artifacts", "model_uri"), [
    ("lora", True, {"model": f"{OUT}model/", "merged": "s3://out/runs/demo/merged/"}, "s3://out/runs/demo/merged/"),
    ("full", False, {"model": "s3://out/runs/demo/model/"}, "s3://out/runs/demo/model/"),
])
def test_a_whole_model_is_served_from_its_reported_uri(method: str, save_merged: bool, artifacts: dict[str, str],
                                                       model_uri: str) -> None:
    decision = serving_apply.decide(ftj(method=method, save_merged=save_merged), succeeded(method, artifacts),
                                    report_readable=True)
    assert decision.plan is not None
    assert (decision.plan.model_uri, decision.plan.adapter_uri) == (model_uri, None)


@pytest.mark.parametrize(("save_merged", "artifacts"), [
    (False, {}),  # the report is not read yet
    (True, {"model": f"{OUT}model/"}),  # the merged model is served: its URI must be reported
])
def test_a_success_waits_for_the_reported_uri(save_merged: bool, artifacts: dict[str, str]) -> None:
    decision = serving_apply.decide(ftj(save_merged=save_merged), succeeded(artifacts=artifacts), report_readable=True)
    assert decision.plan is None and decision.pending
    assert decision.verdict is not None
    assert (decision.verdict.status, decision.verdict.reason) == (c.UNKNOWN, c.SERVING_PENDING)


def test_an_unreadable_report_serves_the_predicted_uris() -> None:
    """pvc:// outputs: the operator never reads the report; the trainer writes where the plan says."""
    out = "pvc://models/runs/demo/"
    decision = serving_apply.decide(ftj(output=out), succeeded(artifacts={}), report_readable=False)
    assert decision.plan is not None and decision.plan.adapter_uri == f"{out}model/"


def test_no_plan_no_service() -> None:
    status = succeeded()
    del status["plan"]
    verdict = serving_apply.decide(ftj(), status, report_readable=True).verdict
    assert verdict is not None and verdict.reason == c.NOT_SERVED


# --- the object -----------------------------------------------------------------------------------------


def test_the_service_is_the_manifest_owned_by_the_job() -> None:
    job = ftj(adapter_name="med-adapter")
    plan = serving_apply.decide(job, succeeded(), report_readable=True).plan
    assert plan is not None
    obj = serving_apply.desired(job, plan, render.owner_reference(job.metadata))
    without_owner = {**obj, "metadata": {k: v for k, v in obj["metadata"].items() if k != "ownerReferences"}}
    assert without_owner == serving.render_llm_inference_service(job, plan)
    assert obj["metadata"]["ownerReferences"] == [{
        "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "name": "demo", "uid": UID,
        "controller": True, "blockOwnerDeletion": True}]
    assert (obj["apiVersion"], obj["kind"], obj["metadata"]["name"]) == (
        "serving.kserve.io/v1alpha1", "LLMInferenceService", "demo")
    assert obj["spec"]["model"]["lora"]["adapters"] == [{"name": "med-adapter", "uri": f"{OUT}model/"}]


def test_paths() -> None:
    assert serving_apply.object_path("team-a", "demo") == (
        "/apis/serving.kserve.io/v1alpha1/namespaces/team-a/llminferenceservices/demo")
    assert serving_apply.DISCOVERY_PATH == "/apis/serving.kserve.io/v1alpha1"
    assert serving_apply.CRD_NAME == "llminferenceservices.serving.kserve.io"


@pytest.mark.parametrize(("discovery", "served"), [
    ({"kind": "APIResourceList", "groupVersion": "serving.kserve.io/v1alpha1", "resources": [
        {"name": "llminferenceservices", "namespaced": True, "kind": "LLMInferenceService"},
        {"name": "llminferenceservices/status", "namespaced": True, "kind": "LLMInferenceService"}]}, True),
    # The group is served, but only other kinds of it (an older KServe).
    ({"resources": [{"name": "llminferenceserviceconfigs", "kind": "LLMInferenceServiceConfig"}]}, False),
    ({"resources": []}, False),
    (None, False),  # 404: the group version is not served at all
])
def test_discovery(discovery: dict[str, Any] | None, served: bool) -> None:
    assert serving_apply.crd_served(discovery) is served


def test_crd_missing_names_the_crd_and_the_manifests() -> None:
    verdict = serving_apply.crd_missing(OUT)
    assert (verdict.status, verdict.reason) == (c.FALSE, c.SERVING_CRD_MISSING)
    assert "llminferenceservices.serving.kserve.io" in verdict.message
    assert f"{OUT}serving/" in verdict.message and "kubectl apply" in verdict.message
    assert f"{OUT}serving/llminferenceservice.yaml" in verdict.message


def isvc(*, owner_uid: str | None = UID, controller: bool = True, ready: dict[str, Any] | None = None,
         labels: dict[str, str] | None = None, **status: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "demo", "namespace": "team-a", "labels": labels or {}}
    if owner_uid:
        meta["ownerReferences"] = [{"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "name": "other",
                                    "uid": owner_uid, "controller": controller}]
    if ready is not None:
        status["conditions"] = [ready]
    return {"apiVersion": "serving.kserve.io/v1alpha1", "kind": "LLMInferenceService", "metadata": meta,
            "status": status}


@pytest.mark.parametrize(("found", "verdict", "served"), [
    (isvc(), (c.UNKNOWN, c.SERVING_CREATED), {"name": "demo", "ready": False}),
    (isvc(ready=cond("Ready", c.FALSE, "MinimumReplicasUnavailable", "0/1 ready")),
     (c.FALSE, c.SERVING_NOT_READY), {"name": "demo", "ready": False}),
    (isvc(ready=cond("Ready", c.UNKNOWN, "Progressing")), (c.FALSE, c.SERVING_NOT_READY), {"name": "demo", "ready": False}),
    (isvc(ready=cond("Ready", c.TRUE, "Ready"), url="http://demo.team-a.example"),
     (c.TRUE, c.SERVING_READY), {"name": "demo", "ready": True, "url": "http://demo.team-a.example"}),
    (isvc(ready=cond("Ready", c.TRUE, "Ready"), address={"url": "http://10.0.0.7"}),
     (c.TRUE, c.SERVING_READY), {"name": "demo", "ready": True, "url": "http://10.0.0.7"}),
    # Not ours: someone else's, or one without a controller.
    (isvc(owner_uid="99999999-2222-4333-8444-555555555555"), (c.FALSE, c.FOREIGN_CHILD), None),
    (isvc(owner_uid=UID, controller=False), (c.FALSE, c.FOREIGN_CHILD), None),
    (isvc(owner_uid=None), (c.FALSE, c.FOREIGN_CHILD), None),
])
def test_observe(found: dict[str, Any], verdict: tuple[str, str], served: dict[str, Any] | None) -> None:
    got, status = serving_apply.observe(found, UID)
    assert (got.status, got.reason) == verdict
    assert status == served


def test_not_ready_quotes_kserve_and_foreign_names_the_owner() -> None:
    verdict, _ = serving_apply.observe(isvc(ready=cond("Ready", c.FALSE, "MinimumReplicasUnavailable", "0/1 ready")), UID)
    assert "MinimumReplicasUnavailable: 0/1 ready" in verdict.message
    verdict, _ = serving_apply.observe(isvc(owner_uid="99999999-2222-4333-8444-555555555555"), UID)
    assert "FineTuneJob other" in verdict.message and "delete or rename it" in verdict.message


def test_adoption_patches_only_missing_labels() -> None:
    wanted = {"metadata": {"labels": {"a": "1", "b": "2"}}}
    assert serving_apply.label_patch(isvc(labels={"a": "1", "b": "2", "c": "3"}), wanted) == {}
    assert serving_apply.label_patch(isvc(labels={"a": "1", "b": "x"}), wanted) == {"metadata": {"labels": {"b": "2"}}}


@pytest.mark.parametrize(("status", "hint"), [
    (403, "must allow create, get and patch on llminferenceservices.serving.kserve.io in namespace team-a"),
    (422, "KServe refused the manifest"),
    (0, ""),  # no answer after the client's retries
])
def test_a_refused_request_is_quoted(status: int, hint: str) -> None:
    verdict = serving_apply.request_failed(status, "POST /apis/...: 403 Forbidden: nope", "team-a")
    assert (verdict.status, verdict.reason) == (c.FALSE, c.SERVING_FAILED)
    assert "403 Forbidden: nope" in verdict.message and hint in verdict.message


# --- the status and its events ------------------------------------------------------------------------


def test_apply_sets_the_condition_and_the_serving_status() -> None:
    status = succeeded()
    new = serving_apply.apply(status, Verdict(c.TRUE, c.SERVING_READY, "ready"), {"name": "demo", "ready": True},
                              generation=1, now=NOW)
    assert c.find(new["conditions"], c.SERVING) == {**cond(c.SERVING, c.TRUE, c.SERVING_READY, "ready"),
                                                    "observedGeneration": 1}
    assert new["serving"] == {"name": "demo", "ready": True}
    assert status_changed(status, new)
    assert "serving" not in status and c.find(status["conditions"], c.SERVING) is None  # the input is not modified
    # No status.serving given (CRD missing, a failed look): the last one known is kept.
    later = serving_apply.apply(new, serving_apply.crd_missing(OUT), None, generation=1, now="2026-03-01T13:00:00Z")
    assert later["serving"] == {"name": "demo", "ready": True}
    # The same verdict again writes nothing.
    assert not status_changed(new, serving_apply.apply(new, Verdict(c.TRUE, c.SERVING_READY, "ready"),
                                                       {"name": "demo", "ready": True}, generation=1, now=NOW))


def with_serving(reason: str, status: str = c.FALSE) -> dict[str, Any]:
    return {"conditions": [cond(c.SERVING, status, reason, f"because {reason}")]}


@pytest.mark.parametrize(("old", "new", "expected"), [
    ({}, with_serving(c.SERVING_CRD_MISSING), [("Warning", c.SERVING_CRD_MISSING)]),
    (with_serving(c.SERVING_CRD_MISSING), with_serving(c.SERVING_CRD_MISSING), []),  # said once
    (with_serving(c.SERVING_CRD_MISSING), with_serving(c.SERVING_CREATED, c.UNKNOWN), [("Normal", c.SERVING_CREATED)]),
    (with_serving(c.SERVING_CREATED, c.UNKNOWN), with_serving(c.SERVING_NOT_READY), []),
    (with_serving(c.SERVING_NOT_READY), with_serving(c.SERVING_READY, c.TRUE), [("Normal", c.SERVING_READY)]),
    ({}, with_serving(c.FOREIGN_CHILD), [("Warning", c.FOREIGN_CHILD)]),
    (with_serving(c.SERVING_CREATED, c.UNKNOWN), with_serving(c.SERVING_FAILED), [("Warning", c.SERVING_FAILED)]),
    ({}, with_serving(c.GATES_FAILED), []),  # the job's own Failed event says it
    ({}, with_serving(c.NOT_SERVED), []),
    ({}, {}, []),
])
def test_events(old: dict[str, Any], new: dict[str, Any], expected: list[tuple[str, str]]) -> None:
    events = serving_apply.events(old, new)
    assert [(e.type, e.reason) for e in events] == expected
    for event in events:
        assert event.message == f"because {event.reason}"
        assert event_name("demo", UID, old, event).startswith("demo.")


# --- looking again --------------------------------------------------------------------------------------

I = 10.0  # the status interval  # noqa: E741


@pytest.mark.parametrize(("outcome", "idle", "expected"), [
    # Not Ready yet (or no CRD, or a foreign one): the running backoff, from one interval after the success.
    (Outcome("Succeeded", serving_pending=True, report_changed=True), 7, Next(I, 0)),
    (Outcome("Succeeded", serving_pending=True), 0, Next(2 * I, 1)),
    (Outcome("Succeeded", serving_pending=True), 1, Next(4 * I, 2)),
    (Outcome("Succeeded", serving_pending=True), 5, Next(BACKOFF_CAP * I, 6)),
    (Outcome("Succeeded", serving_pending=True, awaiting_artifacts=True), 5, Next(BACKOFF_CAP * I, 6)),
    # Ready, or nothing to serve: events only, as for any finished job.
    (Outcome("Succeeded"), 3, Next(None, 0)),
    (Outcome("Failed"), 3, Next(None, 0)),
])
def test_the_refresher_looks_again_until_ready(outcome: Outcome, idle: int, expected: Next) -> None:
    assert next_refresh(outcome, idle, I) == expected
