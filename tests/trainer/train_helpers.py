"""Helpers for the training tests (helper A's): tiny job configs, staged inputs in S3, runs in-process or
through the launcher.

Every run reads its base model and data from the session's S3 server (the real fetch path) and writes
to a fresh output prefix. In-process runs reset accelerate's singleton state first, so several runs can
share one pytest process.
"""

from __future__ import annotations

import copy
import os
import secrets
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_operator.contract import TrainerConfig, config_json, resolve
from finetune_operator.sizing import plan
from finetune_operator.spec import FineTuneJob

REPO = Path(__file__).resolve().parents[2]

#: A spec small enough to train in seconds on one CPU core.
BASE_SPEC: dict[str, Any] = {
    "baseModel": {"uri": "s3://placeholder/model/", "parameters": "1M"},
    "method": "lora",
    "dataset": {"train": "s3://placeholder/train.jsonl"},
    "hyperparameters": {
        "maxSteps": 6,
        "batchSize": 4,
        "gradientAccumulationSteps": 2,
        "learningRate": 3e-3,
        "maxSeqLength": 128,
        "precision": "fp32",
        "warmupRatio": 0.0,
        "seed": 7,
    },
    "checkpoint": {"everySteps": 3, "keep": 2},
    "evaluation": {"maxExamples": 4, "maxNewTokens": 8},
    "output": {"uri": "s3://placeholder/out/"},
}


@dataclass(frozen=True)
class Staged:
    """Inputs uploaded to one bucket of the session's S3 server."""

    bucket: str
    model_uri: str
    train_uri: str
    test_uri: str
    glossary_uri: str

    def output(self, name: str | None = None) -> str:
        return f"s3://{self.bucket}/out-{name or secrets.token_hex(4)}/"


def stage(s3: Any, bucket: str, model_dir: Path, sample: Any) -> Staged:
    """Upload the tiny model and the healthcare sample to `bucket`."""
    client = s3.client()
    for path in sorted(model_dir.iterdir()):
        if path.is_file():
            client.upload_file(str(path), bucket, f"model/{path.name}")
    client.upload_file(str(sample.train), bucket, "data/train.jsonl")
    client.upload_file(str(sample.test), bucket, "data/test.jsonl")
    client.upload_file(str(sample.glossary), bucket, "data/glossary.txt")
    return Staged(bucket, f"s3://{bucket}/model/", f"s3://{bucket}/data/train.jsonl",
                  f"s3://{bucket}/data/test.jsonl", f"s3://{bucket}/data/glossary.txt")


def stage_in_new_bucket(s3: Any, prefix: str, model_dir: Path, sample: Any) -> Staged:
    """`stage` into a fresh bucket `<prefix>-<random>` (each test module its own)."""
    bucket = f"{prefix}-{secrets.token_hex(4)}"
    s3.create_bucket(bucket)
    return stage(s3, bucket, model_dir, sample)


def store(uri: str) -> Any:
    """The trainer's own `Store` for an output URI (what the tests read artifacts back through)."""
    from finetune_trainer.storage import Store

    return Store.for_uri(uri)


def tail_loss(losses: dict[int, float]) -> float:
    """The mean training loss of the last two logged steps (what golden-loss tests pin)."""
    last = sorted(losses)[-2:]
    return sum(losses[s] for s in last) / len(last)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def make_config(staged: Staged, spec: dict[str, Any] | None = None, name: str = "tiny",
                uid: str | None = None) -> TrainerConfig:
    """A resolved TrainerConfig for the staged inputs, with `spec` merged over BASE_SPEC (`uid`: the
    FineTuneJob's metadata.uid, which the trainer writes into its report and pre-flight result)."""
    merged = _merge(BASE_SPEC, {
        "baseModel": {"uri": staged.model_uri},
        "dataset": {"train": staged.train_uri},
        "evaluation": {"testSet": staged.test_uri, "glossary": staged.glossary_uri},
        "output": {"uri": staged.output()},
    })
    merged = _merge(merged, spec or {})
    job = FineTuneJob.model_validate(
        {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
         "metadata": {"name": name, **({"uid": uid} if uid else {})}, "spec": merged})
    return resolve(job, plan(job.spec))


#: Trainer processes in tests use one OpenMP thread. Other test processes share the machine's cores, and
#: oversubscribed OpenMP threads spin at barriers: measured here under load, a tiny training step took
#: 0.9 s with 2 threads against 0.045 s with 1.
THREADS = "1"


def reset_accelerate() -> None:
    """Clear accelerate's process-wide singletons (and pin torch to THREADS threads) before a run."""
    import torch
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch.set_num_threads(int(THREADS))


def run_in_process(config: TrainerConfig, output: str | None = None) -> Any:
    """Run the trainer here (one process); returns train.Outcome. Failures raise."""
    from finetune_trainer.train import Run

    reset_accelerate()
    return Run(config, output).run()


def exit_code_in_process(config: TrainerConfig, output: str | None = None) -> int:
    """The exit code the trainer process would have (entrypoint.run), run here."""
    from finetune_trainer import entrypoint

    reset_accelerate()
    return entrypoint.run(config, output)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def trainer_env(config: TrainerConfig, tmp: Path, s3_env: dict[str, str], **extra: str) -> dict[str, str]:
    """Environment for a trainer subprocess: config file, S3 credentials, a private cache."""
    config_path = tmp / f"job-{secrets.token_hex(3)}.json"
    config_path.write_text(config_json(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FT_", "JOB_COMPLETION"))}
    env.update(s3_env)
    env.update({
        "FT_CONFIG": str(config_path),
        "FT_CACHE_DIR": str(tmp / "cache"),
        "FT_MAIN_PORT": str(free_port()),
        "FT_RDZV_TIMEOUT": "30",
        "PYTHONPATH": os.pathsep.join([str(REPO / "trainer-image"), str(REPO / "operator")]),
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": THREADS,
    })
    env.update(extra)
    return env


def launch(env: dict[str, str], module: str = "finetune_trainer.launch", log: Path | None = None) -> subprocess.Popen[bytes]:
    """Start `python -m module` (the pod's command) with output to `log` (or a pipe).

    The child leads a new process group, so a test can kill it with everything it started (os.killpg).
    """
    out: Any = open(log, "wb") if log else subprocess.PIPE  # noqa: SIM115 - owned by the child
    return subprocess.Popen([sys.executable, "-m", module], env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


def launch_machines(config: TrainerConfig, tmp: Path, s3_env: dict[str, str], *, logs: bool = False,
                    **extra: str) -> tuple[list[subprocess.Popen[bytes]], list[Path]]:
    """Two "machines" on loopback, one process each, rendezvousing as an Indexed Job's pods do: rank r runs in
    `tmp/machine-r` (its log `launch.log` there when `logs`, else a pipe). Returns the processes and logs."""
    port = str(free_port())
    procs, log_paths = [], []
    for rank in (0, 1):
        machine = tmp / f"machine-{rank}"
        machine.mkdir()
        env = trainer_env(config, machine, s3_env, FT_NUM_MACHINES="2", FT_PROCS_PER_MACHINE="1",
                          JOB_COMPLETION_INDEX=str(rank), FT_MAIN_ADDRESS="127.0.0.1", FT_MAIN_PORT=port, **extra)
        log_paths.append(machine / "launch.log")
        procs.append(launch(env, log=log_paths[-1] if logs else None))
    return procs, log_paths


def losses(metrics_text: str) -> dict[int, float]:
    """Step -> training loss from a metrics.jsonl text."""
    import json

    found: dict[int, float] = {}
    for line in metrics_text.splitlines():
        record = json.loads(line)
        if "loss" in record:
            found[record["step"]] = record["loss"]
    return found
