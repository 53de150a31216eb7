"""Fault injection for the trainer's reliability tests (test_faults.py).

Two pieces:

* Watching a trainer subprocess: its progress report and checkpoints in S3, and its own log.
* `python -m tests.trainer.fault_helpers`: the trainer process (`finetune_trainer.entrypoint.main`) with one
  fault injected: the upload of the storage key ending in FT_FAULT_STALL_KEY blocks (before a byte is sent)
  after writing FT_FAULT_STALL_FLAG, so a test can kill the trainer in the middle of a checkpoint upload,
  deterministically. Nothing else changes: the other files of that upload go up in parallel as usual.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_operator.contract import CHECKPOINTS_PREFIX, MARKER_NAME, REPORT_KEY

ENV_STALL_KEY = "FT_FAULT_STALL_KEY"
ENV_STALL_FLAG = "FT_FAULT_STALL_FLAG"
#: How long a trainer subprocess may take to reach a point a test waits for (import, load, a few steps).
WAIT_SECONDS = 180.0
_RESUMING = re.compile(r"resuming from \S+/checkpoints/step-(\d+)")
_STEP_KEY = re.compile(r"^step-(\d+)/(.+)$")


def wait_for(what: str, ready: Callable[[], Any], proc: subprocess.Popen[bytes] | None = None,
             log: Path | None = None, timeout: float = WAIT_SECONDS) -> Any:
    """Poll `ready()` until it returns something truthy; fail (with the log's tail) if `proc` exits first."""
    deadline = time.monotonic() + timeout
    while True:
        value = ready()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-4000:] if log else ""
            raise AssertionError(f"the trainer exited ({proc.returncode}) before {what}:\n{tail}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout:.0f} s")
        time.sleep(0.05)


def wait_for_step(store: Any, step: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Wait until the trainer's progress report says it has done `step` optimizer steps."""
    wait_for(f"step {step}", lambda: report(store).get("step", 0) >= step, proc, log)


def report(store: Any) -> dict[str, Any]:
    return dict(store.read_json(REPORT_KEY)) if store.exists(REPORT_KEY) else {}


def checkpoints(store: Any) -> tuple[list[int], list[int]]:
    """(complete, incomplete) checkpoint steps in storage: complete means `step-N/_COMPLETE` exists.
    Read from the listing here, not through the trainer's code, which is what is under test."""
    steps: dict[int, bool] = {}
    for key in store.list(CHECKPOINTS_PREFIX):
        match = _STEP_KEY.match(key[len(CHECKPOINTS_PREFIX):])
        if match:
            step = int(match.group(1))
            steps[step] = steps.get(step, False) or match.group(2) == MARKER_NAME
    return sorted(s for s, done in steps.items() if done), sorted(s for s, done in steps.items() if not done)


def resumed_from(log_text: str) -> int | None:
    """The checkpoint step a trainer process says it resumed from (None: it started fresh)."""
    found = _RESUMING.findall(log_text)
    assert len(found) <= 1, found
    return int(found[0]) if found else None


def stop(proc: subprocess.Popen[bytes], sig: signal.Signals) -> int:
    """SIGTERM to the process (the pod's PID 1, as the kubelet does) or SIGKILL to its whole group; wait."""
    if sig == signal.SIGKILL:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def manifest_matches(store: Any, prefix: str, *, exclude: tuple[str, ...] = ()) -> list[str]:
    """Check the marker under `prefix` lists exactly the objects there, with their sizes and sha256;
    returns the objects' keys (relative to `prefix`)."""
    import hashlib

    base = f"{prefix}/" if prefix else ""
    manifest = store.read_json(f"{base}{MARKER_NAME}")
    listed = {key[len(base):] for key in store.list(base)} - {MARKER_NAME}
    listed = {key for key in listed if not key.startswith(exclude)}
    entries = {entry["path"]: entry for entry in manifest["files"]}
    assert set(entries) == listed, (sorted(entries), sorted(listed))
    for rel, entry in entries.items():
        data = store.read_bytes(f"{base}{rel}")
        assert len(data) == entry["size"] and hashlib.sha256(data).hexdigest() == entry["sha256"], rel
    return sorted(listed)


@dataclass
class Interruption:
    """One kill of a trainer process and what the next process made of it."""

    signal: str
    target_step: int
    #: Last step the killed process reported.
    step: int
    returncode: int
    complete: list[int]
    incomplete: list[int]
    resumed_from: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def redone(self) -> int:
        """Steps done before the kill that the next process had to do again."""
        return self.step - (self.resumed_from or 0)


# ------------------------------------------------------------------------------------------------
# python -m tests.trainer.fault_helpers: the trainer with a stalled upload
# ------------------------------------------------------------------------------------------------


def _stall_uploads(key_suffix: str, flag: Path) -> None:
    from finetune_trainer.storage import S3Store

    original = S3Store.upload_file

    def upload_file(self: S3Store, local_path: str | os.PathLike[str], key: str) -> None:
        if key.endswith(key_suffix):
            flag.write_text(key)
            time.sleep(3600)  # until the test kills the process
        original(self, local_path, key)

    S3Store.upload_file = upload_file


def main() -> int:
    from finetune_trainer import entrypoint

    _stall_uploads(os.environ[ENV_STALL_KEY], Path(os.environ[ENV_STALL_FLAG]))
    return entrypoint.main()


if __name__ == "__main__":
    sys.exit(main())
