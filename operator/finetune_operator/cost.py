"""What a run will cost: optimizer steps, duration and GPU-hours from the pre-flight's counts. Pure.

The pre-flight (`finetune_operator.preflight`) counts the examples and tokens of the training data with the
model's tokenizer and reads the model's exact parameter count. From those and the plan:

- tokens per epoch: the training file's tokens, each example capped at `maxSeqLength` (the count is taken
  before truncation, so the cap is applied to the total: min(tokens, examples x maxSeqLength)), times the
  share of examples left after `dataset.validationSplit`;
- optimizer steps, as the trainer counts them (`train.py`) at the plan's rung (status.plan.rung: the micro-batch
  and accumulation it starts at; the spec's batchSize and gradientAccumulationSteps in a plan without one):
  micro-batches per rank = ceil(sequences / (micro-batch x ranks)) with ranks = the plan's GPUs and sequences =
  examples, or ceil(tokens / maxSeqLength) with packing; steps per epoch = ceil(micro-batches / accumulation);
  steps = maxSteps, else ceil(epochs x steps per epoch);
- tokens trained: tokens per epoch x steps / steps per epoch;
- FLOPs per token: 2N for the forward pass, 2N for the backward pass through the activations, 2N more for
  weight gradients when every weight trains (`full`), and 2N more for the recomputed forward pass with
  gradient checkpointing at the plan's rung (N = the parameter count; attention's sequence-length term is left out, small
  below a few thousand tokens for these model sizes);
- throughput: GPUs x the GPU class's peak x the method's assumed utilisation (tables below);
- hours = tokens trained x FLOPs per token / throughput / 3600; GPU-hours = hours x GPUs. Evaluation, model
  download and checkpoint uploads are not included.
- `objective: dpo`: the pre-flight counts a pair's prompt, chosen and rejected tokens once, but training runs
  two sequences per pair, each with the prompt: the tokens are doubled (an upper bound, reached when the
  prompt dominates; the estimate errs long), each sequence capped at `maxSeqLength`. The reference costs a
  forward pass (2N per token) every step when it is the model with its adapter switched off, or one forward
  pass over the training tokens before training when it is precomputed; nothing when `referenceFree`.

The peak per GPU memory class is that of the slowest common data-centre GPU of the class (dense bf16/fp16
tensor throughput from NVIDIA's datasheets), so the estimate errs long: an H100 (989 TFLOPS) in the 80 GiB
class runs about 3x faster than its row. The utilisation assumptions are below what large runs reach and
near what this project measured on one H100 at 1B parameters (LoRA 21% without gradient checkpointing,
bench/results/gpu-h100.txt): small models use GPUs less well. The trainer measures what the run really
spends (status.progress.gpuHours); spec.budget.maxGpuHours stops it there whatever this estimate said.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from finetune_operator import contract, sizing
from finetune_operator.spec import CostEstimate, FineTuneJobSpec, Plan


@dataclass(frozen=True)
class GpuClass:
    """The GPU assumed for a memory class: its name and dense bf16 (fp16 for T4) tensor peak."""

    name: str
    peak_tflops: float


#: GiB class (sizing.GPU_CLASSES_GIB) -> the slowest common data-centre GPU of that class.
GPU_CLASSES: dict[int, GpuClass] = {
    12: GpuClass("T4-class (12 GiB classes are consumer parts; T4 assumed)", 65.0),
    16: GpuClass("T4", 65.0),
    24: GpuClass("A10", 125.0),
    40: GpuClass("A100 40GB", 312.0),
    48: GpuClass("L40S", 362.0),
    80: GpuClass("A100 80GB", 312.0),
}

#: Assumed share of the peak a training step achieves, per method. QLoRA dequantizes every 4-bit weight in
#: each forward and backward pass; prefix and prompt tuning run the frozen model like LoRA.
UTILISATION: dict[str, float] = {"full": 0.30, "lora": 0.25, "qlora": 0.15, "prefix": 0.25, "prompt": 0.25}


def gpu_class(gib: int) -> GpuClass:
    """The row for a plan's GPU memory (the next class up for a size between rows)."""
    for size in sorted(GPU_CLASSES):
        if gib <= size:
            return GPU_CLASSES[size]
    return GPU_CLASSES[max(GPU_CLASSES)]


def flops_per_token(parameters: int, method: str, checkpointing: bool) -> float:
    """Training FLOPs per token (see the module docstring)."""
    passes = 2 + 2 + (2 if method == "full" else 0) + (2 if checkpointing else 0)
    return passes * float(parameters)


def estimate(spec: FineTuneJobSpec, plan: Plan, *, parameters: int, examples: int, tokens: int,
             sampled: bool) -> CostEstimate:
    """The cost of running `spec` on `plan`, given the training file's valid `examples` and their `tokens`
    (before truncation; `sampled`: extrapolated). Pure; see the module docstring for every formula."""
    hp = spec.hyperparameters
    data = spec.dataset
    kept = 1.0 if data.validation or not data.validation_split else 1.0 - data.validation_split
    train_examples = math.floor(examples * kept)
    sequences_per_example = 2 if spec.objective == "dpo" else 1  # chosen and rejected, each with the prompt
    capped = min(tokens * sequences_per_example, examples * sequences_per_example * hp.max_seq_length)
    tokens_epoch = round(capped * kept)
    ranks = plan.gpus
    sequences = math.ceil(tokens_epoch / hp.max_seq_length) if hp.packing else train_examples
    rung = plan.rung if plan.rung is not None else contract.spec_rung(spec)  # where the trainer starts
    micro_batches = math.ceil(sequences / (rung.micro_batch * ranks))
    steps_per_epoch = max(1, math.ceil(micro_batches / rung.grad_accum))
    steps = hp.max_steps or max(1, math.ceil(hp.epochs * steps_per_epoch))
    tokens_trained = round(tokens_epoch * steps / steps_per_epoch)

    gpu = gpu_class(plan.gpu_memory_gib)
    utilisation = UTILISATION[plan.method]
    checkpointing = rung.gradient_checkpointing
    per_token = flops_per_token(parameters, plan.method, checkpointing)
    reference = sizing.reference_kind(spec, plan.method)
    if reference == "adapter":
        per_token += 2.0 * parameters
    flops_per_second = plan.gpus * gpu.peak_tflops * 1e12 * utilisation
    seconds = tokens_trained * per_token / flops_per_second
    if reference == "precomputed":  # every rank computes the whole table: one GPU's throughput, not the plan's
        seconds += tokens_epoch * 2.0 * parameters / (flops_per_second / plan.gpus)
    hours = seconds / 3600
    passes = round(per_token / parameters)
    basis = (
        f"{passes}N FLOPs per token (N = {parameters:,}; {plan.method}"
        + (", gradient checkpointing" if checkpointing else "")
        + (f"; dpo: two sequences per pair, reference {REFERENCE_COST[reference]}" if reference else "")
        + f") over {plan.gpus} x {gpu.name} at {gpu.peak_tflops:g} TFLOPS x {utilisation:.0%} assumed utilisation "
        "(finetune_operator.cost); training only, evaluation and uploads not included"
    )
    return CostEstimate(
        parameters=parameters,
        train_examples=train_examples,
        tokens=tokens_epoch,
        tokens_sampled=sampled,
        steps=steps,
        tokens_trained=tokens_trained,
        tokens_per_second=round(flops_per_second / per_token, 1),
        hours=_round(hours),
        gpu_hours=_round(hours * plan.gpus),
        basis=basis,
    )


#: What each kind of DPO reference (`sizing.reference_kind`) costs, in the estimate's basis.
REFERENCE_COST = {"adapter": "a forward per step (adapter off)", "precomputed": "one pass before training",
                  "none": "none (referenceFree)"}


def _round(hours: float) -> float:
    """Four significant figures: a status that does not churn on float noise."""
    return float(f"{hours:.4g}")
