"""`finetune_operator.oomkill`: what the operator writes after a training pod is OOMKilled (pure)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from finetune_operator import contract, oomkill, render
from finetune_operator.manifests import load_file
from finetune_operator.settings import OperatorSettings
from finetune_operator.spec import Adjustment, MemoryRung

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "healthcare-lora.yaml"  # batchSize 4 x 4


def rung(micro: int, accum: int, checkpointing: bool) -> MemoryRung:
    return MemoryRung(micro_batch=micro, grad_accum=accum, gradient_checkpointing=checkpointing)


#: The rung most tests start at: the example's batchSize with checkpointing on.
START = rung(4, 4, True)


def config(start: MemoryRung | None = START) -> contract.TrainerConfig:
    """The example's snapshot with its plan's rung set to `start` (None: a plan made before plans chose a rung)."""
    (loaded,) = load_file(EXAMPLE)
    assert loaded.job is not None and loaded.plan is not None
    cfg = contract.resolve(loaded.job, loaded.plan)
    cfg.plan.rung = start
    return cfg


def pod(name: str = "healthcare-assistant-0-abcde", *, reason: str = "OOMKilled", created: str = "2026-12-02T10:00:00Z",
        where: str = "state") -> dict[str, Any]:
    (loaded,) = load_file(EXAMPLE)
    assert loaded.job is not None and loaded.plan is not None
    job = render.render_job(loaded.job, loaded.plan, OperatorSettings.from_env({}))
    term = {"exitCode": 137, "reason": reason, "finishedAt": "2026-12-02T10:05:00Z"}
    return {
        "metadata": {"name": name, "creationTimestamp": created},
        "spec": job["spec"]["template"]["spec"],
        "status": {"phase": "Failed", "containerStatuses": [
            {"name": render.CONTAINER_NAME, where: {"terminated": term}}]},
    }


def test_only_an_oom_killed_trainer_container_counts() -> None:
    assert oomkill.killed_container(pod(), render.CONTAINER_NAME) is not None
    assert oomkill.killed_container(pod(where="lastState"), render.CONTAINER_NAME) is not None
    assert oomkill.killed_container(pod(reason="Error"), render.CONTAINER_NAME) is None
    assert oomkill.killed_container(pod(), "sidecar") is None
    assert oomkill.killed_container({"status": {}}, render.CONTAINER_NAME) is None


def test_the_config_map_is_the_one_the_pod_mounts_its_config_from() -> None:
    assert oomkill.config_map_name(pod()) == "healthcare-assistant-config"
    assert oomkill.config_map_name({"spec": {"volumes": [{"name": "x", "emptyDir": {}}]}}) is None


def test_one_rung_down_keeps_the_examples_per_step() -> None:
    decision = oomkill.decide(pod(), config(), adjusted_at=None, step=7)
    assert decision is not None and decision.adjustment is not None and not decision.bottom
    a = decision.adjustment
    assert (a.from_, a.to, a.by, a.step) == (rung(4, 4, True), rung(2, 8, True), "operator", 7)
    assert a.reason == "pod healthcare-assistant-0-abcde OOMKilled"
    assert a.to.micro_batch * a.to.grad_accum == 16
    assert "micro-batch 2 x 8 accumulation" in decision.message


@pytest.mark.parametrize(("start", "expected"), [
    (rung(4, 4, False), rung(2, 8, False)),   # halve first
    (rung(2, 8, False), rung(2, 8, True)),    # once halved, checkpointing on
    (rung(1, 16, True), None),                # the bottom
])
def test_the_ladder_continues_from_the_last_adjustment(start: MemoryRung, expected: MemoryRung | None) -> None:
    cfg = config(rung(4, 4, False))
    if start != rung(4, 4, False):
        cfg.adjustments.append(Adjustment.model_validate(
            {"step": 0, "from": rung(4, 4, False).model_dump(by_alias=True), "to": start.model_dump(by_alias=True),
             "reason": "pod earlier OOMKilled", "by": "operator"}))
    decision = oomkill.decide(pod(), cfg, adjusted_at=None)
    assert decision is not None
    if expected is None:
        assert decision.adjustment is None and decision.bottom
        assert "bottom of the out-of-memory ladder" in decision.message and "micro-batch 4 x 4" in decision.message
    else:
        assert decision.adjustment is not None and decision.adjustment.to == expected


def test_the_ladder_starts_at_the_plans_rung() -> None:
    (loaded,) = load_file(EXAMPLE)
    assert loaded.job is not None and loaded.plan is not None and loaded.plan.rung is not None
    cfg = contract.resolve(loaded.job, loaded.plan)
    assert cfg.start_rung() == cfg.ladder_start() == loaded.plan.rung  # the plan's choice, not batchSize
    # A plan that chose 2 x 8 without checkpointing for the example's batchSize 4 x 4: the first step down halves
    # (from the spec's 4 x 4 it would turn checkpointing on at 2 x 8), then checkpointing comes on.
    cfg = config(rung(2, 8, False))
    first = oomkill.decide(pod(), cfg, adjusted_at=None)
    assert first is not None and first.adjustment is not None
    assert (first.adjustment.from_, first.adjustment.to) == (rung(2, 8, False), rung(1, 16, False))
    cfg.adjustments.append(first.adjustment)
    second = oomkill.decide(pod("healthcare-assistant-0-klmno", created="2026-12-02T10:05:20Z"), cfg,
                            adjusted_at="2026-12-02T10:05:00Z")
    assert second is not None and second.adjustment is not None and second.adjustment.to == rung(1, 16, True)


def test_a_snapshot_without_a_planned_rung_starts_at_the_spec_with_unset_checkpointing_on() -> None:
    cfg = config(None)  # a plan from before plans chose a rung
    assert cfg.spec.hyperparameters.gradient_checkpointing is None
    assert cfg.start_rung() == cfg.ladder_start() == rung(4, 4, True)  # unset was on then, never off by accident
    assert cfg.gradient_checkpointing() is True


def test_a_step_down_the_trainer_reported_is_where_the_pod_was() -> None:
    reported = [Adjustment.model_validate({"step": 1, "from": rung(4, 4, True).model_dump(by_alias=True),
                                           "to": rung(2, 8, True).model_dump(by_alias=True),
                                           "reason": "CUDA out of memory", "by": "trainer"})]
    decision = oomkill.decide(pod(), config(), adjusted_at=None, reported=reported)
    assert decision is not None and decision.adjustment is not None
    assert (decision.adjustment.from_, decision.adjustment.to) == (rung(2, 8, True), rung(1, 16, True))


def test_one_incident_one_step() -> None:
    cfg = config()
    first = oomkill.decide(pod(), cfg, adjusted_at=None)
    assert first is not None and first.adjustment is not None
    cfg.adjustments.append(first.adjustment)
    # The same pod again (a repeated watch event, an operator restart): nothing.
    assert oomkill.decide(pod(), cfg, adjusted_at="2026-12-02T10:05:00Z") is None
    # Another rank of the same group, created before the step down: the same incident.
    assert oomkill.decide(pod("healthcare-assistant-1-fghij"), cfg, adjusted_at="2026-12-02T10:05:00Z") is None
    # The replacement pod, created after it, killed again: the next rung.
    later = oomkill.decide(pod("healthcare-assistant-0-klmno", created="2026-12-02T10:05:20Z"), cfg,
                           adjusted_at="2026-12-02T10:05:00Z")
    assert later is not None and later.adjustment is not None and later.adjustment.to == rung(1, 16, True)


def test_the_step_down_survives_the_config_snapshot_round_trip() -> None:
    cfg = config()
    decision = oomkill.decide(pod(), cfg, adjusted_at=None)
    assert decision is not None and decision.adjustment is not None
    cfg.adjustments.append(decision.adjustment)
    again = contract.TrainerConfig.model_validate_json(contract.config_json(cfg))
    assert again.start_rung() == rung(2, 8, True)
    assert again.adjustments[-1].by == "operator"


def test_the_trainers_retryable_out_of_memory_counts_too_but_not_its_final_one() -> None:
    failed = pod(reason="Error")
    term = failed["status"]["containerStatuses"][0]["state"]["terminated"]
    term.update({"exitCode": 1, "message": "ERROR finetune_trainer: OutOfMemory: out of memory at step 2 with "
                 "micro-batch 4 x 4 ... The next attempt can start at micro-batch 2 x 8"})
    found = oomkill.killed_container(failed, render.CONTAINER_NAME)
    assert found is not None and found["reason"] == oomkill.OUT_OF_MEMORY
    decision = oomkill.decide(failed, config(), adjusted_at=None, step=2, kind=found["reason"])
    assert decision is not None and decision.adjustment is not None
    assert decision.adjustment.reason == "pod healthcare-assistant-0-abcde OutOfMemory"
    assert decision.adjustment.to == rung(2, 8, True)
    term["exitCode"] = contract.EXIT_CONFIG_ERROR  # every rung tried: the Job fails now, nothing to step
    assert oomkill.killed_container(failed, render.CONTAINER_NAME) is None
    term.update({"exitCode": 1, "message": "Traceback ... ValueError"})  # another crash
    assert oomkill.killed_container(failed, render.CONTAINER_NAME) is None
