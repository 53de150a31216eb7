"""A two-node FineTuneJob on a real node: one Indexed Job, two pods (on the one node), which find each other
through the headless Service's DNS names (`<job>-0.<job>.<ns>.svc`, published by the cluster DNS about a
second after each pod starts) and train as one world of two processes (gloo) to Succeeded."""

from __future__ import annotations

import json

from tests.node.conftest import (
    ML_NAMESPACE,
    Installed,
    delete_job,
    diagnose,
    tiny_manifest,
    trainer_pods,
    wait_phase,
)

NAME = "two-nodes"


def test_two_pods_rendezvous_through_the_headless_service(installed: Installed) -> None:
    cluster = installed.cluster
    manifest = tiny_manifest(NAME, maxSteps=8, batchSize=2, maxSeqLength=128)
    manifest["spec"]["resources"] = {"gpus": 2, "gpusPerNode": 1}
    cluster.apply(manifest, ML_NAMESPACE)
    try:
        obj = wait_phase(cluster, NAME)
        status = obj["status"]
        assert status["phase"] == "Succeeded", diagnose(cluster, NAME)
        assert (status["plan"]["nodes"], status["plan"]["gpusPerNode"]) == (2, 1)
        job = cluster.get("job", "-n", ML_NAMESPACE, NAME)
        assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 2
        assert job["status"].get("succeeded") == 2 and not job["status"].get("failed"), job["status"]
        service = cluster.get("service", "-n", ML_NAMESPACE, NAME)
        assert service["spec"]["clusterIP"] == "None" and service["spec"].get("publishNotReadyAddresses")
        pods = trainer_pods(cluster, NAME)
        assert sorted(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for p in pods) \
            == ["0", "1"]
        assert len({p["status"]["podIP"] for p in pods}) == 2  # two network namespaces, not loopback
        report = installed.report(NAME)
        assert report is not None and report.get("worldSize") == 2, json.dumps(report, indent=1)[:2000]
    finally:
        delete_job(cluster, NAME)
