"""Training throughput on CPU: ours (finetune_trainer's own loop) against the domain example's reference
recipe (HF `transformers.Trainer`, every example padded to maxSeqLength) and against TRL's `SFTTrainer`
configured for speed (the peer users pick today), for full, LoRA and QLoRA.

All sides train the same tiny Llama (`finetune_trainer.tiny.build_tiny_model`; default hidden 256,
4 layers, 4 heads of 64, MLP 704, vocabulary 2048 of which the byte-level BPE trained on the sample uses
1,676) on the same rows: the bundled healthcare sample minus the same seeded 10% validation split
(`dataset.split_holdout`, as the trainer does for `validationSplit: 0.1`). Settings are those of
examples/healthcare-lora.yaml: LoRA r=16, alpha=32, dropout 0.05 on q,k,v,o; lr 2e-4 with the spec's
default cosine schedule, warmup 0.03, weight decay 0 and gradient clipping at 1.0; batch 4 x gradient
accumulation 4; maxSeqLength 512; seed 42; the precision below. Gradient checkpointing (non-reentrant) as each
side is run by its users: the reference recipe and TRL (whose `SFTConfig` defaults to it) with it; ours at the
rung its plan chooses (`status.plan.rung`: on this tiny model there is memory to spare, so no recompute; printed
as `# <method>: ours trained at ...`). Where ours ran without it, TRL runs again without it too
(`throughput_ratio_vs_trl_same_gc_<method>`), so the ratio at equal checkpointing is there beside the other.
QLoRA: bitsandbytes nf4, double quantization, `prepare_model_for_kbit_training`, on every side.

Precision (`--precision`, default auto; printed as `# precision: ...`): the example's bf16 where this CPU
runs bf16 natively (AVX512-BF16 or AMX, `benchlib.native_bf16`), else fp32, always the same on both sides.
On a CPU that only emulates bf16 (e.g. an AMD EPYC without AVX512) every bf16 matmul converts to fp32 and
back, and the figures would time the emulation, not the trainer. bf16: bf16 autocast; full fine-tuning with
bf16 weights on both sides (ours trains pure bf16 under precision bf16, so the reference loads the model in
bf16 too); QLoRA computes in bf16. fp32: no autocast, fp32 weights, QLoRA computes in fp32
(`quantization.computeDtype: float32` for ours). TRL casts a quantized model's LoRA adapters to bf16 by
itself (following the QLoRA paper), whatever the precision: its QLoRA adapters are bf16 under fp32 too.

- reference: the instruction template is ours (`dataset.instruction_prompt`) and the token ids are
  identical to ours (checked, printed as `# ... token streams identical`): `<s>` + prompt + response +
  `</s>` tokenized with `padding="max_length"`, `max_length=512`, `truncation=True`; labels -100 on the
  prompt and on padding, so the loss is on response tokens (and `</s>`) only, as ours. `Trainer` with
  `max_steps`, logging every step, no saving, the default collator.
- ours: what `finetune run --local` runs in the trainer process: the manifest (examples/healthcare-lora.yaml
  with the base model and data at local files, `evaluation.enabled: false` so the run is about training)
  is validated and resolved as the CLI does (`manifests.validate_document`, `contract.resolve`, with `--set`-style
  overrides for the method, maxSteps, packing and seed), then `entrypoint.run(config, output)` runs it
  (the launcher and CLI around it only supervise). Batches are grouped by length within each optimizer
  step and padded to their own longest row; `_packed`: `packing: true`.
- trl: TRL 1.16's `SFTTrainer` (`SFTConfig`) as its documentation recommends for speed at the same
  examples per step: `padding_free=True` (each micro-batch flattened into one row without padding, example
  boundaries from `position_ids`; with SDPA, transformers builds the block-diagonal causal mask from them,
  `masking_utils.find_packed_sequence_indices`, so examples do not attend to each other) and
  `completion_only_loss=True` on a prompt-completion dataset (prompt `<s>` + our template, completion the
  response; TRL appends `</s>`). The token ids and labels TRL prepared are checked identical to ours
  (printed). Length grouping does not apply to padding-free batches (nothing is padded); `--trl-variant
  grouped` runs TRL padded to each batch's longest row with `train_sampling_strategy="group_by_length"`
  instead: measured here (2026-12-02, LoRA and full, 12 steps, bf16), about the same tokens per CPU second
  as padding-free, but a higher held-out loss for full fine-tuning (6.845 against 6.690): transformers'
  `LengthGroupedSampler` sorts megabatches of 50 batches by length, so each optimizer step holds examples
  alike in length (ours sorts only inside a step, see `dataset.batch_plan`). `--trl-packed` adds TRL with `packing=True` (best-fit
  decreasing, padding-free too) beside ours packed; it flattens 4 packed rows of up to 512 tokens into one
  row of up to 2,048 whose SDPA mask on CPU is dense, and is several times slower per token than TRL's
  padding-free setting on this model, so `make bench` leaves it out. Same hyperparameters, threads,
  precision, LoRA/QLoRA settings and gradient checkpointing as the reference (the model is loaded, and
  prepared for k-bit training, as the reference does; TRL adds the LoRA adapters from the same `LoraConfig`).
  TRL's defaults stay on: its chunked fused LM-head loss and the entropy and token-accuracy metrics it logs.

Each side runs in its own subprocess with the same OMP_NUM_THREADS and torch threads (default 1: other
processes on a shared 2-core machine make multi-threaded OpenMP spin at its barriers, and one run's wall
time then says more about them than about the trainer).

Figures (all from this run):

- useful tokens: non-padding tokens (prompt + response: every token the model attends to). Per optimizer
  step: the reference counts attention-mask sums of the collated batches; ours logs `tokens` per step.
  Step boundaries: the reference's `on_step_end` callback, ours' per-step metrics record (`Run._metric`,
  wrapped to take the time); a step's time is the interval between two boundaries, so both include data
  handling and per-step logging. Steps 2..N (step 1 pays one-time costs on both sides).
- `throughput_ratio_<method>`: ours / reference useful tokens per second of wall time, each the median
  over its steps (robust to bursts of other work on the machine); `throughput_ratio_cpu_<method>`: the
  same with process CPU time (total tokens / total CPU seconds), which other processes disturb far less;
  `tokens_per_second_<side>_<method>` are the wall-clock medians.
- `loss_<side>_<method>`: after the same optimizer steps over the same number of examples (16 per step),
  the mean token loss on the held-out validation rows (response tokens), computed by the same function
  (`train.mean_loss`, under bf16 autocast when the precision is bf16) on both sides. `train_loss_*`: mean
  training loss over the steps (different batch orders, so noisier).
- `rss_mb_<side>_<method>`: peak RSS (ru_maxrss, MiB) of the training process; ours includes its
  loss-only evaluation, final checkpoint and artifacts.
- `loss_delta_lora_seeds`, `loss_sd_lora_seeds`: the LoRA pair again with `--noise-seeds` (default 43 and 44,
  with 42: three seeds; the seed sets data order, adapter init and dropout on both sides): the mean over
  seeds of (ours - reference) held-out loss, and the standard deviation of a side's loss across seeds (the
  noise a single seed's difference should be read against).
- `throughput_ratio_lora_packed`, `loss_ours_lora_packed`: ours with packing, for `--packed-steps` steps
  (packed rows hold several examples: the examples seen are printed; the loss is not at equal examples).
- `throughput_ratio_vs_trl_<method>`: ours / TRL useful tokens per second (wall-clock median step, as
  above), each side's best of `--trl-repeats` runs, default 2, run alternately: the two are close, and a
  run of 11 steps on a shared machine moves by 10% and more with other work (which only slows a run, so
  the best run is the least disturbed); `throughput_ratio_cpu_vs_trl_<method>` the same with tokens per
  CPU second (best run of each side); `heldout_loss_trl_<method>` and
  `heldout_loss_ours_<method>`: the held-out loss of both after the same optimizer steps and examples.
  `throughput_ratio_vs_trl_lora_packed`: ours with packing / TRL as above; `loss_delta_vs_trl_lora_seeds`:
  the mean over the noise seeds of (ours - TRL) held-out loss (TRL runs at every noise seed too).
- `throughput_ratio_vs_trl_same_gc_<method>`: ours / TRL with `gradient_checkpointing=False` (best of
  `--trl-repeats` runs as well), printed when ours ran without recompute; `tokens_per_second_trl_nogc_<method>`.

Runtime (`make bench` must finish within 30 minutes on a CPU without AVX512, where `auto` picks fp32):
measured on a 2-core AMD EPYC standing in for such a CPU (`FT_BENCH_NO_NATIVE_BF16=1`, with
`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2` so that torch's and oneDNN's kernels keep to AVX2;
2026-12-02): 995 s of wall time before, 611 s after two changes: the six noise-seed runs, whose held-out
losses are all that is used from them, run side by side (one per core), and the installed packages carry
compiled bytecode (each worker process used to spend 10-20 s compiling torch, bitsandbytes, peft and
transformers again on import, `PYTHONDONTWRITEBYTECODE` being set there). Every timed worker runs alone,
one after another, with one thread. Most of the time is the reference's max_length padding (LoRA: 58-67 s
over its steps, against 9-11 s for ours and for TRL). `--noise-seeds ''` saves the noise-seed runs,
`--no-trl` about a fifth.

Usage: python bench/throughput_bench.py [--steps 12] [--qlora-steps 6] [--packed-steps 3] [--threads 1]
       [--methods full,lora,qlora] [--seed 42] [--no-packed] [--noise-seeds 43,44] [--precision auto]
       [--no-trl] [--trl-variant padfree|grouped] [--trl-repeats 2] [--trl-packed]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from benchlib import (
    ACCUMULATION,
    BATCH,
    EXAMPLE,
    MAX_LEN,
    SEED,
    VALIDATION_SPLIT,
    add_worker_arguments,
    bench_precision,
    best_of,
    build_tiny_inputs,
    cpu_model,
    mlp_width,
    resolve_manifest,
    run_script_worker,
    scratch_dir,
    step_clock,
    step_figures,
    worker_env,
)

# ------------------------------------------------------------------------------------------------
# Shared set-up (the parent process)
# ------------------------------------------------------------------------------------------------


def build_inputs(work: Path, hidden: int, layers: int) -> tuple[Path, Path, int]:
    """The tiny model and the training file under `work`; returns (model dir, data file, parameters)."""
    return build_tiny_inputs(work, hidden, layers, "healthcare_train.jsonl")


def write_manifest(work: Path, model: Path, train: Path, params: int) -> Path:
    """examples/healthcare-lora.yaml with the base model and data at local files, loss-only evaluation."""
    doc = yaml.safe_load(EXAMPLE.read_text())
    spec = doc["spec"]
    spec["baseModel"] = {"uri": f"file://{model}", "parameters": f"{params / 1e6:.2f}M"}
    spec["dataset"]["train"] = f"file://{train}"
    spec["dataset"].pop("secretRef", None)
    spec["evaluation"] = {"enabled": False, "maxExamples": 8}
    path = work / "healthcare-bench.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run_worker(args: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Run this script as a worker subprocess; returns the JSON it prints last."""
    return run_script_worker(Path(__file__), args, env, timeout)


# ------------------------------------------------------------------------------------------------
# Workers (each in its own process)
# ------------------------------------------------------------------------------------------------


def split_rows(train: Path, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training rows, validation rows) as the trainer splits them (validationSplit 0.1, the seed)."""
    from finetune_trainer import dataset as ds

    loaded = ds.load_dataset([(train, str(train))], "instruction", "fail")
    kept, held = ds.split_holdout(loaded.rows, VALIDATION_SPLIT, seed)
    return [r.data for r in kept], [r.data for r in held]


def each_run(runs: dict[str, list[dict[str, Any]]], key: str) -> str:
    """`key` of every run of every side, as text."""
    return ", ".join(side + " " + " ".join(f"{r[key]:.0f}" for r in done) for side, done in runs.items())


def worker_ref(method: str, model_dir: Path, train: Path, steps: int, threads: int, seed: int,
               precision: str) -> dict[str, Any]:
    """The reference recipe: HF Trainer on max_length-padded examples, in `precision` (bf16 or fp32)."""
    import torch
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        Trainer,
        TrainingArguments,
        default_data_collator,
        set_seed,
    )

    from finetune_trainer import dataset as ds
    from finetune_trainer.train import mean_loss

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    rows, val_rows = split_rows(train, seed)

    # The recipe's tokenization: the whole example padded to max_length; labels masked on prompt and pads.
    features: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    identical = True
    for row in rows:
        prompt = tokenizer.bos_token + ds.instruction_prompt(row)
        enc = tokenizer(prompt + row["output"] + tokenizer.eos_token, padding="max_length", truncation=True,
                        max_length=MAX_LEN, add_special_tokens=False)
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        labels = [tok if (i >= n_prompt and m) else -100
                  for i, (tok, m) in enumerate(zip(enc["input_ids"], enc["attention_mask"], strict=True))]
        ours = ds.encode(row, "instruction", tokenizer, MAX_LEN)
        length = sum(enc["attention_mask"])
        identical &= ours is not None and ours.input_ids == enc["input_ids"][:length] \
            and ours.labels == labels[:length]
        features["input_ids"].append(enc["input_ids"])
        features["attention_mask"].append(enc["attention_mask"])
        features["labels"].append(labels)
    dataset = Dataset.from_dict(features)

    set_seed(seed)
    bf16 = precision == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    kwargs: dict[str, Any] = {"dtype": dtype}
    if method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=torch.uint8)
        kwargs["device_map"] = {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    model.config.use_cache = False
    gc_kwargs = {"use_reentrant": False}
    if method != "full":
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if method == "qlora":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                    gradient_checkpointing_kwargs=gc_kwargs)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none",
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                                 task_type="CAUSAL_LM"))

    counts: list[int] = []

    def collate(batch_features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = default_data_collator(batch_features)
        counts.append(int(batch["attention_mask"].sum()))
        return batch

    stamps: list[tuple[float, float]] = []

    out = tempfile.mkdtemp(prefix="ref-trainer-")
    targs = TrainingArguments(
        output_dir=out, per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUMULATION,
        learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.03, weight_decay=0.0, max_grad_norm=1.0,
        seed=seed, bf16=bf16, activation_checkpointing=True, activation_checkpointing_kwargs=gc_kwargs,
        max_steps=steps, logging_steps=1, save_strategy="no", report_to=[], dataloader_num_workers=0,
        use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=dataset, data_collator=collate,
                      callbacks=[step_clock(stamps)])
    trainer.train()
    shutil.rmtree(out, ignore_errors=True)

    # Collation order is training order; a step is ACCUMULATION consecutive micro-batches.
    per_step = [sum(counts[ACCUMULATION * k:ACCUMULATION * (k + 1)]) for k in range(len(stamps))]
    val = [e for e in (ds.encode(r, "instruction", tokenizer, MAX_LEN) for r in val_rows) if e is not None]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        held_out = mean_loss(trainer.model, val, BATCH, tokenizer.pad_token_id, torch.device("cpu"))
    train_losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        **step_figures(stamps, per_step),
        "padded_tokens": (len(stamps) - 1) * ACCUMULATION * BATCH * MAX_LEN,
        "steps": len(stamps),
        "examples": steps * BATCH * ACCUMULATION,
        "eval_loss": held_out,
        "train_loss": statistics.mean(train_losses),
        "identical": identical,
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


TRL_VARIANTS = ("padfree", "grouped", "packed")


def worker_trl(method: str, model_dir: Path, train: Path, steps: int, threads: int, seed: int,
               precision: str, variant: str, gc: bool = True) -> dict[str, Any]:
    """TRL's SFTTrainer on prompt-completion rows (completion-only loss), configured for speed by `variant`:
    `padfree` (padding_free=True: each micro-batch flattened into one row, example boundaries from
    position_ids), `grouped` (padded to each batch's longest row, length-grouped sampler), `packed`
    (packing=True with best-fit decreasing, which is padding-free too)."""
    import torch
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        set_seed,
    )
    from trl import SFTConfig, SFTTrainer

    from finetune_trainer import dataset as ds
    from finetune_trainer.train import mean_loss

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    rows, val_rows = split_rows(train, seed)
    # TRL tokenizes prompt and prompt + completion with the tokenizer's defaults (no BOS added by this one):
    # the BOS goes in the prompt text, the EOS is appended to the completion by TRL itself.
    dataset = Dataset.from_dict({"prompt": [tokenizer.bos_token + ds.instruction_prompt(r) for r in rows],
                                 "completion": [r["output"] for r in rows]})

    set_seed(seed)
    bf16 = precision == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": "sdpa"}
    if method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=torch.uint8)
        kwargs["device_map"] = {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    model.config.use_cache = False
    gc_kwargs = {"use_reentrant": False}
    peft_config = None
    if method != "full":
        from peft import LoraConfig, prepare_model_for_kbit_training

        if method == "qlora":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc,
                                                    gradient_checkpointing_kwargs=gc_kwargs)
        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none",
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")

    stamps: list[tuple[float, float]] = []

    out = tempfile.mkdtemp(prefix="trl-trainer-")
    variant_args: dict[str, Any] = {
        # padding_free without packing requires max_length=None: every row is at most MAX_LEN already (checked)
        "padfree": {"padding_free": True, "max_length": None},
        "grouped": {"max_length": MAX_LEN, "train_sampling_strategy": "group_by_length"},
        "packed": {"packing": True, "packing_strategy": "bfd", "max_length": MAX_LEN},
    }[variant]
    targs = SFTConfig(
        output_dir=out, per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUMULATION,
        learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.03, weight_decay=0.0, max_grad_norm=1.0,
        seed=seed, bf16=bf16, gradient_checkpointing=gc, gradient_checkpointing_kwargs=gc_kwargs,
        max_steps=steps, logging_steps=1, save_strategy="no", report_to=[], dataloader_num_workers=0,
        use_cpu=True, disable_tqdm=True, completion_only_loss=True, dataset_num_proc=None, **variant_args)
    trainer = SFTTrainer(model=model, args=targs, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[step_clock(stamps)])

    # The token ids and loss mask TRL prepared, against ours (before packing; packing only concatenates them).
    identical = True
    prepared = trainer.train_dataset
    if variant != "packed":
        encoded = [ds.encode(r, "instruction", tokenizer, MAX_LEN) for r in rows]
        identical = len(prepared) == len(encoded) and all(
            e is not None and e.input_ids == p["input_ids"] and e.labels == p["labels"]
            for e, p in zip(encoded, prepared, strict=True))
    longest = max(len(p["input_ids"]) for p in prepared)
    if variant == "padfree" and longest > MAX_LEN:
        raise RuntimeError(f"a row of {longest} tokens: padding_free without packing does not truncate")

    # Useful tokens per micro-batch: the rows' own lengths (a packed row's length is its examples' sum).
    counts: list[int] = []
    examples: list[int] = []
    collator = trainer.data_collator

    def counted(features: list[dict[str, Any]]) -> Any:
        counts.append(sum(len(f["input_ids"]) for f in features))
        examples.append(sum(len(f["seq_lengths"]) if "seq_lengths" in f else 1 for f in features))
        return collator(features)

    trainer.data_collator = counted
    trainer.train()
    shutil.rmtree(out, ignore_errors=True)

    per_step = [sum(counts[ACCUMULATION * k:ACCUMULATION * (k + 1)]) for k in range(len(stamps))]
    val = [e for e in (ds.encode(r, "instruction", tokenizer, MAX_LEN) for r in val_rows) if e is not None]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        held_out = mean_loss(trainer.model, val, BATCH, tokenizer.pad_token_id, torch.device("cpu"))
    train_losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        **step_figures(stamps, per_step),
        "steps": len(stamps),
        "examples": sum(examples[:ACCUMULATION * len(stamps)]),
        "eval_loss": held_out,
        "train_loss": statistics.mean(train_losses),
        "identical": identical,
        "longest": longest,
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def worker_ours(method: str, manifest: Path, steps: int, packing: bool, seed: int, threads: int,
                precision: str, gc: str = "plan") -> dict[str, Any]:
    """Ours: the manifest resolved as `finetune run --local` does, run by the trainer's entrypoint."""
    import torch

    from finetune_trainer import entrypoint, train

    torch.set_num_threads(threads)
    entrypoint.setup_logging()
    overrides = [f"method={method}", f"hyperparameters.maxSteps={steps}",
                 f"hyperparameters.packing={'true' if packing else 'false'}", f"hyperparameters.seed={seed}",
                 f"hyperparameters.precision={precision}"]
    if method == "qlora" and precision == "fp32":  # QLoRA computes in the training precision (default bf16)
        overrides.append("quantization.computeDtype=float32")
    if gc != "plan":  # else the plan decides (no recompute where the planned GPU has memory to spare)
        overrides.append(f"hyperparameters.gradientCheckpointing={'true' if gc == 'on' else 'false'}")
    config = resolve_manifest(manifest, overrides)
    rung = config.start_rung()  # where training starts: the plan's rung unless overridden above

    stamps: list[tuple[float, float]] = []
    records: list[dict[str, Any]] = []
    metric = train.Run._metric

    def timed_metric(self: Any, record: dict[str, Any]) -> None:
        if "loss" in record:  # one per optimizer step, written right after it
            stamps.append((time.perf_counter(), time.process_time()))
        records.append(record)
        metric(self, record)

    train.Run._metric = timed_metric  # type: ignore[method-assign]
    out = Path(tempfile.mkdtemp(prefix="ours-out-"))
    code = entrypoint.run(config, str(out))
    shutil.rmtree(out, ignore_errors=True)
    if code != 0:
        raise RuntimeError(f"the trainer exited with code {code}")
    steps_logged = [r for r in records if "loss" in r]
    examples = steps * BATCH * ACCUMULATION
    if packing:
        examples = packed_examples(manifest, steps, seed)
    return {
        **step_figures(stamps, [r["tokens"] for r in steps_logged]),
        "steps": len(steps_logged),
        "examples": examples,
        "eval_loss": [r for r in records if "eval_loss" in r][-1]["eval_loss"],
        "train_loss": statistics.mean(r["loss"] for r in steps_logged),
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rung": rung.model_dump(by_alias=True),
    }


def packed_examples(manifest: Path, steps: int, seed: int) -> int:
    """About how many examples `steps` packed optimizer steps hold (rows packed as the trainer packs them)."""
    from transformers import AutoTokenizer

    from finetune_trainer import dataset as ds

    spec = yaml.safe_load(manifest.read_text())["spec"]
    tokenizer = AutoTokenizer.from_pretrained(spec["baseModel"]["uri"][len("file://"):])
    rows, _ = split_rows(Path(spec["dataset"]["train"][len("file://"):]), seed)
    encoded = [e for e in (ds.encode(r, "instruction", tokenizer, MAX_LEN) for r in rows) if e is not None]
    per_row = len(encoded) / len(ds.pack(encoded, MAX_LEN, seed))
    return round(steps * BATCH * ACCUMULATION * per_row)


def worker_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("side", choices=["ref", "ours", "trl"])
    parser.add_argument("method", choices=["full", "lora", "qlora"])
    add_worker_arguments(parser)
    parser.add_argument("--packing", action="store_true")
    parser.add_argument("--variant", choices=TRL_VARIANTS, default="padfree")
    parser.add_argument("--gc", choices=["on", "off", "plan"], default="plan",
                        help="gradient checkpointing: ours `plan` lets the plan decide; TRL `plan` is its default (on)")
    args = parser.parse_args(argv)
    if args.side == "trl":
        result = worker_trl(args.method, args.model, args.train, args.steps, args.threads, args.seed,
                            args.precision, args.variant, gc=args.gc != "off")
    elif args.side == "ref":
        result = worker_ref(args.method, args.model, args.train, args.steps, args.threads, args.seed,
                            args.precision)
    else:
        result = worker_ours(args.method, args.manifest, args.steps, args.packing, args.seed, args.threads,
                             args.precision, args.gc)
    print(json.dumps(result), flush=True)
    return 0


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return worker_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps for full and LoRA (default 12)")
    parser.add_argument("--qlora-steps", type=int, default=6, help="optimizer steps for QLoRA (default 6)")
    parser.add_argument("--packed-steps", type=int, default=3, help="optimizer steps of ours packed (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS and torch threads, both sides")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--methods", default="full,lora,qlora")
    parser.add_argument("--seed", type=int, default=SEED, help="seed of both sides (data order, init, split)")
    parser.add_argument("--no-packed", action="store_true", help="skip ours with packing (LoRA)")
    parser.add_argument("--no-trl", action="store_true", help="skip TRL's SFTTrainer")
    parser.add_argument("--trl-repeats", type=int, default=2,
                        help="runs of ours and of TRL per method, pooled for their ratio (default 2)")
    parser.add_argument("--trl-packed", action="store_true",
                        help="also TRL with packing=True (bfd) for LoRA, --packed-steps steps (slow on CPU)")
    parser.add_argument("--trl-variant", choices=["padfree", "grouped"], default="padfree",
                        help="TRL's setting at equal examples (default padfree: padding_free=True)")
    parser.add_argument("--noise-seeds", default="43,44",
                        help="more seeds for the LoRA pair, to show loss noise ('' to skip)")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="both sides' precision; auto: bf16 where the CPU runs it natively, else fp32")
    args = parser.parse_args()
    precision, precision_why = bench_precision(args.precision)
    methods = [m for m in args.methods.split(",") if m]
    if min(args.steps, args.qlora_steps, args.packed_steps) < 2:
        parser.error("every step count must be at least 2 (throughput is taken over steps 2..N)")

    start = time.perf_counter()
    with scratch_dir("throughput-bench-") as work:
        env = worker_env(args.threads, work)
        model, train, params = build_inputs(work, args.hidden, args.layers)
        manifest = write_manifest(work, model, train, params)
        print(f"# machine: nproc={os.cpu_count()} cpu={cpu_model()!r} load_avg_at_start={os.getloadavg()[0]:.2f}")
        print(f"# model: tiny Llama hidden={args.hidden} layers={args.layers} mlp={mlp_width(args.hidden)} "
              f"vocab=2048 ({params / 1e6:.2f}M parameters); data: bundled healthcare sample minus a 10% "
              "validation split")
        print(f"# settings: threads={args.threads} (OMP_NUM_THREADS and torch, both sides), steps={args.steps} "
              f"(qlora {args.qlora_steps}, packed {args.packed_steps}), batch {BATCH} x accumulation "
              f"{ACCUMULATION}, maxSeqLength {MAX_LEN}, {precision}, gradient checkpointing as planned (ours) or on "
              "(reference, TRL's default), lr 2e-4 cosine, "
              f"warmup 0.03, seed {args.seed}")
        print(f"# precision: {precision_why}; the same on both sides", flush=True)
        jobs: list[tuple[str, str, int, bool]] = []
        for method in methods:
            steps = args.qlora_steps if method == "qlora" else args.steps
            jobs += [("ref", method, steps, False), ("ours", method, steps, False)]
            if not args.no_trl:
                jobs.append(("trl", method, steps, False))
        if "lora" in methods and not args.no_packed:
            jobs.append(("ours", "lora", args.packed_steps, True))
            if args.trl_packed and not args.no_trl:
                jobs.append(("trl", "lora", args.packed_steps, True))
        noise_seeds = [int(x) for x in args.noise_seeds.split(",") if x.strip()] if "lora" in methods else []
        results: dict[tuple[str, str, bool], dict[str, Any]] = {}
        for side, method, steps, packing in jobs:
            worker = [side, method, "--steps", str(steps), "--threads", str(args.threads), "--seed", str(args.seed),
                      "--precision", precision]
            if side == "ref":
                worker += ["--model", str(model), "--train", str(train)]
            elif side == "trl":
                worker += ["--model", str(model), "--train", str(train),
                           "--variant", "packed" if packing else args.trl_variant]
            else:
                worker += ["--manifest", str(manifest)] + (["--packing"] if packing else [])
            took = time.perf_counter()
            r = run_worker(worker, env, timeout=1800)
            results[(side, method, packing)] = r
            print(f"# {side}{' packed' if packing else ''} {method}: {r['tokens']} useful tokens over steps "
                  f"2..{r['steps']}: {r['seconds']:.1f} s wall ({r['tokens_per_second_total']:.0f} tokens/s; median "
                  f"step {r['tokens_per_second']:.0f}), {r['cpu_seconds']:.1f} s CPU ({r['tokens_per_cpu_second']:.0f} "
                  f"tokens/CPU-s); held-out loss {r['eval_loss']:.4f}, mean train loss {r['train_loss']:.4f}; "
                  f"{r['examples']} examples seen; peak RSS {r['rss_mb']:.0f} MiB; worker "
                  f"{time.perf_counter() - took:.0f} s", flush=True)
            if side == "trl":
                print(f"# trl{' packed' if packing else ''} {method} ({'packing, bfd' if packing else args.trl_variant}"
                      f"): prepared token ids and labels identical to ours: "
                      f"{r['identical'] if not packing else 'checked unpacked'}; longest row {r['longest']}", flush=True)
            if side == "ref":
                print(f"# ref {method}: token streams identical to ours: {r['identical']}; "
                      f"{100 * r['tokens'] / r['padded_tokens']:.1f}% of its computed positions are non-padding",
                      flush=True)
        for method in methods:
            ref, ours = results[("ref", method, False)], results[("ours", method, False)]
            print(f"throughput_ratio_{method}={ours['tokens_per_second'] / ref['tokens_per_second']:.2f}")
            print(f"throughput_ratio_cpu_{method}={ours['tokens_per_cpu_second'] / ref['tokens_per_cpu_second']:.2f}")
            print(f"# {method}: ratio of total wall-clock rates "
                  f"{ours['tokens_per_second_total'] / ref['tokens_per_second_total']:.2f}")
            print(f"tokens_per_second_ref_{method}={ref['tokens_per_second']:.0f}")
            print(f"tokens_per_second_ours_{method}={ours['tokens_per_second']:.0f}")
            print(f"loss_ref_{method}={ref['eval_loss']:.4f}")
            print(f"loss_ours_{method}={ours['eval_loss']:.4f}")
            print(f"train_loss_ref_{method}={ref['train_loss']:.4f}")
            print(f"train_loss_ours_{method}={ours['train_loss']:.4f}")
            print(f"rss_mb_ref_{method}={ref['rss_mb']:.0f}")
            print(f"rss_mb_ours_{method}={ours['rss_mb']:.0f}")
        trl_best: dict[str, dict[str, Any]] = {}
        for method in methods if not args.no_trl else []:
            # More runs of the pair (alternating, TRL first); each side's best run.
            runs: dict[str, list[dict[str, Any]]] = {side: [results[(side, method, False)]] for side in ("ours", "trl")}
            steps = args.qlora_steps if method == "qlora" else args.steps
            for _ in range(args.trl_repeats - 1):
                for side in ("trl", "ours"):
                    worker = [side, method, "--steps", str(steps), "--threads", str(args.threads),
                              "--seed", str(args.seed), "--precision", precision]
                    worker += ["--manifest", str(manifest)] if side == "ours" else \
                        ["--model", str(model), "--train", str(train), "--variant", args.trl_variant]
                    runs[side].append(run_worker(worker, env, timeout=1800))
            trl, ours = (best_of(runs[side]) for side in ("trl", "ours"))
            trl_best[method] = trl
            if args.trl_repeats > 1:
                print(f"# {method}, {args.trl_repeats} runs of ours and of trl (the best of each taken): median steps "
                      f"{each_run(runs, 'tokens_per_second')}; tokens/CPU-s "
                      f"{each_run(runs, 'tokens_per_cpu_second')}", flush=True)
            print(f"throughput_ratio_vs_trl_{method}={ours['tokens_per_second'] / trl['tokens_per_second']:.2f}")
            print(f"throughput_ratio_cpu_vs_trl_{method}="
                  f"{ours['tokens_per_cpu_second'] / trl['tokens_per_cpu_second']:.2f}")
            print(f"# {method} vs trl: ratio of total wall-clock rates "
                  f"{ours['tokens_per_second_total'] / trl['tokens_per_second_total']:.2f}")
            print(f"tokens_per_second_trl_{method}={trl['tokens_per_second']:.0f}")
            rung = ours["rung"]
            print(f"# {method}: ours trained at micro-batch {rung['microBatch']} x {rung['gradAccum']}, gradient "
                  f"checkpointing {'on' if rung['gradientCheckpointing'] else 'off'} (the plan's rung); TRL with its "
                  "default gradient checkpointing (on)", flush=True)
            if not rung["gradientCheckpointing"]:
                # TRL again without recompute, as ours: the ratio at the same checkpointing setting.
                same = [run_worker(["trl", method, "--steps", str(steps), "--threads", str(args.threads), "--seed",
                                    str(args.seed), "--precision", precision, "--model", str(model), "--train",
                                    str(train), "--variant", args.trl_variant, "--gc", "off"], env, timeout=1800)
                        for _ in range(args.trl_repeats)]
                trl_off = best_of(same)
                print(f"# {method}: trl with gradient checkpointing off, {args.trl_repeats} run(s), median steps "
                      + " ".join(f"{r['tokens_per_second']:.0f}" for r in same), flush=True)
                print(f"throughput_ratio_vs_trl_same_gc_{method}="
                      f"{ours['tokens_per_second'] / trl_off['tokens_per_second']:.2f}")
                print(f"tokens_per_second_trl_nogc_{method}={trl_off['tokens_per_second']:.0f}")
                print(f"heldout_loss_trl_nogc_{method}={trl_off['eval_loss']:.4f}")
            print(f"heldout_loss_trl_{method}={trl['eval_loss']:.4f}")
            print(f"heldout_loss_ours_{method}={ours['eval_loss']:.4f}")
            print(f"train_loss_trl_{method}={trl['train_loss']:.4f}")
            print(f"rss_mb_trl_{method}={trl['rss_mb']:.0f}")
        if noise_seeds:
            sides = ("ref", "ours") if args.no_trl else ("ref", "ours", "trl")
            seeded = {args.seed: tuple(results[(side, "lora", False)]["eval_loss"] for side in sides)}
            # Only their held-out losses are used (no timing), and a single-threaded worker's result does not
            # depend on what else runs: so these runs go side by side, one per `--threads` cores.
            noise_runs = {}
            for seed in noise_seeds:
                for side in sides:
                    worker = [side, "lora", "--steps", str(args.steps), "--threads", str(args.threads),
                              "--seed", str(seed), "--precision", precision]
                    if side == "ours":
                        worker += ["--manifest", str(manifest)]
                    else:
                        worker += ["--model", str(model), "--train", str(train)]
                    if side == "trl":
                        worker += ["--variant", args.trl_variant]
                    noise_runs[(seed, side)] = worker
            parallel = max(1, (os.cpu_count() or 1) // max(args.threads, 1))
            with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
                futures = {key: pool.submit(run_worker, worker, env, 1800) for key, worker in noise_runs.items()}
                noise_losses = {key: future.result()["eval_loss"] for key, future in futures.items()}
            for seed in noise_seeds:
                losses = [noise_losses[(seed, side)] for side in sides]
                seeded[seed] = tuple(losses)
                print(f"# lora seed {seed}: held-out loss "
                      + ", ".join(f"{side} {loss:.4f}" for side, loss in zip(sides, losses, strict=True)),
                      flush=True)
            deltas = [v[1] - v[0] for v in seeded.values()]
            spread = statistics.mean([statistics.stdev([v[k] for v in seeded.values()]) for k in range(len(sides))])
            print(f"# lora over seeds {sorted(seeded)}: ours - ref = {', '.join(f'{d:+.4f}' for d in deltas)}")
            print(f"loss_delta_lora_seeds={statistics.mean(deltas):+.4f}")
            print(f"loss_sd_lora_seeds={spread:.4f}")
            if "trl" in sides:
                vs_trl = [v[1] - v[2] for v in seeded.values()]
                print(f"# lora over seeds {sorted(seeded)}: ours - trl = {', '.join(f'{d:+.4f}' for d in vs_trl)}")
                print(f"loss_delta_vs_trl_lora_seeds={statistics.mean(vs_trl):+.4f}")
        packed = results.get(("ours", "lora", True))
        if packed is not None:
            ref = results[("ref", "lora", False)]
            print(f"throughput_ratio_lora_packed={packed['tokens_per_second'] / ref['tokens_per_second']:.2f}")
            print(f"throughput_ratio_cpu_lora_packed="
                  f"{packed['tokens_per_cpu_second'] / ref['tokens_per_cpu_second']:.2f}")
            print(f"tokens_per_second_ours_lora_packed={packed['tokens_per_second']:.0f}")
            print(f"loss_ours_lora_packed={packed['eval_loss']:.4f}")
            print(f"rss_mb_ours_lora_packed={packed['rss_mb']:.0f}")
            trl, trl_packed = trl_best.get("lora"), results.get(("trl", "lora", True))
            if trl is not None:
                print(f"throughput_ratio_vs_trl_lora_packed={packed['tokens_per_second'] / trl['tokens_per_second']:.2f}")
                print(f"heldout_loss_ours_lora_packed={packed['eval_loss']:.4f}")
            if trl_packed is not None:
                print(f"throughput_ratio_packed_vs_trl_packed_lora="
                      f"{packed['tokens_per_second'] / trl_packed['tokens_per_second']:.2f}")
                print(f"tokens_per_second_trl_lora_packed={trl_packed['tokens_per_second']:.0f}")
                print(f"heldout_loss_trl_lora_packed={trl_packed['eval_loss']:.4f}")
                print(f"# packed lora: ours saw about {packed['examples']} examples, trl {trl_packed['examples']}")
        print(f"# load_avg_at_end={os.getloadavg()[0]:.2f}; total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
