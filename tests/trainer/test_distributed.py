"""Several processes on CPU (gloo) through the pod's launcher: one machine with two processes, and two
"machines" on 127.0.0.1 launched separately (num_machines=2, machine ranks 0 and 1, c10d rendezvous)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import pytest

from finetune_operator.contract import EXIT_CONFIG_ERROR, EXIT_GATES_FAILED, EXIT_PREEMPTED, REPORT_KEY
from finetune_trainer import launch
from finetune_trainer import world as world_mod
from finetune_trainer.world import World, check_rendezvous, check_size, from_env
from tests.trainer import train_helpers as th

SPEC: dict[str, Any] = {"hyperparameters": {"maxSteps": 4}, "checkpoint": {"everySteps": 2},
                        "evaluation": {"maxExamples": 2}}


@pytest.fixture(scope="module")
def staged(s3: Any, tiny_model_dir: Path, healthcare_sample: Any) -> th.Staged:
    return th.stage_in_new_bucket(s3, "dist", tiny_model_dir, healthcare_sample)



def _finish(proc: Any, timeout: float = 300) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out.decode(errors="replace")


# -- the launcher's command and exit codes (pure) --------------------------------------------------------


def test_launch_command_for_two_machines() -> None:
    world = World(num_machines=2, machine_rank=1, procs_per_machine=4, main_address="job-0.job",
                  main_port=29500, rdzv_timeout=60)
    cmd = launch.command(world, python="python")
    assert cmd[:4] == ["python", "-m", "accelerate.commands.launch", "--multi_gpu"]
    args = dict(zip(cmd[4::2], cmd[5::2], strict=False))
    assert args["--num_machines"] == "2" and args["--machine_rank"] == "1"
    assert args["--num_processes"] == "8"  # total, not per machine
    assert args["--main_process_ip"] == "job-0.job" and args["--main_process_port"] == "29500"
    assert args["--rdzv_backend"] == "c10d"
    assert args["--rdzv_conf"] == "join_timeout=60,read_timeout=60,is_host=0"
    assert cmd[-2:] == ["--module", "finetune_trainer"]


def test_the_rendezvous_id_reaches_torchrun(tmp_path: Path) -> None:
    """torchrun's --rdzv-id comes from the config snapshot, through the variable its parser reads."""
    config = tmp_path / "job.json"
    config.write_text('{"rendezvousId": "5f1c0ffee"}')
    two = World(2, 0, 1, "job-0.job", 29500, 60)
    env = launch.environment(two, {"FT_CONFIG": str(config)}, tmp_path, cuda=False)
    assert env["PET_RDZV_ID"] == "5f1c0ffee"
    one = World(1, 0, 2, "127.0.0.1", 29500, 60)  # no rendezvous store on one machine
    assert "PET_RDZV_ID" not in launch.environment(one, {"FT_CONFIG": str(config)}, tmp_path, cuda=False)
    config.write_text("{}")
    assert "PET_RDZV_ID" not in launch.environment(two, {"FT_CONFIG": str(config)}, tmp_path, cuda=False)
    assert launch.rendezvous_id({"FT_CONFIG": str(tmp_path / "missing.json")}) is None


def test_a_world_under_another_rendezvous_id_stops() -> None:
    """Each trainer process checks the id torchrun ran under (so the loopback test below shows it arrived)."""
    two = {"FT_NUM_MACHINES": "2", "TORCHELASTIC_RUN_ID": "none"}
    with pytest.raises(Exception, match="rendezvous ran under id 'none'") as err:
        check_rendezvous("5f1c0ffee", two)
    assert err.value.exit_code == EXIT_CONFIG_ERROR  # type: ignore[attr-defined]
    check_rendezvous("5f1c0ffee", {**two, "TORCHELASTIC_RUN_ID": "5f1c0ffee"})
    check_rendezvous("5f1c0ffee", {"FT_NUM_MACHINES": "1", "TORCHELASTIC_RUN_ID": "none"})  # no store to guard
    check_rendezvous(None, two)  # a snapshot from before rendezvous ids


def test_single_process_runs_the_trainer_directly() -> None:
    world = World(1, 0, 1, "127.0.0.1", 29500, 60)
    assert launch.command(world, python="python") == ["python", "-m", "finetune_trainer"]


def test_world_from_environment() -> None:
    env = {"FT_NUM_MACHINES": "3", "JOB_COMPLETION_INDEX": "2", "FT_PROCS_PER_MACHINE": "2",
           "FT_MAIN_ADDRESS": "ftj-0.ftj", "FT_MAIN_PORT": "29400"}
    world = from_env(env)
    assert (world.size, world.machine_rank, world.main_address, world.main_port) == (6, 2, "ftj-0.ftj", 29400)
    with pytest.raises(Exception, match="JOB_COMPLETION_INDEX=3 is not below FT_NUM_MACHINES=3"):
        from_env({**env, "JOB_COMPLETION_INDEX": "3"})
    with pytest.raises(Exception, match="FT_MAIN_ADDRESS must name machine 0"):
        from_env({"FT_NUM_MACHINES": "2"})
    with pytest.raises(Exception, match="formed a world of 1 process") as err:
        check_size(1, env)
    assert err.value.exit_code == EXIT_CONFIG_ERROR  # type: ignore[attr-defined]


def test_publish_timeout_from_environment() -> None:
    """FT_PUBLISH_TIMEOUT (the wait for rank 0's publishing): default 4 hours; a bad value is a config error
    naming the variable, as FT_COLLECTIVE_TIMEOUT's."""
    assert world_mod.publish_timeout({}) == 4 * 3600
    assert world_mod.publish_timeout({"FT_PUBLISH_TIMEOUT": "7200"}) == 7200
    with pytest.raises(Exception, match="FT_PUBLISH_TIMEOUT='2h' is not an integer") as err:
        world_mod.publish_timeout({"FT_PUBLISH_TIMEOUT": "2h"})
    assert err.value.exit_code == EXIT_CONFIG_ERROR  # type: ignore[attr-defined]
    with pytest.raises(Exception, match="FT_PUBLISH_TIMEOUT=0 must be at least 1"):
        world_mod.publish_timeout({"FT_PUBLISH_TIMEOUT": "0"})


def test_publish_barrier_is_nothing_in_a_single_process() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("torch.distributed is initialized in this process")
    world_mod.publish_barrier()
    assert world_mod.publish_group() is None and world_mod._publish_group is None and not dist.is_initialized()


def test_exit_code_priority() -> None:
    assert launch.exit_code(1, [EXIT_PREEMPTED, EXIT_CONFIG_ERROR]) == EXIT_CONFIG_ERROR
    assert launch.exit_code(1, [EXIT_GATES_FAILED]) == EXIT_GATES_FAILED
    assert launch.exit_code(1, [EXIT_PREEMPTED, EXIT_PREEMPTED]) == EXIT_PREEMPTED
    assert launch.exit_code(1, []) == 1
    assert launch.exit_code(0, []) == 0
    assert launch.exit_code(-9, []) == 1


# -- real processes ----------------------------------------------------------------------------------------


def test_two_processes_train_data_parallel(s3_env: dict[str, str], staged: th.Staged, tmp_path: Path) -> None:
    config = th.make_config(staged, SPEC)
    env = th.trainer_env(config, tmp_path, s3_env, FT_NUM_MACHINES="1", FT_PROCS_PER_MACHINE="2")
    code, out = _finish(th.launch(env))
    assert code == 0, out[-4000:]
    assert "--multi_gpu" in out and "--num_processes 2" in out
    store = th.store(config.spec.output.uri)
    report = store.read_json(REPORT_KEY)
    assert report["phase"] == "complete" and report["worldSize"] == 2
    # every process saved its own RNG state in the checkpoint
    keys = store.list("checkpoints/step-4/")
    assert {"checkpoints/step-4/rng-0.json", "checkpoints/step-4/rng-1.json"} <= set(keys)
    state = store.read_json("checkpoints/step-4/trainer_state.json")
    assert state["world_size"] == 2
    losses = th.losses(store.read_bytes("metrics.jsonl").decode())
    assert sorted(losses) == [1, 2, 3, 4]
    assert store.is_complete("")


def test_two_machines_rendezvous_on_loopback(s3_env: dict[str, str], staged: th.Staged, tmp_path: Path) -> None:
    config = th.make_config(staged, SPEC)
    config.rendezvous_id = "9e3779b97f4a7c15"
    procs, _ = th.launch_machines(config, tmp_path, s3_env)
    results = [_finish(p) for p in procs]
    for code, out in results:
        assert code == 0, out[-4000:]
    assert "--rdzv_backend c10d" in results[1][1] and "is_host=0" in results[1][1]
    report = th.store(config.spec.output.uri).read_json(REPORT_KEY)
    assert report["phase"] == "complete" and report["worldSize"] == 2


def test_missing_peer_fails_instead_of_hanging(s3_env: dict[str, str], staged: th.Staged, tmp_path: Path) -> None:
    config = th.make_config(staged, SPEC)
    env = th.trainer_env(config, tmp_path, s3_env, FT_NUM_MACHINES="2", FT_PROCS_PER_MACHINE="1",
                         JOB_COMPLETION_INDEX="0", FT_MAIN_ADDRESS="127.0.0.1", FT_RDZV_TIMEOUT="3")
    code, out = _finish(th.launch(env), timeout=120)
    assert code == 1, out[-3000:]  # a crash (retried by the Job), not a config error
    assert "Rendezvous" in out or "rendezvous" in out


def test_frozen_peer_fails_the_survivor_within_the_collective_timeout(
        s3_env: dict[str, str], staged: th.Staged, tmp_path: Path) -> None:
    """A peer that stops answering without closing its connections (a lost node; here machine 1's whole
    process tree SIGSTOPped mid-training) fails machine 0 with a retryable exit after FT_COLLECTIVE_TIMEOUT,
    instead of blocking it in an all-reduce for gloo's default 30 minutes."""
    import signal
    import time

    import psutil

    from tests.trainer import fault_helpers as fh

    config = th.make_config(staged, {"hyperparameters": {"maxSteps": 200}, "checkpoint": {"everySteps": 100},
                                     "evaluation": {"maxExamples": 2}})
    procs, logs = th.launch_machines(config, tmp_path, s3_env, logs=True, FT_COLLECTIVE_TIMEOUT="20")
    frozen: list[Any] = []
    try:
        fh.wait_for_step(th.store(config.spec.output.uri), 2, procs[0], logs[0])
        frozen = [psutil.Process(procs[1].pid), *psutil.Process(procs[1].pid).children(recursive=True)]
        for proc in frozen:
            proc.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        code = procs[0].wait(timeout=300)  # bounds a hang; gloo's default would be 1800 s
        seconds = time.monotonic() - stopped
        text = logs[0].read_text(errors="replace")
        assert code == 1, text[-3000:]  # a crash the Job retries, not a config error
        assert "imed out" in text or "timeout" in text.lower(), text[-3000:]
        print(f"\nfrozen peer: machine 0 exited {code} {seconds:.1f}s after machine 1 froze (timeout 20 s)")
    finally:
        for proc in frozen:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGKILL)
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)


def test_trainer_started_without_the_launcher_stops(s3_env: dict[str, str], staged: th.Staged,
                                                    tmp_path: Path) -> None:
    """`python -m finetune_trainer` in a pod given two processes forms a world of one: exit 3, not a
    silent single-process run."""
    config = th.make_config(staged, SPEC)
    env = th.trainer_env(config, tmp_path, s3_env, FT_NUM_MACHINES="1", FT_PROCS_PER_MACHINE="2")
    code, out = _finish(th.launch(env, module="finetune_trainer"))
    assert code == EXIT_CONFIG_ERROR, out[-3000:]
    report = th.store(config.spec.output.uri).read_json(REPORT_KEY)
    assert report["error"]["reason"] == "WorldSizeMismatch"


def test_the_launcher_waits_until_the_main_address_resolves() -> None:
    """A new pod's DNS record appears after the pod starts: the lookup is retried, then given up on."""
    clock = [0.0]
    answers = iter([OSError("unknown"), OSError("unknown"), "10.244.0.7"])

    def resolve(_name: str) -> object:
        answer = next(answers)
        if isinstance(answer, OSError):
            raise answer
        return answer

    def sleep(seconds: float) -> None:
        clock[0] += seconds

    assert launch.wait_for_address("j-0.j.ns.svc", 30, resolve=resolve, clock=lambda: clock[0], sleep=sleep) == 1.0

    def never(_name: str) -> object:
        raise OSError("unknown")

    clock[0] = 0.0
    assert launch.wait_for_address("j-0.j.ns.svc", 3, resolve=never, clock=lambda: clock[0], sleep=sleep) is None
    assert clock[0] == 3.0
