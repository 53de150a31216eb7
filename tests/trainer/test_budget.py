"""The GPU-hours budget (issue 11, part 2): reaching spec.budget.maxGpuHours saves a checkpoint and stops the
run with BudgetExceeded; a run with a larger budget on the same output resumes from that checkpoint and ends
at the uninterrupted run's losses.

GPU-hours are wall-clock hours of the training processes times their number (on CPU: one process), so a cap
of 1e-9 hours is reached by the first optimizer step whatever the machine: the run stops after step 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from finetune_operator.contract import EXIT_CONFIG_ERROR, REPORT_KEY, TrainerConfig
from finetune_operator.spec import BudgetSpec
from tests.trainer import train_helpers as th

TOLERANCE = 1e-4  # as tests/trainer/test_resume.py: a resumed run's losses against an uninterrupted one

SPEC: dict[str, Any] = {
    "hyperparameters": {"maxSteps": 4, "batchSize": 4, "gradientAccumulationSteps": 1},
    "checkpoint": {"everySteps": 2, "keep": 4},
    "evaluation": {"maxExamples": 2, "maxNewTokens": 4},
}


@pytest.fixture(scope="module")
def staged(s3: Any, tiny_model_dir: Path, healthcare_sample: Any) -> th.Staged:
    return th.stage_in_new_bucket(s3, "budget", tiny_model_dir, healthcare_sample)


def _losses(config: TrainerConfig) -> dict[int, float]:
    return th.losses(th.store(config.spec.output.uri).read_bytes("metrics.jsonl").decode())


def test_the_budget_stops_with_a_checkpoint_and_a_larger_one_resumes(s3_env: Any, staged: th.Staged) -> None:
    reference = th.make_config(staged, SPEC, name="uncapped")
    th.run_in_process(reference)
    expected = _losses(reference)

    capped = th.make_config(staged, th._merge(SPEC, {"budget": {"maxGpuHours": 1e-9}}), name="capped")
    assert th.exit_code_in_process(capped) == EXIT_CONFIG_ERROR  # the Job fails now: a retry would spend more
    store = th.store(capped.spec.output.uri)
    report = store.read_json(REPORT_KEY)
    assert report["phase"] == "failed" and report["error"]["reason"] == "BudgetExceeded"
    message = report["error"]["message"]
    assert "spec.budget.maxGpuHours (1e-09)" in message and "at step 1 of 4" in message
    assert "checkpoints/step-1 is saved" in message
    assert store.is_complete("checkpoints/step-1") and not store.exists("checkpoints/step-2/_COMPLETE")
    first = store.read_json("checkpoints/step-1/trainer_state.json")["gpu_seconds"]
    assert first > 0

    # The same output, a budget that suffices: resumed from step 1, to the uninterrupted run's losses.
    larger = capped.spec.model_copy(update={"budget": BudgetSpec(max_gpu_hours=100)})
    outcome = th.run_in_process(capped.model_copy(update={"spec": larger}))
    assert outcome.resumed_from == 1
    losses = _losses(capped)
    assert sorted(losses) == sorted(expected) == [1, 2, 3, 4]
    for step, loss in expected.items():
        assert losses[step] == pytest.approx(loss, abs=TOLERANCE), f"step {step}"
    report = store.read_json(REPORT_KEY)
    assert report["phase"] == "complete" and report.get("error") is None
    # GPU-hours add up over the attempts: the second counts on from what the first checkpoint recorded.
    last = store.read_json("checkpoints/step-4/trainer_state.json")["gpu_seconds"]
    assert last > first
    assert report["gpuHours"] >= first / 3600
