"""`python -m finetune_trainer.launch`: what a training pod runs. Starts the trainer processes and
supervises them.

The world comes from the environment (`world.py`). With more than one process it runs

    python -m accelerate.commands.launch --multi_gpu --num_machines N --machine_rank R
        --main_process_ip ADDR --main_process_port PORT --num_processes N*P
        [--rdzv_backend c10d --rdzv_conf join_timeout=T,read_timeout=T,is_host=0|1]
        --max_restarts 0 --module finetune_trainer

`--multi_gpu` is also what starts several CPU processes (gloo): `accelerate launch --cpu` with several
processes silently runs one. Across machines the rendezvous is c10d with a join timeout (FT_RDZV_TIMEOUT,
default 300 s), so a missing peer fails the pod instead of hanging it; machine 0 hosts the store.
With a single process the trainer runs directly: accelerate's simple launcher would not pass SIGTERM on.

Why this is a supervisor and not an `exec`:

- Exit codes. torchrun turns any failed worker into exit 1, which would hide the codes the Job's
  podFailurePolicy acts on (3: bad config/data/credentials, 4: gates missed, 143: preempted). Workers leave
  their code in FT_EXIT_DIR (see `entrypoint.py`); the launcher exits with the most telling one.
- SIGTERM. Kubernetes signals PID 1 only. The launcher passes SIGTERM straight to the worker processes
  (not to torchrun's agent, which would SIGKILL them 30 s later), so each saves its checkpoint and exits 143.

Across machines the launcher first waits until the main address resolves (`wait_for_address`, bounded by
the rendezvous timeout). A new pod's DNS record (`<job>-0.<service>.<ns>.svc`) appears about a second after
the pod starts (CoreDNS and the test node's DNS alike, and CoreDNS caches the negative answer). torch's c10d
rendezvous resolves that name once: on machine 0 a failed lookup makes its agent give up hosting the store
and join as a client, so nobody hosts it and every machine times out (seen on a real node).

On CPU each process gets OMP_NUM_THREADS = cores / processes (1 on a 2-core machine with 2 processes)
unless set; oversubscribed OpenMP threads make gloo runs many times slower.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from finetune_operator.contract import (
    ENV_CONFIG,
    EXIT_CONFIG_ERROR,
    EXIT_GATES_FAILED,
    EXIT_OK,
    EXIT_PREEMPTED,
)
from finetune_trainer import world as world_mod
from finetune_trainer.errors import TrainerFailure

#: Directory where each worker writes its exit code (file named by its global rank).
ENV_EXIT_DIR = "FT_EXIT_DIR"
#: The order in which worker exit codes explain a failure: a config error on one rank is the cause
#: of the others' collective failures, so it wins over a crash.
EXIT_PRIORITY = (EXIT_CONFIG_ERROR, EXIT_GATES_FAILED, EXIT_PREEMPTED)


def command(world: world_mod.World, python: str = sys.executable) -> list[str]:
    """The command that starts this machine's trainer processes."""
    if world.size == 1:
        return [python, "-m", "finetune_trainer"]
    cmd = [
        python, "-m", "accelerate.commands.launch",
        "--multi_gpu",
        "--num_machines", str(world.num_machines),
        "--machine_rank", str(world.machine_rank),
        "--main_process_ip", world.main_address,
        "--main_process_port", str(world.main_port),
        "--num_processes", str(world.size),
        "--mixed_precision", "no",  # the trainer picks precision from the spec
        "--dynamo_backend", "no",
        "--max_restarts", "0",  # restarts are the Job's business (backoffLimit), not torchrun's
        "--monitor_interval", "1",
    ]
    if world.num_machines > 1:
        is_host = 1 if world.machine_rank == 0 else 0
        cmd += [
            "--rdzv_backend", "c10d",
            "--rdzv_conf",
            f"join_timeout={world.rdzv_timeout},read_timeout={world.rdzv_timeout},is_host={is_host}",
        ]
    return [*cmd, "--module", "finetune_trainer"]


def rendezvous_id(env: Mapping[str, str]) -> str | None:
    """The job's random rendezvous id, from its config snapshot (`rendezvousId`; see contract.TrainerConfig)."""
    path = env.get(ENV_CONFIG)
    if not path:
        return None
    try:
        value = json.loads(Path(path).read_text()).get("rendezvousId")
    except (OSError, ValueError, AttributeError):
        return None  # the trainer itself reports an unreadable config, with its reason
    return str(value) if value else None


def environment(world: world_mod.World, base: Mapping[str, str], exit_dir: Path, cuda: bool) -> dict[str, str]:
    env = dict(base)
    env[ENV_EXIT_DIR] = str(exit_dir)
    rdzv_id = rendezvous_id(base)
    if rdzv_id and world.num_machines > 1:
        # torchrun's --rdzv-id, through the environment variable its argument parser reads (accelerate launch
        # passes on only the torchrun arguments it knows, and --rdzv-id is not one of them).
        env["PET_RDZV_ID"] = rdzv_id
    # The trainer checks the world it joins against these (world.check_size).
    env.setdefault(world_mod.ENV_NUM_MACHINES, str(world.num_machines))
    env.setdefault(world_mod.ENV_PROCS_PER_MACHINE, str(world.procs_per_machine))
    if not cuda and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // world.procs_per_machine))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def wait_for_address(address: str, timeout: float, interval: float = 0.5,
                     resolve: Callable[[str], object] = socket.gethostbyname,
                     clock: Callable[[], float] = time.monotonic,
                     sleep: Callable[[float], None] = time.sleep) -> float | None:
    """Wait until `address` resolves; the seconds waited, or None when it still did not after `timeout`."""
    start = clock()
    while True:
        try:
            resolve(address)
            return clock() - start
        except OSError:  # socket.gaierror: not (yet) known
            if clock() - start >= timeout:
                return None
            sleep(interval)


def exit_code(child_returncode: int, worker_codes: Sequence[int]) -> int:
    """The pod's exit code from the launcher child's code and the codes workers left."""
    for wanted in EXIT_PRIORITY:
        if wanted in worker_codes:
            return wanted
    if child_returncode == EXIT_OK:
        return EXIT_OK
    if child_returncode in EXIT_PRIORITY:
        return child_returncode
    return 1


def read_worker_codes(exit_dir: Path) -> list[int]:
    codes = []
    for path in exit_dir.glob("rank-*"):
        try:
            codes.append(int(path.read_text().strip()))
        except ValueError:
            continue
    return codes


def _workers(child: subprocess.Popen[bytes], world: world_mod.World) -> list[int]:
    """PIDs to signal: the trainer itself (one process) or the processes torchrun's agent started."""
    if world.size == 1:
        return [child.pid]
    import psutil

    try:
        return [p.pid for p in psutil.Process(child.pid).children(recursive=False)]
    except psutil.NoSuchProcess:
        return []


def run(world: world_mod.World, env: Mapping[str, str] | None = None) -> int:
    """Start the trainer processes, pass SIGTERM/SIGINT on to them, and return the pod's exit code."""
    import torch

    cuda = torch.cuda.is_available()
    if world.num_machines > 1:
        waited = wait_for_address(world.main_address, world.rdzv_timeout)
        if waited is None:
            # Exit 1: retryable (the Job's backoffLimit), unlike a configuration error.
            print(f"finetune-trainer: RendezvousAddressUnresolved: {world.main_address} did not resolve within "
                  f"{world.rdzv_timeout} s (FT_RDZV_TIMEOUT); is the headless Service {world.main_address.split('.')[1]} "
                  "there, and does the cluster DNS publish not-ready pods?", file=sys.stderr, flush=True)
            return 1
        if waited >= 0.5:  # it had to wait for the DNS record: worth a line in the pod's log
            print(f"finetune-trainer: {world.main_address} resolved after {waited:.1f} s", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="ft-exit-") as tmp:
        exit_dir = Path(tmp)
        child_env = environment(world, os.environ if env is None else env, exit_dir, cuda)
        cmd = command(world)
        print("finetune-trainer: " + " ".join(cmd), file=sys.stderr, flush=True)
        child = subprocess.Popen(cmd, env=child_env)

        received: list[int] = []

        def forward(signum: int, _frame: object) -> None:
            received.append(signum)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
        delivered = 0
        try:
            # Deliver signals from this loop, not the handler: a SIGTERM that arrives while torchrun is
            # still starting its workers is held until they exist.
            while (returncode := child.poll()) is None:
                if delivered < len(received):
                    workers = _workers(child, world)
                    for pid in workers:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, received[-1])
                    if workers:
                        delivered = len(received)
                time.sleep(0.2)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        code = exit_code(returncode, read_worker_codes(exit_dir))
        if received and code not in (EXIT_OK, EXIT_CONFIG_ERROR, EXIT_GATES_FAILED):
            # Stopped from outside before a worker could checkpoint (e.g. still importing): still a
            # preemption for the Job, not a crash that uses up its backoffLimit.
            return EXIT_PREEMPTED
        return code


def main(argv: Sequence[str] | None = None) -> int:
    del argv  # the launcher takes everything from the environment
    try:
        world = world_mod.from_env()
    except TrainerFailure as err:
        print(f"finetune-trainer: {err}", file=sys.stderr)
        return err.exit_code
    return run(world)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
