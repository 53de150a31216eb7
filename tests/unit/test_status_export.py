"""status.export from the trainer's report (finetune_trainer/export.py), and a failed export check as the
job's failure reason: table tests of the pure status function."""

from __future__ import annotations

from typing import Any

from finetune_operator.contract import TrainerError
from finetune_operator.status import Children, compute_status
from tests.unit.test_status import NOW, PLAN, RUNNING_JOB, ftj, jcond, job, pod, report

CHECK = {"prompts": 4, "tolerance": 0.05, "adapter_max_abs_diff": 0.0, "merged_max_abs_diff": 0.003,
         "merge_peak_bytes": 2_000_000, "passed": True}
WIRE = {"prompts": 4, "tolerance": 0.05, "adapterMaxAbsDiff": 0.0, "mergedMaxAbsDiff": 0.003,
        "mergePeakBytes": 2_000_000, "passed": True}


def test_the_export_check_is_copied_to_the_status() -> None:
    assert "export" not in compute_status(ftj(), plan=PLAN, now=NOW, report=report(), children=RUNNING_JOB)
    status = compute_status(ftj(), plan=PLAN, now=NOW, report=report(phase="uploading", export=CHECK),
                            children=RUNNING_JOB)
    assert status["export"] == WIRE


def test_a_failed_export_check_fails_the_job_with_its_reason() -> None:
    message = "merged/ gives logits up to 0.9 from the adapter's (tolerance 0.05, on 4 sample prompts)"
    failed: dict[str, Any] = {**CHECK, "merged_max_abs_diff": 0.9, "passed": False}
    rep = report(phase="failed", export=failed, error=TrainerError(reason="ExportCheckFailed", message=message))
    children = Children(job=job(conditions=[jcond("Failed", "PodFailurePolicy", "exit 3")]), pods=[pod("Failed")])
    status = compute_status(ftj(), plan=PLAN, now=NOW, report=rep, children=children)
    assert status["phase"] == "Failed"
    assert status["export"]["passed"] is False and status["export"]["mergedMaxAbsDiff"] == 0.9
    failed_condition = next(x for x in status["conditions"] if x["type"] == "Failed")
    assert failed_condition["reason"] == "ExportCheckFailed" and "tolerance 0.05" in failed_condition["message"]
