"""A two-node FineTuneJob on a real node: one Indexed Job, two pods (on the one node), which find each other
through the headless Service's DNS names (`<job>-0.<job>.<ns>.svc`, published by the cluster DNS about a
second after each pod starts) and train as one world of two processes (gloo) to Succeeded."""

from __future__ import annotations

import json
import re

from tests.node.conftest import (
    ML_NAMESPACE,
    Installed,
    delete_job,
    diagnose,
    tiny_manifest,
    trainer_pods,
    wait_for,
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


def test_a_killed_worker_is_recovered_from_the_newest_checkpoint(installed: Installed) -> None:
    """Pod 1's trainer process SIGKILLed mid-run (its launcher and torchrun's agent stay): the peer does not
    hang, the Job replaces the failed pods, and the group resumes from the newest complete checkpoint."""
    cluster = installed.cluster
    name = "killed-worker"
    steps = 600
    manifest = tiny_manifest(name, maxSteps=steps, batchSize=2, maxSeqLength=128)
    manifest["spec"]["resources"] = {"gpus": 2, "gpusPerNode": 1}
    manifest["spec"]["checkpoint"] = {"everySteps": 100, "keep": 2}
    manifest["spec"]["backoffLimit"] = 6
    cluster.apply(manifest, ML_NAMESPACE)
    try:
        report = wait_for(f"{name}: a complete checkpoint, well before the end", lambda: (
            r := installed.report(name)) and r.get("checkpoints") and r.get("step", 0) < steps - 200 and r,
            interval=0.3)
        checkpoint = max(c["step"] for c in report["checkpoints"])
        (pod1,) = [p for p in trainer_pods(cluster, name)
                   if p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "1"
                   and p["status"].get("phase") == "Running"]
        kill = ("import os, signal, psutil\n"
                "victims = [p for p in psutil.process_iter(['cmdline'])"
                " if (p.info['cmdline'] or [])[-2:] == ['-m', 'finetune_trainer']]\n"
                "assert len(victims) == 1, [p.info['cmdline'] for p in psutil.process_iter(['cmdline'])]\n"
                "os.kill(victims[0].pid, signal.SIGKILL)\n")
        cluster.kubectl("-n", ML_NAMESPACE, "exec", pod1["metadata"]["name"], "--", "python", "-c", kill)
        obj = wait_phase(cluster, name)
        assert obj["status"]["phase"] == "Succeeded", diagnose(cluster, name)
        later = [p for p in trainer_pods(cluster, name)
                 if p["metadata"]["creationTimestamp"] > pod1["metadata"]["creationTimestamp"]]
        assert later, "no replacement pod"
        log = "\n".join(cluster.logs(ML_NAMESPACE, p["metadata"]["name"]) for p in later)
        resumed = [int(s) for s in re.findall(r"resuming from \S*/checkpoints/step-(\d+)\b", log)]
        assert resumed and min(resumed) >= checkpoint, (checkpoint, resumed, log[-3000:])
        final = installed.report(name)
        assert final is not None and final["step"] == steps and final.get("worldSize") == 2
    finally:
        delete_job(cluster, name)
