"""spec.serving.apply on a real API server: the operator creates a finished job's KServe LLMInferenceService.

The operator runs as the chart runs it (`kopf run` with the Deployment's arguments and environment), with the token
of the chart's ServiceAccount only (`watchNamespaces`: a Role in the test's namespace), so the chart's RBAC is what
it has. No pod runs here: the FineTuneJobs are suspended, and the tests play the trainer and the Job controller:
the trainer's report (`<output.uri>/status/report.json`, with the adapter's URI and the gates' verdict) goes to
the local S3 server, then the Job's status says Complete (or Failed by the pod failure policy, the way a trainer
that missed its gates ends it), as the Job controller would write it. KServe's LLMInferenceService CRD is
`fixtures/llminferenceservice-crd.yaml` (KServe's schema for the fields used); no KServe controller runs, so its
readiness is the test's to write too.

1. Without the CRD, a job that Succeeded with its gates held gets `Serving` False/ServingCRDMissing naming the CRD
   and the manifests, and nothing is created;
2. the CRD installed afterwards, the same job gets exactly one LLMInferenceService (picked up by a later refresh):
   owned by the job (controller owner reference), serving the adapter under its name at the URI the trainer
   reported; status.serving names it; its Ready condition set True, status.serving.ready follows;
3. a job whose gates failed gets none (`Serving` False/GatesFailed).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator import conditions as c
from finetune_operator.contract import REPORT_KEY, TrainerError, TrainerReport
from finetune_operator.handlers import ftj_url
from finetune_operator.serving_apply import CRD_NAME, collection_path, object_path
from finetune_operator.spec import EvaluationStatus, FineTuneJob
from tests.e2e.conftest import CRD_URL, KEEP, OUTPUT_BUCKET, wait_for
from tests.e2e.test_chart import (
    chart_manifest,
    fresh_namespace,
    namespace_operator,
)
from tests.kube import Kube, KubeError

pytestmark = pytest.mark.e2e

KSERVE_CRD = Path(__file__).parent / "fixtures" / "llminferenceservice-crd.yaml"
#: Waits here are on the operator's refreshes (FT_STATUS_INTERVAL below: at most 6 of them apart) and on the
#: discovery cache (10 s): a broken run fails after this, nothing asserts on durations.
WAIT = 90.0


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@pytest.fixture(scope="module")
def namespace(kube: Kube) -> Iterator[str]:
    with fresh_namespace(kube, "ft-serving") as name:
        yield name


@pytest.fixture(scope="module")
def kserve_preinstalled(kube: Kube) -> bool:
    """Whether the cluster has KServe's CRD already (a cluster of yours with `--e2e`): then it is neither
    removed for the CRD-missing case nor deleted afterwards."""
    return kube.get(f"{CRD_URL}/{CRD_NAME}") is not None


@pytest.fixture(scope="module")
def operator(kube: Kube, kubeconfig: str, crd: Any, s3: Any, namespace: str, kserve_preinstalled: bool,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The chart (watching `namespace` only, without the FineTunePolicy singletons) and its operator."""
    # No pre-flight pod can run here; a short interval keeps the refreshes of a finished job quick.
    with namespace_operator(kube, kubeconfig, s3, namespace, tmp_path_factory.mktemp("serving-apply"),
                            FT_PREFLIGHT="false", FT_STATUS_INTERVAL="0.5") as running:
        yield running


def served_manifest(namespace: str, name: str) -> dict[str, Any]:
    """test_chart.py's small FineTuneJob, suspended (no pod is ever wanted), with spec.serving.apply."""
    manifest = chart_manifest(namespace, name)
    manifest["spec"]["suspend"] = True
    manifest["spec"]["serving"] = {"apply": True, "adapterName": f"{name}-adapter"}
    FineTuneJob.model_validate(manifest)
    return manifest


def job_url(namespace: str, name: str) -> str:
    return f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}"


def finish(kube: Kube, s3: Any, namespace: str, name: str, *, gates_passed: bool) -> dict[str, Any]:
    """Submit a served FineTuneJob and end it as its trainer and the Job controller would: the report first
    (the adapter at `<output>/model-final/`, not where the plan predicts, to tell the two apart), then the Job's
    status Complete, or Failed by the pod failure policy with the report's GatesFailed. Its body, as created."""
    ftj = kube.request("POST", ftj_url(namespace), body=served_manifest(namespace, name))
    output = ftj["spec"]["output"]["uri"]
    job = wait_for(f"the Job of {name}", lambda: kube.get(job_url(namespace, name)), timeout=WAIT, interval=0.5)
    report = TrainerReport(
        job_uid=ftj["metadata"]["uid"], phase="complete" if gates_passed else "failed", step=4, total_steps=4,
        artifacts={"model": f"{output}model-final/"},
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
        counts = {"succeeded": 1, "completedIndexes": "0", "completionTime": now}
    else:
        ended = [{"type": "FailureTarget", "status": "True", "reason": "PodFailurePolicy", **probe},
                 {"type": "Failed", "status": "True", "reason": "PodFailurePolicy", **probe}]
        counts = {"failed": 1}
    job["status"] = {"startTime": now, "active": 0, "ready": 0, "terminating": 0, "uncountedTerminatedPods": {},
                     "conditions": ended, **counts}
    kube.request("PUT", job_url(namespace, name) + "/status", body=job)
    return ftj


def serving_condition(kube: Kube, namespace: str, name: str, reason: str) -> dict[str, Any] | None:
    """The FineTuneJob once its `Serving` condition has `reason`."""
    ftj = kube.get(ftj_url(namespace, name)) or {}
    found = c.find((ftj.get("status") or {}).get("conditions"), c.SERVING)
    return ftj if found is not None and found.get("reason") == reason else None


def llm_services(kube: Kube, namespace: str) -> list[dict[str, Any]]:
    return list(kube.request("GET", collection_path(namespace))["items"])


@pytest.fixture(scope="module")
def succeeded_without_kserve(kube: Kube, s3: Any, namespace: str, operator: Any,
                             kserve_preinstalled: bool) -> dict[str, Any]:
    """A served job that Succeeded with its gates held, before KServe's CRD is installed (when it is not)."""
    return finish(kube, s3, namespace, "served", gates_passed=True)


@pytest.fixture(scope="module")
def kserve_crd(kube: Kube, kserve_preinstalled: bool, succeeded_without_kserve: dict[str, Any]) -> Iterator[None]:
    """KServe's LLMInferenceService CRD, installed after `succeeded_without_kserve` finished; Established."""
    if kserve_preinstalled:
        yield
        return
    kube.request("POST", CRD_URL, body=yaml.safe_load(KSERVE_CRD.read_text()))

    def established() -> bool:
        found = kube.get(f"{CRD_URL}/{CRD_NAME}") or {}
        return any(cond["type"] == "Established" and cond["status"] == "True"
                   for cond in (found.get("status") or {}).get("conditions") or [])

    wait_for(f"CRD {CRD_NAME} to be Established", established, timeout=120, interval=0.5)
    yield
    if not KEEP:
        with contextlib.suppress(KubeError):
            kube.request("DELETE", f"{CRD_URL}/{CRD_NAME}")


def test_without_the_crd_the_condition_says_so(kube: Kube, namespace: str, kserve_preinstalled: bool,
                                               succeeded_without_kserve: dict[str, Any]) -> None:
    if kserve_preinstalled:
        pytest.skip(f"the cluster has {CRD_NAME}: KServe is installed")
    name = succeeded_without_kserve["metadata"]["name"]
    ftj = wait_for("Serving False/ServingCRDMissing", lambda: serving_condition(kube, namespace, name,
                                                                                c.SERVING_CRD_MISSING), timeout=WAIT)
    status = ftj["status"]
    assert status["phase"] == "Succeeded"
    cond = c.find(status["conditions"], c.SERVING)
    assert cond is not None and cond["status"] == c.FALSE
    output = succeeded_without_kserve["spec"]["output"]["uri"]
    assert CRD_NAME in cond["message"] and f"{output}serving/" in cond["message"] and "kubectl apply" in cond["message"]
    assert not status.get("serving")
    events = kube.request("GET", f"/api/v1/namespaces/{namespace}/events")["items"]
    assert any(e["reason"] == c.SERVING_CRD_MISSING and e["involvedObject"]["name"] == name for e in events)


def test_a_succeeded_job_gets_exactly_one_owned_service(kube: Kube, namespace: str, kserve_crd: None,
                                                         succeeded_without_kserve: dict[str, Any]) -> None:
    """The CRD installed after the job finished: a later refresh creates the service; its readiness follows."""
    ftj = succeeded_without_kserve
    name, uid, output = ftj["metadata"]["name"], ftj["metadata"]["uid"], ftj["spec"]["output"]["uri"]
    wait_for("status.serving.name", lambda: ((kube.get(ftj_url(namespace, name)) or {}).get("status") or {}).get(
        "serving"), timeout=WAIT)
    owned = [obj for obj in llm_services(kube, namespace)
             if any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or [])]
    assert len(owned) == 1, owned
    (service,) = owned
    assert service["metadata"]["ownerReferences"] == [{
        "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "name": name, "uid": uid,
        "controller": True, "blockOwnerDeletion": True}]
    # The adapter as the trainer reported it (not the plan's `<output>/model/`), under spec.serving.adapterName.
    assert service["spec"]["model"]["lora"]["adapters"] == [{"name": f"{name}-adapter", "uri": f"{output}model-final/"}]
    status = (kube.get(ftj_url(namespace, name)) or {})["status"]
    assert status["serving"] == {"name": service["metadata"]["name"], "ready": False}
    assert c.find(status["conditions"], c.SERVING)["reason"] == c.SERVING_CREATED

    # KServe's controller would write this once its pods serve.
    now = _now()
    service["status"] = {"url": f"http://{name}.{namespace}.example", "conditions": [
        {"type": "Ready", "status": "True", "reason": "Ready", "lastTransitionTime": now}]}
    kube.request("PUT", object_path(namespace, service["metadata"]["name"]) + "/status", body=service)
    ready = wait_for("status.serving.ready", lambda: serving_condition(kube, namespace, name, c.SERVING_READY),
                     timeout=WAIT)
    assert ready["status"]["serving"] == {"name": name, "ready": True, "url": f"http://{name}.{namespace}.example"}
    assert c.find(ready["status"]["conditions"], c.SERVING)["status"] == c.TRUE
    assert len([obj for obj in llm_services(kube, namespace)
                if any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or [])]) == 1


def test_a_job_whose_gates_failed_gets_none(kube: Kube, s3: Any, namespace: str, kserve_crd: None) -> None:
    ftj = finish(kube, s3, namespace, "gated", gates_passed=False)
    name, uid = ftj["metadata"]["name"], ftj["metadata"]["uid"]
    found = wait_for("Serving False/GatesFailed", lambda: serving_condition(kube, namespace, name, c.GATES_FAILED),
                     timeout=WAIT)
    status = found["status"]
    assert status["phase"] == "Failed"
    assert c.find(status["conditions"], c.FAILED)["reason"] == c.GATES_FAILED
    assert "nothing is served" in c.find(status["conditions"], c.SERVING)["message"]
    assert not status.get("serving")
    assert not [obj for obj in llm_services(kube, namespace)
                if any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or [])]
    assert kube.get(object_path(namespace, name)) is None
