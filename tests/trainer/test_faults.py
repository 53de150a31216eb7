"""Trainer faults: kills at random steps, a kill during a checkpoint upload, and S3 outages during uploads.

Kills (one run of 24 steps, checkpoints every 3, keep 2): a seeded RNG picks 7 kill points at random steps,
4 SIGTERM (a real signal to a trainer running in this process, handled by its own handler; the launcher's
forwarding is test_resume's) and 3 SIGKILL (to the process group of a launcher and trainer subprocess:
nothing can clean up), then an 8th, a SIGKILL while checkpoint 21 is being uploaded (its optimizer.pt upload
is held back by `fault_helpers`, the other files are up, the marker is not). After every kill the next
process must resume from the newest COMPLETE checkpoint in storage (never from the partial one, which it deletes and later
writes again, complete), and the run must end with every step's loss equal to the uninterrupted run's.
Tolerance: 1e-4 absolute (as in test_resume: bit-identical in one process; the margin covers subprocesses).

S3 outages (a private LocalS3, not the session's): the server is stopped when the trainer starts uploading
the final artifacts. Back after 30 s, within the storage layer's retry window (FT_S3_RETRY_SECONDS, default
120 s): the uploads are retried, every staged artifact arrives, and `_COMPLETE` is written last, after the
outage, with a manifest that matches the objects. Longer than the window: the run fails (exit 1, retried
by the Job) with nothing marked complete, and the next run completes it.

The figures (kill points, resumes, lost steps, outage) are printed past pytest's capture for the README.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from finetune_operator.contract import EXIT_PREEMPTED, MARKER_NAME
from finetune_trainer.local import scoped_environ
from tests.trainer import fault_helpers as fh
from tests.trainer import train_helpers as th

SEED = 20240611
STEPS = 24
EVERY = 3
#: Random kill points per signal (a fifth SIGKILL comes during a checkpoint upload).
SIGTERMS = 4
SIGKILLS = 3
#: The checkpoint whose upload is killed half-way (after the random kills, among the two kept at the end).
STALL_STEP = 21
TOLERANCE = 1e-4
OUTAGE_SECONDS = 30.0
SPEC: dict[str, Any] = {
    "hyperparameters": {"maxSteps": STEPS, "learningRate": 1e-2},
    "lora": {"dropout": 0.1},  # dropout makes the RNG state matter
    "checkpoint": {"everySteps": EVERY, "keep": 2},
    "evaluation": {"enabled": False},
}


def figure(capsys: pytest.CaptureFixture[str], text: str) -> None:
    """Print a measured figure for the README's reliability section, past pytest's capture."""
    with capsys.disabled():
        print(f"\n[faults] {text}")


def kill_plan(seed: int) -> list[tuple[signal.Signals, int]]:
    """(signal, step to kill at or after) pairs in step order, drawn from a seeded RNG."""
    rng = random.Random(seed)
    signals = [signal.SIGTERM] * SIGTERMS + [signal.SIGKILL] * SIGKILLS
    rng.shuffle(signals)
    steps = sorted(rng.sample(range(2, STALL_STEP - 2), len(signals)))
    return list(zip(signals, steps, strict=True))



def _step_losses(store: Any) -> list[tuple[int, float]]:
    """(step, loss) of every training record in the output's metrics.jsonl, in file order."""
    records = [json.loads(line) for line in store.read_bytes("metrics.jsonl").decode().splitlines() if line]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


@pytest.fixture(scope="module")
def staged(s3: Any, tiny_model_dir: Path, healthcare_sample: Any) -> th.Staged:
    return th.stage_in_new_bucket(s3, "faults", tiny_model_dir, healthcare_sample)


@pytest.fixture(scope="module")
def reference(staged: th.Staged, s3: Any) -> dict[int, float]:
    """Per-step losses of the uninterrupted run (in this process)."""
    with scoped_environ(s3.env()):
        config = th.make_config(staged, SPEC)
        assert th.run_in_process(config).state.step == STEPS
        return dict(_step_losses(th.store(config.spec.output.uri)))


def _started(proc: Any, log: Path) -> int | None:
    """Wait until the trainer subprocess trains; the step it resumed from (None: a fresh start).

    "phase: training" is logged after this process has rewritten the progress report (phase starting,
    its data stats, its resume step), so from then on the report in storage is this process's.
    """
    fh.wait_for("the training phase", lambda: "phase: training" in log.read_text(errors="replace"), proc, log)
    return fh.resumed_from(log.read_text(errors="replace"))


def _sigterm_in_process(config: Any, target: int, monkeypatch: pytest.MonkeyPatch) -> int:
    """Run the trainer in this process and send it (this process) a real SIGTERM once it has reported step
    `target`; its own handler (train.StopFlag) takes it from there. Returns the trainer's exit code.

    Cheaper than a subprocess (no start-up), which is what lets the test afford several kill points; the
    launcher's forwarding of SIGTERM to the trainer is covered by test_resume. A guard handler stands in for
    the default one (which would end pytest) should a signal ever land outside the training loop.
    """
    from finetune_trainer.report import Reporter

    update = Reporter.update
    sent: list[int] = []

    def update_then_signal(self: Reporter, **fields: Any) -> None:
        update(self, **fields)
        if not sent and self.report.phase == "training" and self.report.step >= target:
            sent.append(self.report.step)
            os.kill(os.getpid(), signal.SIGTERM)

    stray: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: stray.append(signum))
    try:
        with monkeypatch.context() as patch:
            patch.setattr(Reporter, "update", update_then_signal)
            code = th.exit_code_in_process(config)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert sent, f"the trainer exited ({code}) before reporting step {target}"
    assert not stray, "a SIGTERM landed outside the training loop"
    return code


def test_kills_resume_from_the_newest_complete_checkpoint(
    s3_env: dict[str, str], staged: th.Staged, tmp_path: Path, reference: dict[int, float],
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str],
) -> None:
    config = th.make_config(staged, SPEC)
    store = th.store(config.spec.output.uri)
    env = th.trainer_env(config, tmp_path, s3_env)
    done: list[fh.Interruption] = []

    def interrupted(sig: signal.Signals, target: int, code: int, how: str) -> fh.Interruption:
        complete, incomplete = fh.checkpoints(store)
        return fh.Interruption(sig.name, target, fh.report(store)["step"], code, complete, incomplete, notes=[how])

    def check_resume(resumed: int | None) -> None:
        """The process started after the last kill resumed from the newest complete checkpoint then."""
        if not done:
            assert resumed is None
            return
        last = done[-1]
        last.resumed_from = resumed
        assert last.complete, f"no complete checkpoint after {last}"  # every kill is after step 3
        assert resumed == last.complete[-1], last

    # -- kills at random steps: SIGTERM in this process, SIGKILL to a trainer subprocess (launcher) -------
    for i, (sig, planned) in enumerate(kill_plan(SEED)):
        resumed = done[-1].complete[-1] if done else None  # where the next run must start
        target = max(planned, (resumed or 0) + 1)
        if sig == signal.SIGTERM:
            code = _sigterm_in_process(config, target, monkeypatch)
            check_resume(fh.report(store).get("resumedFromStep"))
            kill = interrupted(sig, planned, code, "(in-process trainer)")
            assert code == EXIT_PREEMPTED
            assert kill.complete[-1] == kill.step, kill  # a checkpoint of the step it stopped at
        else:
            log = tmp_path / f"trainer-{i}.log"
            proc = th.launch(env, log=log)
            try:
                check_resume(_started(proc, log))
                fh.wait_for_step(store, target, proc, log)
                code = fh.stop(proc, sig)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            kill = interrupted(sig, planned, code, "(launcher and trainer subprocess)")
            assert code == -signal.SIGKILL
        assert not store.exists(MARKER_NAME)
        done.append(kill)

    # -- a SIGKILL while checkpoint STALL_STEP is being uploaded -------------------------------------
    flag = tmp_path / "stalled"
    stall_env = dict(env, PYTHONPATH=os.pathsep.join([env["PYTHONPATH"], str(th.REPO)]))
    stall_env.update({fh.ENV_STALL_KEY: f"checkpoints/step-{STALL_STEP}/optimizer.pt", fh.ENV_STALL_FLAG: str(flag)})
    log = tmp_path / "trainer-stalled.log"
    proc = th.launch(stall_env, module="tests.trainer.fault_helpers", log=log)
    partial = f"checkpoints/step-{STALL_STEP}/"
    try:
        check_resume(_started(proc, log))
        fh.wait_for("the stalled checkpoint upload", flag.exists, proc, log)
        # The checkpoint's files upload concurrently: wait for the ones the assertions below name.
        others = [partial + "trainer_state.json", partial + "model/adapter_model.safetensors"]
        fh.wait_for("the checkpoint's other files", lambda: all(store.exists(k) for k in others), proc, log)
        code = fh.stop(proc, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    kill = interrupted(signal.SIGKILL, STALL_STEP, code, f"during the upload of checkpoint {STALL_STEP}")
    assert STALL_STEP in kill.incomplete and STALL_STEP not in kill.complete, kill
    left = store.list(partial)
    assert partial + "model/adapter_model.safetensors" in left and partial + "optimizer.pt" not in left, left
    done.append(kill)

    # -- the last restart, in this process: ignores and deletes the partial checkpoint, finishes -----------
    caplog.set_level(logging.INFO, logger="finetune_trainer")
    outcome = th.run_in_process(config)
    check_resume(outcome.resumed_from)
    assert f"deleting incomplete checkpoint {store.child(partial.rstrip('/'))}" in caplog.text
    assert outcome.state.step == STEPS and store.is_complete("")

    # Checkpoint 21 was written again, complete: its marker lists exactly its objects (no leftovers).
    complete, incomplete = fh.checkpoints(store)
    assert incomplete == [] and complete == [STALL_STEP, STEPS], (complete, incomplete)
    assert "optimizer.pt" in fh.manifest_matches(store, partial.rstrip("/"))
    fh.manifest_matches(store, f"checkpoints/step-{STEPS}")

    # Every step once, with the uninterrupted run's loss.
    steps = _step_losses(store)
    assert [s for s, _ in steps] == list(range(1, STEPS + 1))
    lost = [s for s, loss in steps if abs(loss - reference[s]) > TOLERANCE]
    assert lost == [], {s: (dict(steps)[s], reference[s]) for s in lost}
    worst = max(abs(loss - reference[s]) for s, loss in steps)
    newest = sum(k.resumed_from == k.complete[-1] for k in done)
    from_partial = sum(k.resumed_from in k.incomplete for k in done)
    assert (newest, from_partial) == (len(done), 0)

    for kill in done:
        figure(capsys, f"{kill.signal} at step {kill.step} (planned >= {kill.target_step}) {kill.notes[0]}: "
               f"exit {kill.returncode}, complete checkpoints "
               f"{kill.complete}, partial {kill.incomplete}, resumed from {kill.resumed_from}, "
               f"{kill.redone} step(s) redone")
    terms = sum(k.signal == "SIGTERM" for k in done)
    figure(capsys, f"{len(done)} kill points ({terms} SIGTERM, {len(done) - terms} SIGKILL, 1 of them during a "
           f"checkpoint upload): {newest} resumed from the newest complete checkpoint, {from_partial} from a "
           f"partial one; {len(steps)} of {STEPS} steps present, {len(lost)} lost (loss off by more than "
           f"{TOLERANCE:g}); max |loss - uninterrupted| = {worst:.1e}; {sum(k.redone for k in done)} step(s) "
           "redone in all")


def test_sigterm_during_a_checkpoint_upload_stops_after_it(
    s3_env: dict[str, str], staged: th.Staged, reference: dict[int, float], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """SIGTERM while checkpoint 6 uploads: that step is saved, so the trainer stops right after the upload
    (exit 143), not one step and one more checkpoint later (time the pod's grace period may not have)."""
    from finetune_trainer.storage import S3Store

    config = th.make_config(staged, SPEC)
    store = th.store(config.spec.output.uri)
    upload = S3Store.upload_file
    sent: list[str] = []

    def upload_then_signal(self: S3Store, local_path: Any, key: str) -> None:
        if key.startswith("checkpoints/step-6/") and not sent:
            sent.append(key)
            os.kill(os.getpid(), signal.SIGTERM)  # handled by the trainer's StopFlag (main thread)
        upload(self, local_path, key)

    stray: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: stray.append(signum))
    try:
        with monkeypatch.context() as patch:
            patch.setattr(S3Store, "upload_file", upload_then_signal)
            code = th.exit_code_in_process(config)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert sent and not stray
    assert code == EXIT_PREEMPTED
    complete, incomplete = fh.checkpoints(store)
    assert (complete, incomplete) == ([3, 6], []), (complete, incomplete)
    assert fh.report(store)["step"] == 6

    outcome = th.run_in_process(config)
    assert outcome.resumed_from == 6
    steps = _step_losses(store)
    assert [s for s, _ in steps] == list(range(1, STEPS + 1))
    assert all(abs(loss - reference[s]) <= TOLERANCE for s, loss in steps)
    figure(capsys, "SIGTERM during the upload of checkpoint 6: stopped after it (exit 143, no step 7), resumed "
           "from 6, 24 of 24 steps with the uninterrupted losses")


# ------------------------------------------------------------------------------------------------
# S3 outages
# ------------------------------------------------------------------------------------------------


class Outage:
    """Stops `server` when the trainer (this process) starts uploading a final artifact; records every
    successful write (key, time) of the output store. `back_after`: seconds until the server is started
    again (None: not by this object)."""

    def __init__(self, server: Any, bucket: str, back_after: float | None):
        self.server, self.bucket, self.back_after = server, bucket, back_after
        self.writes: list[tuple[str, float]] = []
        self.stopped: float | None = None
        self.started: float | None = None
        self.timer: threading.Timer | None = None
        self._lock = threading.Lock()

    def _restart(self) -> None:
        self.server.start()
        self.started = time.monotonic()

    def _maybe_stop(self, key: str) -> None:
        with self._lock:
            # Not for the TensorBoard event files either: they go up at every checkpoint, during training.
            if self.stopped is None and not key.startswith(("checkpoints/", "status/", "tensorboard/")):
                self.server.stop()
                self.stopped = time.monotonic()
                if self.back_after is not None:
                    self.timer = threading.Timer(self.back_after, self._restart)
                    self.timer.start()

    @classmethod
    def installed(cls, monkeypatch: pytest.MonkeyPatch, server: Any, bucket: str,
                  back_after: float | None) -> Outage:
        from finetune_trainer.storage import S3Store

        outage = cls(server, bucket, back_after)
        upload, write = S3Store.upload_file, S3Store.write_bytes

        def upload_file(self: S3Store, local_path: Any, key: str) -> None:
            if self.bucket == bucket:
                outage._maybe_stop(key)
            upload(self, local_path, key)
            if self.bucket == bucket:
                with outage._lock:
                    outage.writes.append((key, time.monotonic()))

        def write_bytes(self: S3Store, key: str, data: bytes) -> None:
            write(self, key, data)
            if self.bucket == bucket:
                with outage._lock:
                    outage.writes.append((key, time.monotonic()))

        monkeypatch.setattr(S3Store, "upload_file", upload_file)
        monkeypatch.setattr(S3Store, "write_bytes", write_bytes)
        return outage


@pytest.fixture(scope="module")
def private_s3() -> Iterator[Any]:
    """A LocalS3 of these tests' own: they stop it."""
    from finetune_trainer.s3server import LocalS3

    with LocalS3(buckets=("outage",)) as server:
        yield server


@pytest.fixture
def private_env(private_s3: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_model_dir: Path,
                healthcare_sample: Any) -> th.Staged:
    for name, value in private_s3.env().items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "FT_S3_RETRY_SECONDS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FT_CACHE_DIR", str(tmp_path / "cache"))
    return th.stage(private_s3, "outage", tiny_model_dir, healthcare_sample)


OUTAGE_SPEC: dict[str, Any] = {
    "hyperparameters": {"maxSteps": 4},
    "checkpoint": {"everySteps": 2, "keep": 2},
    "evaluation": {"enabled": False},
}


def _final_artifacts_complete(store: Any, tmp_path: Path, config: Any) -> tuple[list[str], list[str]]:
    """The output's `_COMPLETE` manifest matches the objects (sizes, sha256), and every file the trainer
    staged locally is among them. Returns (objects, staged files)."""
    keys = fh.manifest_matches(store, "", exclude=("checkpoints/", "status/"))
    staged_dir = next((tmp_path / "cache" / "work").glob(f"{config.name}-*-rank0")) / "artifacts"
    local = sorted(p.relative_to(staged_dir).as_posix() for p in staged_dir.rglob("*") if p.is_file())
    assert keys == local, (keys, local)
    assert {"model/adapter_model.safetensors", "model/adapter_config.json", "metrics.jsonl", "evaluation.json",
            "provenance.json", "README.md"} <= set(keys)
    return keys, local


def test_s3_outage_during_the_final_upload_is_ridden_out(
    private_s3: Any, private_env: th.Staged, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str],
) -> None:
    config = th.make_config(private_env, OUTAGE_SPEC)
    store = th.store(config.spec.output.uri)
    assert store.retry_seconds == 120.0  # the default window (FT_S3_RETRY_SECONDS unset)
    outage = Outage.installed(monkeypatch, private_s3, "outage", back_after=OUTAGE_SECONDS)
    caplog.set_level(logging.WARNING, logger="finetune_trainer.storage")
    try:
        outcome = th.run_in_process(config)
    finally:
        if outage.timer is not None:
            outage.timer.join()
    assert outcome.state.step == 4
    assert outage.stopped is not None and outage.started is not None
    down = outage.started - outage.stopped
    assert down >= OUTAGE_SECONDS
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    artifact_retries = [m for m in retries if "/checkpoints/" not in m and "/status/" not in m]
    assert artifact_retries, f"no artifact upload was retried: the outage missed the upload ({retries})"

    # The marker is the last write, after the outage, after every file it lists.
    final = [(key, at) for key, at in outage.writes if not key.startswith(("checkpoints/", "status/"))]
    assert final[-1][0] == MARKER_NAME and [k for k, _ in final].count(MARKER_NAME) == 1, final
    assert final[-1][1] > outage.started
    # Each checkpoint's marker came after its own files too.
    for step in (2, 4):
        own = [(k, at) for k, at in outage.writes if k.startswith(f"checkpoints/step-{step}/")]
        assert own[-1][0] == f"checkpoints/step-{step}/{MARKER_NAME}", own
    keys, local = _final_artifacts_complete(store, tmp_path, config)
    assert [s for s, _ in _step_losses(store)] == [1, 2, 3, 4]
    lost = sorted(set(local) - set(keys))
    figure(capsys, f"1 S3 outage of {OUTAGE_SECONDS:.0f} s during the final upload (server down {down:.1f} s, "
           f"retry window {store.retry_seconds:.0f} s): {len(artifact_retries)} artifact upload attempt(s) "
           f"retried, {len(keys)} of {len(local)} staged artifacts in S3, {len(lost)} lost; _COMPLETE written "
           "last, after the outage, its manifest matching the objects")


def test_s3_outage_longer_than_the_retry_window_fails_with_nothing_complete(
    private_s3: Any, private_env: th.Staged, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = th.make_config(private_env, OUTAGE_SPEC)
    store = th.store(config.spec.output.uri)
    monkeypatch.setenv("FT_S3_RETRY_SECONDS", "3")
    with monkeypatch.context() as patch:
        outage = Outage.installed(patch, private_s3, "outage", back_after=None)
        try:
            code = th.exit_code_in_process(config)
        finally:
            private_s3.start()
    assert outage.stopped is not None
    assert code == 1  # StorageUnavailable: the Job retries the pod
    assert not store.exists(MARKER_NAME)
    assert fh.checkpoints(store)[0] == [2, 4]

    # The Job's next pod: resumes after the last step, uploads everything, marks the output complete.
    monkeypatch.delenv("FT_S3_RETRY_SECONDS")
    outcome = th.run_in_process(config)
    assert outcome.resumed_from == 4 and store.is_complete("")
    keys, _ = _final_artifacts_complete(store, tmp_path, config)
    figure(capsys, f"S3 outage longer than the retry window (3 s): exit 1 (retryable), no _COMPLETE; the next "
           f"run resumed from step 4 and completed, {len(keys)} artifacts, manifest matches")
