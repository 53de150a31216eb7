"""End to end on a real cluster: CRD -> operator -> Indexed Job -> pods (run by the local pod runner) ->
trainer on CPU with the tiny model -> S3 -> FineTuneJob status, then garbage collection on delete.

Runs only with `--e2e` and KUBECONFIG (see README.md); every test here shares one run of the derived
examples/healthcare-lora.yaml, and the last one deletes it. Garbage collection and Job completion are
kube-controller-manager's work, so the cluster needs one (kind, k3s and managed clusters have it).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from finetune_operator.contract import MARKER_NAME, REPORT_KEY
from finetune_operator.spec import FineTuneJob
from tests.e2e.conftest import (
    FTJ_NAME,
    OUTPUT_BUCKET,
    OUTPUT_PREFIX,
    Operator,
    RunnerHandle,
    healthcare_manifest,
    wait_for,
)
from tests.e2e.podrunner import Kube

pytestmark = pytest.mark.e2e


def ftj_url(namespace: str, name: str | None = None) -> str:
    base = f"/apis/finetune.dev/v1alpha1/namespaces/{namespace}/finetunejobs"
    return f"{base}/{name}" if name else base


def conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}


@pytest.fixture(scope="module")
def finished(
    kube: Kube,
    namespace: str,
    operator: Operator,
    pod_runner: RunnerHandle,
    s3_secret: str,
    model_uri: str,
) -> dict[str, Any]:
    """Apply the derived example and wait until the operator reports a terminal phase."""
    manifest = healthcare_manifest(namespace, pod_runner.runner.node_name, model_uri, secret=s3_secret)
    FineTuneJob.model_validate(manifest)  # the derivation must keep the example valid
    kube.request("POST", ftj_url(namespace), body=manifest)

    def terminal() -> dict[str, Any] | None:
        operator.check_alive()
        pod_runner.check_alive()
        obj = kube.get(ftj_url(namespace, FTJ_NAME)) or {}
        phase = (obj.get("status") or {}).get("phase")
        return obj if phase in ("Succeeded", "Failed") else None

    return wait_for(f"FineTuneJob {namespace}/{FTJ_NAME} to finish", terminal)


def test_phase_and_conditions(finished: dict[str, Any]) -> None:
    status = finished["status"]
    found = conditions(finished)
    assert status["phase"] == "Succeeded", f"phase {status['phase']}; conditions: {json.dumps(found, indent=1)}"
    for kind in ("Valid", "Planned", "Complete"):
        assert found[kind]["status"] == "True", f"{kind}: {found.get(kind)}"
    assert found.get("Failed", {}).get("status") != "True"
    assert status["plan"]["method"] == "lora"
    assert status["plan"]["nodes"] == 1
    assert status.get("completionTime")


def test_children_are_owned_by_the_finetunejob(kube: Kube, namespace: str, finished: dict[str, Any],
                                              pod_runner: RunnerHandle) -> None:
    uid = finished["metadata"]["uid"]
    children: dict[str, dict[str, Any]] = {}
    for kind, url in (
        ("ConfigMap", f"/api/v1/namespaces/{namespace}/configmaps/{FTJ_NAME}-config"),
        ("Service", f"/api/v1/namespaces/{namespace}/services/{FTJ_NAME}"),
        ("Job", f"/apis/batch/v1/namespaces/{namespace}/jobs/{FTJ_NAME}"),
    ):
        found = kube.get(url)
        assert found is not None, f"{kind} {url} is missing"
        children[kind] = found
    for child in children.values():
        [owner] = child["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == ("FineTuneJob", FTJ_NAME, uid, True)
    assert json.loads(children["ConfigMap"]["data"]["job.json"])["method"] == "lora"
    assert children["Service"]["spec"]["clusterIP"] == "None"
    job = children["Job"]
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == finished["status"]["plan"]["nodes"]
    job_conditions = {c["type"]: c["status"] for c in job["status"].get("conditions") or []}
    assert job_conditions.get("Complete") == "True", job["status"]
    assert job["status"].get("succeeded") == job["spec"]["completions"]
    assert pod_runner.runner.finished, "the pod runner ran no pod"
    assert set(pod_runner.runner.finished.values()) == {"Succeeded"}, pod_runner.runner.finished


def test_artifacts_are_complete_in_s3(s3: Any, finished: dict[str, Any]) -> None:
    client = s3.client()
    marker = json.loads(client.get_object(Bucket=OUTPUT_BUCKET, Key=OUTPUT_PREFIX + MARKER_NAME)["Body"].read())
    listed = {o["Key"]: o["Size"] for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=OUTPUT_BUCKET, Prefix=OUTPUT_PREFIX) for o in page.get("Contents", [])}
    assert marker["count"] == len(marker["files"]) > 0
    for entry in marker["files"]:  # every file the marker vouches for is there, at its size
        assert listed.get(OUTPUT_PREFIX + entry["path"]) == entry["size"], entry
    paths = {entry["path"] for entry in marker["files"]}
    for expected in ("evaluation.json", "provenance.json", "metrics.jsonl", "README.md"):
        assert expected in paths
    assert any(p.startswith("model/") and p.endswith(".safetensors") for p in paths), sorted(paths)
    report = json.loads(client.get_object(Bucket=OUTPUT_BUCKET, Key=OUTPUT_PREFIX + REPORT_KEY)["Body"].read())
    assert report["phase"] == "complete"


def test_status_carries_progress_artifacts_and_evaluation(finished: dict[str, Any]) -> None:
    status = finished["status"]
    output = f"s3://{OUTPUT_BUCKET}/{OUTPUT_PREFIX}"
    for kind in ("model", "metrics", "evaluation", "provenance", "modelCard"):
        assert status["artifacts"][kind].startswith(output), status["artifacts"]
    evaluation = status["evaluation"]
    assert evaluation["examples"] > 0
    for model in ("base", "tuned"):
        for score in ("accuracy", "terminology", "hallucination"):
            assert 0.0 <= evaluation[model][score] <= 1.0, (model, score, evaluation[model])
    progress = status["progress"]
    assert progress["totalSteps"] == 4 and progress["step"] == 4 and progress["percent"] == 100
    assert [c["step"] for c in status["checkpoints"]] == [2, 4]  # everySteps 2, keep 2


def test_deleting_the_finetunejob_collects_its_children(kube: Kube, namespace: str, finished: dict[str, Any]) -> None:
    kube.request("DELETE", ftj_url(namespace, FTJ_NAME))
    urls = [
        ftj_url(namespace, FTJ_NAME),
        f"/api/v1/namespaces/{namespace}/configmaps/{FTJ_NAME}-config",
        f"/api/v1/namespaces/{namespace}/services/{FTJ_NAME}",
        f"/apis/batch/v1/namespaces/{namespace}/jobs/{FTJ_NAME}",
        # the CPU pre-flight's (the operator runs one by default)
        f"/api/v1/namespaces/{namespace}/configmaps/{FTJ_NAME}-preflight-config",
        f"/apis/batch/v1/namespaces/{namespace}/jobs/{FTJ_NAME}-preflight",
    ]

    def all_gone() -> bool:
        left = [url for url in urls if kube.get(url) is not None]
        pods = kube.request("GET", f"/api/v1/namespaces/{namespace}/pods",
                            query={"labelSelector": f"finetune.dev/job={FTJ_NAME}"})["items"]
        return not left and not pods

    # Garbage collection is kube-controller-manager's: it follows the owner references asynchronously.
    wait_for("the garbage collector to delete the FineTuneJob's children and pods", all_gone, timeout=300)
