"""spec.tracking.mlflow through the real operator loop: the trainer's report says the tracking server was down
(as the trainer writes it: tests/trainer/test_tracking.py), the job still ends Succeeded, with status.tracking,
the `Tracking` condition False and one Warning event; the secretRef reaches the training pods by reference."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from finetune_operator.contract import REPORT_KEY
from tests.api.conftest import FTJ, UID, Cluster, ftj_manifest, operator, wait_for
from tests.api.test_operator import condition, finish_job, phase_is, reasons, start_pod, status

DOWN = ("spec.tracking.mlflow.trackingUri http://mlflow.ml:5000: finding experiment 'default/demo' failed: "
        "MlflowException: API request failed; training goes on, and tracking is tried again later")
TRACKING = {"mlflow": {"trackingUri": "http://mlflow.ml:5000", "registeredModel": "demo",
                       "secretRef": {"name": "mlflow-credentials"}}}


def test_a_tracking_server_that_is_down_leaves_the_job_succeeded(cluster: Cluster, s3: Any) -> None:
    def report(**fields: Any) -> None:
        body = {"jobUid": UID, "phase": "complete", "step": 10, "totalSteps": 10,
                "updatedAt": (datetime.now(UTC) + timedelta(seconds=5)).isoformat(), **fields}
        s3.client().put_object(Bucket="out", Key=f"demo/{REPORT_KEY}", Body=json.dumps(body).encode())

    with operator():
        cluster.create(FTJ, ftj_manifest(tracking=TRACKING))
        job = wait_for(lambda: cluster.get("batch/v1/jobs", "demo"), "the Job")
        container = job["spec"]["template"]["spec"]["containers"][0]
        assert {e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"]
                if e["name"].startswith("MLFLOW_")} == {"mlflow-credentials"}
        start_pod(cluster)
        report(tracking={"error": DOWN})
        failed = wait_for(lambda: condition(cluster, "Tracking"), "the Tracking condition")
        assert (failed["status"], failed["reason"]) == ("False", "TrackingFailed") and DOWN in failed["message"]
        finish_job(cluster, "Complete", "CompletionsReached")
        done = wait_for(phase_is(cluster, "Succeeded"), "phase Succeeded")
        assert done["tracking"] == {"error": DOWN}
        wait_for(lambda: ("Warning", "TrackingFailed") in reasons(cluster), "the TrackingFailed event")
        assert reasons(cluster).count(("Warning", "TrackingFailed")) == 1
        assert status(cluster)["phase"] == "Succeeded"
