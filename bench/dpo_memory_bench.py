"""Memory of full fine-tuning DPO: the reference log-probabilities precomputed (what the trainer does for
`method: full`, `spec.dpo.precomputeReference: auto`) against a two-model reference (the policy plus a frozen
copy computing the reference log-probabilities every step: TRL's `DPOTrainer` for full fine-tuning without
`precompute_ref_log_probs`). Issue 23: full fine-tuning with a precomputed reference never holds two copies
of the weights.

Model: a random Llama built in the child process itself (nothing loaded from disk, so no file mapping or
loading copy enters the peak), fp32, default hidden 1024, 8 layers, MLP 2752, vocabulary 8192, untied head:
117M parameters, 470 MB of weights, so that weights, gradients and AdamW's two moments (four weight-sized
buffers) dominate a step's memory rather than its activations.

Data: `--pairs` preference pairs of random token ids (default 8; prompt 64, chosen 48, rejected 40 tokens):
what the ids are does not change the memory.

Cases, each in a fresh subprocess (imports first; its peak resident memory is VmHWM of /proc/self/status,
`benchlib.peak_rss_bytes`, minus the peak after the imports):

- `precomputed`: `objectives.dpo.precompute_reference` over the pairs (eval mode, no gradients), then
  `DpoObjective(settings, PrecomputedReference(table))`;
- `two_model`: `copy.deepcopy(policy)` frozen (eval, requires_grad off) as the reference, its
  log-probabilities computed under no_grad each micro-batch (`objectives.dpo.sequence_logps`), the same
  objective and loss otherwise;
- `policy_only`: `referenceFree` (`ZeroReference`): the floor, the policy and its training state alone;
- `trainer`: the trainer itself (`entrypoint.run`, the manifest resolved as `finetune run --local` does) on
  the same architecture saved to disk with a tokenizer (`tiny.build_tiny_model`), `method: full`,
  `objective: dpo` with `precomputeReference: auto`, fp32, the first `--pairs` pairs of the bundled
  preference data, the same batch, accumulation, steps and checkpointing, evaluation off; its peak is read
  at each optimizer step's metrics record (so it covers loading, the reference pass and every step, not the
  final checkpoint and artifacts written after training). Its loader and data differ from the three cases
  above, so it is compared in weight copies, not subtracted from them.

The same loop for all: gradient checkpointing (non-reentrant, the trainer's default), sigmoid beta 0.1,
`--steps` optimizer steps (default 3) of 2 pairs x accumulation 2, AdamW (its moments exist from step 1
on), clipping at 1.0, fp32, `--threads` threads.

Figures: `dpo_memory_peak_mib_<case>`, `dpo_memory_weight_mib` (the model's parameter bytes), and
`dpo_memory_extra_weight_copies_two_model_vs_precomputed` = (peak two_model - peak precomputed) / weight bytes
(one copy expected: the reference model), `dpo_memory_extra_weight_copies_precomputed_vs_policy_only` (zero
expected: the table is 8 bytes a pair). Also each case's RSS right after the model was built (and, for
two_model, copied) and its step losses (the same for precomputed and two_model up to rounding: the same
reference computed once or every step).

Usage: python bench/dpo_memory_bench.py [--hidden 1024] [--layers 8] [--vocab 8192] [--pairs 8] [--steps 3]
       [--threads 1] [--cases precomputed,two_model,policy_only,trainer]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from benchlib import count_parameters, cpu_model, mlp_width, native_bf16, peak_rss_bytes

MIB = 1024**2
CASES = ("precomputed", "two_model", "policy_only", "trainer")
REPO = Path(__file__).resolve().parents[1]
BETA = 0.1
MICRO_PAIRS, ACCUMULATION = 2, 2
PROMPT, CHOSEN, REJECTED = 64, 48, 40


class ModelReference:
    """A second model as the reference (TRL's two-model set-up): its log-probabilities each micro-batch."""

    def __init__(self, model: Any):
        self.model = model

    def logps(self, _policy: Any, batch: dict[str, Any], device: Any) -> tuple[Any, Any]:
        import torch

        from finetune_trainer.objectives import dpo

        with torch.no_grad():
            logps, _ = dpo.sequence_logps(self.model, batch, device)
        chosen, rejected = logps.chunk(2)
        return chosen, rejected


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def child(case: str, args: argparse.Namespace) -> dict[str, Any]:
    import copy

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune_trainer.objectives import dpo

    torch.set_num_threads(args.threads)
    baseline = peak_rss_bytes()
    started = time.monotonic()
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=mlp_width(args.hidden),
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=args.hidden // 64, tie_word_embeddings=False,
                         max_position_embeddings=512, use_cache=False)
    torch.manual_seed(0)
    policy = LlamaForCausalLM(config)  # fp32
    weight_bytes = sum(p.numel() * p.element_size() for p in policy.parameters())
    policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    generator = torch.Generator().manual_seed(1)

    def ids(n: int) -> list[int]:
        return torch.randint(3, args.vocab, (n,), generator=generator).tolist()

    pairs = [dpo.PairEncoded(ids(PROMPT), ids(CHOSEN), ids(REJECTED)) for _ in range(args.pairs)]
    reference: Any
    if case == "precomputed":
        reference = dpo.PrecomputedReference(dpo.precompute_reference(policy, pairs, MICRO_PAIRS, 0, "cpu"))
    elif case == "two_model":
        frozen = copy.deepcopy(policy).eval()
        frozen.requires_grad_(False)
        reference = ModelReference(frozen)
    else:
        reference = dpo.ZeroReference()
    rss_after_models = rss_bytes() - baseline
    objective = dpo.DpoObjective(dpo.DpoSettings(beta=BETA, loss="sigmoid", reference_free=case == "policy_only"),
                                 reference)
    objective.prepare(policy)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6, weight_decay=0.0)
    policy.train()
    losses = []
    per_step = MICRO_PAIRS * ACCUMULATION
    for step in range(args.steps):
        start = (step * per_step) % len(pairs)
        indices = [(start + k) % len(pairs) for k in range(per_step)]
        batches = [objective.batch(pairs, indices[i:i + MICRO_PAIRS], 0) for i in range(0, per_step, MICRO_PAIRS)]
        num_items = sum(objective.weight(b) for b in batches)
        total = 0.0
        for batch in batches:
            out = objective.loss(policy, batch, "cpu", num_items)
            out.loss.backward()
            total += float(out.loss)
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
    return {"case": case, "peak_bytes": peak_rss_bytes() - baseline, "baseline_bytes": baseline,
            "rss_after_models_bytes": rss_after_models, "weight_bytes": weight_bytes,
            "parameters": sum(p.numel() for p in policy.parameters()), "losses": losses,
            "seconds": round(time.monotonic() - started, 1)}


def trainer_child(manifest: Path, threads: int) -> dict[str, Any]:
    """The trainer's own full DPO run; the peak through its last optimizer step."""
    import accelerate  # noqa: F401 - imported before the baseline, as the other cases import theirs
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401

    from finetune_operator import manifests
    from finetune_operator.contract import resolve
    from finetune_trainer import entrypoint, train
    from finetune_trainer.objectives import dpo  # noqa: F401

    torch.set_num_threads(threads)
    baseline = peak_rss_bytes()
    started = time.monotonic()
    doc = yaml.safe_load(manifest.read_text())
    loaded = manifests.validate_document(doc, str(manifest))
    if not loaded.ok:
        raise SystemExit(f"{manifest} is not a valid FineTuneJob: " + "; ".join(map(str, loaded.issues)))
    config = resolve(loaded.job, loaded.plan)
    peaks: list[int] = []
    losses: list[float] = []
    hook = "log_metric" if hasattr(train.Run, "log_metric") else "_metric"
    original = getattr(train.Run, hook)

    def sampled(self: Any, record: dict[str, Any]) -> None:
        if "loss" in record and "step" in record:
            peaks.append(peak_rss_bytes())
            losses.append(record["loss"])
        original(self, record)

    setattr(train.Run, hook, sampled)
    code = entrypoint.run(config, str(manifest.parent / "out"))
    if code != 0 or not peaks:
        raise SystemExit(f"the trainer exited with code {code} after {len(peaks)} steps")
    return {"case": "trainer", "peak_bytes": peaks[-1] - baseline, "baseline_bytes": baseline,
            "rss_after_models_bytes": 0, "losses": losses, "seconds": round(time.monotonic() - started, 1)}


def write_trainer_inputs(work: Path, args: argparse.Namespace) -> tuple[Path, int]:
    """The model on disk (the cases' architecture, with a tokenizer), the first pairs, and the manifest."""
    from finetune_trainer import tiny

    model = tiny.build_tiny_model(work / "model", seed=0, hidden_size=args.hidden, num_layers=args.layers,
                                  num_heads=args.hidden // 64, intermediate_size=mlp_width(args.hidden),
                                  vocab_size=args.vocab, max_position_embeddings=512)
    lines = (tiny.DATA_DIR / "healthcare_preference_train.jsonl").read_text().splitlines()
    train = work / "pairs.jsonl"
    train.write_text("\n".join(lines[:args.pairs]) + "\n")
    doc = yaml.safe_load((REPO / "examples" / "healthcare-lora.yaml").read_text())
    spec = doc["spec"]
    spec["baseModel"] = {"uri": f"file://{model}", "parameters": f"{count_parameters(model) / 1e6:.1f}M"}
    spec["method"] = "full"
    spec.pop("lora", None)
    spec["objective"] = "dpo"
    spec["dpo"] = {"beta": BETA, "loss": "sigmoid", "precomputeReference": "auto"}
    spec["dataset"] = {"train": f"file://{train}", "format": "preference"}
    spec["hyperparameters"] = {"maxSteps": args.steps, "learningRate": 1e-6, "batchSize": MICRO_PAIRS,
                               "gradientAccumulationSteps": ACCUMULATION, "maxSeqLength": 512, "precision": "fp32",
                               "gradientCheckpointing": True, "seed": 42}
    spec["evaluation"] = {"enabled": False, "maxExamples": 8}
    spec["compliance"] = {"provenanceRequired": False}
    path = work / "full-dpo.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path, count_parameters(model) * 4


def run_child(case: str, argv: list[str], work: Path | None = None) -> dict[str, Any]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if work is not None:  # the trainer: its model cache in the bench's folder, quiet logs
        env.update({"FT_CACHE_DIR": str(work / "cache"), "FT_LOG_LEVEL": "WARNING"})
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", case, *argv],
                          capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{case} failed:\n{proc.stderr[-4000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--manifest", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "trainer":
        print(json.dumps(trainer_child(args.manifest, args.threads)), flush=True)
        return 0
    if args.child:
        print(json.dumps(child(args.child, args)), flush=True)
        return 0
    cases = [c for c in args.cases.split(",") if c]
    if any(c not in CASES for c in cases):
        parser.error(f"--cases: each of {', '.join(CASES)}")
    argv = ["--hidden", str(args.hidden), "--layers", str(args.layers), "--vocab", str(args.vocab),
            "--pairs", str(args.pairs), "--steps", str(args.steps), "--threads", str(args.threads)]
    print(f"# machine: nproc={os.cpu_count()} cpu={cpu_model()!r} bf16 {native_bf16()[1]}; "
          f"load_avg_at_start={os.getloadavg()[0]:.2f}")
    print(f"# model: random Llama hidden={args.hidden} layers={args.layers} mlp={mlp_width(args.hidden)} "
          f"vocab={args.vocab}, fp32, built in each child; {args.pairs} pairs of {PROMPT}+{CHOSEN}/{REJECTED} "
          f"tokens; {args.steps} steps of {MICRO_PAIRS} pairs x accumulation {ACCUMULATION}; AdamW; gradient "
          f"checkpointing; threads={args.threads}", flush=True)
    results: dict[str, dict[str, Any]] = {}
    work = Path(tempfile.mkdtemp(prefix="dpo-memory-bench-"))
    try:
        for case in cases:
            if case == "trainer":
                manifest, weight_bytes = write_trainer_inputs(work, args)
                r = run_child(case, ["--manifest", str(manifest), "--threads", str(args.threads)], work)
                r.update(weight_bytes=weight_bytes, parameters=weight_bytes // 4)
            else:
                r = run_child(case, argv)
            results[case] = r
            print(f"# {case}: peak {r['peak_bytes'] / MIB:.0f} MiB above the imports' "
                  f"{r['baseline_bytes'] / MIB:.0f} MiB; RSS after the model(s) {r['rss_after_models_bytes'] / MIB:.0f} "
                  f"MiB; step losses {', '.join(f'{v:.4f}' for v in r['losses'])}; {r['seconds']} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    weight = next(iter(results.values()))["weight_bytes"]
    params = next(iter(results.values()))["parameters"]
    print(f"dpo_memory_parameters={params}")
    print(f"dpo_memory_weight_mib={weight / MIB:.0f}")
    for case, r in results.items():
        print(f"dpo_memory_peak_mib_{case}={r['peak_bytes'] / MIB:.0f}")
        print(f"dpo_memory_peak_weight_copies_{case}={r['peak_bytes'] / weight:.2f}")
    if "two_model" in results and "precomputed" in results:
        extra = (results["two_model"]["peak_bytes"] - results["precomputed"]["peak_bytes"]) / weight
        print(f"dpo_memory_extra_weight_copies_two_model_vs_precomputed={extra:.2f}")
    if "policy_only" in results and "precomputed" in results:
        extra = (results["precomputed"]["peak_bytes"] - results["policy_only"]["peak_bytes"]) / weight
        print(f"dpo_memory_extra_weight_copies_precomputed_vs_policy_only={extra:.2f}")
    print(f"# load_avg_at_end={os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
