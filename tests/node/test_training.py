"""FineTuneJobs on a real node, in the README's namespace `ml` (Pod Security `restricted` enforced): pre-flight
and training pods from the trainer image, progress in status while running, `kubectl logs`, artifacts in S3;
a training pod deleted mid-run; `suspend: true` mid-run; and a pre-flight failure on bad data.

Every pod here is a container of the image `make images` built, run by the kubelet under the restricted
profile (non-root, read-only root filesystem, no privilege escalation, all capabilities dropped), so what an
image, a securityContext or a signal really does is what is tested.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import pytest

from finetune_operator.contract import MARKER_NAME, REPORT_KEY
from tests.node.conftest import (
    ML_NAMESPACE,
    OUTPUT_BUCKET,
    TRAINER_IMAGE,
    Installed,
    delete_job,
    diagnose,
    ftj,
    tiny_manifest,
    trainer_pods,
    wait_for,
    wait_phase,
    write_manifest,
)

NAME = "healthcare-assistant"  # the example's name: the README's commands apply it as written
#: The tiny model's steps take milliseconds: enough of them that the status (refreshed every 2 s) shows
#: progress before the end.
STEPS = 600


def _progress_step(obj: dict[str, Any]) -> int:
    return int(((obj.get("status") or {}).get("progress") or {}).get("step") or 0)


@dataclass
class ExampleRun:
    obj: dict[str, Any]  # the FineTuneJob at its end
    steps_seen_running: list[int]  # status.progress.step each time the job was seen Running
    watched: str  # what the README's `kubectl get ftj -w` printed meanwhile


@pytest.fixture(scope="module")
def example(installed: Installed) -> ExampleRun:
    """The README's `kubectl apply` of the example (its tiny variant) and `kubectl get ftj -w`, to the end."""
    cluster = installed.cluster
    manifest = write_manifest(installed, tiny_manifest(NAME, maxSteps=STEPS))
    installed.run_readme(installed.apply_command, manifest=manifest)
    # The README's `kubectl get ftj -w`, as written, for the length of the run.
    watch = subprocess.Popen(["kubectl", *shlex.split(installed.watch_command)[1:]], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env={**os.environ, **cluster.env()})
    try:
        seen_running: list[int] = []

        def done() -> dict[str, Any] | None:
            obj = ftj(cluster, NAME)
            phase = (obj.get("status") or {}).get("phase")
            if phase == "Running" and _progress_step(obj):
                seen_running.append(_progress_step(obj))
            return obj if phase in ("Succeeded", "Failed") else None

        obj = wait_for(f"{NAME} to finish", done, interval=0.5)
    finally:
        watch.terminate()
        watched = watch.communicate(timeout=10)[0]
    return ExampleRun(obj, seen_running, watched)


def test_the_readme_example_succeeds_in_a_restricted_namespace(installed: Installed, example: ExampleRun) -> None:
    cluster = installed.cluster
    namespace = cluster.get("namespace", ML_NAMESPACE)
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    obj, seen_running, watched = example.obj, example.steps_seen_running, example.watched
    status = obj["status"]
    assert status["phase"] == "Succeeded", diagnose(cluster, NAME)
    # Progress reached the status while the pod trained, not only at the end.
    assert seen_running and min(seen_running) < STEPS, (seen_running, status.get("progress"))
    assert status["progress"]["step"] == STEPS
    assert re.search(rf"^{NAME}\s", watched, re.M) and "Succeeded" in watched, watched

    # The pre-flight pod and the training pod ran the trainer image the node loaded.
    pods = cluster.pods(ML_NAMESPACE, f"finetune.dev/job={NAME}")
    assert {p["metadata"]["labels"].get("app.kubernetes.io/component") for p in pods} >= {"trainer"}
    assert len(pods) >= 2, [p["metadata"]["name"] for p in pods]
    for pod in pods:
        (cs,) = pod["status"]["containerStatuses"]
        assert pod["spec"]["containers"][0]["image"] == TRAINER_IMAGE
        assert cs["imageID"].rsplit("@", 1)[-1] == cluster.image_ids[TRAINER_IMAGE]
        assert cs["state"]["terminated"]["exitCode"] == 0, cs
    # `kubectl logs` reads the trainer's log (the README's command).
    log = cluster.kubectl("-n", ML_NAMESPACE, "logs", f"job/{NAME}").stdout
    assert "step" in log and "finetune" in log.lower(), log[-2000:]

    # The artifacts: the marker, written last, lists every file at its size.
    keys = installed.keys(OUTPUT_BUCKET, f"{NAME}/")
    assert MARKER_NAME in keys and REPORT_KEY in keys, sorted(keys)
    marker = installed.read_json(OUTPUT_BUCKET, f"{NAME}/{MARKER_NAME}")
    listed = marker["files"]
    assert listed, marker
    for entry in listed:
        assert keys.get(entry["path"]) == entry["size"], entry
    assert {"metrics.jsonl", "evaluation.json", "provenance.json", "README.md"} <= set(keys)
    assert status["evaluation"]["tuned"]["accuracy"] is not None, status["evaluation"]


def test_restricted_namespace_refuses_a_non_compliant_training_pod(installed: Installed,
                                                                   example: ExampleRun) -> None:
    """Enforcement is on: the operator's training pod is admitted; a copy running as root is refused."""
    cluster = installed.cluster
    job = cluster.get("job", "-n", ML_NAMESPACE, NAME)
    assert job is not None, f"no Job {NAME} (the example's training Job, kept for its TTL)"
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "psa-probe", "namespace": ML_NAMESPACE},
           "spec": {**job["spec"]["template"]["spec"], "restartPolicy": "Never"}}
    compliant = cluster.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(pod), check=False)
    assert compliant.returncode == 0, compliant.stderr
    pod["spec"]["securityContext"] = {}
    for container in pod["spec"]["containers"]:
        container["securityContext"] = {"runAsUser": 0}
    refused = cluster.kubectl("create", "-f", "-", input=json.dumps(pod), check=False)
    assert refused.returncode != 0, "the restricted namespace admitted a root pod"
    assert "violates PodSecurity" in refused.stderr and "restricted" in refused.stderr, refused.stderr


def test_the_default_policy_refuses_what_a_finetunejob_may_not_ask_for(installed: Installed,
                                                                       example: ExampleRun) -> None:
    """The chart's default FineTunePolicy, as installed by the README's commands, on this cluster's API server:
    a foreign image and a key-less toleration are refused at admission, naming the field and the policy;
    the example's own pods carry the memory limit, disk request and bounded /tmp the operator renders."""
    cluster = installed.cluster
    for field, change in (("spec.image", {"image": "evil.example.com/miner:1"}),
                          ("spec.resources.tolerations", {"resources": {"tolerations": [{"operator": "Exists"}]}})):
        manifest = tiny_manifest("policy-probe")
        manifest["spec"].update(change)
        refused = cluster.kubectl("-n", ML_NAMESPACE, "create", "-f", "-", input=json.dumps(manifest), check=False)
        assert refused.returncode != 0, f"{field}: admitted"
        assert f"{field}:" in refused.stderr and "FineTunePolicy default" in refused.stderr, refused.stderr
    job = cluster.get("job", "-n", ML_NAMESPACE, NAME)
    assert job is not None
    spec = job["spec"]["template"]["spec"]
    resources = spec["containers"][0]["resources"]
    assert resources["limits"]["memory"] and resources["requests"]["ephemeral-storage"], resources
    assert all("sizeLimit" in v["emptyDir"] for v in spec["volumes"] if "emptyDir" in v), spec["volumes"]
    assert cluster.get("networkpolicy", "-n", ML_NAMESPACE, NAME) is not None


def _interrupt_and_resume(installed: Installed, name: str, interrupt: Any, resume: Any) -> None:
    """Run `name` until it reported a few steps, `interrupt` it, `resume` it; check it continued from the
    checkpoint the interruption wrote, with one FineTuneJob and one result."""
    cluster = installed.cluster
    steps = 1500  # a few tens of seconds of training: time to interrupt it mid-run
    manifest = tiny_manifest(name, maxSteps=steps)
    manifest["spec"]["checkpoint"] = {"everySteps": 1000, "keep": 2}  # only the interruption checkpoints
    manifest["spec"]["backoffLimit"] = 2
    cluster.apply(manifest, ML_NAMESPACE)
    try:
        # The trainer's own report in S3 (what the operator copies into the status every 2 s), read at once.
        report = wait_for(f"{name}'s trainer to report steps", lambda: (r := installed.report(name)) and
                          r.get("step", 0) >= 20 and r, interval=0.2)
        (first,) = [p for p in trainer_pods(cluster, name) if not p["metadata"].get("deletionTimestamp")]
        at = report["step"]
        sys.stderr.write(f"[node] {name}: interrupting {first['metadata']['name']} at step {at}\n")
        interrupt(first)
        resume()
        done = wait_phase(cluster, name)
        assert done["status"]["phase"] == "Succeeded", diagnose(cluster, name)
        pods = trainer_pods(cluster, name)
        later = [p for p in pods if p["metadata"]["name"] != first["metadata"]["name"]]
        assert later, [p["metadata"]["name"] for p in pods]
        log = "\n".join(cluster.logs(ML_NAMESPACE, p["metadata"]["name"]) for p in later)
        # The replacement resumed from the checkpoint the interrupted pod wrote on SIGTERM, within its grace
        # period: at or after the last step it had reported, before the run's end (the run checkpoints on
        # its own only at 1000 steps and at the end).
        resumed = re.search(r"resuming from \S*/checkpoints/step-(\d+)\b", log)
        assert resumed, log[-3000:]
        assert at <= int(resumed.group(1)) < 1000, (at, resumed.group(0))
        # Step and loss continue: the replacement's first logged step follows the checkpoint.
        metrics = [json.loads(line) for line in installed.s3_client().get_object(
            Bucket=OUTPUT_BUCKET, Key=f"{name}/metrics.jsonl")["Body"].read().decode().splitlines() if line]
        train_steps = [m["step"] for m in metrics if "loss" in m and "step" in m]
        assert train_steps == sorted(set(train_steps)) and train_steps[-1] == steps, train_steps
        assert done["status"]["progress"]["step"] == steps
        assert len([o for o in (cluster.get("finetunejobs.finetune.dev", "-n", ML_NAMESPACE) or {})["items"]
                    if o["metadata"]["name"] == name]) == 1
        assert MARKER_NAME in installed.keys(OUTPUT_BUCKET, f"{name}/")
    finally:
        delete_job(cluster, name)


def test_a_deleted_training_pod_is_replaced_and_resumes(installed: Installed) -> None:
    cluster = installed.cluster

    def delete(pod: dict[str, Any]) -> None:
        cluster.kubectl("-n", ML_NAMESPACE, "delete", "pod", pod["metadata"]["name"], "--wait=false")

    _interrupt_and_resume(installed, "deleted-pod", delete, lambda: None)


def test_suspend_checkpoints_within_the_grace_period_and_resumes(installed: Installed) -> None:
    cluster = installed.cluster
    name = "suspended"

    def suspend(pod: dict[str, Any]) -> None:
        cluster.kubectl("-n", ML_NAMESPACE, "patch", "finetunejobs.finetune.dev", name, "--type=merge",
                        "-p", '{"spec": {"suspend": true}}')
        started = time.monotonic()
        wait_for(f"{name}'s pod to end", lambda: not [
            p for p in trainer_pods(cluster, name) if p["metadata"]["name"] == pod["metadata"]["name"]
            and p["status"].get("phase") == "Running"], timeout=120, interval=0.5)
        grace = pod["spec"]["terminationGracePeriodSeconds"]
        assert time.monotonic() - started < grace + 10
        obj = wait_phase(cluster, name, ("Suspended",), timeout=120)
        assert obj["status"]["phase"] == "Suspended"

    def resume() -> None:
        cluster.kubectl("-n", ML_NAMESPACE, "patch", "finetunejobs.finetune.dev", name, "--type=merge",
                        "-p", '{"spec": {"suspend": false}}')

    _interrupt_and_resume(installed, name, suspend, resume)


@pytest.mark.parametrize("bad_row", ['{"instruction": "Summarize the note.", "output": 3}'])
def test_bad_data_fails_in_the_preflight_without_a_training_pod(installed: Installed, bad_row: str) -> None:
    cluster = installed.cluster
    name = "bad-data"
    client = installed.s3_client()
    good = client.get_object(Bucket="healthcare-data", Key="instructions/train.jsonl")["Body"].read().decode()
    client.put_object(Bucket="healthcare-data", Key="instructions/bad.jsonl", Body=(good + bad_row + "\n").encode())
    manifest = tiny_manifest(name)
    manifest["spec"]["dataset"]["train"] = "s3://healthcare-data/instructions/bad.jsonl"
    cluster.apply(manifest, ML_NAMESPACE)
    try:
        obj = wait_phase(cluster, name)
        status = obj["status"]
        assert status["phase"] == "Failed", json.dumps(status, indent=1)
        conditions = {c["type"]: c for c in status["conditions"]}
        failed = [c for c in conditions.values() if c.get("reason") == "DataInvalid"]
        assert failed, json.dumps(status["conditions"], indent=1)
        line = len(good.splitlines()) + 1
        assert f"line {line}" in failed[0]["message"] or f":{line}" in failed[0]["message"], failed[0]["message"]
        assert not trainer_pods(cluster, name), "a training pod was created for data that failed the pre-flight"
        assert cluster.get("job", "-n", ML_NAMESPACE, name) is None
    finally:
        delete_job(cluster, name)


def test_deleting_the_finetunejob_collects_its_children(installed: Installed, example: ExampleRun) -> None:
    """Last in this module (the tests above read the example's Job): the garbage collector removes the
    ConfigMap, Service, Jobs and pods the FineTuneJob owns; the artifacts in S3 stay."""
    cluster = installed.cluster
    uid = example.obj["metadata"]["uid"]
    owned = {kind: cluster.get(kind, "-n", ML_NAMESPACE, name) for kind, name in (
        ("configmap", f"{NAME}-config"), ("service", NAME), ("job", NAME), ("job", f"{NAME}-preflight"))}
    for kind, obj in owned.items():
        assert obj is not None, kind
        (ref,) = obj["metadata"]["ownerReferences"]
        assert (ref["uid"], ref["controller"]) == (uid, True), (kind, ref)
    cluster.kubectl("-n", ML_NAMESPACE, "delete", "finetunejobs.finetune.dev", NAME)

    def collected() -> bool:
        left = [kind for kind, name in (("configmap", f"{NAME}-config"), ("service", NAME), ("job", NAME),
                                        ("job", f"{NAME}-preflight"))
                if cluster.get(kind, "-n", ML_NAMESPACE, name) is not None]
        return not left and not cluster.pods(ML_NAMESPACE, f"finetune.dev/job={NAME}")

    wait_for(f"the garbage collector to remove {NAME}'s children and pods", collected, timeout=180)
    assert MARKER_NAME in installed.keys(OUTPUT_BUCKET, f"{NAME}/")
