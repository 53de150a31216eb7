"""The pre-flight stage: a CPU-only Job that checks a FineTuneJob's model, data and output before any GPU
is requested, and what the operator makes of its result. Pure (no I/O).

Before a job's first GPU Job the operator (unless `FT_PREFLIGHT=false`) creates `<name>-preflight-config`
(the trainer's config snapshot, `TrainerConfig.stage = "preflight"`) and the Job `<name>-preflight`: one pod
of the trainer image running `python -m finetune_trainer.preflight`, with the job's secrets and volumes
like a training pod but no GPU, small requests (`FT_PREFLIGHT_CPU`, `FT_PREFLIGHT_MEMORY`), a deadline
(`FT_PREFLIGHT_DEADLINE_SECONDS`), no Service, no Kueue labels (it takes no quota), and its pods labelled
`app.kubernetes.io/component: preflight`, so nothing that watches training pods sees them. Exit 3 (a
verdict: DataInvalid, ModelUnreadable, OutputNotWritable) fails the Job at once through its
podFailurePolicy; exit 1 (S3 unreachable: no verdict) is retried once.

The pre-flight writes `<output.uri>/preflight.json` (`contract.PreflightResult`); the operator reads it
when the Job has finished, and:

- on success completes the plan (`complete_plan`): `sizing.plan` with the architecture read from the model's
  files (exact parameters; the size when neither the spec nor the name gives one), `method: auto` decided
  on the counted examples, and the cost (`cost.estimate`: examples, tokens, steps, hours, GPU-hours) in
  `plan.estimate`. That plan is written to the status before the training Job (or the pilot's) exists;
- refuses a run whose estimate is above spec.budget.maxGpuHours (`over_budget`): Failed/BudgetExceeded
  with both numbers, and no GPU Job;
- on failure ends the FineTuneJob Failed with the pre-flight's reason and message (naming the field, file and
  line), and no GPU Job is ever created. A Job that failed without a readable result (deadline, image pull,
  S3 down) fails the FineTuneJob with PreflightFailed and the pod's termination message.

Outputs the operator cannot read (`pvc://`) still get the check: the Job's success or failure decides, and
the plan stays the one from the model's size (no estimate, no budget refusal before start).
"""

from __future__ import annotations

from finetune_operator import conditions as c
from finetune_operator import cost, sizing
from finetune_operator.architecture import Architecture
from finetune_operator.contract import PreflightResult, PreflightSplit
from finetune_operator.spec import FineTuneJobSpec, Plan

#: The stage name in labels, child names and `TrainerConfig.stage`.
STAGE = "preflight"
#: The pre-flight pod's `app.kubernetes.io/component` (training pods have `trainer`).
COMPONENT = "preflight"
COMMAND = ["python", "-m", "finetune_trainer.preflight"]
#: The Job's retries: one, for a pre-flight that could not reach S3 (exit 1, no verdict).
BACKOFF_LIMIT = 1

#: Reasons of a failed pre-flight (the trainer's `preflight` module writes all but the last).
REASONS = (c.DATA_INVALID, c.MODEL_UNREADABLE, c.OUTPUT_NOT_WRITABLE, c.SERVING_UNSUPPORTED, c.PREFLIGHT_FAILED)


def placeholder_plan(spec: FineTuneJobSpec) -> Plan:
    """The plan in the pre-flight's own config snapshot: one CPU pod (the pre-flight reads only the spec)."""
    method, _ = sizing.resolve_method(spec)
    return Plan(method=method, gpus=1, gpu_memory_gib=sizing.GPU_CLASSES_GIB[0], nodes=1, gpus_per_node=1,
                estimated_memory_gib=0.0, source="estimate",
                reason="the CPU pre-flight: no GPU; the training plan follows from its result")


def architecture(result: PreflightResult) -> Architecture | None:
    """The `Architecture` the pre-flight read (None when it read none)."""
    arch = result.architecture
    if arch is None:
        return None
    fields = arch.model_dump()
    return Architecture(**fields, path=result.model_uri)


def train_split(result: PreflightResult) -> PreflightSplit | None:
    """What the pre-flight found in spec.dataset.train, or None when the result has no such split."""
    return next((split for split in result.splits if split.field == "spec.dataset.train"), None)


def train_counts(result: PreflightResult) -> tuple[int, int, bool] | None:
    """(examples, tokens, sampled) of spec.dataset.train, or None when the result has no such split."""
    split = train_split(result)
    return (split.examples, split.tokens, split.sampled) if split is not None else None


def counted_spec(spec: FineTuneJobSpec, result: PreflightResult) -> FineTuneJobSpec:
    """The spec as the counts make it: dataset.examples = the counted training examples (so `auto` decides
    on them), and baseModel.parameters = the exact count when neither the spec nor the name gave a size."""
    counted = spec.model_copy(deep=True)
    counts = train_counts(result)
    if counts is not None:
        counted.dataset.examples = counts[0]
    arch = result.architecture
    if arch is not None and spec.base_model.parameters_billion() is None:
        # exact in millions (six decimals), as `finetune plan --inspect` fills it in
        counted.base_model.parameters = f"{arch.parameters / 1e6:.6f}M"
    return counted


def complete_plan(spec: FineTuneJobSpec, result: PreflightResult) -> Plan:
    """The plan from the pre-flight's result (see the module docstring). Raises `sizing.PlanningError`."""
    counted = counted_spec(spec, result)
    arch = architecture(result)
    plan = sizing.plan(counted, arch)
    counts = train_counts(result)
    if spec.method == "auto" and counts is not None:
        plan.reason = plan.reason.replace("method auto:", "method auto (examples counted by the pre-flight):", 1)
    if arch is not None and counts is not None:
        examples, tokens, sampled = counts
        plan.estimate = cost.estimate(counted, plan, parameters=arch.parameters, examples=examples, tokens=tokens,
                                      sampled=sampled)
    return plan


def over_budget(max_gpu_hours: float | None, plan: Plan) -> str | None:
    """Why the run is refused before start, or None: its estimated GPU-hours above `max_gpu_hours`
    (spec.budget.maxGpuHours)."""
    estimate = plan.estimate
    if max_gpu_hours is None or estimate is None or estimate.gpu_hours <= max_gpu_hours:
        return None
    return (
        f"the estimated {estimate.gpu_hours:g} GPU-hours ({estimate.steps:,} steps over {estimate.tokens_trained:,} "
        f"tokens on {plan.gpus} GPU(s), {estimate.hours:g} h) exceed spec.budget.maxGpuHours {max_gpu_hours:g}; "
        "no GPU was requested. Raise spec.budget.maxGpuHours, or lower hyperparameters.epochs or maxSteps "
        "(status.plan.estimate.basis says how the estimate was made)"
    )


def failure(result: PreflightResult | None) -> tuple[str, str] | None:
    """(reason, message) of a result that failed, None for one that passed or none at all."""
    if result is None or result.ok:
        return None
    if result.error is None:
        return c.PREFLIGHT_FAILED, "the pre-flight failed without saying why"
    reason = result.error.reason if result.error.reason in REASONS else c.PREFLIGHT_FAILED
    return reason, result.error.message


def summary(result: PreflightResult, result_uri: str | None) -> dict[str, object]:
    """status.preflight's fields from a result (wire names; the phase is set by the status function)."""
    out: dict[str, object] = {}
    arch = architecture(result)
    if arch is not None:
        out["parameters"] = arch.parameters
        out["architecture"] = sizing.shape_words(arch)[:256]
    split = train_split(result)
    if split is not None:
        out["examples"], out["tokens"], out["sampled"] = split.examples, split.tokens, split.sampled
        # preference data (objective dpo): the pairs, their mean length and the length bias, where counted
        for key, value in (("pairs", split.pairs), ("tokensPerPair", split.tokens_per_pair),
                           ("lengthBias", split.length_bias)):
            if value is not None:
                out[key] = round(value, 2) if isinstance(value, float) else value
    if result_uri:
        out["result"] = result_uri
    return out
