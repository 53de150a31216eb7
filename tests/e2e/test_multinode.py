"""Two-node FineTuneJobs end to end: one Indexed Job with two pods that rendezvous through the headless
Service name (the pod runner maps pod 0's DNS name to 127.0.0.1), trained to Succeeded; then the same with
one pod's container SIGKILLed mid-training, which must still end Succeeded, resumed from the newest
complete checkpoint, without the surviving pod hanging. The kill test prints how long recovery took and
how many pod retries it cost (no timing is asserted: the bounds only detect a hang).

Runs with a real API server (KUBEBUILDER_ASSETS or `--e2e` with KUBECONFIG, see README.md). Both jobs use
the operator's rendezvous port (29500 by default) one after the other; they must not overlap.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import time
from typing import Any

import psutil
import pytest

from finetune_operator.contract import MARKER_NAME, REPORT_KEY
from finetune_operator.handlers import ftj_url
from finetune_operator.spec import FineTuneJob
from tests.e2e.conftest import OUTPUT_BUCKET, Operator, RunnerHandle, healthcare_manifest, wait_for
from tests.e2e.podrunner import COMPLETION_INDEX_ANNOTATION, Kube, kill_tree

pytestmark = pytest.mark.e2e

#: Seconds a surviving pod may take to exit (or rejoin) after its peer died. gloo's default collective
#: timeout is 30 minutes; anything near that is a hang, not a recovery.
SURVIVOR_BOUND = 180.0
KILL_STEPS = 24
#: The kill comes once this checkpoint is complete (with keep=2, an older one exists too, so resuming from
#: the newest is not the only choice), and before step KILL_STEPS - 4.
KILL_AFTER_CHECKPOINT = 6


def two_node_manifest(namespace: str, runner: RunnerHandle, model_uri: str, secret: str, name: str,
                      *, steps: int, backoff_limit: int) -> dict[str, Any]:
    """The derived example as a two-node job: 2 GPUs, at most 1 per node -> 2 pods of 1 GPU each (the runner
    ignores the GPU requests and runs each pod on CPU with one process)."""
    manifest = healthcare_manifest(namespace, runner.runner.node_name, model_uri, secret=secret)
    manifest["metadata"]["name"] = name
    spec = manifest["spec"]
    spec["output"]["uri"] = f"s3://{OUTPUT_BUCKET}/{name}/"
    spec["resources"].update({"gpus": 2, "gpusPerNode": 1})
    spec["hyperparameters"].update({"maxSteps": steps, "maxSeqLength": 128, "batchSize": 2})
    spec["backoffLimit"] = backoff_limit
    FineTuneJob.model_validate(manifest)
    return manifest


def ftj(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    return kube.get(ftj_url(namespace, name)) or {}


def phase_of(obj: dict[str, Any]) -> str | None:
    return (obj.get("status") or {}).get("phase")


def pods_of(kube: Kube, namespace: str, name: str) -> list[dict[str, Any]]:
    return kube.request("GET", f"/api/v1/namespaces/{namespace}/pods",
                        query={"labelSelector": f"finetune.dev/job={name},app.kubernetes.io/component=trainer"})["items"]


def index_of(pod: dict[str, Any]) -> int:
    return int(pod["metadata"]["annotations"][COMPLETION_INDEX_ANNOTATION])


def pod_log(runner: RunnerHandle, pod: dict[str, Any]) -> str:
    meta = pod["metadata"]
    pod_dir = runner.runner.workdir / "pods" / f"{meta['name']}-{meta['uid'][:8]}"
    return "".join(p.read_text(errors="replace") for p in sorted(pod_dir.glob("trainer.*.log")))


def s3_json(s3: Any, key: str) -> dict[str, Any] | None:
    client = s3.client()
    try:
        return json.loads(client.get_object(Bucket=OUTPUT_BUCKET, Key=key)["Body"].read())
    except client.exceptions.NoSuchKey:
        return None


def complete_checkpoints(s3: Any, name: str) -> list[int]:
    """Steps of the checkpoints under `<output>/checkpoints/` that have their `_COMPLETE` marker."""
    prefix = f"{name}/checkpoints/"
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=OUTPUT_BUCKET, Prefix=prefix)
    steps = set()
    for page in pages:
        for obj in page.get("Contents", []):
            match = re.fullmatch(re.escape(prefix) + r"step-(\d+)/" + MARKER_NAME, obj["Key"])
            if match:
                steps.add(int(match.group(1)))
    return sorted(steps)


def wait_terminal(kube: Kube, namespace: str, name: str, operator: Operator, runner: RunnerHandle) -> dict[str, Any]:
    def terminal() -> dict[str, Any] | None:
        operator.check_alive()
        runner.check_alive()
        obj = ftj(kube, namespace, name)
        return obj if phase_of(obj) in ("Succeeded", "Failed") else None

    return wait_for(f"FineTuneJob {namespace}/{name} to finish", terminal, interval=1.0)


# -- a clean two-node run -------------------------------------------------------------------------------


def test_two_node_job_trains_to_succeeded(kube: Kube, namespace: str, operator: Operator, pod_runner: RunnerHandle,
                                          s3: Any, s3_secret: str, model_uri: str) -> None:
    name = "two-node"
    manifest = two_node_manifest(namespace, pod_runner, model_uri, s3_secret, name, steps=4, backoff_limit=0)
    kube.request("POST", ftj_url(namespace), body=manifest)
    obj = wait_terminal(kube, namespace, name, operator, pod_runner)
    status = obj["status"]
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1)[-3000:]
    assert (status["plan"]["nodes"], status["plan"]["gpusPerNode"]) == (2, 1)

    job = kube.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}")
    assert job is not None
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    assert job["status"].get("succeeded") == 2 and not job["status"].get("failed"), job["status"]

    pods = pods_of(kube, namespace, name)
    assert sorted(index_of(p) for p in pods) == [0, 1], [p["metadata"]["name"] for p in pods]
    logs = {}
    for pod in pods:
        assert pod["status"]["phase"] == "Succeeded", pod["status"]
        assert pod_runner.runner.finished.get(pod["metadata"]["name"]) == "Succeeded"
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        # The pods were told to meet at pod 0's name through the headless Service (the runner maps it).
        assert env["FT_MAIN_ADDRESS"] == f"{name}-0.{name}.{namespace}.svc" and env["FT_NUM_MACHINES"] == "2"
        logs[index_of(pod)] = pod_log(pod_runner, pod)
    for index, text in logs.items():
        assert f"--num_machines 2 --machine_rank {index}" in text, text[-3000:]
        assert f"is_host={1 if index == 0 else 0}" in text and "--num_processes 2" in text

    report = s3_json(s3, f"{name}/{REPORT_KEY}")
    assert report is not None and report["phase"] == "complete" and report["worldSize"] == 2, report
    provenance = s3_json(s3, f"{name}/provenance.json")
    assert provenance is not None and provenance["worldSize"] == 2
    marker = s3_json(s3, f"{name}/{MARKER_NAME}")
    assert marker is not None and marker["count"] == len(marker["files"]) > 0
    kube.request("DELETE", ftj_url(namespace, name))


# -- one pod's container killed mid-training ------------------------------------------------------------


def _kill_and_recover(kube: Kube, namespace: str, operator: Operator, pod_runner: RunnerHandle, s3: Any,
                      s3_secret: str, model_uri: str, name: str, what: str) -> dict[str, Any]:
    """Run a two-node job, SIGKILL `what` ("container": pod 1's whole process group; "worker": pod 1's
    trainer process only) after a complete checkpoint and before the last step, and follow the recovery.
    Returns the figures (also printed)."""
    runner = pod_runner.runner
    manifest = two_node_manifest(namespace, pod_runner, model_uri, s3_secret, name, steps=KILL_STEPS,
                                 backoff_limit=6)
    kube.request("POST", ftj_url(namespace), body=manifest)

    def ready_to_kill() -> tuple[dict[str, Any], dict[str, Any], int] | None:
        operator.check_alive()
        pod_runner.check_alive()
        pods = {index_of(p): p for p in pods_of(kube, namespace, name)}
        if set(pods) != {0, 1} or not all(runner.pids(p["metadata"]["name"]) for p in pods.values()):
            return None
        done = complete_checkpoints(s3, name)
        report = s3_json(s3, f"{name}/{REPORT_KEY}") or {}
        if not done or done[-1] < KILL_AFTER_CHECKPOINT or report.get("step", 0) >= KILL_STEPS - 4:
            return None
        return pods[0], pods[1], done[-1]

    pod0, pod1, kill_ckpt = wait_for(f"{name}: both pods training with a complete checkpoint", ready_to_kill,
                                     interval=0.3)
    pod0_name, pod1_name = pod0["metadata"]["name"], pod1["metadata"]["name"]
    [pid] = runner.pids(pod1_name).values()
    if what == "container":
        # The container's whole process tree, as a runtime's kill of the cgroup (OOM kill, node loss), with
        # the runner's own kill (torchrun starts its workers in sessions of their own).
        kill_tree(pid)
    else:
        # Only the trainer process torchrun's agent started; the launcher and the agent stay.
        tree = psutil.Process(pid).children(recursive=True)
        victims = [p for p in tree if p.cmdline()[-2:] == ["-m", "finetune_trainer"]]  # not `--module ...`
        assert len(victims) == 1, [p.cmdline() for p in tree]
        for victim in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                victim.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    step_at_kill = (s3_json(s3, f"{name}/{REPORT_KEY}") or {}).get("step")

    # The surviving pod must not hang: its trainer exits (or rejoins a new group) within a bounded time.
    survivor_pid = next(iter(runner.pids(pod0_name).values()), None)

    def survivor_done() -> str | None:
        pod_runner.check_alive()
        if not runner.pids(pod0_name):
            return "exited"
        pods = [p for p in pods_of(kube, namespace, name) if p["metadata"]["name"] not in (pod0_name, pod1_name)]
        report = s3_json(s3, f"{name}/{REPORT_KEY}") or {}
        if pods and report.get("resumedFromStep") is not None:
            return "rejoined"
        return None

    survivor = wait_for(f"{name}: the surviving pod {pod0_name} to exit or rejoin", survivor_done,
                        timeout=SURVIVOR_BOUND, interval=0.3)
    survivor_seconds = time.monotonic() - killed_at
    # No process of the first attempt writes any more (rank 0, the only writer, is gone or restarting), so
    # the newest complete checkpoint now is the one a correct resume must start from.
    newest = (complete_checkpoints(s3, name) or [None])[-1]

    def progressing() -> dict[str, Any] | None:
        operator.check_alive()
        pod_runner.check_alive()
        report = s3_json(s3, f"{name}/{REPORT_KEY}") or {}
        resumed = report.get("resumedFromStep")
        if resumed is not None and (report.get("step") or 0) > resumed:
            return report
        if phase_of(ftj(kube, namespace, name)) == "Failed":
            raise AssertionError(f"{name} failed: {ftj(kube, namespace, name).get('status')}")
        return None

    resumed_report = wait_for(f"{name}: training to progress again after the kill", progressing, interval=0.3)
    progress_seconds = time.monotonic() - killed_at
    obj = wait_terminal(kube, namespace, name, operator, pod_runner)
    succeeded_seconds = time.monotonic() - killed_at

    job = kube.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}") or {}
    pods = pods_of(kube, namespace, name)
    survivor_pod = next((p for p in pods if p["metadata"]["name"] == pod0_name), {})
    survivor_state = ((survivor_pod.get("status") or {}).get("containerStatuses") or [{}])[0].get("state", {})
    figures = {
        "what": what,
        "phase": phase_of(obj),
        "checkpoint_at_kill": kill_ckpt,
        "newest_checkpoint_after_failure": newest,
        "step_at_kill": step_at_kill,
        "resumed_from": resumed_report["resumedFromStep"],
        "survivor": survivor,
        "survivor_pid": survivor_pid,
        "survivor_exit": survivor_state.get("terminated", {}).get("exitCode"),
        "survivor_seconds": round(survivor_seconds, 1),
        "progress_seconds": round(progress_seconds, 1),
        "succeeded_seconds": round(succeeded_seconds, 1),
        "job_failed": job.get("status", {}).get("failed", 0),
        "job_succeeded": job.get("status", {}).get("succeeded", 0),
        "pods_created": len(pods),
        "pods_by_index": {i: sorted(p["status"].get("phase", "?") for p in pods if index_of(p) == i) for i in (0, 1)},
        "pod0": pod0_name,
        "pod1": pod1_name,
        "pods": pods,
    }
    return figures


def _check_recovered(s3: Any, pod_runner: RunnerHandle, name: str, figures: dict[str, Any]) -> None:
    assert figures["phase"] == "Succeeded", figures
    resumed = figures["resumed_from"]
    # Resumed from the newest complete checkpoint (the newest once the first attempt had stopped, at least
    # the one seen before the kill), the new pods' logs say they loaded it, and metrics.jsonl (restored from
    # the checkpoint, then appended) has every step exactly once.
    assert figures["checkpoint_at_kill"] <= resumed == figures["newest_checkpoint_after_failure"], figures
    new_pods = [p for p in figures["pods"] if p["metadata"]["name"] not in (figures["pod0"], figures["pod1"])]
    assert new_pods, "no replacement pod was created"
    resumed_logs = [pod_log(pod_runner, p) for p in new_pods]
    assert any(f"checkpoints/step-{resumed}" in text and "resuming from" in text for text in resumed_logs), \
        [t[-2000:] for t in resumed_logs]
    client = s3.client()
    metrics = client.get_object(Bucket=OUTPUT_BUCKET, Key=f"{name}/metrics.jsonl")["Body"].read().decode()
    records = [json.loads(line) for line in metrics.splitlines() if line.strip()]
    steps = [r["step"] for r in records if "loss" in r]  # training steps (eval_loss lines repeat a step)
    assert steps == sorted(set(steps)) and steps[-1] == KILL_STEPS, steps
    report = s3_json(s3, f"{name}/{REPORT_KEY}") or {}
    assert report.get("phase") == "complete" and report.get("worldSize") == 2, report
    assert s3_json(s3, f"{name}/{MARKER_NAME}") is not None


def _print(capsys: pytest.CaptureFixture[str], figures: dict[str, Any]) -> None:
    shown = {k: v for k, v in figures.items() if k not in ("pods",)}
    with capsys.disabled():
        print(f"\n[multinode kill] {json.dumps(shown)}")
        print(f"[multinode kill] recovery ({figures['what']} of pod index 1 SIGKILLed at step "
              f"{figures['step_at_kill']}, newest complete checkpoint step {figures['checkpoint_at_kill']}): "
              f"survivor {figures['survivor']} after {figures['survivor_seconds']}s (exit code "
              f"{figures['survivor_exit']}); training progressing again from step {figures['resumed_from']} "
              f"after {figures['progress_seconds']}s; Succeeded after {figures['succeeded_seconds']}s; "
              f"pod retries: Job status.failed={figures['job_failed']}, pods created={figures['pods_created']} "
              f"for 2 indexes")


def test_killed_pod_container_recovers(kube: Kube, namespace: str, operator: Operator, pod_runner: RunnerHandle,
                                       s3: Any, s3_secret: str, model_uri: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    name = "kill-container"
    figures = _kill_and_recover(kube, namespace, operator, pod_runner, s3, s3_secret, model_uri, name, "container")
    _print(capsys, figures)
    _check_recovered(s3, pod_runner, name, figures)
    kube.request("DELETE", ftj_url(namespace, name))


def test_killed_worker_recovers(kube: Kube, namespace: str, operator: Operator, pod_runner: RunnerHandle,
                                s3: Any, s3_secret: str, model_uri: str, capsys: pytest.CaptureFixture[str]) -> None:
    name = "kill-worker"
    figures = _kill_and_recover(kube, namespace, operator, pod_runner, s3, s3_secret, model_uri, name, "worker")
    _print(capsys, figures)
    _check_recovered(s3, pod_runner, name, figures)
    kube.request("DELETE", ftj_url(namespace, name))

