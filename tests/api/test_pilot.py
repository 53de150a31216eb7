"""spec.pilot in the operator loop (kmock emulator, a local S3 server for the trainer's reports).

The tests play the Job controller and kubelet for the pilot's Job (`demo-pilot`), write the pilot's report
where its trainer would (`<output.uri>/pilot/status/report.json`), and check what the operator does: a
pilot that completes leads to the main Job; a pilot whose Job fails on missed gates ends the FineTuneJob
Failed with reason PilotGatesFailed and the pilot's scores, and no main Job is ever created.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from finetune_operator import render
from finetune_operator.contract import REPORT_KEY
from tests.api.conftest import FTJ, UID, Cluster, ftj_manifest, operator, wait_for
from tests.api.test_operator import finish_job, phase_is, reasons, status

PILOT = {"maxSteps": 10, "gates": [{"metric": "evalLoss", "minImprovement": 0.1}, {"metric": "accuracy", "min": 0.3}]}
SCORES = {"accuracyMetric": "rougeL", "examples": 50, "base": {"accuracy": 0.02, "evalLoss": 6.2}}


def pilot_report(s3: Any, **fields: Any) -> None:
    body = {"jobUid": UID, "phase": "training", "step": 5, "totalSteps": 10, "loss": 2.5,
            "updatedAt": (datetime.now(UTC) + timedelta(seconds=5)).isoformat(), **fields}
    s3.client().put_object(Bucket="out", Key=f"demo/pilot/{REPORT_KEY}", Body=json.dumps(body).encode())


def start_pilot_pod(cluster: Cluster) -> None:
    cluster.patch("batch/v1/jobs", "demo-pilot", {"status": {"active": 1, "ready": 1, "startTime": "2026-01-01T00:00:00Z"}},
                  sub="status")
    cluster.create("v1/pods", {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "demo-pilot-0-abcde", "labels": {
            render.LABEL_JOB: "demo", render.LABEL_COMPONENT: render.COMPONENT_TRAINER, render.LABEL_STAGE: "pilot"}},
        "status": {"phase": "Running"},
    })


def full_with_pilot() -> dict[str, Any]:
    return ftj_manifest(method="full", pilot=PILOT)


def test_a_passing_pilot_leads_to_the_main_job(cluster: Cluster, s3: Any) -> None:
    with operator():
        cluster.create(FTJ, full_with_pilot())
        pilot_job = wait_for(lambda: cluster.get("batch/v1/jobs", "demo-pilot"), "the pilot's Job")
        assert cluster.get("v1/configmaps", "demo-pilot-config") and cluster.get("v1/services", "demo-pilot")
        snapshot = json.loads(cluster.get("v1/configmaps", "demo-pilot-config")["data"]["job.json"])
        assert (snapshot["stage"], snapshot["method"], snapshot["spec"]["output"]["uri"]) == (
            "pilot", "lora", "s3://out/demo/pilot/")
        assert pilot_job["metadata"]["labels"][render.LABEL_STAGE] == "pilot"
        st = wait_for(lambda: (s := status(cluster)).get("stage") == "Pilot" and s.get("pilot", {}).get("plan") and s,
                      "the pilot stage in the status")
        assert st["plan"]["method"] == "full" and st["pilot"]["plan"]["method"] == "lora"
        assert st["pilot"]["plan"]["gpus"] < st["plan"]["gpus"]

        start_pilot_pod(cluster)
        pilot_report(s3)
        st = wait_for(lambda: (s := status(cluster)).get("pilot", {}).get("progress", {}).get("summary") == "50% 5/10"
                      and s, "the pilot's progress")
        assert (st["phase"], st["pilot"]["phase"]) == ("Running", "Running")
        assert cluster.get("batch/v1/jobs", "demo") is None  # no main Job while the pilot runs

        passed = {**SCORES, "tuned": {"accuracy": 0.4, "evalLoss": 3.1}, "gatesPassed": True}
        pilot_report(s3, phase="complete", step=10, evaluation=passed,
                     artifacts={"model": "s3://out/demo/pilot/model/"})
        finish_job(cluster, "Complete", "CompletionsReached", name="demo-pilot")
        main = wait_for(lambda: cluster.get("batch/v1/jobs", "demo"), "the main Job after the pilot passed")
        assert render.LABEL_STAGE not in main["metadata"]["labels"]
        assert json.loads(cluster.get("v1/configmaps", "demo-config")["data"]["job.json"])["method"] == "full"
        st = wait_for(lambda: (s := status(cluster)).get("stage") == "Main" and s, "the main stage")
        assert st["pilot"]["phase"] == "Succeeded"
        assert st["pilot"]["artifacts"]["model"] == "s3://out/demo/pilot/model/"
        assert st["pilot"]["evaluation"]["tuned"]["evalLoss"] == 3.1
        assert next(c for c in st["conditions"] if c["type"] == "PilotPassed")["status"] == "True"
        wait_for(lambda: ("Normal", "PilotGatesPassed") in reasons(cluster), "the PilotGatesPassed event")

        # The main stage then runs as without a pilot; the pilot's completed pod is not one of its pods.
        finish_job(cluster, "Complete", "CompletionsReached")
        done = wait_for(phase_is(cluster, "Succeeded"), "phase Succeeded")
        assert done["stage"] == "Main" and done["pilot"]["phase"] == "Succeeded"


def test_a_failing_pilot_creates_no_main_job(cluster: Cluster, s3: Any) -> None:
    with operator():
        cluster.create(FTJ, full_with_pilot())
        wait_for(lambda: cluster.get("batch/v1/jobs", "demo-pilot"), "the pilot's Job")
        start_pilot_pod(cluster)
        missed = {**SCORES, "tuned": {"accuracy": 0.05, "evalLoss": 5.9}, "gatesPassed": False,
                  "failedGates": ["evalLoss 5.90 > 5.58 (base 6.20 lowered by minImprovement 0.10)",
                                  "accuracy 0.05 < min 0.30"]}
        pilot_report(s3, phase="failed", step=10, evaluation=missed,
                     artifacts={"model": "s3://out/demo/pilot/model/"},
                     error={"reason": "GatesFailed", "message": "; ".join(missed["failedGates"])})
        finish_job(cluster, "Failed", "PodFailurePolicy", "Container trainer exited with code 4", name="demo-pilot")
        st = wait_for(phase_is(cluster, "Failed"), "phase Failed")
        failed = next(c for c in st["conditions"] if c["type"] == "Failed")
        assert failed["reason"] == "PilotGatesFailed", failed
        assert "accuracy 0.05 < min 0.30" in failed["message"] and "evalLoss 5.9 (base 6.2)" in failed["message"]
        assert (st["stage"], st["pilot"]["phase"]) == ("Pilot", "Failed")
        assert st["pilot"]["evaluation"]["gatesPassed"] is False
        assert st["pilot"]["artifacts"]["model"] == "s3://out/demo/pilot/model/"  # the adapter is kept
        wait_for(lambda: ("Warning", "PilotGatesFailed") in reasons(cluster), "the PilotGatesFailed event")
        # Later passes (a pod event) leave it Failed and never create the main stage.
        cluster.patch("v1/pods", "demo-pilot-0-abcde", {"status": {"phase": "Failed"}}, sub="status")
        wait_for(lambda: status(cluster).get("phase") == "Failed" and status(cluster), "still Failed")
        for resource, name in (("batch/v1/jobs", "demo"), ("v1/configmaps", "demo-config"), ("v1/services", "demo")):
            assert cluster.get(resource, name) is None, f"{resource}/{name} was created"
