"""spec.pilot on a real API server: the operator, the Job controller and the local pod runner (the trainer
from this checkout, tiny model, CPU) take two full fine-tunes with a LoRA pilot through their stages.

- `pilot-pass`: the pilot (6 LoRA steps) must lower the eval loss by 1% against the base model; it does, so
  the operator creates the main (full) Job only then, and the FineTuneJob ends Succeeded with both stages
  in its status and the pilot's adapter kept under `<output.uri>/pilot/model/`.
- `pilot-fail`: the pilot (1 step) must reach 99% accuracy; it cannot, the trainer exits with the gates
  code, and the FineTuneJob ends Failed/PilotGatesFailed with the pilot's scores, no main Job ever created.

Both run at once in the suite's namespace (the operator and pod runner of tests/e2e/conftest.py).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from finetune_operator.contract import MARKER_NAME, REPORT_KEY
from finetune_operator.spec import FineTuneJob
from tests.e2e.conftest import OUTPUT_BUCKET, Operator, RunnerHandle, healthcare_manifest, wait_for
from tests.e2e.podrunner import Kube
from tests.e2e.test_e2e import conditions, ftj_url

pytestmark = pytest.mark.e2e

#: What the demo gives the tiny stand-in (trainer-image/finetune_trainer/local.py DEMO_OVERRIDES): adapters
#: on every linear layer and the output head, and larger steps.
TINY_LORA = {"r": 64, "alpha": 64, "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj", "lm_head"]}


def pilot_manifest(namespace: str, node: str, model_uri: str, secret: str, name: str, pilot: dict[str, Any]) -> dict[str, Any]:
    manifest = healthcare_manifest(namespace, node, model_uri, secret=secret)
    manifest["metadata"]["name"] = name
    spec = manifest["spec"]
    spec["method"] = "full"
    spec["lora"] = TINY_LORA
    spec["hyperparameters"].update({"maxSteps": 2, "learningRate": 1e-3})
    spec["evaluation"]["maxExamples"] = 2
    spec["output"]["uri"] = f"s3://{OUTPUT_BUCKET}/{name}/"
    spec["pilot"] = {"learningRate": 5e-3, **pilot}
    FineTuneJob.model_validate(manifest)
    return manifest


@pytest.fixture(scope="module")
def finished(kube: Kube, namespace: str, operator: Operator, pod_runner: RunnerHandle, s3_secret: str,
             model_uri: str) -> dict[str, dict[str, Any]]:
    node = pod_runner.runner.node_name
    runs = {
        "pilot-pass": {"maxSteps": 6, "gates": [{"metric": "evalLoss", "minImprovement": 0.01}]},
        "pilot-fail": {"maxSteps": 1, "gates": [{"metric": "accuracy", "min": 0.99}]},
    }
    for name, pilot in runs.items():
        kube.request("POST", ftj_url(namespace), body=pilot_manifest(namespace, node, model_uri, s3_secret, name, pilot))

    def all_terminal() -> dict[str, dict[str, Any]] | None:
        operator.check_alive()
        pod_runner.check_alive()
        objs = {name: kube.get(ftj_url(namespace, name)) or {} for name in runs}
        done = all((o.get("status") or {}).get("phase") in ("Succeeded", "Failed") for o in objs.values())
        return objs if done else None

    return wait_for("both pilot FineTuneJobs to finish", all_terminal)


def test_a_passing_pilot_leads_to_the_main_job(kube: Kube, namespace: str, s3: Any,
                                              finished: dict[str, dict[str, Any]]) -> None:
    obj = finished["pilot-pass"]
    status = obj["status"]
    found = conditions(obj)
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1)[-3000:]
    assert found["PilotPassed"]["status"] == "True" and found["PilotPassed"]["reason"] == "PilotGatesPassed"
    assert (status["stage"], status["plan"]["method"]) == ("Main", "full")
    pilot = status["pilot"]
    assert (pilot["phase"], pilot["plan"]["method"]) == ("Succeeded", "lora")
    assert pilot["progress"]["step"] == 6 and pilot["evaluation"]["gatesPassed"] is True
    assert pilot["evaluation"]["tuned"]["evalLoss"] <= 0.99 * pilot["evaluation"]["base"]["evalLoss"]
    assert status["progress"]["step"] == 2 and status["evaluation"]["examples"] > 0
    # Both stages' Jobs exist, each owned by the FineTuneJob; the pilot's completed before the main one started.
    jobs = {name: kube.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}") for name in ("pilot-pass-pilot", "pilot-pass")}
    for name, job in jobs.items():
        assert job is not None, name
        assert job["metadata"]["ownerReferences"][0]["uid"] == obj["metadata"]["uid"]
    assert jobs["pilot-pass-pilot"]["status"]["completionTime"] <= jobs["pilot-pass"]["metadata"]["creationTimestamp"]
    config = json.loads(kube.get(f"/api/v1/namespaces/{namespace}/configmaps/pilot-pass-pilot-config")["data"]["job.json"])
    assert (config["stage"], config["method"], config["spec"]["hyperparameters"]["maxSteps"]) == ("pilot", "lora", 6)
    # The pilot's adapter is kept under <output.uri>/pilot/, next to the main run's artifacts.
    client = s3.client()
    keys = {o["Key"] for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=OUTPUT_BUCKET, Prefix="pilot-pass/") for o in page.get("Contents", [])}
    assert "pilot-pass/pilot/model/adapter_model.safetensors" in keys, sorted(keys)
    assert f"pilot-pass/pilot/{MARKER_NAME}" in keys and f"pilot-pass/{MARKER_NAME}" in keys
    assert pilot["artifacts"]["model"] == f"s3://{OUTPUT_BUCKET}/pilot-pass/pilot/model/"


def test_a_failing_pilot_creates_no_main_job(kube: Kube, namespace: str, s3: Any,
                                            finished: dict[str, dict[str, Any]]) -> None:
    obj = finished["pilot-fail"]
    status = obj["status"]
    failed = conditions(obj)["Failed"]
    assert (status["phase"], failed["reason"]) == ("Failed", "PilotGatesFailed"), json.dumps(status, indent=1)[-3000:]
    assert "accuracy" in failed["message"] and "pilot scores" in failed["message"]
    assert (status["stage"], status["pilot"]["phase"]) == ("Pilot", "Failed")
    assert status["pilot"]["evaluation"]["gatesPassed"] is False
    for url in (f"/apis/batch/v1/namespaces/{namespace}/jobs/pilot-fail",
                f"/api/v1/namespaces/{namespace}/configmaps/pilot-fail-config",
                f"/api/v1/namespaces/{namespace}/services/pilot-fail"):
        assert kube.get(url) is None, f"{url} was created"
    events = kube.request("GET", f"/api/v1/namespaces/{namespace}/events",
                          query={"fieldSelector": "involvedObject.name=pilot-fail"})["items"]
    assert "PilotGatesFailed" in {e["reason"] for e in events}
    report = json.loads(s3.client().get_object(Bucket=OUTPUT_BUCKET, Key=f"pilot-fail/pilot/{REPORT_KEY}")["Body"].read())
    assert report["error"]["reason"] == "GatesFailed"
    s3.client().head_object(Bucket=OUTPUT_BUCKET, Key="pilot-fail/pilot/model/adapter_model.safetensors")  # kept
