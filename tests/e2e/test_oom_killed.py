"""A training pod OOMKilled on a real API server: the next pod starts one rung down the ladder and the run
succeeds (`finetune_operator.oomkill`).

The pod runner has no memory cgroup, so `oom_hook/sitecustomize.py` stands in for the kernel's OOM killer:
a trainer process about to run a forward pass at a micro-batch above 2 writes the runner's OOM marker and
SIGKILLs its process group (exit 137, no report), which the runner reports as `OOMKilled`, as a kubelet
would. The operator steps the config snapshot in the ConfigMap from 4 x 1 down to 2 x 2 (the same examples
per optimizer step), the real Job controller starts the replacement pod, the runner mounts the ConfigMap as
it is then, and the trainer starts at 2 x 2 and finishes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from finetune_operator import contract, oomkill
from finetune_operator.handlers import ftj_url
from finetune_operator.spec import FineTuneJob
from tests.e2e.conftest import OUTPUT_BUCKET, Operator, RunnerHandle, healthcare_manifest, wait_for
from tests.e2e.podrunner import Kube

pytestmark = pytest.mark.e2e

HOOK = Path(__file__).resolve().parent / "oom_hook"
NAME = "oom-killed"


def test_an_oom_killed_pod_is_followed_by_one_a_rung_lower(kube: Kube, namespace: str, operator: Operator,
                                                           pod_runner: RunnerHandle, s3_secret: str,
                                                           model_uri: str) -> None:
    manifest = healthcare_manifest(namespace, pod_runner.runner.node_name, model_uri, secret=s3_secret)
    manifest["metadata"]["name"] = NAME
    manifest["spec"]["output"]["uri"] = f"s3://{OUTPUT_BUCKET}/{NAME}/"  # its own: the shared example's may be done
    manifest["spec"]["hyperparameters"].update({"batchSize": 4, "gradientAccumulationSteps": 1})
    manifest["spec"]["backoffLimit"] = 1  # the replacement pod
    FineTuneJob.model_validate(manifest)
    extra = {"PYTHONPATH": str(HOOK), "FT_TEST_OOM_ABOVE_MICRO_BATCH": "2"}
    saved = dict(pod_runner.runner.extra_env)
    pod_runner.runner.extra_env.update(extra)
    try:
        kube.request("POST", ftj_url(namespace), body=manifest)

        def terminal() -> dict[str, Any] | None:
            operator.check_alive()
            pod_runner.check_alive()
            obj = kube.get(ftj_url(namespace, NAME)) or {}
            return obj if (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed") else None

        obj = wait_for(f"FineTuneJob {namespace}/{NAME} to finish", terminal, interval=1.0)
    finally:
        pod_runner.runner.extra_env.clear()
        pod_runner.runner.extra_env.update(saved)
    status = obj["status"]
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1)[-3000:]

    pods = kube.request("GET", f"/api/v1/namespaces/{namespace}/pods",
                        query={"labelSelector": f"finetune.dev/job={NAME},app.kubernetes.io/component=trainer"})["items"]
    killed = [p for p in pods if oomkill.killed_container(p, "trainer")]
    assert len(killed) == 1 and len(pods) == 2, [(p["metadata"]["name"], p["status"].get("phase")) for p in pods]
    killed_name = killed[0]["metadata"]["name"]

    # The operator's step down, in the ConfigMap the replacement pod mounted...
    cm = kube.get(f"/api/v1/namespaces/{namespace}/configmaps/{NAME}-config")
    assert cm is not None and oomkill.ADJUSTED_AT_ANNOTATION in cm["metadata"]["annotations"]
    config = contract.TrainerConfig.model_validate_json(cm["data"][contract.CONFIG_KEY])
    assert [(a.by, a.from_.micro_batch, a.from_.grad_accum, a.to.micro_batch, a.to.grad_accum)
            for a in config.adjustments] == [("operator", 4, 1, 2, 2)]
    assert config.adjustments[0].reason == f"pod {killed_name} OOMKilled"
    # ...carried by the trainer into its report and so into the status,
    assert [(a["by"], a["to"]["microBatch"], a["to"]["gradAccum"]) for a in status.get("adjustments") or []] \
        == [("operator", 2, 2)], status.get("adjustments")
    # ...and told to whoever reads the events.
    events = kube.request("GET", f"/api/v1/namespaces/{namespace}/events",
                          query={"fieldSelector": f"involvedObject.name={NAME}"})["items"]
    oom = [e for e in events if e.get("reason") == "OutOfMemory"]
    assert len(oom) == 1 and killed_name in oom[0]["message"] and "micro-batch 2 x 2" in oom[0]["message"], oom
    kube.request("DELETE", ftj_url(namespace, NAME))
