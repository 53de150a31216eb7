"""Chained stages (spec.baseModel.fromJob) on a real API server: SFT, then DPO starting from its result.

The operator runs as the chart runs it (`kopf run` with the Deployment's arguments and environment), with the token
of the chart's ServiceAccount only (`watchNamespaces`: a Role in the test's namespace), as in test_serving_apply.py.
No pod runs here: the FineTuneJobs are suspended, and the tests play the trainer and the Job controller: the
trainer's report (`<output.uri>/status/report.json`, the adapter's URI and the gates' verdict) goes to the local S3
server, then the Job's status says Complete (or Failed by the pod failure policy, as a trainer that missed its
gates ends it), as the Job controller would write it.

1. A chain of two FineTuneJobs, the DPO stage applied first (GitOps applies both in any order): the DPO stage waits
   (Pending, WaitingForBaseJob, no Job, no ConfigMap) while the SFT stage runs; once the SFT stage Succeeded it gets
   its Job, its config snapshot starts from the SFT stage's base model with its adapter merged in, and it runs to
   Succeeded in turn; `kubectl get ftj` lists both;
2. deleting the SFT stage while the DPO stage waits fails the DPO stage with BaseJobDeleted, naming it;
3. the SFT stage failing (its gates missed) fails the DPO stage with BaseJobFailed, naming it and its reason.

The status interval is 30 s, so a waiting job's fallback refresh (6 intervals) is beyond every wait here: the DPO
stage moves on the SFT stage's own watch events.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from finetune_operator import conditions as c
from finetune_operator.contract import REPORT_KEY, TrainerError, TrainerReport
from finetune_operator.handlers import ftj_url
from finetune_operator.spec import EvaluationStatus, FineTuneJob
from tests.e2e.conftest import OUTPUT_BUCKET, wait_for
from tests.e2e.test_chart import (
    MODEL_URI,
    chart_manifest,
    fresh_namespace,
    namespace_operator,
)
from tests.kube import Kube, KubeError

pytestmark = pytest.mark.e2e

#: Waits here are on watch events (and, after a failed pass, one 30 s retry): a broken run fails after this,
#: nothing asserts on durations.
WAIT = 90.0


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@pytest.fixture(scope="module")
def namespace(kube: Kube) -> Iterator[str]:
    with fresh_namespace(kube, "ft-chain") as name:
        yield name


@pytest.fixture(scope="module")
def operator(kube: Kube, kubeconfig: str, crd: Any, s3: Any, namespace: str,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The chart (watching `namespace` only, without the FineTunePolicy singletons) and its operator."""
    with namespace_operator(kube, kubeconfig, s3, namespace, tmp_path_factory.mktemp("chain"), FT_PREFLIGHT="false",
                            FT_STATUS_INTERVAL="30") as running:
        yield running


def sft_manifest(namespace: str, name: str) -> dict[str, Any]:
    """test_chart.py's small LoRA FineTuneJob, suspended (no pod is ever wanted)."""
    manifest = chart_manifest(namespace, name)
    manifest["spec"]["suspend"] = True
    FineTuneJob.model_validate(manifest)
    return manifest


def dpo_manifest(namespace: str, name: str, base: str) -> dict[str, Any]:
    """A DPO stage starting from FineTuneJob `base`'s result, suspended."""
    manifest = sft_manifest(namespace, name)
    spec = manifest["spec"]
    spec["baseModel"] = {"fromJob": base}
    spec["objective"] = "dpo"
    spec["dpo"] = {"beta": 0.1}
    spec["dataset"].update({"train": "s3://healthcare-data/preferences/train.jsonl", "format": "preference"})
    spec["hyperparameters"]["packing"] = False
    FineTuneJob.model_validate(manifest)
    return manifest


def job_url(namespace: str, name: str) -> str:
    return f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}"


def ftj(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    return kube.get(ftj_url(namespace, name)) or {}


def condition(kube: Kube, namespace: str, name: str, type_: str) -> dict[str, Any]:
    return c.find((ftj(kube, namespace, name).get("status") or {}).get("conditions"), type_) or {}


def events(kube: Kube, namespace: str, name: str) -> list[tuple[str, str, str]]:
    found = kube.request("GET", f"/api/v1/namespaces/{namespace}/events")["items"]
    return [(e["type"], e["reason"], e.get("message", "")) for e in found if e["involvedObject"]["name"] == name]


def trainer_finishes(kube: Kube, s3: Any, namespace: str, name: str, *, gates_passed: bool) -> None:
    """End FineTuneJob `name` as its trainer and the Job controller would: the report first (the adapter under
    `<output>/model/`, the gates' verdict), then the Job's status Complete, or Failed by the pod failure policy
    with the report's GatesFailed."""
    body = ftj(kube, namespace, name)
    output = body["spec"]["output"]["uri"]
    report = TrainerReport(
        job_uid=body["metadata"]["uid"], phase="complete" if gates_passed else "failed", step=4, total_steps=4,
        artifacts={"model": f"{output}model/"},
        evaluation=EvaluationStatus(gates_passed=gates_passed, failed_gates=[] if gates_passed else ["accuracy 0.10 < 0.50"]),
        error=None if gates_passed else TrainerError(reason=c.GATES_FAILED, message="missed: accuracy 0.10 < 0.50"),
        updated_at=_now(),
    )
    key = output.removeprefix(f"s3://{OUTPUT_BUCKET}/") + REPORT_KEY
    s3.client().put_object(Bucket=OUTPUT_BUCKET, Key=key, Body=json.dumps(report.wire()).encode())
    now = _now()
    probe = {"lastProbeTime": now, "lastTransitionTime": now, "message": "set by the test"}
    if gates_passed:
        ended = [{"type": "SuccessCriteriaMet", "status": "True", "reason": "CompletionsReached", **probe},
                 {"type": "Complete", "status": "True", "reason": "CompletionsReached", **probe}]
        counts: dict[str, Any] = {"succeeded": 1, "completedIndexes": "0", "completionTime": now}
    else:
        ended = [{"type": "FailureTarget", "status": "True", "reason": "PodFailurePolicy", **probe},
                 {"type": "Failed", "status": "True", "reason": "PodFailurePolicy", **probe}]
        counts = {"failed": 1}
    for _attempt in range(5):  # the Job controller writes the status of a suspended Job too: read it again on 409
        job = wait_for(f"the Job of {name}", lambda: kube.get(job_url(namespace, name)), timeout=WAIT, interval=0.5)
        job["status"] = {"startTime": now, "active": 0, "ready": 0, "terminating": 0, "uncountedTerminatedPods": {},
                         "conditions": ended, **counts}
        try:
            kube.request("PUT", job_url(namespace, name) + "/status", body=job)
            return
        except KubeError as err:
            if err.status != 409:
                raise
    raise AssertionError(f"could not write the status of Job {name}: it kept changing")


def waiting(kube: Kube, namespace: str, name: str, reason: str) -> Any:
    def check() -> dict[str, Any] | None:
        found = ftj(kube, namespace, name)
        cond = c.find((found.get("status") or {}).get("conditions"), c.WAITING_FOR_BASE_JOB) or {}
        return found if (cond.get("status"), cond.get("reason")) == ("True", reason) else None
    return check


def phase(kube: Kube, namespace: str, name: str, wanted: str) -> Any:
    def check() -> dict[str, Any] | None:
        found = ftj(kube, namespace, name)
        return found if (found.get("status") or {}).get("phase") == wanted else None
    return check


def test_a_chain_of_two_runs_in_order_to_succeeded(kube: Kube, kubeconfig: str, s3: Any, namespace: str,
                                                   operator: Any) -> None:
    # The DPO stage first: its base job does not exist yet.
    kube.request("POST", ftj_url(namespace), body=dpo_manifest(namespace, "dpo", "sft"))
    wait_for("dpo waiting for sft to be created", waiting(kube, namespace, "dpo", c.BASE_JOB_NOT_FOUND),
             timeout=WAIT, interval=0.5)
    sft = kube.request("POST", ftj_url(namespace), body=sft_manifest(namespace, "sft"))
    wait_for("the Job of sft", lambda: kube.get(job_url(namespace, "sft")), timeout=WAIT, interval=0.5)
    dpo = wait_for("dpo waiting for sft to succeed", waiting(kube, namespace, "dpo", c.BASE_JOB_RUNNING),
                   timeout=WAIT, interval=0.5)
    assert dpo["status"]["phase"] == "Pending"
    assert dpo["status"]["baseJob"]["uid"] == sft["metadata"]["uid"]
    assert "sft" in condition(kube, namespace, "dpo", c.WAITING_FOR_BASE_JOB)["message"]
    assert kube.get(job_url(namespace, "dpo")) is None
    assert kube.get(f"/api/v1/namespaces/{namespace}/configmaps/dpo-config") is None

    trainer_finishes(kube, s3, namespace, "sft", gates_passed=True)
    wait_for("sft Succeeded", phase(kube, namespace, "sft", "Succeeded"), timeout=WAIT, interval=0.5)
    wait_for("the Job of dpo, once sft Succeeded", lambda: kube.get(job_url(namespace, "dpo")), timeout=WAIT,
             interval=0.5)
    dpo = wait_for("dpo planned", lambda: (f := ftj(kube, namespace, "dpo")).get("status", {}).get("plan") and f,
                   timeout=WAIT, interval=0.5)
    sft_output = sft["spec"]["output"]["uri"]
    base_job = dpo["status"]["baseJob"]
    assert (base_job["name"], base_job["uid"], base_job["modelUri"], base_job["adapters"]) == (
        "sft", sft["metadata"]["uid"], MODEL_URI, [f"{sft_output}model/"])
    assert [stage["name"] for stage in base_job["chain"]] == ["sft"]
    waited = condition(kube, namespace, "dpo", c.WAITING_FOR_BASE_JOB)
    assert (waited["status"], waited["reason"]) == ("False", c.BASE_JOB_SUCCEEDED)
    config_map = kube.get(f"/api/v1/namespaces/{namespace}/configmaps/dpo-config") or {}
    snapshot = json.loads(config_map["data"]["job.json"])
    assert snapshot["spec"]["baseModel"]["uri"] == MODEL_URI and "fromJob" not in snapshot["spec"]["baseModel"]
    assert snapshot["base"]["adapters"] == [f"{sft_output}model/"] and snapshot["spec"]["objective"] == "dpo"

    trainer_finishes(kube, s3, namespace, "dpo", gates_passed=True)
    done = wait_for("dpo Succeeded", phase(kube, namespace, "dpo", "Succeeded"), timeout=WAIT, interval=0.5)
    assert done["status"]["artifacts"]["model"] == f"{done['spec']['output']['uri']}model/"
    posted = {(kind, reason) for kind, reason, _ in events(kube, namespace, "dpo")}
    assert {("Normal", c.WAITING_FOR_BASE_JOB), ("Normal", c.BASE_JOB_SUCCEEDED)} <= posted
    # The order: sft finished before dpo's Job existed.
    dpo_job = kube.get(job_url(namespace, "dpo")) or {}
    assert ftj(kube, namespace, "sft")["status"]["completionTime"] <= dpo_job["metadata"]["creationTimestamp"]

    listed = subprocess.run(["kubectl", "--kubeconfig", kubeconfig, "get", "ftj", "-n", namespace],
                            capture_output=True, text=True, timeout=60, check=True).stdout
    rows = {line.split()[0]: line.split() for line in listed.splitlines()[1:]}
    assert rows["sft"][1] == "Succeeded" and rows["dpo"][1] == "Succeeded", listed


def test_deleting_the_first_while_the_second_waits_fails_the_second(kube: Kube, namespace: str,
                                                                      operator: Any) -> None:
    sft = kube.request("POST", ftj_url(namespace), body=sft_manifest(namespace, "sft-deleted"))
    kube.request("POST", ftj_url(namespace), body=dpo_manifest(namespace, "dpo-orphan", "sft-deleted"))
    wait_for("dpo-orphan waiting for sft-deleted", waiting(kube, namespace, "dpo-orphan", c.BASE_JOB_RUNNING),
             timeout=WAIT, interval=0.5)
    kube.request("DELETE", ftj_url(namespace, "sft-deleted"))
    failed = wait_for("dpo-orphan Failed", phase(kube, namespace, "dpo-orphan", "Failed"), timeout=WAIT, interval=0.5)
    cond = c.find(failed["status"]["conditions"], c.FAILED) or {}
    assert cond.get("reason") == c.BASE_JOB_DELETED
    assert "sft-deleted" in cond["message"] and sft["metadata"]["uid"] in cond["message"]
    assert any(kind == "Warning" and reason == c.BASE_JOB_DELETED and "sft-deleted" in message
               for kind, reason, message in events(kube, namespace, "dpo-orphan"))
    assert kube.get(job_url(namespace, "dpo-orphan")) is None


def test_failing_the_first_fails_the_second(kube: Kube, s3: Any, namespace: str, operator: Any) -> None:
    kube.request("POST", ftj_url(namespace), body=sft_manifest(namespace, "sft-gated"))
    kube.request("POST", ftj_url(namespace), body=dpo_manifest(namespace, "dpo-after-gated", "sft-gated"))
    wait_for("dpo-after-gated waiting", waiting(kube, namespace, "dpo-after-gated", c.BASE_JOB_RUNNING),
             timeout=WAIT, interval=0.5)
    trainer_finishes(kube, s3, namespace, "sft-gated", gates_passed=False)
    wait_for("sft-gated Failed", phase(kube, namespace, "sft-gated", "Failed"), timeout=WAIT, interval=0.5)
    failed = wait_for("dpo-after-gated Failed", phase(kube, namespace, "dpo-after-gated", "Failed"), timeout=WAIT,
                      interval=0.5)
    cond = c.find(failed["status"]["conditions"], c.FAILED) or {}
    assert cond.get("reason") == c.BASE_JOB_FAILED
    assert "sft-gated" in cond["message"] and c.GATES_FAILED in cond["message"]
    assert any(kind == "Warning" and reason == c.BASE_JOB_FAILED for kind, reason, _ in
               events(kube, namespace, "dpo-after-gated"))
    assert kube.get(job_url(namespace, "dpo-after-gated")) is None
