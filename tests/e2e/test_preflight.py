"""The CPU pre-flight on a real API server: the operator creates `<name>-preflight`, the Job controller runs
it through the local pod runner (the real `python -m finetune_trainer.preflight` from this checkout, reading
the tiny model's headers and the data from S3), and only then a training Job, or none.

- `preflight-good`: the manifest gives no model size (the tiny model's URI has none in its name): the plan
  is completed from the pre-flight's reading of its files (exact parameters, examples, tokens, steps,
  GPU-hours) and is in the status before the training Job, which then trains to Succeeded.
- `preflight-bad`: one row of the training file has `question` instead of `instruction`: the FineTuneJob
  ends Failed/DataInvalid naming the file and the line, and no training Job is ever created.

Both run at once in the suite's namespace (the operator and pod runner of tests/e2e/conftest.py; the
operator runs pre-flights, its default).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import pytest

from tests.e2e.conftest import (
    DATA_BUCKET,
    DATA_DIR,
    OUTPUT_BUCKET,
    Operator,
    RunnerHandle,
    healthcare_manifest,
    wait_for,
)
from tests.e2e.podrunner import Kube
from tests.e2e.test_e2e import conditions, ftj_url

pytestmark = pytest.mark.e2e

BAD_KEY = "instructions/preflight-bad.jsonl"
BAD_LINE = 5


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@pytest.fixture(scope="module")
def finished(kube: Kube, namespace: str, operator: Operator, pod_runner: RunnerHandle, s3: Any, s3_secret: str,
             model_uri: str) -> dict[str, dict[str, Any]]:
    lines = (DATA_DIR / "healthcare_train.jsonl").read_text(encoding="utf-8").splitlines()
    row = json.loads(lines[BAD_LINE - 1])
    row["question"] = row.pop("instruction")
    lines[BAD_LINE - 1] = json.dumps(row)
    s3.client().put_object(Bucket=DATA_BUCKET, Key=BAD_KEY, Body=("\n".join(lines) + "\n").encode())

    node = pod_runner.runner.node_name
    names = ("preflight-good", "preflight-bad")
    for name in names:
        manifest = healthcare_manifest(namespace, node, model_uri, secret=s3_secret)
        manifest["metadata"]["name"] = name
        spec = manifest["spec"]
        del spec["baseModel"]["parameters"]  # only the model's files say how large it is
        spec["output"]["uri"] = f"s3://{OUTPUT_BUCKET}/{name}/"
        if name == "preflight-bad":
            spec["dataset"]["train"] = f"s3://{DATA_BUCKET}/{BAD_KEY}"
        kube.request("POST", ftj_url(namespace), body=manifest)

    def all_terminal() -> dict[str, dict[str, Any]] | None:
        operator.check_alive()
        pod_runner.check_alive()
        objs = {name: kube.get(ftj_url(namespace, name)) or {} for name in names}
        done = all((o.get("status") or {}).get("phase") in ("Succeeded", "Failed") for o in objs.values())
        return objs if done else None

    return wait_for("both pre-flight FineTuneJobs to finish", all_terminal)


def test_a_good_job_is_planned_from_its_files_then_trains(kube: Kube, namespace: str,
                                                          finished: dict[str, dict[str, Any]]) -> None:
    status = finished["preflight-good"]["status"]
    conds = conditions({"status": status})
    assert status["phase"] == "Succeeded", (status.get("phase"), conds)
    assert status["stage"] == "Main"
    preflight = status["preflight"]
    assert preflight["phase"] == "Succeeded"
    lines = sum(1 for line in (DATA_DIR / "healthcare_train.jsonl").read_text().splitlines() if line.strip())
    assert preflight["examples"] == lines and preflight["tokens"] > lines
    estimate = status["plan"]["estimate"]
    assert estimate["parameters"] == preflight["parameters"] > 0
    assert estimate["steps"] == 4  # hyperparameters.maxSteps
    assert estimate["gpuHours"] > 0
    assert conds["PreflightPassed"]["status"] == "True"
    # Written before the training Job existed (the emulator's request journal proves the order exactly:
    # tests/api/test_preflight.py; here, to the second of the API server's clock).
    job = kube.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/preflight-good")
    assert job is not None
    assert _time(conds["PreflightPassed"]["lastTransitionTime"]) <= _time(job["metadata"]["creationTimestamp"])
    pf_job = kube.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/preflight-good-preflight")
    assert pf_job is not None and any(c["type"] == "Complete" and c["status"] == "True"
                                      for c in pf_job["status"]["conditions"])


def test_a_bad_dataset_key_fails_in_preflight_with_no_training_job(kube: Kube, namespace: str,
                                                                  finished: dict[str, dict[str, Any]]) -> None:
    status = finished["preflight-bad"]["status"]
    conds = conditions({"status": status})
    assert status["phase"] == "Failed"
    failed = conds["Failed"]
    assert failed["reason"] == "DataInvalid", failed
    assert f"s3://{DATA_BUCKET}/{BAD_KEY}" in failed["message"] and f"line {BAD_LINE}" in failed["message"], failed
    assert (status["stage"], status["preflight"]["phase"]) == ("Preflight", "Failed")
    assert kube.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/preflight-bad") is None
    events = kube.get(f"/api/v1/namespaces/{namespace}/events?fieldSelector=involvedObject.name=preflight-bad")
    assert any(e["reason"] == "DataInvalid" for e in (events or {}).get("items", []))
