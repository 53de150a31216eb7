"""`python -m finetune_trainer`: one trainer process (started by `launch.py`, one per GPU or CPU slot).

Reads the TrainerConfig JSON from FT_CONFIG (else `contract.CONFIG_PATH`), runs `train.Run`, and maps
the outcome to the contract's exit codes: 0 done (or already complete), 3 (EXIT_CONFIG_ERROR) for a bad
config, world, data, credentials or missing object, 4 (EXIT_GATES_FAILED) for missed evaluation gates,
143 (EXIT_PREEMPTED) after a SIGTERM checkpoint, 1 for anything else (a crash: the Job retries it). Rank 0
records failures in the progress report with their reason. The code is also left in FT_EXIT_DIR for the
launcher, because torchrun reports every failed worker as exit 1.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from finetune_operator.contract import CONFIG_PATH, ENV_CONFIG, EXIT_OK, EXIT_PREEMPTED, TrainerConfig
from finetune_trainer.errors import ConfigError, TrainerFailure

log = logging.getLogger("finetune_trainer")


def load_config(path: str | None = None) -> TrainerConfig:
    where = Path(path or os.environ.get(ENV_CONFIG) or CONFIG_PATH)
    try:
        text = where.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read the trainer config {where} ({err.strerror}); set {ENV_CONFIG} or "
                          f"mount it at {CONFIG_PATH}", reason="MissingConfig") from None
    try:
        return TrainerConfig.model_validate_json(text)
    except ValidationError as err:
        raise ConfigError(f"invalid trainer config {where}: {err}") from None


def setup_logging() -> None:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=os.environ.get("FT_LOG_LEVEL", "INFO").upper(),
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _leave_exit_code(code: int) -> None:
    from finetune_trainer.launch import ENV_EXIT_DIR

    directory = os.environ.get(ENV_EXIT_DIR)
    if directory and code != EXIT_OK:
        Path(directory, f"rank-{os.environ.get('RANK', '0')}").write_text(str(code))


def run(config: TrainerConfig, output_uri: str | None = None) -> int:
    """Run one trainer process in this process; returns the exit code (failures are reported)."""
    from finetune_trainer import tracking
    from finetune_trainer.train import Preempted, Run

    job: Any = Run(config, output_uri)
    try:
        job.run()
    except Preempted as stop:
        log.warning("%s", stop)
        tracking.abandon(job, stop)
        return EXIT_PREEMPTED
    except TrainerFailure as err:
        log.error("%s", err)
        tracking.abandon(job, err)
        if getattr(job, "reporter", None) is not None:
            job.reporter.fail_with(err)
        return err.exit_code
    except Exception as err:
        log.exception("trainer crashed")
        tracking.abandon(job, err)
        if getattr(job, "reporter", None) is not None:
            job.reporter.fail_with(err)
        return 1
    finally:
        _shutdown()
    return EXIT_OK


def _shutdown() -> None:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception as err:
        log.debug("destroy_process_group: %s", err)


def main(argv: list[str] | None = None) -> int:
    del argv  # everything comes from the config file and the environment
    setup_logging()
    try:
        config = load_config()
    except TrainerFailure as err:
        log.error("%s", err)
        code = err.exit_code
    else:
        code = run(config)
    _leave_exit_code(code)
    return code
