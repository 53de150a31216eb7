"""Multi-process scaling on CPU: our trainer with two processes against one, on the same global batch.

The same tiny Llama, rows, manifest and settings as `bench/throughput_bench.py` (examples/healthcare-lora.yaml
with the base model and data at local files; batch 4 per micro-batch, 16 examples per optimizer step,
maxSeqLength 512, gradient checkpointing as the plan chooses (off on this tiny model), seed 42, precision chosen by `benchlib.bench_precision`: bf16 where
the CPU runs it natively, else fp32, printed as `# precision: ...`).

- one process: `entrypoint.run` in the worker itself, gradient accumulation 4 (4 x 4 = 16 examples a step).
- two processes: `torchrun --standalone --nproc_per_node 2` (torch.distributed's launcher, gloo on CPU:
  the trainer's `Accelerator(cpu=True)` forms the world from torchrun's variables; the pod's launcher,
  `finetune_trainer.launch`, starts the same world with `accelerate launch --multi_gpu`, since
  `accelerate launch --cpu` with several processes silently runs one), gradient accumulation 2 per process
  (2 processes x 2 x 4 = the same 16 examples a step). Each optimizer step's examples are split between the
  ranks (`dataset.shard`), gradients are averaged with one all-reduce per step (DDP, LoRA) or reduce-scattered
  with parameters all-gathered per decoder layer (FSDP2, full).
- full fine-tuning runs with FSDP here: the trainer turns FSDP on by itself only for several GPU processes
  (`train.make_accelerator`: "FSDP's CPU path is slow"; several CPU processes train full with DDP), so this
  benchmark asks for it through `make_accelerator(config, fsdp=True)`, the trainer's own switch.
- OMP_NUM_THREADS=1 and torch threads 1 in every process: one core per process, so the two-process run has
  twice the cores of the one-process run, and `scaling_efficiency_2proc_<method>` = (tokens/s with 2) /
  (2 x tokens/s with 1) is the fraction of the second core turned into throughput.

Figures: useful (non-padding) tokens of the whole world per optimizer step over the wall time between step
boundaries (rank 0's per-step metrics record), steps 2..N, median step; `heldout_loss_<n>proc_<method>`: the
trainer's own held-out loss (validation split, response tokens) after the last step, which the two runs must
agree on within seed noise (same examples per step; the per-rank split changes how micro-batches are grouped
and padded, and dropout's random draws). `busy_pct_2proc_<method>`: each rank's CPU time over its wall time
during steps 2..N (mean of ranks): the rest is time a rank waited, for the other rank (uneven token counts
per rank in a step), in gloo's collectives, or for a core while other work ran. `cpu_efficiency_2proc_<method>`:
tokens per CPU second of both ranks together / tokens per CPU second of the one process: the work that
distribution adds (collectives, FSDP's gathers, smaller micro-batch groups), which other work on the
machine disturbs far less than wall time. The `# bound:` line names what the measurements point to.

The ceiling (`run_uncoupled`): two independent one-process runs at once, each training what one rank of the
two-process run trains per step (accumulation 2), with no process group and nothing to wait for, their timed
steps started together. `ceiling_efficiency_2proc_<method>` = their summed tokens/s / (2 x the one process's):
what the second core can add on this machine when distribution costs nothing (two processes share the caches,
the memory bandwidth and, on a 2-vCPU VM, possibly one physical core); `scaling_vs_ceiling_2proc_<method>` =
the two-process run's tokens/s / the pair's, the share of that ceiling the trainer reaches.

Runtime (measured 2026-12-02 on the README's 2-core Intel Xeon): 80 s wall, 99 s of CPU with bf16 (native
there); with `--precision fp32`, what `auto` picks on a CPU without AVX512-BF16, 83 s wall and 103 s of CPU.
More than half is outside the timed steps (four runs, each starting torch, loading the model, evaluating and saving). A CPU
with AVX2 only has half the fp32 vector width: allow up to twice, about 3 minutes.

Usage: python bench/scaling_bench.py [--steps 16] [--methods lora,full] [--precision auto] [--seed 42]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchlib import bench_precision, cpu_model, scratch_dir, worker_env

BATCH, GLOBAL_EXAMPLES = 4, 16


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ------------------------------------------------------------------------------------------------
# The worker: one trainer process (rank) of a run
# ------------------------------------------------------------------------------------------------


def worker(method: str, manifest: Path, steps: int, accumulation: int, seed: int, precision: str, fsdp: bool,
           output: Path, report: Path, barrier: Path | None = None) -> int:
    import torch

    from finetune_operator import manifests
    from finetune_operator.contract import resolve
    from finetune_trainer import entrypoint, local, train

    torch.set_num_threads(1)
    entrypoint.setup_logging()
    doc = local.load_manifest(manifest)
    overrides = [f"method={method}", f"hyperparameters.maxSteps={steps}", f"hyperparameters.seed={seed}",
                 f"hyperparameters.gradientAccumulationSteps={accumulation}",
                 f"hyperparameters.precision={precision}", "hyperparameters.packing=false"]
    for text in overrides:
        local.set_path(doc, *local.parse_override(text))
    loaded = manifests.validate_document(doc, str(manifest))  # what `finetune run --local` validates with
    if not loaded.ok:
        raise RuntimeError(f"{manifest} is not a valid FineTuneJob: " + "; ".join(map(str, loaded.issues)))
    config = resolve(loaded.job, loaded.plan)

    if fsdp:
        make_accelerator = train.make_accelerator
        train.make_accelerator = lambda cfg, fsdp=None: make_accelerator(cfg, fsdp=True)  # type: ignore[assignment]

    # Step boundaries: rank 0's per-step metrics record (global tokens), and on every rank the per-step
    # stop check that follows it (`Run._stop_agreed`, one all-reduce per step with several processes).
    records: list[dict[str, Any]] = []
    boundaries: list[tuple[float, float]] = []
    stamps: list[tuple[float, float]] = []
    metric, stop_agreed = train.Run._metric, train.Run._stop_agreed

    def timed_metric(self: Any, record: dict[str, Any]) -> None:
        if "loss" in record:
            if barrier is not None and not stamps:
                meet(barrier)
            stamps.append((time.perf_counter(), time.process_time()))
        records.append(record)
        metric(self, record)

    def timed_stop(self: Any, flag: Any) -> bool:
        answer = stop_agreed(self, flag)
        boundaries.append((time.perf_counter(), time.process_time()))
        return answer

    train.Run._metric = timed_metric  # type: ignore[method-assign]
    train.Run._stop_agreed = timed_stop  # type: ignore[method-assign]

    code = entrypoint.run(config, str(output))
    rank = int(os.environ.get("RANK", "0"))
    # boundaries[k] ends step k + 1 (the last step's checkpoint adds one more): steps 2..N
    walls = [boundaries[k][0] - boundaries[k - 1][0] for k in range(1, min(len(boundaries), steps))]
    cpus = [boundaries[k][1] - boundaries[k - 1][1] for k in range(1, min(len(boundaries), steps))]
    result: dict[str, Any] = {"rank": rank, "code": code, "busy": sum(cpus) / sum(walls) if walls else None,
                              "cpu_seconds": sum(cpus),
                              "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if rank == 0:
        steps_logged = [r for r in records if "loss" in r]
        tokens = [r["tokens"] for r in steps_logged]
        step_walls = [stamps[k][0] - stamps[k - 1][0] for k in range(1, len(stamps))]
        counted = tokens[1:len(stamps)]
        evals = [r for r in records if "eval_loss" in r]
        result.update({
            "steps": len(steps_logged),
            "tokens": sum(counted),
            "seconds": sum(step_walls),
            "tokens_per_second": statistics.median(t / w for t, w in zip(counted, step_walls, strict=True)),
            "tokens_per_second_total": sum(counted) / sum(step_walls),
            "train_loss": statistics.mean(r["loss"] for r in steps_logged),
            "eval_loss": evals[-1]["eval_loss"] if evals else None,
        })
    (report / f"rank-{rank}.json").write_text(json.dumps(result))
    return code


def meet(barrier: Path, parties: int = 2, timeout: float = 300.0) -> None:
    """Wait until `parties` processes reached this point (a file each under `barrier`): the uncoupled pair's
    timed steps then run side by side, not one while the other is still loading."""
    barrier.mkdir(parents=True, exist_ok=True)
    (barrier / str(os.getpid())).touch()
    deadline = time.monotonic() + timeout
    while len(list(barrier.iterdir())) < parties:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the other process of the pair never reached its first step ({barrier})")
        time.sleep(0.005)


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def run(procs: int, method: str, manifest: Path, steps: int, seed: int, precision: str, work: Path,
        env: dict[str, str]) -> dict[str, Any]:
    """One training run with `procs` processes; rank 0's figures plus every rank's busy fraction."""
    tag = f"{method}-{procs}"
    output, report = work / f"out-{tag}", work / f"report-{tag}"
    report.mkdir()
    args = [str(Path(__file__).resolve()), "--worker", method, "--manifest", str(manifest), "--steps", str(steps),
            "--accumulation", str(GLOBAL_EXAMPLES // (BATCH * procs)), "--seed", str(seed),
            "--precision", precision, "--output", str(output), "--report", str(report)]
    if method == "full" and procs > 1:
        args.append("--fsdp")
    if procs == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
               "--master_port", str(free_port()), *args]
    took = time.perf_counter()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    ranks = [json.loads(p.read_text()) for p in sorted(report.glob("rank-*.json"))]
    if result.returncode != 0 or len(ranks) != procs or any(r["code"] != 0 for r in ranks):
        tail = "\n".join((result.stderr + result.stdout).splitlines()[-30:])
        raise RuntimeError(f"{tag} failed (exit {result.returncode}):\n{tail}")
    shutil.rmtree(output, ignore_errors=True)
    main_rank = next(r for r in ranks if r["rank"] == 0)
    return {**main_rank, "busy": statistics.mean(r["busy"] for r in ranks),
            "cpu_seconds": sum(r["cpu_seconds"] for r in ranks),
            "rss_mb": max(r["rss_mb"] for r in ranks), "worker_seconds": time.perf_counter() - took}


def run_uncoupled(method: str, manifest: Path, steps: int, seed: int, precision: str, work: Path,
                  env: dict[str, str]) -> dict[str, Any]:
    """The ceiling of two processes on this machine: two independent one-process runs at the same time, each on
    what one rank of the two-process run trains per step (accumulation 2), with no communication at all (no
    process group, no gradient exchange, nothing to wait for); their timed steps start together (`meet`).
    Their summed throughput is what two processes can do here when distribution costs nothing."""
    tag = f"{method}-uncoupled"
    barrier = work / f"barrier-{tag}"
    procs = []
    for k in range(2):
        report = work / f"report-{tag}-{k}"
        report.mkdir()
        args = [str(Path(__file__).resolve()), "--worker", method, "--manifest", str(manifest), "--steps", str(steps),
                "--accumulation", str(GLOBAL_EXAMPLES // (BATCH * 2)), "--seed", str(seed), "--precision", precision,
                "--output", str(work / f"out-{tag}-{k}"), "--report", str(report), "--barrier", str(barrier)]
        procs.append((subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True), report))
    results = []
    for proc, report in procs:
        out, _ = proc.communicate(timeout=1800)
        files = list(report.glob("rank-*.json"))
        if proc.returncode != 0 or not files:
            raise RuntimeError(f"{tag} failed (exit {proc.returncode}):\n" + "\n".join(out.splitlines()[-30:]))
        results.append(json.loads(files[0].read_text()))
    return {"tokens_per_second": sum(r["tokens_per_second"] for r in results),
            "busy": statistics.mean(r["busy"] for r in results)}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        parser = argparse.ArgumentParser()
        parser.add_argument("method", choices=["full", "lora"])
        parser.add_argument("--manifest", type=Path, required=True)
        parser.add_argument("--steps", type=int, required=True)
        parser.add_argument("--accumulation", type=int, required=True)
        parser.add_argument("--seed", type=int, required=True)
        parser.add_argument("--precision", choices=["bf16", "fp32"], required=True)
        parser.add_argument("--fsdp", action="store_true")
        parser.add_argument("--output", type=Path, required=True)
        parser.add_argument("--report", type=Path, required=True)
        parser.add_argument("--barrier", type=Path)
        a = parser.parse_args(sys.argv[2:])
        return worker(a.method, a.manifest, a.steps, a.accumulation, a.seed, a.precision, a.fsdp, a.output, a.report,
                      a.barrier)

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps of every run (default 16)")
    parser.add_argument("--methods", default="lora,full")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    if args.steps < 3:
        parser.error("--steps must be at least 3 (throughput is taken over steps 2..N)")
    precision, precision_why = bench_precision(args.precision)
    methods = [m for m in args.methods.split(",") if m]
    from throughput_bench import build_inputs, write_manifest

    start = time.perf_counter()
    with scratch_dir("scaling-bench-") as work:
        env = worker_env(1, work)
        model, train, params = build_inputs(work, args.hidden, args.layers)
        manifest = write_manifest(work, model, train, params)
        print(f"# machine: nproc={os.cpu_count()} cpu={cpu_model()!r} load_avg_at_start={os.getloadavg()[0]:.2f}")
        print(f"# model: tiny Llama hidden={args.hidden} layers={args.layers} ({params / 1e6:.2f}M parameters); "
              f"{args.steps} steps of {GLOBAL_EXAMPLES} examples (batch {BATCH}; accumulation 4 with one process, "
              f"2 per process with two); one thread per process; seed {args.seed}")
        print(f"# precision: {precision_why}; the same in every run", flush=True)
        for method in methods:
            one = run(1, method, manifest, args.steps, args.seed, precision, work, env)
            two = run(2, method, manifest, args.steps, args.seed, precision, work, env)
            ceiling = run_uncoupled(method, manifest, args.steps, args.seed, precision, work, env)
            for procs, r in ((1, one), (2, two)):
                how = "one process" if procs == 1 else \
                    "two processes, torchrun + gloo, " + ("FSDP2" if method == "full" else "DDP")
                print(f"# {method}, {how}: {r['tokens']} tokens over steps 2..{r['steps']} in {r['seconds']:.1f} s "
                      f"({r['tokens_per_second_total']:.0f} tokens/s; median step {r['tokens_per_second']:.0f}); "
                      f"held-out loss {r['eval_loss']:.4f}, mean train loss {r['train_loss']:.4f}; ranks busy "
                      f"{100 * r['busy']:.0f}% of wall; peak RSS {r['rss_mb']:.0f} MiB per process; "
                      f"run {r['worker_seconds']:.0f} s", flush=True)
            efficiency = two["tokens_per_second"] / (2 * one["tokens_per_second"])
            cpu_efficiency = (two["tokens"] / two["cpu_seconds"]) / (one["tokens"] / one["cpu_seconds"])
            print(f"scaling_efficiency_2proc_{method}={efficiency:.2f}")
            print(f"cpu_efficiency_2proc_{method}={cpu_efficiency:.2f}")
            print(f"tokens_per_second_1proc_{method}={one['tokens_per_second']:.0f}")
            print(f"tokens_per_second_2proc_{method}={two['tokens_per_second']:.0f}")
            print(f"heldout_loss_1proc_{method}={one['eval_loss']:.4f}")
            print(f"heldout_loss_2proc_{method}={two['eval_loss']:.4f}")
            print(f"busy_pct_2proc_{method}={100 * two['busy']:.0f}")
            print(f"# {method}, two uncoupled processes (no communication, each a rank's share of a step, timed "
                  f"steps side by side): {ceiling['tokens_per_second']:.0f} tokens/s together (sum of median steps); "
                  f"busy {100 * ceiling['busy']:.0f}% of wall", flush=True)
            print(f"ceiling_efficiency_2proc_{method}={ceiling['tokens_per_second'] / (2 * one['tokens_per_second']):.2f}")
            print(f"scaling_vs_ceiling_2proc_{method}={two['tokens_per_second'] / ceiling['tokens_per_second']:.2f}")
            print(f"# bound ({method}): {bound_line(method, one, two, params)}", flush=True)
        print(f"# load_avg_at_end={os.getloadavg()[0]:.2f}; total {time.perf_counter() - start:.0f} s")
    return 0


def bound_line(method: str, one: dict[str, Any], two: dict[str, Any], params: int) -> str:
    """What the measurements say bounds the two-process throughput on this machine."""
    cpu_efficiency = (two["tokens"] / two["cpu_seconds"]) / (one["tokens"] / one["cpu_seconds"])
    parts = [f"each rank ran on a core {100 * two['busy']:.0f}% of the wall time (the one-process run "
             f"{100 * one['busy']:.0f}%); the rest it waited for the other rank (uneven micro-batch lengths), in "
             "gloo's collectives, or for a core while other work ran",
             f"per CPU second the two ranks together did {cpu_efficiency:.2f} times the one process's work, so "
             + ("distribution itself costs little and waiting is what bounds it" if cpu_efficiency >= 0.8
                else "distribution itself costs CPU")]
    if method == "full":
        parts.append(f"FSDP2 all-gathers the {params / 1e6:.2f}M parameters per decoder layer in every forward and "
                     "recomputation and reduce-scatters the gradients, all through gloo over loopback TCP, on the "
                     "same cores that compute")
    else:
        parts.append("DDP all-reduces the LoRA gradients (a few hundred KB) once per optimizer step")
    load = os.getloadavg()[0]
    parts.append(f"two processes need both cores, so anything else on the machine (load average {load:.2f} now) "
                 "slows the two-process run and hardly the one-process run")
    return "; ".join(parts)

if __name__ == "__main__":
    sys.exit(main())
