"""Chained stages (spec.baseModel.fromJob) in the operator loop: the real kopf handlers against kmock's emulator.

Two FineTuneJobs: `sft` (a LoRA stage) and `dpo` (objective dpo, `fromJob: sft`). The tests play the Job
controller for `sft` (its Job's status) and its trainer (the report with the adapter's URI, on a local S3 server,
where the operator reads it), and check what the operator does with `dpo`: it waits (Pending,
WaitingForBaseJob, nothing created) until `sft` Succeeded, then creates its children from the resolution; it
fails naming `sft` when `sft` fails or is deleted while it waits.

The status interval is 30 s here, so the fallback refresh of a waiting job (6 intervals) is far beyond any wait
of these tests: a dependent that moves moved because its base job's watch event woke it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from finetune_operator import conditions as c
from finetune_operator.contract import REPORT_KEY
from tests.api.conftest import FTJ, Cluster, ftj_manifest, operator, wait_for
from tests.api.test_operator import condition, finish_job, reasons, start_pod, status

SFT_UID = "aaaaaaaa-0000-4000-8000-000000000001"
DPO_UID = "aaaaaaaa-0000-4000-8000-000000000002"
BASE_MODEL = "hf://meta-llama/Llama-2-7b-hf"


@pytest.fixture
def slow_fallback(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    monkeypatch.setenv("FT_STATUS_INTERVAL", "30")
    yield cluster


def sft(uid: str = SFT_UID) -> dict[str, Any]:
    return ftj_manifest("sft", uid=uid, method="lora", output={"uri": "s3://out/sft/"})


def dpo() -> dict[str, Any]:
    return ftj_manifest("dpo", uid=DPO_UID, baseModel={"fromJob": "sft"}, objective="dpo", method="lora",
                        dataset={"train": "s3://data/pairs.jsonl", "format": "preference"},
                        output={"uri": "s3://out/dpo/"})


def trainer_report(s3: Any, uid: str = SFT_UID) -> None:
    """The base job's trainer's last report: where its adapter is, and its gates held."""
    body = {"jobUid": uid, "phase": "complete", "step": 10, "totalSteps": 10,
            "updatedAt": (datetime.now(UTC) + timedelta(seconds=5)).isoformat(),
            "artifacts": {"model": "s3://out/sft/model/"}, "evaluation": {"gatesPassed": True}}
    s3.client().put_object(Bucket="out", Key=f"sft/{REPORT_KEY}", Body=json.dumps(body).encode())


def waiting(cluster: Cluster, reason: str) -> Any:
    def check() -> dict[str, Any] | None:
        cond = condition(cluster, c.WAITING_FOR_BASE_JOB, "dpo")
        return status(cluster, "dpo") if cond and (cond["status"], cond["reason"]) == ("True", reason) else None
    return check


def failed_with(cluster: Cluster, reason: str) -> Any:
    def check() -> dict[str, Any] | None:
        st = status(cluster, "dpo")
        return st if st.get("phase") == "Failed" and (condition(cluster, c.FAILED, "dpo") or {}).get(
            "reason") == reason else None
    return check


def nothing_created(cluster: Cluster) -> None:
    assert cluster.get("batch/v1/jobs", "dpo") is None
    assert cluster.get("v1/configmaps", "dpo-config") is None
    assert cluster.get("v1/services", "dpo") is None


def test_waits_for_its_base_job_then_starts_from_its_result(slow_fallback: Cluster, s3: Any) -> None:
    cluster = slow_fallback
    with operator():
        cluster.create(FTJ, sft())
        cluster.create(FTJ, dpo())
        wait_for(lambda: cluster.get("batch/v1/jobs", "sft"), "the base job's Job")
        st = wait_for(waiting(cluster, c.BASE_JOB_RUNNING), "dpo waiting for sft")
        assert st["phase"] == "Pending"
        assert st["baseJob"]["name"] == "sft" and st["baseJob"]["uid"] == SFT_UID
        assert "sft" in condition(cluster, c.WAITING_FOR_BASE_JOB, "dpo")["message"]
        assert "plan" not in st
        nothing_created(cluster)
        assert ("Normal", c.WAITING_FOR_BASE_JOB) in reasons(cluster, "dpo")

        start_pod(cluster, name="sft")
        wait_for(lambda: status(cluster, "sft").get("phase") == "Running", "sft Running")
        # The base job's progress is no reason to start: dpo still waits, and says sft runs.
        wait_for(lambda: (st := waiting(cluster, c.BASE_JOB_RUNNING)()) and st["baseJob"].get("phase") == "Running",
                 "dpo's status.baseJob.phase Running")
        nothing_created(cluster)

        trainer_report(s3)
        finish_job(cluster, "Complete", name="sft")
        job = wait_for(lambda: cluster.get("batch/v1/jobs", "dpo"), "dpo's Job, once sft Succeeded")
        assert status(cluster, "sft")["phase"] == "Succeeded"
        st = wait_for(lambda: (s := status(cluster, "dpo")).get("plan") and s, "dpo planned")
        assert st["baseJob"]["modelUri"] == BASE_MODEL
        assert st["baseJob"]["adapters"] == ["s3://out/sft/model/"]
        assert [(s["name"], s["uid"]) for s in st["baseJob"]["chain"]] == [("sft", SFT_UID)]
        assert (condition(cluster, c.WAITING_FOR_BASE_JOB, "dpo")["status"],
                condition(cluster, c.WAITING_FOR_BASE_JOB, "dpo")["reason"]) == ("False", c.BASE_JOB_SUCCEEDED)
        events = {e["reason"]: e for e in cluster.events("dpo")}
        assert events[c.BASE_JOB_SUCCEEDED]["type"] == "Normal" and "sft" in events[c.BASE_JOB_SUCCEEDED]["message"]

        # The trainer's snapshot: the applied spec and the resolution.
        snapshot = json.loads(cluster.get("v1/configmaps", "dpo-config")["data"]["job.json"])
        assert snapshot["spec"]["baseModel"]["uri"] == BASE_MODEL and "fromJob" not in snapshot["spec"]["baseModel"]
        assert snapshot["base"]["adapters"] == ["s3://out/sft/model/"] and snapshot["base"]["name"] == "sft"
        assert snapshot["spec"]["objective"] == "dpo"
        assert job["metadata"]["ownerReferences"][0]["uid"] == DPO_UID

        # Deleting the base job after this one started changes nothing: it started from what sft left in S3.
        cluster.delete(FTJ, "sft")
        start_pod(cluster, name="dpo")
        wait_for(lambda: status(cluster, "dpo").get("phase") == "Running", "dpo Running without its base job")
        assert status(cluster, "dpo")["baseJob"]["modelUri"] == BASE_MODEL


def test_a_failed_base_job_fails_the_dependent(slow_fallback: Cluster) -> None:
    cluster = slow_fallback
    with operator():
        cluster.create(FTJ, sft())
        cluster.create(FTJ, dpo())
        wait_for(lambda: cluster.get("batch/v1/jobs", "sft"), "the base job's Job")
        wait_for(waiting(cluster, c.BASE_JOB_RUNNING), "dpo waiting for sft")
        finish_job(cluster, "Failed", reason="BackoffLimitExceeded", message="Job has reached the specified backoff limit",
                   name="sft")
        st = wait_for(failed_with(cluster, c.BASE_JOB_FAILED), "dpo Failed/BaseJobFailed")
        message = condition(cluster, c.FAILED, "dpo")["message"]
        assert "base job sft failed" in message and "BackoffLimitExceeded" in message
        assert st["baseJob"]["phase"] == "Failed"
        assert ("Warning", c.BASE_JOB_FAILED) in reasons(cluster, "dpo")
        nothing_created(cluster)


def test_deleting_the_base_job_while_it_waits_fails_the_dependent(slow_fallback: Cluster) -> None:
    cluster = slow_fallback
    with operator():
        cluster.create(FTJ, sft())
        cluster.create(FTJ, dpo())
        wait_for(waiting(cluster, c.BASE_JOB_RUNNING), "dpo waiting for sft (its uid recorded)")
        cluster.delete(FTJ, "sft")
        wait_for(failed_with(cluster, c.BASE_JOB_DELETED), "dpo Failed/BaseJobDeleted")
        message = condition(cluster, c.FAILED, "dpo")["message"]
        assert "sft" in message and SFT_UID in message and "deleted" in message
        assert ("Warning", c.BASE_JOB_DELETED) in reasons(cluster, "dpo")
        nothing_created(cluster)
        # Recreating a base job of the same name does not revive it: it failed for good.
        cluster.create(FTJ, sft(uid="aaaaaaaa-0000-4000-8000-000000000003"))
        wait_for(lambda: cluster.get("batch/v1/jobs", "sft"), "the new sft's Job")
        assert status(cluster, "dpo")["phase"] == "Failed"
        nothing_created(cluster)


def test_a_base_job_created_after_its_dependent_is_waited_for(slow_fallback: Cluster, s3: Any) -> None:
    """GitOps applies both at once, in any order: the dependent first waits for its base job to exist."""
    cluster = slow_fallback
    with operator():
        cluster.create(FTJ, dpo())
        st = wait_for(waiting(cluster, c.BASE_JOB_NOT_FOUND), "dpo waiting for sft to exist")
        assert st["phase"] == "Pending" and st["baseJob"] == {"name": "sft"}
        assert "to be created" in condition(cluster, c.WAITING_FOR_BASE_JOB, "dpo")["message"]
        nothing_created(cluster)

        cluster.create(FTJ, sft())
        wait_for(lambda: cluster.get("batch/v1/jobs", "sft"), "the base job's Job")
        st = wait_for(waiting(cluster, c.BASE_JOB_RUNNING), "dpo waiting for sft to succeed")
        assert st["baseJob"]["uid"] == SFT_UID
        trainer_report(s3)
        finish_job(cluster, "Complete", name="sft")
        wait_for(lambda: cluster.get("batch/v1/jobs", "dpo"), "dpo's Job, once sft Succeeded")
        assert status(cluster, "dpo")["baseJob"]["adapters"] == ["s3://out/sft/model/"]


def test_a_base_job_that_finished_while_the_operator_was_down_starts_its_dependent(slow_fallback: Cluster,
                                                                                    s3: Any) -> None:
    """The restart converges: the listing rebuilds who waits for whom, and the base job's first pass wakes it."""
    cluster = slow_fallback
    with operator():
        cluster.create(FTJ, sft())
        cluster.create(FTJ, dpo())
        wait_for(lambda: cluster.get("batch/v1/jobs", "sft"), "the base job's Job")
        wait_for(waiting(cluster, c.BASE_JOB_RUNNING), "dpo waiting for sft")
    trainer_report(s3)
    finish_job(cluster, "Complete", name="sft")
    nothing_created(cluster)
    with operator():
        wait_for(lambda: cluster.get("batch/v1/jobs", "dpo"), "dpo's Job, after the restart")
        assert status(cluster, "sft")["phase"] == "Succeeded"
        assert status(cluster, "dpo")["baseJob"]["adapters"] == ["s3://out/sft/model/"]
