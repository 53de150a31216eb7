"""Checkpoints and resume: killed or stopped runs continue from their newest complete checkpoint and end
with the uninterrupted run's losses; a checkpoint without its marker is ignored.

Tolerance: per-step training losses after resuming must equal the uninterrupted run's within 1e-4
(absolute). Resume restores weights, AdamW state, scheduler, RNG states and the data position exactly, so
in one process the losses are bit-identical; the margin covers runs in a subprocess, whose OpenMP thread
count (set by the launcher) can change the order of floating-point reductions.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from finetune_operator.contract import EXIT_PREEMPTED, MARKER_NAME, REPORT_KEY
from finetune_trainer.local import scoped_environ
from tests.trainer import fault_helpers as fh
from tests.trainer import train_helpers as th

TOLERANCE = 1e-4
SPEC: dict[str, Any] = {
    "hyperparameters": {"maxSteps": 16, "learningRate": 1e-2},
    "lora": {"dropout": 0.1},  # dropout makes the RNG state matter
    "checkpoint": {"everySteps": 3, "keep": 2},
    "evaluation": {"enabled": False},
}


@pytest.fixture(scope="module")
def staged(s3: Any, tiny_model_dir: Path, healthcare_sample: Any) -> th.Staged:
    return th.stage_in_new_bucket(s3, "resume", tiny_model_dir, healthcare_sample)



def _losses(uri: str) -> dict[int, float]:
    return th.losses(th.store(uri).read_bytes("metrics.jsonl").decode())


@pytest.fixture(scope="module")
def reference(staged: th.Staged, s3: Any) -> dict[int, float]:
    """Per-step losses of the uninterrupted run."""
    with scoped_environ(s3.env()):
        config = th.make_config(staged, SPEC)
        outcome = th.run_in_process(config)
        assert outcome.state.step == 16
        return _losses(config.spec.output.uri)


def _assert_matches(reference: dict[int, float], resumed: dict[int, float]) -> None:
    assert sorted(resumed) == sorted(reference)
    for step, loss in reference.items():
        assert resumed[step] == pytest.approx(loss, abs=TOLERANCE), f"step {step}"


def test_checkpoint_without_marker_is_ignored(s3: Any, s3_env: Any, staged: th.Staged,
                                             reference: dict[int, float]) -> None:
    config = th.make_config(staged, SPEC)
    output = config.spec.output.uri
    th.run_in_process(config)
    store = th.store(output)
    assert [k for k in store.list("checkpoints/") if k.endswith(MARKER_NAME)] == [
        "checkpoints/step-15/_COMPLETE", "checkpoints/step-16/_COMPLETE"]  # keep: 2
    # The writer of step 16 "died" before its marker, and the output was never finished.
    prefix = output[len(f"s3://{staged.bucket}/"):]
    for key in ("checkpoints/step-16/_COMPLETE", MARKER_NAME):
        s3.client().delete_object(Bucket=staged.bucket, Key=prefix + key)
    outcome = th.run_in_process(config)
    assert outcome.resumed_from == 15
    assert outcome.state.step == 16
    assert store.is_complete("checkpoints/step-16") and store.is_complete("")
    _assert_matches(reference, _losses(output))


def test_killed_run_resumes_from_its_checkpoint(s3_env: dict[str, str], staged: th.Staged, tmp_path: Path,
                                                reference: dict[int, float]) -> None:
    config = th.make_config(staged, SPEC)
    output = config.spec.output.uri
    store = th.store(output)
    env = th.trainer_env(config, tmp_path, s3_env)
    log = tmp_path / "trainer.log"
    proc = th.launch(env, log=log)
    try:
        fh.wait_for("checkpoint 3", lambda: store.exists("checkpoints/step-3/_COMPLETE"), proc, log, timeout=180)
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the trainer: no chance to clean up
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not store.exists(MARKER_NAME)
    outcome = th.run_in_process(config)
    assert outcome.resumed_from is not None and 3 <= outcome.resumed_from < 16
    _assert_matches(reference, _losses(output))


def test_sigterm_saves_a_checkpoint_and_exits_143(s3_env: dict[str, str], staged: th.Staged, tmp_path: Path,
                                                  reference: dict[int, float]) -> None:
    config = th.make_config(staged, SPEC)
    output = config.spec.output.uri
    store = th.store(output)
    env = th.trainer_env(config, tmp_path, s3_env)
    log = tmp_path / "trainer.log"
    proc = th.launch(env, log=log)
    try:
        fh.wait_for("step 1", lambda: fh.report(store).get("step", 0) >= 1, proc, log, timeout=180)
        proc.send_signal(signal.SIGTERM)  # to the launcher, as Kubernetes does to PID 1
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = (tmp_path / "trainer.log").read_text()
    assert proc.returncode == EXIT_PREEMPTED, log[-3000:]
    report = store.read_json(REPORT_KEY)
    stopped = report["checkpoints"][-1]["step"]
    assert 1 <= stopped < 16, report
    assert store.is_complete(f"checkpoints/step-{stopped}") and not store.exists(MARKER_NAME)
    outcome = th.run_in_process(config)
    assert outcome.resumed_from == stopped
    _assert_matches(reference, _losses(output))
