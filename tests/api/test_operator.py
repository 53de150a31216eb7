"""The operator loop end to end: the real kopf handlers against kmock's Kubernetes emulator.

The tests play the cluster's controllers themselves (Job controller, kubelet, Kueue, garbage collector)
by patching objects through the API, and assert on what the operator leaves in the API: children,
status, conditions and events. Waits poll for an outcome and never assert on timing.
"""

from __future__ import annotations

import json
import socket
import urllib.request
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from finetune_operator import render
from finetune_operator.contract import REPORT_KEY
from finetune_operator.settings import OperatorSettings
from finetune_operator.sizing import plan as size
from finetune_operator.spec import FineTuneJob
from tests.api.conftest import FTJ, NAMESPACE, UID, Cluster, ftj_manifest, operator, wait_for

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
SELECTOR = f"{render.LABEL_JOB}=demo"


def status(cluster: Cluster, name: str = "demo") -> dict[str, Any]:
    return dict((cluster.get(FTJ, name) or {}).get("status") or {})


def condition(cluster: Cluster, type_: str, name: str = "demo") -> dict[str, Any] | None:
    for cond in status(cluster, name).get("conditions") or []:
        if cond["type"] == type_:
            return dict(cond)
    return None


def phase_is(cluster: Cluster, phase: str, name: str = "demo") -> Any:
    return lambda: status(cluster, name) if status(cluster, name).get("phase") == phase else None


def reasons(cluster: Cluster, name: str = "demo") -> list[tuple[str, str]]:
    return [(e["type"], e["reason"]) for e in cluster.events(name)]


def start_pod(cluster: Cluster, index: int = 0, name: str = "demo") -> None:
    """Play the Job controller and kubelet: the Job starts (startTime), then one training pod runs."""
    cluster.patch("batch/v1/jobs", name, {"status": {"active": 1, "startTime": "2026-01-01T00:00:00Z"}}, sub="status")
    cluster.create(
        "v1/pods",
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{name}-{index}-abcde",
                "labels": {render.LABEL_JOB: name, render.LABEL_COMPONENT: render.COMPONENT_TRAINER},
            },
            "status": {"phase": "Running"},
        },
    )
    cluster.patch("batch/v1/jobs", name, {"status": {"ready": 1}}, sub="status")


def finish_job(cluster: Cluster, type_: str, reason: str = "", message: str = "", name: str = "demo") -> None:
    cond = {"type": type_, "status": "True", "reason": reason, "message": message,
            "lastTransitionTime": "2026-01-01T01:00:00Z"}
    extra = {"completionTime": "2026-01-01T01:00:00Z", "succeeded": 1} if type_ == "Complete" else {"failed": 1}
    cluster.patch("batch/v1/jobs", name, {"status": {"conditions": [cond], "active": 0, "ready": 0, **extra}}, sub="status")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


def rendered(uid: str = UID, **spec: Any) -> list[dict[str, Any]]:
    job = FineTuneJob.model_validate(ftj_manifest(uid=uid, **spec))
    return render.render_children(job, size(job.spec), OperatorSettings.from_env())


# --------------------------------------------------------------------------------------------------


def test_create_runs_to_succeeded(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    monkeypatch.setenv("FT_METRICS_PORT", str(port))
    with operator():
        cluster.create(FTJ, ftj_manifest())

        # Children, each controlled by the FineTuneJob (garbage-collected with it).
        job = wait_for(lambda: cluster.get("batch/v1/jobs", "demo"), "the Job")
        config_map = cluster.get("v1/configmaps", "demo-config")
        service = cluster.get("v1/services", "demo")
        assert config_map is not None and service is not None
        for child in (config_map, service, job):
            (owner,) = child["metadata"]["ownerReferences"]
            assert owner == {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "name": "demo",
                             "uid": UID, "controller": True, "blockOwnerDeletion": True}
        assert job["spec"]["suspend"] is False
        assert "job.json" in config_map["data"]

        pending = wait_for(phase_is(cluster, "Pending"), "phase Pending")
        assert pending["plan"]["method"] == "qlora" and pending["plan"]["gpus"] == 1
        assert {c["type"]: c["status"] for c in pending["conditions"]} == {
            "Valid": "True", "Planned": "True", "Created": "True", "Running": "False"}
        assert condition(cluster, "Created")["reason"] == "ChildrenCreated"

        start_pod(cluster)
        running = wait_for(phase_is(cluster, "Running"), "phase Running")
        assert running["startTime"] == "2026-01-01T00:00:00Z"
        assert condition(cluster, "Running")["status"] == "True"

        finish_job(cluster, "Complete", "CompletionsReached")
        done = wait_for(phase_is(cluster, "Succeeded"), "phase Succeeded")
        complete = condition(cluster, "Complete")
        assert complete is not None and complete["status"] == "True" and complete["reason"] == "TrainingSucceeded"
        assert condition(cluster, "Running")["status"] == "False"
        assert done["completionTime"] == "2026-01-01T01:00:00Z"
        assert done["observedGeneration"] == 1

        events = wait_for(
            lambda: reasons(cluster) if ("Normal", "TrainingSucceeded") in reasons(cluster) else None,
            "the Succeeded event",
        )
        assert ("Normal", "Running") in events
        assert wait_for(lambda: 'finetune_operator_jobs{phase="Succeeded"} 1.0' in scrape(port), "the jobs gauge")
        text = scrape(port)
        assert 'finetune_operator_children_total{action="created"} 4.0' in text
        assert "finetune_operator_reconcile_duration_seconds_count" in text

        # A finished job is never re-created, even when its Job is deleted (ttlSecondsAfterFinished).
        cluster.delete("batch/v1/jobs", "demo")
        cluster.create(FTJ, ftj_manifest("marker", uid=None))  # a later job proves the loop went on
        wait_for(lambda: cluster.get("batch/v1/jobs", "marker"), "the marker's Job")
        wait_for(phase_is(cluster, "Pending", "marker"), "the marker's status")
        assert cluster.get("batch/v1/jobs", "demo") is None
        assert status(cluster)["phase"] == "Succeeded"


def test_invalid_spec_creates_nothing(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FT_LOG_FORMAT", "json")
    with operator() as runner:
        # Cross-field rule (passes the CRD's OpenAPI schema) and an unknown field (a typo).
        cluster.create(FTJ, ftj_manifest("mixed", uid=None, method="lora", quantization={"bits": 4}))
        cluster.create(FTJ, ftj_manifest("typo", uid=None, hyperparameters={"learningRte": 0.1}))

        for name, field in (("mixed", "spec.quantization"), ("typo", "spec.hyperparameters.learningRte")):
            st = wait_for(phase_is(cluster, "Failed", name), f"{name} failing")
            valid = next(c for c in st["conditions"] if c["type"] == "Valid")
            failed = next(c for c in st["conditions"] if c["type"] == "Failed")
            assert valid["status"] == "False" and valid["reason"] == "InvalidSpec"
            assert field in valid["message"], valid["message"]
            assert failed["status"] == "True" and failed["reason"] == "InvalidSpec"
            assert "plan" not in st
            wait_for(lambda n=name: ("Warning", "InvalidSpec") in reasons(cluster, n), f"{name}'s Warning event")

        assert cluster.list("batch/v1/jobs") == []
        assert cluster.list("v1/configmaps") == []
        assert cluster.list("v1/services") == []
    # Structured logs: one JSON object per line.
    started = [json.loads(line) for line in runner.output.splitlines() if "finetune-operator started" in line]
    assert started and started[-1]["message"].startswith("finetune-operator started")


def test_unplannable_spec_fails_with_planning_failed(cluster: Cluster) -> None:
    with operator():
        cluster.create(FTJ, ftj_manifest(resources={"gpus": 3, "gpusPerNode": 2}))
        st = wait_for(phase_is(cluster, "Failed"), "phase Failed")
        planned = condition(cluster, "Planned")
        assert planned is not None and planned["reason"] == "PlanningFailed"
        assert "spec.resources.gpus" in planned["message"]
        assert condition(cluster, "Failed")["reason"] == "PlanningFailed"
        assert condition(cluster, "Valid")["status"] == "True"
        assert "plan" not in st
        assert cluster.list("batch/v1/jobs") == []


def test_existing_children_with_our_owner_are_adopted(cluster: Cluster) -> None:
    config_map, service, _, job = rendered()  # the NetworkPolicy is left for the operator to create
    config_map["data"] = {"job.json": "{}"}  # a snapshot is never rewritten under a job
    del service["metadata"]["labels"][render.LABEL_MANAGED_BY]
    service["spec"]["selector"] = {"stale": "selector"}
    originals = [cluster.create(r, o) for r, o in (("v1/configmaps", config_map), ("v1/services", service),
                                                   ("batch/v1/jobs", job))]

    cluster.stale_read("configmaps")  # the operator's first read misses it: its create gets a 409
    with operator():
        cluster.create(FTJ, ftj_manifest())
        created = wait_for(lambda: condition(cluster, "Created"), "the Created condition")
        assert created["status"] == "True" and created["reason"] == "AdoptedChildren", created
        assert cluster.stale_reads_left == set()
        assert "ConfigMap/demo-config" in created["message"] and "Job/demo" in created["message"]

    after = [cluster.get(r, n) for r, n in (("v1/configmaps", "demo-config"), ("v1/services", "demo"),
                                            ("batch/v1/jobs", "demo"))]
    assert [a["metadata"]["uid"] for a in after] == [o["metadata"]["uid"] for o in originals]
    assert after[0]["data"] == {"job.json": "{}"}
    assert after[1]["metadata"]["labels"][render.LABEL_MANAGED_BY] == render.MANAGED_BY
    assert after[1]["spec"]["selector"] == {render.LABEL_JOB: "demo", render.LABEL_COMPONENT: "trainer"}
    assert len(cluster.list("batch/v1/jobs")) == 1


def test_foreign_child_is_left_alone_until_removed(cluster: Cluster) -> None:
    foreign = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "demo-config",
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "someone-else",
                                 "uid": "99999999-0000-4000-8000-000000000000", "controller": True}],
        },
        "data": {"theirs": "yes"},
    }
    before = cluster.create("v1/configmaps", foreign)
    cluster.stale_read("configmaps")  # found through the 409 of the operator's create
    with operator():
        cluster.create(FTJ, ftj_manifest())
        created = wait_for(
            lambda: (c := condition(cluster, "Created")) and c["reason"] == "ForeignChild" and c, "ForeignChild"
        )
        assert created["status"] == "False"
        assert "Deployment someone-else" in created["message"] and "demo-config" in created["message"]
        assert status(cluster)["phase"] == "Pending"
        assert cluster.stale_reads_left == set()
        wait_for(lambda: ("Warning", "ForeignChild") in reasons(cluster), "the ForeignChild event")
        assert cluster.get("v1/configmaps", "demo-config") == before  # untouched
        assert cluster.get("v1/services", "demo") is None and cluster.get("batch/v1/jobs", "demo") is None

        # Once the conflicting object is gone, the operator converges on its own.
        cluster.delete("v1/configmaps", "demo-config")
        wait_for(lambda: cluster.get("batch/v1/jobs", "demo"), "the Job after the conflict is resolved")
        created = wait_for(lambda: (c := condition(cluster, "Created")) and c["status"] == "True" and c, "Created")
        assert created["reason"] == "ChildrenCreated"
        cm = cluster.get("v1/configmaps", "demo-config")
        assert cm["metadata"]["ownerReferences"][0]["uid"] == UID
    assert ("Warning", "ForeignChild") in reasons(cluster)
    assert sum(1 for r in reasons(cluster) if r == ("Warning", "ForeignChild")) == 1  # not once per pass


def test_restart_in_the_middle_of_a_reconcile_converges(cluster: Cluster) -> None:
    cluster.fail_creates("services")  # the API server fails after the ConfigMap was created
    with operator():
        cluster.create(FTJ, ftj_manifest())
        first = wait_for(lambda: cluster.get("v1/configmaps", "demo-config"), "the ConfigMap")
    assert cluster.get("v1/services", "demo") is None and cluster.get("batch/v1/jobs", "demo") is None
    assert "phase" not in status(cluster)

    cluster.heal()
    with operator():
        wait_for(phase_is(cluster, "Pending"), "convergence after the restart")
        created = condition(cluster, "Created")
        assert created["status"] == "True" and created["reason"] == "AdoptedChildren"
        assert created["message"] == "adopted ConfigMap/demo-config"
        transitions_before = len(cluster.events("demo"))
    # Exactly one of each, and the ConfigMap is the very object created before the restart.
    assert cluster.get("v1/configmaps", "demo-config")["metadata"]["uid"] == first["metadata"]["uid"]
    assert [len(cluster.list(r, SELECTOR)) for r in ("v1/configmaps", "v1/services", "batch/v1/jobs")] == [1, 1, 1]

    # A third start over a converged job changes nothing and posts no duplicate events.
    stored = status(cluster)
    with operator():
        start_pod(cluster)
        wait_for(phase_is(cluster, "Running"), "Running after another restart")
    after = status(cluster)
    assert next(c for c in after["conditions"] if c["type"] == "Created") == next(
        c for c in stored["conditions"] if c["type"] == "Created"
    )
    assert len(cluster.events("demo")) == transitions_before + 1  # only Pending -> Running


def test_suspend_and_resume(cluster: Cluster) -> None:
    with operator():
        cluster.create(FTJ, ftj_manifest())
        wait_for(lambda: cluster.get("batch/v1/jobs", "demo"), "the Job")
        start_pod(cluster)
        wait_for(phase_is(cluster, "Running"), "Running")

        cluster.patch(FTJ, "demo", {"spec": {"suspend": True}})
        wait_for(lambda: cluster.get("batch/v1/jobs", "demo")["spec"]["suspend"] is True, "the Job suspended")
        # Play the Job controller: a suspended Job's pods are removed.
        cluster.delete("v1/pods", "demo-0-abcde")
        cluster.patch("batch/v1/jobs", "demo", {"status": {"active": 0, "ready": 0}}, sub="status")
        st = wait_for(phase_is(cluster, "Suspended"), "phase Suspended")
        suspended = next(c for c in st["conditions"] if c["type"] == "Suspended")
        assert suspended["status"] == "True" and suspended["reason"] == "Suspended"

        cluster.patch(FTJ, "demo", {"spec": {"suspend": False}})
        wait_for(lambda: cluster.get("batch/v1/jobs", "demo")["spec"]["suspend"] is False, "the Job resumed")
        start_pod(cluster, index=1)
        wait_for(phase_is(cluster, "Running"), "Running again")
        resumed = condition(cluster, "Suspended")
        assert resumed["status"] == "False" and resumed["reason"] == "Resumed"
        wait_for(lambda: ("Normal", "Suspended") in reasons(cluster), "the Suspended event")
    assert len(cluster.list("batch/v1/jobs")) == 1
    assert ("Warning", "SpecImmutable") not in reasons(cluster)  # suspend is the one mutable field


def test_spec_changes_other_than_suspend_are_refused(cluster: Cluster) -> None:
    with operator():
        cluster.create(FTJ, ftj_manifest())
        job = wait_for(lambda: cluster.get("batch/v1/jobs", "demo"), "the Job")
        wait_for(phase_is(cluster, "Pending"), "Pending")
        cluster.patch(FTJ, "demo", {"spec": {"hyperparameters": {"batchSize": 64}}})
        event = wait_for(
            lambda: next((e for e in cluster.events("demo") if e["reason"] == "SpecImmutable"), None), "SpecImmutable"
        )
        assert event["type"] == "Warning" and "spec.hyperparameters" in event["message"]
    assert cluster.get("batch/v1/jobs", "demo") == job


def test_kueue_managed_job_is_queued_and_never_flipped(cluster: Cluster) -> None:
    with operator():
        cluster.create(FTJ, ftj_manifest(labels={QUEUE_LABEL: "team-a"}))
        job = wait_for(lambda: cluster.get("batch/v1/jobs", "demo"), "the Job")
        assert job["spec"]["suspend"] is True
        assert job["metadata"]["labels"][QUEUE_LABEL] == "team-a"
        st = wait_for(phase_is(cluster, "Queued"), "phase Queued")
        queued = next(c for c in st["conditions"] if c["type"] == "Queued")
        assert queued["status"] == "True" and queued["reason"] == "WaitingForAdmission"

        # Kueue admits: it unsuspends the Job.
        cluster.patch("batch/v1/jobs", "demo", {"spec": {"suspend": False}})
        start_pod(cluster)
        wait_for(phase_is(cluster, "Running"), "Running after admission")
        assert condition(cluster, "Queued")["reason"] == "Admitted"

        # A user suspend cannot be applied by the operator: Kueue owns the field.
        cluster.patch(FTJ, "demo", {"spec": {"suspend": True}})
        kueue = wait_for(
            lambda: (c := condition(cluster, "Suspended")) and c["reason"] == "KueueManaged" and c, "KueueManaged"
        )
        assert kueue["status"] == "False"
        wait_for(lambda: ("Warning", "KueueManaged") in reasons(cluster), "the KueueManaged event")
        assert cluster.get("batch/v1/jobs", "demo")["spec"]["suspend"] is False

        # Kueue preempts: it suspends the Job; the operator does not unsuspend it either.
        cluster.patch(FTJ, "demo", {"spec": {"suspend": False}})
        cluster.patch("batch/v1/jobs", "demo", {"spec": {"suspend": True}})
        wait_for(phase_is(cluster, "Queued"), "Queued again after preemption")
        cluster.create(FTJ, ftj_manifest("marker", uid=None))  # a later job proves the loop went on
        wait_for(phase_is(cluster, "Pending", "marker"), "the marker's status")
        assert cluster.get("batch/v1/jobs", "demo")["spec"]["suspend"] is True


def test_delete_leaves_children_to_garbage_collection(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    monkeypatch.setenv("FT_METRICS_PORT", str(port))
    with operator():
        cluster.create(FTJ, ftj_manifest())
        wait_for(phase_is(cluster, "Pending"), "Pending")
        assert not cluster.get(FTJ, "demo")["metadata"].get("finalizers")  # deletion never waits for us

        cluster.delete(FTJ, "demo")
        assert cluster.get(FTJ, "demo") is None
        wait_for(lambda: 'finetune_operator_jobs{phase="Pending"} 0.0' in scrape(port), "the operator forgetting it")
        removed = cluster.collect_garbage()
        assert sorted(removed) == ["batch/v1/jobs/demo", "v1/configmaps/demo-config", "v1/services/demo"]

        cluster.create(FTJ, ftj_manifest("marker", uid=None))
        wait_for(phase_is(cluster, "Pending", "marker"), "the marker's status")
        assert cluster.get("batch/v1/jobs", "demo") is None
        assert cluster.get("v1/configmaps", "demo-config") is None


def test_progress_and_trainer_error_from_the_report(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    from finetune_trainer.s3server import LocalS3

    with LocalS3(buckets=("out",)).start() as s3:
        s3.create_bucket("out")
        for key, value in s3.env().items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("FT_S3_ENDPOINT", s3.endpoint_url)

        def report(**fields: Any) -> None:
            body = {"jobUid": UID, "phase": "training", "step": 450, "totalSteps": 1000, "loss": 1.25,
                    "tokensPerSecond": 900.0,
                    "etaSeconds": 120, "updatedAt": (datetime.now(UTC) + timedelta(seconds=5)).isoformat(),
                    "checkpoints": [{"step": 400, "uri": "s3://out/demo/checkpoints/step-400/"}], **fields}
            s3.client().put_object(Bucket="out", Key=f"demo/{REPORT_KEY}", Body=json.dumps(body).encode())

        with operator():
            cluster.create(FTJ, ftj_manifest())
            wait_for(lambda: cluster.get("batch/v1/jobs", "demo"), "the Job")
            start_pod(cluster)
            report()
            st = wait_for(
                lambda: (s := status(cluster)).get("progress", {}).get("summary") == "45% 450/1000" and s, "progress"
            )
            assert st["phase"] == "Running"
            assert st["progress"]["loss"] == 1.25 and st["progress"]["etaSeconds"] == 120
            assert st["checkpoints"] == [{"step": 400, "uri": "s3://out/demo/checkpoints/step-400/"}]

            report(phase="failed", error={"reason": "InvalidData", "message": "row 7 has no 'output' key"})
            finish_job(cluster, "Failed", "PodFailurePolicy", "Container trainer exited with code 3")
            st = wait_for(phase_is(cluster, "Failed"), "phase Failed")
            failed = next(c for c in st["conditions"] if c["type"] == "Failed")
            assert failed["reason"] == "InvalidData" and "row 7" in failed["message"]
            assert "etaSeconds" not in st["progress"]
            wait_for(lambda: ("Warning", "InvalidData") in reasons(cluster), "the Failed event")


def test_job_deadline_exceeded(cluster: Cluster) -> None:
    with operator():
        cluster.create(FTJ, ftj_manifest(activeDeadlineSeconds=60))
        job = wait_for(lambda: cluster.get("batch/v1/jobs", "demo"), "the Job")
        assert job["spec"]["activeDeadlineSeconds"] == 60
        start_pod(cluster)
        wait_for(phase_is(cluster, "Running"), "Running")
        finish_job(cluster, "Failed", "DeadlineExceeded", "Job was active longer than specified deadline")
        st = wait_for(phase_is(cluster, "Failed"), "phase Failed")
        failed = next(c for c in st["conditions"] if c["type"] == "Failed")
        assert failed["reason"] == "DeadlineExceeded"
        assert st["restarts"] == 1  # the Job counted one failed pod


__all__ = ["NAMESPACE"]


def test_retrieval_is_accepted_and_high_hallucination_is_flagged(cluster: Cluster,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """spec.retrieval reaches the trainer through the ConfigMap; a job without it whose fine-tuned model
    hallucinates above evaluation.hallucinationThreshold gets HallucinationHigh and one Warning event with the
    score and the recommendation, and still succeeds (gates decide failure)."""
    from finetune_trainer.s3server import LocalS3

    with LocalS3(buckets=("out",)).start() as s3:
        s3.create_bucket("out")
        for key, value in s3.env().items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("FT_S3_ENDPOINT", s3.endpoint_url)
        evaluation = {"accuracyMetric": "rougeL-f1", "examples": 50, "base": {"hallucination": 0.94},
                      "tuned": {"hallucination": 0.83}}

        with operator():
            cluster.create(FTJ, ftj_manifest("rag", uid=None, retrieval={"corpus": "s3://data/corpus/", "topK": 2},
                                             output={"uri": "s3://out/rag/"}))
            cluster.create(FTJ, ftj_manifest())
            config_map = wait_for(lambda: cluster.get("v1/configmaps", "rag-config"), "the rag job's ConfigMap")
            assert json.loads(config_map["data"]["job.json"])["spec"]["retrieval"]["topK"] == 2
            wait_for(phase_is(cluster, "Pending", "rag"), "the rag job's status")

            wait_for(lambda: cluster.get("batch/v1/jobs", "demo"), "the Job")
            start_pod(cluster)
            body = {"jobUid": UID, "phase": "uploading", "step": 10, "totalSteps": 10, "evaluation": evaluation,
                    "updatedAt": (datetime.now(UTC) + timedelta(seconds=5)).isoformat()}
            s3.client().put_object(Bucket="out", Key=f"demo/{REPORT_KEY}", Body=json.dumps(body).encode())
            high = wait_for(lambda: condition(cluster, "HallucinationHigh"), "HallucinationHigh")
            assert (high["status"], high["reason"]) == ("True", "HallucinationAboveThreshold")
            assert "83.0%" in high["message"] and "spec.retrieval" in high["message"]
            wait_for(lambda: ("Warning", "HallucinationHigh") in reasons(cluster), "the HallucinationHigh event")
            finish_job(cluster, "Complete", "CompletionsReached")
            wait_for(phase_is(cluster, "Succeeded"), "phase Succeeded")
            assert reasons(cluster).count(("Warning", "HallucinationHigh")) == 1
            assert condition(cluster, "HallucinationHigh", "rag") is None
