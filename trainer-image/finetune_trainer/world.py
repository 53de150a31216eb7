"""The distributed world a training pod was given, read from the environment (see `contract.ENV_*`).

The operator runs one pod per machine (an Indexed Job): `FT_NUM_MACHINES` pods, each with
`FT_PROCS_PER_MACHINE` processes (one per GPU), machine rank from `JOB_COMPLETION_INDEX`, and pod 0's stable
address in `FT_MAIN_ADDRESS`/`FT_MAIN_PORT`. `launch.py` turns this into an `accelerate launch` command;
the trainer checks that the world torch.distributed actually formed has the size the pod was given,
because accelerate silently falls back to a single process when its multi-node settings do not reach
torch (a known trap: every pod then trains alone on the whole data set and they overwrite each other).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from finetune_operator.contract import (
    DEFAULT_MAIN_PORT,
    DEFAULT_RDZV_TIMEOUT,
    ENV_MACHINE_RANK,
    ENV_MAIN_ADDRESS,
    ENV_MAIN_PORT,
    ENV_NUM_MACHINES,
    ENV_PROCS_PER_MACHINE,
    ENV_RDZV_TIMEOUT,
)
from finetune_trainer.errors import ConfigError

#: Seconds a collective (all-reduce, barrier) may wait for a peer before the process fails (exit 1,
#: retried by the Job). A peer that vanished without closing its connections (a lost node, a partition, a
#: frozen process) otherwise blocks the survivors for torch's default: 30 minutes on gloo. 600 s is torch's
#: own default for NCCL, so GPU runs keep their behaviour; it must exceed the longest stretch one rank works
#: while the others wait (rank 0's checkpoint and artifact uploads).
ENV_COLLECTIVE_TIMEOUT = "FT_COLLECTIVE_TIMEOUT"
DEFAULT_COLLECTIVE_TIMEOUT = 600
#: Seconds the other ranks wait for rank 0 to publish the artifacts (`publish_barrier`). Rank 0 alone then
#: merges the model shard by shard (saveMerged), reloads the base for the export check, draws the charts and
#: uploads everything: for a 70B model that takes far longer than the collective timeout, whose watchdog
#: would kill the waiting ranks (and fail the run) after training succeeded. So that one wait runs on a gloo
#: group of its own with this timeout (default 4 hours). A rank 0 that crashes closes its connections and
#: fails the others at once; only one frozen or lost without a word holds them up to this long.
ENV_PUBLISH_TIMEOUT = "FT_PUBLISH_TIMEOUT"
DEFAULT_PUBLISH_TIMEOUT = 4 * 3600


@dataclass(frozen=True)
class World:
    num_machines: int
    machine_rank: int
    procs_per_machine: int
    main_address: str
    main_port: int
    rdzv_timeout: int
    collective_timeout: int = DEFAULT_COLLECTIVE_TIMEOUT

    @property
    def size(self) -> int:
        return self.num_machines * self.procs_per_machine


def _int(env: Mapping[str, str], name: str, default: int, low: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer", reason="InvalidWorld") from None
    if value < low:
        raise ConfigError(f"environment variable {name}={value} must be at least {low}", reason="InvalidWorld")
    return value


def default_procs_per_machine() -> int:
    """One process per visible GPU, else one (CPU)."""
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except ImportError:  # pragma: no cover - torch is in the trainer image
        return 1


def from_env(env: Mapping[str, str] | None = None) -> World:
    """The world from the environment; unset variables mean a single machine."""
    env = os.environ if env is None else env
    num_machines = _int(env, ENV_NUM_MACHINES, 1, 1)
    rank = _int(env, ENV_MACHINE_RANK, 0, 0)
    if rank >= num_machines:
        raise ConfigError(
            f"{ENV_MACHINE_RANK}={rank} is not below {ENV_NUM_MACHINES}={num_machines}", reason="InvalidWorld"
        )
    procs = _int(env, ENV_PROCS_PER_MACHINE, 0, 1) or default_procs_per_machine()
    address = env.get(ENV_MAIN_ADDRESS) or "127.0.0.1"
    if num_machines > 1 and not env.get(ENV_MAIN_ADDRESS):
        raise ConfigError(f"{ENV_MAIN_ADDRESS} must name machine 0 when {ENV_NUM_MACHINES} > 1",
                          reason="InvalidWorld")
    return World(
        num_machines=num_machines,
        machine_rank=rank,
        procs_per_machine=procs,
        main_address=address,
        main_port=_int(env, ENV_MAIN_PORT, DEFAULT_MAIN_PORT, 1),
        rdzv_timeout=_int(env, ENV_RDZV_TIMEOUT, DEFAULT_RDZV_TIMEOUT, 1),
        collective_timeout=collective_timeout(env),
    )


def collective_timeout(env: Mapping[str, str] | None = None) -> int:
    """Seconds a collective waits for a peer (`FT_COLLECTIVE_TIMEOUT`, default 600)."""
    return _int(os.environ if env is None else env, ENV_COLLECTIVE_TIMEOUT, DEFAULT_COLLECTIVE_TIMEOUT, 1)


def publish_timeout(env: Mapping[str, str] | None = None) -> int:
    """Seconds the other ranks wait for rank 0's publishing (`FT_PUBLISH_TIMEOUT`, default 4 hours)."""
    return _int(os.environ if env is None else env, ENV_PUBLISH_TIMEOUT, DEFAULT_PUBLISH_TIMEOUT, 1)


_publish_group: Any = None


def _distributed() -> Any:
    """torch.distributed when this process is in a world of more than one, else None."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return None
    return dist


def publish_group() -> Any:
    """The gloo group `publish_barrier` waits on (timeout `publish_timeout()`), created once per process; None
    in a single-process run. Creating it is collective: every rank calls this at the same point, before rank 0
    starts its long work (`artifacts.publish`), so the creation itself never waits on a busy rank 0."""
    global _publish_group
    dist = _distributed()
    if dist is None:
        return None
    if _publish_group is None:
        _publish_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=publish_timeout()))
    return _publish_group


def publish_barrier() -> None:
    """Wait, up to `FT_PUBLISH_TIMEOUT`, until every rank is here (rank 0 last, done publishing); nothing in
    a single-process run."""
    group = publish_group()
    if group is not None:
        _distributed().barrier(group=group)


def expected_size(env: Mapping[str, str] | None = None) -> int | None:
    """The world size the pod was given, or None when the environment does not say (a plain local run)."""
    env = os.environ if env is None else env
    if not env.get(ENV_NUM_MACHINES) and not env.get(ENV_PROCS_PER_MACHINE):
        return None
    return from_env(env).size


def check_rendezvous(rendezvous_id: str | None, env: Mapping[str, str] | None = None) -> None:
    """Stop (ConfigError, exit 3) when a multi-machine world rendezvoused under another id than the job's
    random one (the config snapshot's `rendezvousId`; torchrun tells its workers in TORCHELASTIC_RUN_ID): the
    store's keys would then be the default `torch.rendezvous.none`, which any pod that reaches the port can
    address."""
    env = os.environ if env is None else env
    run_id = env.get("TORCHELASTIC_RUN_ID")
    if not rendezvous_id or run_id is None or _int(env, ENV_NUM_MACHINES, 1, 1) < 2:
        return
    if run_id != rendezvous_id:
        raise ConfigError(
            f"the rendezvous ran under id {run_id!r}, not the job's rendezvousId; start the trainer with "
            "`python -m finetune_trainer.launch`, which passes it to torchrun",
            reason="RendezvousMismatch",
        )


def check_size(actual: int, env: Mapping[str, str] | None = None) -> None:
    """Stop (ConfigError, exit 3) when torch.distributed's world differs from the one the pod was given."""
    expected = expected_size(env)
    if expected is not None and actual != expected:
        raise ConfigError(
            f"torch.distributed formed a world of {actual} process(es) but this pod was given {expected} "
            f"({ENV_NUM_MACHINES} x {ENV_PROCS_PER_MACHINE}); the launcher did not reach every process. "
            "Start the trainer with `python -m finetune_trainer.launch`, not `python -m finetune_trainer`",
            reason="WorldSizeMismatch",
        )
