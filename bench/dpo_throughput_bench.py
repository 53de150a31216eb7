"""DPO training throughput on CPU: ours against TRL 1.16's `DPOTrainer`, on the same model, pairs, loss and
settings, in one run, as a ratio (issue 23: target >= 1.0), with both sides' losses printed.

Model and data: the tiny Llama of bench/throughput_bench.py (`finetune_trainer.tiny.build_tiny_model`,
default hidden 256, 4 layers, 4 heads of 64, MLP 704, vocabulary 2048) and the bundled preference pairs
(`finetune_trainer/data/healthcare_preference_train.jsonl`, 199 instruction-form pairs: chosen the reference
answer, rejected a plausible one with invented facts), minus the same seeded 10% validation split the
trainer holds out for `validationSplit: 0.1` (`dataset.split_holdout`); the held-out pairs measure both
sides after training with the same function.

Settings, both sides: sigmoid loss, beta 0.1; LoRA r=16, alpha=32 on q,k,v,o (dropout 0.05 in the spec;
DPO switches dropout off on both sides: TRL's `disable_dropout=True` default, our objective's `prepare`);
lr 2e-4 (the example's), cosine schedule, warmup 0.03, weight decay 0, gradient clipping at 1.0; 4 pairs per micro-batch
(8 sequences) x gradient accumulation 4 = 16 pairs per optimizer step; maxSeqLength 512 (no pair of the
set needs cutting: checked, printed); gradient checkpointing (non-reentrant); seed 42; the precision of
`benchlib.bench_precision` (bf16 where the CPU runs it natively, else fp32; the same on both sides).

Rows (`--rows`):

- `adapter` (like with like for TRL's default, `precompute_ref_log_probs=False`): the reference is the base
  with the LoRA adapter switched off, one no-grad forward per micro-batch on both sides (ours:
  `precomputeReference: auto`, which for LoRA is the adapter reference).
- `precomputed`: both compute the reference log-probabilities once before training (TRL
  `precompute_ref_log_probs=True`; ours `precomputeReference: always`); the steps then run the policy
  only. The one-time pass is in `first_step_seconds` (set-up to the end of step 1: tokenization, model
  loading, the reference pass where there is one, step 1), not in the throughput.

Sides:

- trl: `DPOTrainer(model, args=DPOConfig(...), train_dataset, processing_class, peft_config=LoraConfig)`
  on a prompt/chosen/rejected dataset (the prompt `<s>` + our instruction template, the answers as text;
  TRL tokenizes them apart and appends `</s>`); the token ids TRL prepared are checked to equal ours
  (`preference_data.encode_pairs`), printed as `# ... token ids identical`. TRL pads each micro-batch to
  its longest sequence and draws micro-batches at random (the Trainer's sampler).
- ours: see `# ours:` in the output. `trainer` is the trainer's own loop, driven as
  bench/throughput_bench.py drives it for SFT (the manifest resolved as `finetune run --local` does, then
  `entrypoint.run`). `objective` (used while the trainer does not dispatch on `spec.objective`, and said so
  in the output) is `finetune_trainer.objectives.dpo.DpoObjective` in a minimal loop built the way the
  trainer's loop is: batches from `dataset.batch_plan` (grouped by length within each optimizer step, so
  fewer padding positions than TRL's random batches), the step's loss averaged over its pairs, AdamW,
  `transformers.get_scheduler`, clipping; the model loaded and adapted exactly as the TRL side does.

Figures (steps 2..N; step 1 pays one-time costs on both sides):

- useful tokens: the non-padding tokens of the chosen and rejected sequences (prompt included: every token
  the model attends to), per optimizer step; TRL: attention-mask sums of the batches its collator built,
  ours: `num_tokens` of each collated batch (the same count).
- `dpo_throughput_ratio_vs_trl_<row>`: ours / TRL useful tokens per second of wall time, each the median
  over its steps, each side's best of `--repeats` runs (run alternately; other work on a shared machine
  only slows a run, so the fastest is the least disturbed); `dpo_throughput_ratio_cpu_vs_trl_<row>` the same
  with process CPU time (total tokens / total CPU seconds).
- `dpo_loss_<side>_<row>_steps`: the training loss of every optimizer step (the mean DPO loss of its 16
  pairs: step 1 is ln 2 = 0.6931 on both sides, the policy starting equal to its reference), from the
  first run of each side; `dpo_heldout_*`: held-out pairs after training, scored by the same function
  (`objectives.dpo.evaluate_pairs`, the reference the adapter-less base): mean loss, preference accuracy,
  mean reward margin. `# ... non-padding share of computed positions`: useful tokens / (rows x padded width)
  over the run's micro-batches, which says how much of a throughput ratio is padding avoided (ours groups
  pairs by length within each optimizer step, TRL's batches are drawn at random).

Each side runs in its own subprocess with the same thread count (default 1, as throughput_bench.py: on a
shared 2-core machine, multi-threaded OpenMP spins at its barriers while other processes run).

Usage: python bench/dpo_throughput_bench.py [--steps 10] [--repeats 2] [--rows adapter,precomputed]
       [--threads 1] [--precision auto] [--ours auto|trainer|objective] [--seed 42]
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib
import yaml
from benchlib import ACCUMULATION, BATCH, EXAMPLE, MAX_LEN, SEED, VALIDATION_SPLIT

BETA = 0.1
LEARNING_RATE = 2e-4  # examples/healthcare-lora.yaml's
WARMUP = 0.03
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "bias": "none",
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "task_type": "CAUSAL_LM"}
ROWS = ("adapter", "precomputed")
PAIRS_FILE = "healthcare_preference_train.jsonl"


# ------------------------------------------------------------------------------------------------
# Shared set-up (the parent process)
# ------------------------------------------------------------------------------------------------


def build_inputs(work: Path, hidden: int, layers: int) -> tuple[Path, Path, int]:
    """The tiny model and the preference file under `work`; returns (model dir, data file, parameters)."""
    return benchlib.build_tiny_inputs(work, hidden, layers, PAIRS_FILE)


def trainer_dispatches_objective() -> bool:
    """Whether the trainer's loop runs `spec.objective` (the DPO wiring of issue 23 landed): its training
    module names the objectives registry. Until then `--ours auto` drives the objective in a minimal loop."""
    from finetune_trainer import train

    return "objectives" in inspect.getsource(train)


def write_manifest(work: Path, model: Path, train: Path, params: int, reference: str) -> Path:
    """examples/healthcare-lora.yaml turned into a DPO job on the local model and pairs (evaluation off: the
    run is about training), with the settings of the TRL side."""
    doc = yaml.safe_load(EXAMPLE.read_text())
    spec = doc["spec"]
    spec["baseModel"] = {"uri": f"file://{model}", "parameters": f"{params / 1e6:.2f}M"}
    spec["objective"] = "dpo"
    spec["dpo"] = {"beta": BETA, "loss": "sigmoid", "precomputeReference": reference}
    spec["dataset"] = {"train": f"file://{train}", "validationSplit": VALIDATION_SPLIT, "format": "preference"}
    spec["hyperparameters"].update({"learningRate": LEARNING_RATE, "warmupRatio": WARMUP, "weightDecay": 0.0,
                                    "lrScheduler": "cosine"})
    spec["evaluation"] = {"enabled": False, "maxExamples": 8}
    path = work / f"dpo-bench-{reference}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run_worker(args: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Run this script as a worker subprocess; returns the JSON it prints last."""
    return benchlib.run_script_worker(Path(__file__), args, env, timeout)


# ------------------------------------------------------------------------------------------------
# Workers (each in its own process)
# ------------------------------------------------------------------------------------------------


def split_pairs(train: Path, seed: int) -> tuple[list[Any], list[Any]]:
    """(training rows, validation rows) of the preference file, split as the trainer splits
    (validationSplit 0.1, the seed)."""
    from finetune_trainer import dataset as ds
    from finetune_trainer import preference_data as pd

    loaded = pd.load_preferences([(train, str(train))], "auto", "fail")
    kept, held = ds.split_holdout(loaded.rows, VALIDATION_SPLIT, seed)
    return kept, held


def encoded(rows: list[Any], tokenizer: Any) -> tuple[list[Any], int]:
    """Our encoding of instruction-form rows, and how many pairs max length cut (expected 0)."""
    from finetune_trainer import preference_data as pd

    out = pd.encode_pairs(rows, "instruction", tokenizer, MAX_LEN)
    if out.dropped:
        raise RuntimeError(f"{out.dropped} pairs dropped by encoding: the bench expects every pair kept")
    return out.pairs, out.truncated


def load_lora_model(model_dir: Path, precision: str) -> Any:
    """The base in the bench's precision with the LoRA adapter of both sides (peft keeps adapters in fp32)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    return get_peft_model(model, LoraConfig(**LORA))


def held_out(model: Any, pairs: list[Any], pad_id: int, precision: str) -> dict[str, float]:
    """Mean DPO loss, preference accuracy and reward margin of `model` on held-out pairs, the reference being
    the base (adapter off): the same function for both sides."""
    import torch

    from finetune_trainer.objectives import dpo

    settings = dpo.DpoSettings(beta=BETA, loss="sigmoid")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        result = dpo.evaluate_pairs(model, pairs, dpo.AdapterReference(), settings, BATCH, pad_id, "cpu")
    return {"heldout_loss": result.loss, "heldout_accuracy": result.accuracy, "heldout_margin": result.margin}


def worker_trl(row: str, model_dir: Path, train: Path, steps: int, threads: int, seed: int,
               precision: str) -> dict[str, Any]:
    """TRL's DPOTrainer with LoRA; `row` precomputed: precompute_ref_log_probs=True."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import DPOConfig, DPOTrainer

    from finetune_trainer import preference_data as pd

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    rows, val_rows = split_pairs(train, seed)
    # TRL tokenizes prompt and answers with the tokenizer's defaults (no BOS added by this one): the BOS goes in
    # the prompt text; TRL appends the EOS to each answer itself.
    prompts = [tokenizer.bos_token + pd.prompt_text(r.data, "instruction", tokenizer) for r in rows]
    dataset = Dataset.from_dict({"prompt": prompts, "chosen": [r.data["chosen"] for r in rows],
                                 "rejected": [r.data["rejected"] for r in rows]})

    set_seed(seed)
    bf16 = precision == "bf16"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16 if bf16 else torch.float32,
                                                 attn_implementation="sdpa")
    model.config.use_cache = False

    stamps: list[tuple[float, float]] = []

    out = tempfile.mkdtemp(prefix="trl-dpo-")
    targs = DPOConfig(
        output_dir=out, per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUMULATION,
        learning_rate=LEARNING_RATE, lr_scheduler_type="cosine", warmup_steps=WARMUP, weight_decay=0.0,
        max_grad_norm=1.0, seed=seed, bf16=bf16, gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, max_steps=steps, logging_steps=1,
        save_strategy="no", report_to=[], dataloader_num_workers=0, use_cpu=True, disable_tqdm=True,
        dataset_num_proc=None, beta=BETA, loss_type=["sigmoid"], max_length=MAX_LEN,
        precompute_ref_log_probs=row == "precomputed")
    began = time.perf_counter()
    trainer = DPOTrainer(model=model, args=targs, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=LoraConfig(**LORA), callbacks=[benchlib.step_clock(stamps)])

    # The token ids TRL prepared against ours.
    ours, truncated = encoded(rows, tokenizer)
    prepared = trainer.train_dataset
    identical = len(prepared) == len(ours) and all(
        (p["prompt_ids"], p["chosen_ids"], p["rejected_ids"]) == (e.prompt_ids, e.chosen_ids, e.rejected_ids)
        for p, e in zip(prepared, ours, strict=True))

    counts: list[int] = []
    positions: list[int] = []
    collator = trainer.data_collator

    def counted(features: list[dict[str, Any]]) -> Any:
        batch = collator(features)
        counts.append(int(batch["attention_mask"].sum()))
        positions.append(int(batch["input_ids"].numel()))
        return batch

    trainer.data_collator = counted
    trainer.train()
    shutil.rmtree(out, ignore_errors=True)

    per_step = [sum(counts[ACCUMULATION * k:ACCUMULATION * (k + 1)]) for k in range(len(stamps))]
    val, _ = encoded(val_rows, tokenizer)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        **benchlib.step_figures(stamps, per_step),
        **held_out(trainer.model, val, tokenizer.pad_token_id, precision),
        "steps": len(stamps),
        "step_losses": losses,
        "first_step_seconds": stamps[0][0] - began,
        "identical": identical,
        "truncated": truncated,
        "nonpadding_share": sum(counts) / sum(positions),
        "longest": max(len(e.prompt_ids) + max(len(e.chosen_ids), len(e.rejected_ids)) for e in ours),
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "driver": "trl.DPOTrainer",
    }


def worker_objective(row: str, model_dir: Path, train: Path, steps: int, threads: int, seed: int,
                     precision: str) -> dict[str, Any]:
    """`objectives.dpo.DpoObjective` in a minimal loop shaped like the trainer's (see the module docstring)."""
    import torch
    from transformers import AutoTokenizer, get_scheduler, set_seed

    from finetune_trainer import dataset as ds
    from finetune_trainer.objectives import dpo

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    rows, val_rows = split_pairs(train, seed)
    set_seed(seed)
    began = time.perf_counter()
    pairs, _ = encoded(rows, tokenizer)
    model = load_lora_model(model_dir, precision)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pad_id = tokenizer.pad_token_id
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    reference: dpo.Reference
    if row == "precomputed":
        with autocast:
            table = dpo.precompute_reference(model, pairs, BATCH, pad_id, "cpu")
        reference = dpo.PrecomputedReference(table)
    else:
        reference = dpo.AdapterReference()
    objective = dpo.DpoObjective(dpo.DpoSettings(beta=BETA, loss="sigmoid"), reference)
    objective.prepare(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=math.ceil(WARMUP * steps),
                              num_training_steps=steps)

    lengths = [objective.length(p) for p in pairs]
    per_epoch = len(lengths) // BATCH
    stamps: list[tuple[float, float]] = []
    tokens: list[int] = []
    positions: list[int] = []
    losses: list[float] = []
    epoch, used = 0, 0
    model.train()
    for _ in range(steps):
        if used + ACCUMULATION > per_epoch:
            epoch, used = epoch + 1, 0
        plan = ds.batch_plan(lengths, BATCH, seed, epoch, True, ACCUMULATION)
        batches = [objective.batch(pairs, b, pad_id) for b in plan[used:used + ACCUMULATION]]
        used += ACCUMULATION
        num_items = sum(objective.weight(b) for b in batches)
        total = torch.zeros(())
        for batch in batches:
            with autocast:
                step = objective.loss(model, batch, "cpu", num_items)
            step.loss.backward()
            total += step.loss.detach().float()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(total))
        tokens.append(sum(b["num_tokens"] for b in batches))
        positions.append(sum(int(b["input_ids"].numel()) for b in batches))
        stamps.append((time.perf_counter(), time.process_time()))

    val, _ = encoded(val_rows, tokenizer)
    return {
        **benchlib.step_figures(stamps, tokens),
        **held_out(model, val, pad_id, precision),
        "steps": len(stamps),
        "step_losses": losses,
        "first_step_seconds": stamps[0][0] - began,
        "nonpadding_share": sum(tokens) / sum(positions),
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "driver": "objective",
    }


def worker_trainer(row: str, manifest: Path, steps: int, threads: int, seed: int, precision: str) -> dict[str, Any]:
    """Ours: the manifest resolved as `finetune run --local` does, run by the trainer's entrypoint; per-step
    records taken from the metrics it writes (each stamped when written, right after its optimizer step)."""
    import torch

    from finetune_trainer import entrypoint, train
    from finetune_trainer.objectives import dpo

    torch.set_num_threads(threads)
    entrypoint.setup_logging()
    overrides = [f"hyperparameters.maxSteps={steps}", f"hyperparameters.seed={seed}",
                 f"hyperparameters.precision={precision}", "hyperparameters.packing=false"]
    config = benchlib.resolve_manifest(manifest, overrides)

    stamps: list[tuple[float, float]] = []
    records: list[dict[str, Any]] = []
    # The run's metric hook (Run.log_metric since the loop was split out of train.Run; Run._metric before).
    hook = "log_metric" if hasattr(train.Run, "log_metric") else "_metric"
    original = getattr(train.Run, hook)

    def timed(self: Any, record: dict[str, Any]) -> None:
        if "loss" in record and "step" in record:  # one per optimizer step, written right after it
            stamps.append((time.perf_counter(), time.process_time()))
        records.append(record)
        original(self, record)

    setattr(train.Run, hook, timed)
    # Token and position counts of the loop's micro-batches (the objective builds every one of them).
    counts: list[tuple[int, int]] = []
    make_batch = dpo.DpoObjective.batch

    def counted(self: Any, items: Any, indices: Any, pad_id: int) -> dict[str, Any]:
        batch = make_batch(self, items, indices, pad_id)
        counts.append((batch["num_tokens"], int(batch["input_ids"].numel())))
        return batch

    dpo.DpoObjective.batch = counted  # type: ignore[method-assign]
    out = Path(tempfile.mkdtemp(prefix="ours-dpo-out-"))
    began = time.perf_counter()
    code = entrypoint.run(config, str(out))
    if code != 0:
        raise RuntimeError(f"the trainer exited with code {code}")
    steps_logged = [r for r in records if "loss" in r and "step" in r]
    if not steps_logged or "reward_margin" not in steps_logged[0]:
        raise RuntimeError(f"the trainer logged no DPO step (first records: {records[:2]})")

    # Held-out pairs scored by the same function as TRL's side, on the adapter the run saved (the trainer's
    # own evaluation is off: evaluation.enabled false).
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(config.spec.base_model.resolved_uri().removeprefix("file://"))
    adapter = out / "model"
    if not (adapter / "adapter_config.json").is_file():
        raise RuntimeError(f"no adapter at {adapter}: {sorted(p.name for p in out.iterdir())}")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    base = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.bfloat16 if precision == "bf16" else torch.float32, attn_implementation="sdpa")
    _, val_rows = split_pairs(Path(config.spec.dataset.train.removeprefix("file://")), seed)
    val, _ = encoded(val_rows, tokenizer)
    figures = held_out(PeftModel.from_pretrained(base, str(adapter)), val, tokenizer.pad_token_id, precision)
    shutil.rmtree(out, ignore_errors=True)
    return {
        **benchlib.step_figures(stamps, [r["tokens"] for r in steps_logged]),
        **figures,
        "steps": len(steps_logged),
        "step_losses": [r["loss"] for r in steps_logged],
        "first_step_seconds": stamps[0][0] - began,
        "nonpadding_share": sum(c[0] for c in counts) / sum(c[1] for c in counts),
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "driver": "trainer",
    }


def worker_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("side", choices=["trl", "objective", "trainer"])
    parser.add_argument("row", choices=ROWS)
    benchlib.add_worker_arguments(parser)
    args = parser.parse_args(argv)
    if args.side == "trl":
        result = worker_trl(args.row, args.model, args.train, args.steps, args.threads, args.seed, args.precision)
    elif args.side == "objective":
        result = worker_objective(args.row, args.model, args.train, args.steps, args.threads, args.seed,
                                  args.precision)
    else:
        result = worker_trainer(args.row, args.manifest, args.steps, args.threads, args.seed, args.precision)
    print(json.dumps(result), flush=True)
    return 0


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def losses_text(values: list[float]) -> str:
    return ",".join(f"{v:.4f}" for v in values)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return worker_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per run (default 10, < 1 epoch)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side per row, best taken (default 2)")
    parser.add_argument("--rows", default="adapter,precomputed", help="reference rows: adapter, precomputed")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS and torch threads, both sides")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    parser.add_argument("--ours", choices=["auto", "trainer", "objective"], default="auto",
                        help="ours: the trainer's loop, or DpoObjective in a minimal loop (auto: the trainer "
                             "where it dispatches on spec.objective)")
    args = parser.parse_args()
    rows = [r for r in args.rows.split(",") if r]
    if any(r not in ROWS for r in rows):
        parser.error(f"--rows: each of {', '.join(ROWS)}")
    if args.steps < 2:
        parser.error("--steps must be at least 2 (throughput is taken over steps 2..N)")
    precision, precision_why = benchlib.bench_precision(args.precision)
    ours = args.ours
    if ours == "auto":
        ours = "trainer" if trainer_dispatches_objective() else "objective"

    start = time.perf_counter()
    with benchlib.scratch_dir("dpo-throughput-bench-") as work:
        env = benchlib.worker_env(args.threads, work)
        model, train, params = build_inputs(work, args.hidden, args.layers)
        print(f"# machine: nproc={os.cpu_count()} cpu={benchlib.cpu_model()!r} "
              f"bf16 {benchlib.native_bf16()[1]}; load_avg_at_start={os.getloadavg()[0]:.2f}")
        print(f"# model: tiny Llama hidden={args.hidden} layers={args.layers} "
              f"mlp={benchlib.mlp_width(args.hidden)} vocab=2048 ({params / 1e6:.2f}M parameters); "
              f"data: {PAIRS_FILE} minus a 10% validation split")
        print(f"# settings: LoRA r16 alpha32 q,k,v,o (dropout off for DPO on both sides), sigmoid beta {BETA}, "
              f"lr {LEARNING_RATE} cosine warmup {WARMUP}, {BATCH} pairs x accumulation {ACCUMULATION}, "
              f"maxSeqLength {MAX_LEN}, gradient checkpointing, steps={args.steps}, threads={args.threads}, "
              f"seed {args.seed}, repeats {args.repeats}")
        print(f"# precision: {precision_why}; the same on both sides")
        if ours == "trainer":
            print("# ours: the trainer's own loop (manifest resolved as `finetune run --local`, entrypoint.run)")
        else:
            why = "as asked (--ours objective)" if args.ours == "objective" else \
                "the trainer not dispatching on spec.objective when this ran"
            print("# ours: NOT the trainer's loop: finetune_trainer.objectives.dpo.DpoObjective driven by this "
                  f"bench's minimal AdamW loop (dataset.batch_plan, clipping, cosine schedule), {why}")
        print(flush=True)
        common = ["--steps", str(args.steps), "--threads", str(args.threads), "--seed", str(args.seed),
                  "--precision", precision]
        for row in rows:
            reference = "always" if row == "precomputed" else "auto"
            manifest = write_manifest(work, model, train, params, reference)
            ours_args = ([ours, row, "--manifest", str(manifest)] if ours == "trainer"
                         else [ours, row, "--model", str(model), "--train", str(train)])
            runs: dict[str, list[dict[str, Any]]] = {"trl": [], "ours": []}
            for _ in range(args.repeats):
                for side, worker in (("trl", ["trl", row, "--model", str(model), "--train", str(train)]),
                                     ("ours", ours_args)):
                    took = time.perf_counter()
                    r = run_worker(worker + common, env, timeout=1800)
                    runs[side].append(r)
                    print(f"# {row} {side} ({r['driver']}): {r['tokens']} useful tokens over steps 2..{r['steps']}: "
                          f"{r['seconds']:.1f} s wall (median step {r['tokens_per_second']:.0f} tokens/s), "
                          f"{r['cpu_seconds']:.1f} s CPU ({r['tokens_per_cpu_second']:.0f} tokens/CPU-s); set-up to "
                          f"the end of step 1 {r['first_step_seconds']:.1f} s; held-out loss {r['heldout_loss']:.4f} accuracy "
                          f"{r['heldout_accuracy']:.3f} margin {r['heldout_margin']:+.4f}; non-padding share of computed "
                          f"positions {r['nonpadding_share']:.3f}; peak RSS "
                          f"{r['rss_mb']:.0f} MiB; worker {time.perf_counter() - took:.0f} s; "
                          f"load_avg={os.getloadavg()[0]:.2f}", flush=True)
            first = runs["trl"][0]
            print(f"# {row} trl: prepared token ids identical to ours: {first['identical']}; pairs cut by max length: "
                  f"{first['truncated']}; longest pair row {first['longest']} tokens")
            trl, mine = benchlib.best_of(runs["trl"]), benchlib.best_of(runs["ours"])
            print(f"# {row}, median-step tokens/s of each run: trl "
                  + " ".join(f"{r['tokens_per_second']:.0f}" for r in runs["trl"]) + ", ours "
                  + " ".join(f"{r['tokens_per_second']:.0f}" for r in runs["ours"]))
            print(f"dpo_throughput_ratio_vs_trl_{row}={mine['tokens_per_second'] / trl['tokens_per_second']:.2f}")
            print(f"dpo_throughput_ratio_cpu_vs_trl_{row}="
                  f"{mine['tokens_per_cpu_second'] / trl['tokens_per_cpu_second']:.2f}")
            print(f"dpo_tokens_per_second_trl_{row}={trl['tokens_per_second']:.0f}")
            print(f"dpo_tokens_per_second_ours_{row}={mine['tokens_per_second']:.0f}")
            for side, best in (("trl", trl), ("ours", mine)):
                print(f"dpo_loss_{side}_{row}_steps={losses_text(runs[side][0]['step_losses'])}")
                print(f"dpo_heldout_loss_{side}_{row}={best['heldout_loss']:.4f}")
                print(f"dpo_heldout_accuracy_{side}_{row}={best['heldout_accuracy']:.3f}")
                print(f"dpo_heldout_margin_{side}_{row}={best['heldout_margin']:+.4f}")
                print(f"dpo_first_step_seconds_{side}_{row}={best['first_step_seconds']:.1f}")
                print(f"dpo_rss_mb_{side}_{row}={best['rss_mb']:.0f}")
            print(flush=True)
        print(f"# load_avg_at_end={os.getloadavg()[0]:.2f}; total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
