"""spec.pilot on a real node: two full fine-tunes of the tiny model with a LoRA pilot, both at once.

- `pilot-pass`: the pilot (6 LoRA steps) must lower the eval loss by 1% against the base model; it does, so
  the operator creates the main (full) Job only then, and the FineTuneJob ends Succeeded with both stages
  in its status and the pilot's adapter kept under `<output.uri>/pilot/model/`.
- `pilot-fail`: the pilot (1 step) must reach 99% accuracy; it cannot, the trainer exits with the gates
  code, and the FineTuneJob ends Failed/PilotGatesFailed with the pilot's scores, no main Job ever created.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from finetune_operator.contract import MARKER_NAME, REPORT_KEY
from finetune_operator.spec import FineTuneJob
from tests.node.conftest import (
    ML_NAMESPACE,
    OUTPUT_BUCKET,
    Installed,
    delete_job,
    ftj,
    tiny_manifest,
    wait_for,
)

#: What the demo gives the tiny stand-in (trainer-image/finetune_trainer/local.py DEMO_OVERRIDES): adapters
#: on every linear layer and the output head, and larger steps.
TINY_LORA = {"r": 64, "alpha": 64, "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj", "lm_head"]}
RUNS = {
    "pilot-pass": {"maxSteps": 6, "gates": [{"metric": "evalLoss", "minImprovement": 0.01}]},
    "pilot-fail": {"maxSteps": 1, "gates": [{"metric": "accuracy", "min": 0.99}]},
}


def conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}


@pytest.fixture(scope="module")
def finished(installed: Installed) -> Any:
    cluster = installed.cluster
    for name, pilot in RUNS.items():
        manifest = tiny_manifest(name, maxSteps=2, learningRate=1e-3)
        spec = manifest["spec"]
        spec["method"] = "full"
        spec["lora"] = TINY_LORA
        spec["evaluation"]["maxExamples"] = 2
        spec["pilot"] = {"learningRate": 5e-3, **pilot}
        FineTuneJob.model_validate(manifest)
        cluster.apply(manifest, ML_NAMESPACE)

    def all_terminal() -> dict[str, dict[str, Any]] | None:
        objs = {name: ftj(cluster, name) for name in RUNS}
        done = all((o.get("status") or {}).get("phase") in ("Succeeded", "Failed") for o in objs.values())
        return objs if done else None

    yield wait_for("both pilot FineTuneJobs to finish", all_terminal)
    for name in RUNS:
        delete_job(cluster, name)


def test_a_passing_pilot_leads_to_the_main_job(installed: Installed, finished: dict[str, dict[str, Any]]) -> None:
    cluster = installed.cluster
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
    jobs = {name: cluster.get("job", "-n", ML_NAMESPACE, name) for name in ("pilot-pass-pilot", "pilot-pass")}
    for name, job in jobs.items():
        assert job is not None, name
        assert job["metadata"]["ownerReferences"][0]["uid"] == obj["metadata"]["uid"]
    assert jobs["pilot-pass-pilot"]["status"]["completionTime"] <= jobs["pilot-pass"]["metadata"]["creationTimestamp"]
    config = json.loads(cluster.get("configmap", "-n", ML_NAMESPACE, "pilot-pass-pilot-config")["data"]["job.json"])
    assert (config["stage"], config["method"], config["spec"]["hyperparameters"]["maxSteps"]) == ("pilot", "lora", 6)
    # The pilot's adapter is kept under <output.uri>/pilot/, next to the main run's artifacts.
    keys = installed.keys(OUTPUT_BUCKET, "pilot-pass/")
    assert "pilot/model/adapter_model.safetensors" in keys, sorted(keys)
    assert f"pilot/{MARKER_NAME}" in keys and MARKER_NAME in keys
    assert pilot["artifacts"]["model"] == f"s3://{OUTPUT_BUCKET}/pilot-pass/pilot/model/"


def test_a_failing_pilot_creates_no_main_job(installed: Installed, finished: dict[str, dict[str, Any]]) -> None:
    cluster = installed.cluster
    obj = finished["pilot-fail"]
    status = obj["status"]
    failed = conditions(obj)["Failed"]
    assert (status["phase"], failed["reason"]) == ("Failed", "PilotGatesFailed"), json.dumps(status, indent=1)[-3000:]
    assert "accuracy" in failed["message"] and "pilot scores" in failed["message"]
    assert (status["stage"], status["pilot"]["phase"]) == ("Pilot", "Failed")
    assert status["pilot"]["evaluation"]["gatesPassed"] is False
    for kind, name in (("job", "pilot-fail"), ("configmap", "pilot-fail-config"), ("service", "pilot-fail")):
        assert cluster.get(kind, "-n", ML_NAMESPACE, name) is None, f"{kind} {name} was created"
    events = cluster.get("events", "-n", ML_NAMESPACE, "--field-selector", "involvedObject.name=pilot-fail")
    assert "PilotGatesFailed" in {e["reason"] for e in events["items"]}
    report = installed.read_json(OUTPUT_BUCKET, f"pilot-fail/pilot/{REPORT_KEY}")
    assert report["error"]["reason"] == "GatesFailed"
    assert "pilot/model/adapter_model.safetensors" in installed.keys(OUTPUT_BUCKET, "pilot-fail/")  # kept
