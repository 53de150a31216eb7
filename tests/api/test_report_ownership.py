"""Reports the operator must not take, in the operator loop (kmock emulator, a real local S3 server).

A running FineTuneJob shows its own report's progress; then its output holds, one after the other, a report
written for another FineTuneJob (another tenant's loss, scores and artifact URIs), one without a jobUid, one
larger than MAX_REPORT_BYTES and one whose checkpoint list is over its cap. Each is ignored: the status keeps
the job's own values, and each cause gets exactly one Warning event on the FineTuneJob, however many passes
read it (pod events and the refresher's polls). Its own report afterwards is taken again.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from finetune_operator import conditions
from finetune_operator.contract import MAX_REPORT_CHECKPOINTS, REPORT_KEY
from finetune_operator.progress import MAX_REPORT_BYTES
from tests.api.conftest import FTJ, Cluster, ftj_manifest, operator, wait_for
from tests.api.test_operator import start_pod, status

INTERVAL = 0.3  # FT_STATUS_INTERVAL in tests/api/conftest.py
OTHER_UID = "9f9f9f9f-0000-4000-8000-0000000000ff"


def ignored_events(cluster: Cluster, name: str) -> list[dict[str, Any]]:
    return [e for e in cluster.events(name) if e.get("type") == "Warning" and e.get("reason") == conditions.REPORT_IGNORED]


def test_reports_of_other_jobs_or_out_of_bounds_are_ignored_with_one_event_each(cluster: Cluster, s3: Any) -> None:
    name = "mine"

    def put(doc: dict[str, Any]) -> None:
        s3.client().put_object(Bucket="out", Key=f"{name}/{REPORT_KEY}", Body=json.dumps(doc).encode())

    def report(uid: str | None, **fields: Any) -> dict[str, Any]:
        doc = {"phase": "training", "step": 10, "totalSteps": 100, "loss": 1.5,
               "updatedAt": (datetime.now(UTC) + timedelta(seconds=5)).isoformat(), **fields}
        return {"jobUid": uid, **doc} if uid is not None else doc

    def nudge(times: int = 3) -> None:
        """Several passes: pod events (each runs one) and the refresher's polls in between."""
        for i in range(times):
            cluster.patch("v1/pods", f"{name}-0-abcde", {"metadata": {"annotations": {"nudge": str(i)}}})
            time.sleep(2 * INTERVAL)

    with operator():
        cluster.create(FTJ, ftj_manifest(name, uid=None, output={"uri": f"s3://out/{name}/"}))
        uid = cluster.get(FTJ, name)["metadata"]["uid"]
        wait_for(lambda: cluster.get("batch/v1/jobs", name), "the Job")
        start_pod(cluster, name=name)
        own = {"checkpoints": [{"step": 5, "uri": f"s3://out/{name}/checkpoints/step-5/"}],
               "artifacts": {"metrics": f"s3://out/{name}/metrics.jsonl"}}
        put(report(uid, **own))
        mine = wait_for(lambda: (st := status(cluster, name)).get("progress", {}).get("step") == 10 and st,
                        "the job's own progress")
        kept = {key: mine.get(key) for key in ("progress", "checkpoints", "artifacts", "evaluation")}

        cases = [
            ("foreign", report(OTHER_UID, step=90, loss=0.01, artifacts={"model": "s3://tenant-b/secret-model/"},
                               evaluation={"tuned": {"accuracy": 0.99}}),
             "written for another FineTuneJob"),
            ("unowned", report(None, step=20), "names no FineTuneJob"),
            ("oversized", report(uid, step=30, error={"reason": "Crashed", "message": "x" * MAX_REPORT_BYTES}),
             f"larger than {MAX_REPORT_BYTES} bytes"),
            ("over-long list", report(uid, step=40, checkpoints=[{"step": i, "uri": f"s3://out/{name}/c/{i}/"}
                                                                 for i in range(MAX_REPORT_CHECKPOINTS + 1)]),
             f"checkpoints: List should have at most {MAX_REPORT_CHECKPOINTS} items"),
        ]
        for seen, (cause, doc, words) in enumerate(cases, start=1):
            put(doc)
            wait_for(lambda w=words: any(w in e["message"] for e in ignored_events(cluster, name)), f"the {cause} event")
            nudge()
            events = ignored_events(cluster, name)
            assert len(events) == seen, [e["message"] for e in events]
            assert sum(words in e["message"] for e in events) == 1, cause
            st = status(cluster, name)
            assert {key: st.get(key) for key in kept} == kept, cause
            assert st["phase"] == "Running"
        assert not any("secret-model" in e["message"] or "0.01" in e["message"] for e in ignored_events(cluster, name))

        # Its own report again: taken as before.
        put(report(uid, step=50, **own))
        wait_for(lambda: status(cluster, name).get("progress", {}).get("step") == 50, "the job's own progress again")
        assert len(ignored_events(cluster, name)) == len(cases)
