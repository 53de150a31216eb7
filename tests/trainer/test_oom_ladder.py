"""The out-of-memory ladder (issue 11, part 3): the rule, and the trainer stepping down on CPU.

The OOM is injected by replacing `finetune_trainer.oom.probe` (called before every forward pass of the
training loop) with one that raises `torch.OutOfMemoryError` at a chosen micro-batch size.

Loss equality: a run that steps down from 4 x 4 to 2 x 8 trains, from step 0 with the same seeds, on the
same micro-batches as a run started at 2 x 8, so its per-step losses are the same numbers. Measured here:
bit-identical (largest difference 0.0); LOSS_TOLERANCE leaves room for nothing but reduction order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from finetune_operator.contract import EXIT_CONFIG_ERROR, REPORT_KEY, TrainerConfig, next_rung, spec_rung
from finetune_operator.sizing import choose_rung
from finetune_operator.spec import Adjustment, MemoryRung
from tests.trainer import train_helpers as th

LOSS_TOLERANCE = 1e-6

#: 4 x 4 (16 examples per optimizer step), 4 steps, a checkpoint after step 2. Gradient checkpointing set: the
#: plan of the tiny model (4 x 4 fits anything) then starts at 4 x 4 with it on, the rung these tests step down from.
SPEC: dict[str, Any] = {
    "hyperparameters": {"maxSteps": 4, "batchSize": 4, "gradientAccumulationSteps": 4, "gradientCheckpointing": True},
    "checkpoint": {"everySteps": 2, "keep": 2},
    "evaluation": {"maxExamples": 2, "maxNewTokens": 4},
}


def R(micro_batch: int, grad_accum: int, checkpointing: bool) -> MemoryRung:
    return MemoryRung(micro_batch=micro_batch, grad_accum=grad_accum, gradient_checkpointing=checkpointing)


def ladder(start: MemoryRung, checkpointing: bool = True) -> list[MemoryRung]:
    rungs, rung = [start], next_rung(start, start, checkpointing=checkpointing)
    while rung is not None:
        rungs.append(rung)
        rung = next_rung(rung, start, checkpointing=checkpointing)
    return rungs


@pytest.mark.parametrize(("start", "checkpointing", "expected"), [
    # halve, then checkpointing on, then halve down to 1
    (R(4, 4, False), True, [R(4, 4, False), R(2, 8, False), R(2, 8, True), R(1, 16, True)]),
    (R(8, 2, False), True, [R(8, 2, False), R(4, 4, False), R(4, 4, True), R(2, 8, True), R(1, 16, True)]),
    # checkpointing already on (the spec's default): halving only
    (R(4, 4, True), True, [R(4, 4, True), R(2, 8, True), R(1, 16, True)]),
    # a micro-batch of 1 can only turn checkpointing on
    (R(1, 4, False), True, [R(1, 4, False), R(1, 4, True)]),
    (R(1, 4, True), True, [R(1, 4, True)]),
    # odd sizes go to their largest divisor at most half: the product stays
    (R(6, 1, True), True, [R(6, 1, True), R(3, 2, True), R(1, 6, True)]),
    (R(5, 3, True), True, [R(5, 3, True), R(1, 15, True)]),
    # prefix tuning: checkpointing never turned on
    (R(4, 4, False), False, [R(4, 4, False), R(2, 8, False), R(1, 16, False)]),
    (R(1, 4, False), False, [R(1, 4, False)]),
])
def test_ladder(start: MemoryRung, checkpointing: bool, expected: list[MemoryRung]) -> None:
    rungs = ladder(start, checkpointing)
    assert rungs == expected
    assert {r.micro_batch * r.grad_accum for r in rungs} == {start.micro_batch * start.grad_accum}


def test_next_rung_from_the_middle_knows_the_start() -> None:
    # 2 x 8 reached from 4 x 4 turns checkpointing on; 2 x 8 as the start halves first.
    assert next_rung(R(2, 8, False), R(4, 4, False)) == R(2, 8, True)
    assert next_rung(R(2, 8, False), R(2, 8, False)) == R(1, 16, False)


# ------------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def staged(s3: Any, tiny_model_dir: Path, healthcare_sample: Any) -> th.Staged:
    return th.stage_in_new_bucket(s3, "oom", tiny_model_dir, healthcare_sample)



def inject(monkeypatch: pytest.MonkeyPatch, at_micro_batch: int, from_step: int = 0) -> list[tuple[int, int]]:
    """Raise torch.OutOfMemoryError before a forward pass with a micro-batch >= `at_micro_batch` from
    optimizer step `from_step` on; returns the (micro-batch, step) of every injected error."""
    import torch

    from finetune_trainer import oom

    raised: list[tuple[int, int]] = []

    def probe(*, micro_batch: int, step: int) -> None:
        if micro_batch >= at_micro_batch and step >= from_step:
            raised.append((micro_batch, step))
            raise torch.OutOfMemoryError(f"injected: CUDA out of memory at micro-batch {micro_batch}")

    monkeypatch.setattr(oom, "probe", probe)
    return raised


def _losses(config: TrainerConfig) -> dict[int, float]:
    return th.losses(th.store(config.spec.output.uri).read_bytes("metrics.jsonl").decode())


def _wire(micro_batch: int, grad_accum: int, checkpointing: bool = True) -> dict[str, Any]:
    return R(micro_batch, grad_accum, checkpointing).wire()


def test_oom_steps_down_and_trains_the_same_losses(s3_env: Any, staged: th.Staged,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # The reference: a run started at 2 x 8.
    reference = th.make_config(staged, th._merge(SPEC, {"hyperparameters": {"batchSize": 2,
                                                                            "gradientAccumulationSteps": 8}}))
    th.run_in_process(reference)
    expected = _losses(reference)
    assert sorted(expected) == [1, 2, 3, 4]

    # 4 x 4 runs out of memory in its second step (step 1 is done and logged): back to step 0 at 2 x 8.
    config = th.make_config(staged, SPEC)
    raised = inject(monkeypatch, at_micro_batch=4, from_step=1)
    outcome = th.run_in_process(config)
    assert raised == [(4, 1)]
    store = th.store(config.spec.output.uri)
    assert store.is_complete("")
    losses = _losses(config)
    assert sorted(losses) == [1, 2, 3, 4]  # the failed attempt's step 1 is not kept
    worst = max(abs(losses[s] - expected[s]) for s in expected)
    print(f"per-step losses {losses}; largest difference from the 2 x 8 run {worst:.3g}")
    assert worst <= LOSS_TOLERANCE
    assert outcome.final_loss == pytest.approx(expected[4], abs=LOSS_TOLERANCE)

    report = store.read_json(REPORT_KEY)
    assert report["phase"] == "complete"
    (adjustment,) = report["adjustments"]
    assert adjustment["step"] == 1 and adjustment["by"] == "trainer"
    assert adjustment["from"] == _wire(4, 4) and adjustment["to"] == _wire(2, 8)
    assert "OutOfMemoryError" in adjustment["reason"] and "first steps" in adjustment["reason"]

    card = store.read_bytes("README.md").decode()
    assert "## Out-of-memory adjustments" in card
    assert "| 1 | trainer | 4 x 4, gradient checkpointing on | 2 x 8, gradient checkpointing on |" in card
    assert "| batch size per GPU x accumulation | 2 x 8 |" in card
    # The checkpoints carry the rung, so a resumed pod continues at 2 x 8 whatever its config says.
    for step in (2, 4):
        saved = store.read_json(f"checkpoints/step-{step}/trainer_state.json")
        assert saved["rung"] == _wire(2, 8) and saved["adjustments"] == [adjustment]


def test_the_trainer_starts_and_steps_down_from_the_plans_rung(s3_env: Any, staged: th.Staged,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """gradientCheckpointing unset: the plan decides. A plan that chose 2 x 8 without checkpointing (a GPU the
    spec's 4 x 4 does not fit): the trainer starts there, and its ladder starts there too (the next rung halves:
    checkpointing comes on only below the plan's micro-batch), whatever batchSize says."""
    spec = th._merge(SPEC, {})
    del spec["hyperparameters"]["gradientCheckpointing"]
    config = th.make_config(staged, spec)
    assert config.spec.hyperparameters.gradient_checkpointing is None
    # the tiny model fits at the requested rung, checkpointing off: the plan's own choice
    assert config.plan.rung == R(4, 4, False) == choose_rung(config.spec, "lora", 1, 12).rung
    planned = config.model_copy(update={"plan": config.plan.model_copy(update={"rung": R(2, 8, False)})})
    raised = inject(monkeypatch, at_micro_batch=2, from_step=1)
    th.run_in_process(planned)
    assert raised == [(2, 1)]  # no attempt at the spec's 4 x 4
    store = th.store(config.spec.output.uri)
    report = store.read_json(REPORT_KEY)
    assert report["phase"] == "complete"
    (adjustment,) = report["adjustments"]
    assert adjustment["from"] == _wire(2, 8, False) and adjustment["to"] == _wire(1, 16, False)
    card = store.read_bytes("README.md").decode()
    assert "| batch size per GPU x accumulation | 1 x 16 |" in card and "| gradient checkpointing | no |" in card
    provenance = store.read_json("provenance.json")["hyperparameters"]
    assert (provenance["batchSize"], provenance["gradientAccumulationSteps"], provenance["gradientCheckpointing"]) == (
        1, 16, False)


def test_the_operators_adjustment_starts_one_rung_lower(s3_env: Any, staged: th.Staged,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A pod OOMKilled at 4 x 4: the operator passes 4 x 4 -> 2 x 8 in the config; no OOM on 2 x 8."""
    raised = inject(monkeypatch, at_micro_batch=4)
    config = th.make_config(staged, SPEC)
    passed = Adjustment(step=0, from_=spec_rung(config.spec), to=R(2, 8, True), by="operator",
                        reason="the training pod was OOMKilled")
    config = config.model_copy(update={"adjustments": [passed]})
    th.run_in_process(config)
    assert raised == []
    store = th.store(config.spec.output.uri)
    report = store.read_json(REPORT_KEY)
    assert report["phase"] == "complete" and report["adjustments"] == [passed.wire()]
    assert "| 0 | operator | 4 x 4" in store.read_bytes("README.md").decode()


def test_oom_on_every_rung_fails_naming_what_was_tried(s3_env: Any, staged: th.Staged,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    config = th.make_config(staged, th._merge(SPEC, {"hyperparameters": {"gradientCheckpointing": False}}))
    raised = inject(monkeypatch, at_micro_batch=1)
    assert th.exit_code_in_process(config) == EXIT_CONFIG_ERROR
    assert raised == [(4, 0), (2, 0), (2, 0), (1, 0)]
    report = th.store(config.spec.output.uri).read_json(REPORT_KEY)
    assert report["phase"] == "failed" and report["error"]["reason"] == "OutOfMemory"
    message = report["error"]["message"]
    assert ("tried: micro-batch 4 x 4 accumulation, gradient checkpointing off; micro-batch 2 x 8 accumulation, "
            "gradient checkpointing off; micro-batch 2 x 8 accumulation, gradient checkpointing on; micro-batch 1 x "
            "16 accumulation, gradient checkpointing on)") in message
    assert "down to a micro-batch of 1" in message
    assert [(a["from"], a["to"]) for a in report["adjustments"]] == [
        (_wire(4, 4, False), _wire(2, 8, False)), (_wire(2, 8, False), _wire(2, 8, True)),
        (_wire(2, 8, True), _wire(1, 16, True))]


def test_oom_after_the_first_checkpoint_fails_retryably(s3_env: Any, staged: th.Staged,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    config = th.make_config(staged, SPEC)
    raised = inject(monkeypatch, at_micro_batch=4, from_step=2)  # the checkpoint of step 2 is written
    assert th.exit_code_in_process(config) == 1
    assert raised == [(4, 2)]
    report = th.store(config.spec.output.uri).read_json(REPORT_KEY)
    assert report["error"]["reason"] == "OutOfMemory" and report["adjustments"] == []
    assert "after the first checkpoint" in report["error"]["message"]
    assert "next attempt can start at micro-batch 2 x 8 accumulation" in report["error"]["message"]

    # The next pod, one rung lower as the operator passes it, resumes from step 2's checkpoint (taken at 4 x 4):
    # the data position, 8 micro-batches of 4, becomes 16 of 2.
    passed = Adjustment(step=2, from_=R(4, 4, True), to=R(2, 8, True), by="operator", reason="OutOfMemory")
    outcome = th.run_in_process(config.model_copy(update={"adjustments": [passed]}))
    assert outcome.resumed_from == 2 and raised == [(4, 2)]
    store = th.store(config.spec.output.uri)
    assert store.read_json("checkpoints/step-2/trainer_state.json")["batches_in_epoch"] == 8
    final = store.read_json("checkpoints/step-4/trainer_state.json")
    assert (final["epoch"], final["batches_in_epoch"], final["rung"]) == (0, 32, _wire(2, 8))
    assert store.read_json(REPORT_KEY)["adjustments"] == [passed.wire()]
