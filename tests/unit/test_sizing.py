"""Table tests of the sizing planner: the model-size table cell by cell, the memory model, auto, overrides."""

from __future__ import annotations

import pytest

from finetune_operator import contract, sizing
from finetune_operator.architecture import Architecture
from finetune_operator.contract import at_rung
from finetune_operator.spec import FineTuneJobSpec, MemoryRung, Plan


def make(parameters: str, method: str = "lora", **overrides: object) -> FineTuneJobSpec:
    raw: dict = {
        "baseModel": {"uri": "hf://org/some-model", "parameters": parameters},
        "method": method,
        "dataset": {"train": "s3://data/train.jsonl"},
        "output": {"uri": "s3://out/run/"},
    }
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        raw.setdefault(section, {})[field] = value
    return FineTuneJobSpec.model_validate(raw)


def estimate(spec: FineTuneJobSpec, method: str, architecture: Architecture | None = None) -> sizing.MemoryEstimate:
    """The memory model at the spec's requested rung (`sizing.requested_rung`: gradientCheckpointing unset counts
    as on, as layouts are chosen): `estimate_memory` reads a resolved rung, and unset is not off."""
    return sizing.estimate_memory(at_rung(spec, sizing.requested_rung(spec, method)), method, architecture)  # type: ignore[arg-type]


TABLE = [
    ("7B", "full", 4, 24, 1, 4),
    ("7B", "lora", 1, 24, 1, 1),
    ("7B", "qlora", 1, 12, 1, 1),
    ("13B", "full", 8, 24, 1, 8),
    ("13B", "lora", 1, 48, 1, 1),
    ("13B", "qlora", 1, 24, 1, 1),
    ("70B", "full", 16, 48, 2, 8),
    ("70B", "lora", 2, 48, 1, 2),
    ("70B", "qlora", 1, 48, 1, 1),
]


@pytest.mark.parametrize(("size", "method", "gpus", "gib", "nodes", "per_node"), TABLE)
def test_model_size_table_is_reproduced_exactly(size, method, gpus, gib, nodes, per_node):
    plan = sizing.plan(make(size, method))
    assert (plan.method, plan.gpus, plan.gpu_memory_gib, plan.nodes, plan.gpus_per_node) == (
        method,
        gpus,
        gib,
        nodes,
        per_node,
    )
    assert plan.source == "table"
    assert "model-size table" in plan.reason
    assert plan.estimated_memory_gib > 0


def test_size_is_read_from_the_model_name():
    spec = FineTuneJobSpec.model_validate(
        {
            "baseModel": {"uri": "hf://meta-llama/Llama-2-13b-hf"},
            "method": "qlora",
            "dataset": {"train": "s3://data/t.jsonl"},
            "output": {"uri": "s3://out/x/"},
        }
    )
    plan = sizing.plan(spec)
    assert (plan.gpus, plan.gpu_memory_gib, plan.source) == (1, 24, "table")


ESTIMATED = ["1B", "3B", "8B", "34B", "180B"]


@pytest.mark.parametrize("size", ESTIMATED)
def test_other_sizes_are_estimated_and_ordered_by_method(size):
    plans = {m: sizing.plan(make(size, m)) for m in ("qlora", "lora", "full")}
    for plan in plans.values():
        assert plan.source == "estimate"
        assert plan.gpu_memory_gib in sizing.GPU_CLASSES_GIB
        assert "memory model" in plan.reason
    total = {m: p.gpus * p.gpu_memory_gib for m, p in plans.items()}
    assert total["qlora"] <= total["lora"] <= total["full"]
    # at one rung (the plans' rungs differ: each keeps its own headroom)
    mems = {m: estimate(make(size, m), m) for m in plans}
    assert mems["lora"].total(1) < mems["full"].total(1)
    # QLoRA's 4-bit weights are smaller than LoRA's; its float32 residual stream costs activations, so its
    # total is below LoRA's only where the weights dominate (not at 1B and 4 x 2048)
    assert mems["qlora"].weights < mems["lora"].weights


@pytest.mark.parametrize("method", ["qlora", "lora", "full"])
def test_estimates_grow_with_size(method):
    plans = [sizing.plan(make(size, method)) for size in ESTIMATED]
    # at one rung (a plan's estimatedMemoryGiB is at its own rung, which may be lower for a larger model)
    estimates = [estimate(make(size, method), method).total(1) for size in ESTIMATED]
    assert estimates == sorted(estimates) and len(set(estimates)) == len(estimates)
    totals = [p.gpus * p.gpu_memory_gib for p in plans]
    assert totals == sorted(totals)
    assert totals[-1] > totals[0]


def test_the_chosen_layout_fits_the_estimate():
    for size in ESTIMATED:
        for method in ("qlora", "lora", "full"):
            spec = make(size, method)
            plan = sizing.plan(spec)
            mem = estimate(spec, plan.method)
            assert mem.per_gpu(plan.gpus) <= plan.gpu_memory_gib


def test_memory_model_parts_respond_to_their_inputs():
    base = estimate(make("8B", "lora"), "lora")
    longer = estimate(make("8B", "lora", hyperparameters__maxSeqLength=8192), "lora")
    no_ckpt = estimate(make("8B", "lora", hyperparameters__gradientCheckpointing=False), "lora")
    fp32 = estimate(make("8B", "lora", hyperparameters__precision="fp32"), "lora")
    assert longer.activations > 3 * base.activations
    assert no_ckpt.activations > base.activations
    assert fp32.weights == pytest.approx(2 * base.weights)
    full = estimate(make("8B", "full"), "full")
    assert full.trainable_parameters == pytest.approx(8e9)
    assert full.trainable_state == pytest.approx(8e9 * 6 / sizing.GIB)  # pure bf16: grads 2 + AdamW 2x2
    full32 = estimate(make("8B", "full", hyperparameters__precision="fp32"), "full")
    assert full32.weights + full32.trainable_state == pytest.approx(8e9 * 16 / sizing.GIB)
    assert base.trainable_parameters < 0.01 * 8e9


@pytest.mark.parametrize(
    ("examples", "expected"),
    [(1, "qlora"), (9_999, "qlora"), (10_000, "lora"), (250_000, "lora"), (None, "lora")],
)
def test_auto_picks_qlora_below_ten_thousand_examples(examples, expected):
    overrides = {"dataset__examples": examples} if examples is not None else {}
    plan = sizing.plan(make("7B", "auto", **overrides))
    assert plan.method == expected
    assert "method auto" in plan.reason


def test_explicit_resources_override_and_warn_when_too_small():
    plan = sizing.plan(make("13B", "lora", resources__gpus=1, resources__gpuMemory="24Gi"))
    assert (plan.gpus, plan.gpu_memory_gib) == (1, 24)
    assert "overrides" in plan.reason
    assert any("needs" in w and "per GPU" in w for w in plan.warnings)
    assert any("model-size table gives 1x48GiB" in w for w in plan.warnings)


def test_explicit_gpus_pick_the_smallest_class_that_fits():
    plan = sizing.plan(make("8B", "full", resources__gpus=8))
    assert plan.gpus == 8
    spec = make("8B", "full", resources__gpus=8)
    mem = estimate(spec, "full")
    smaller = [c for c in sizing.GPU_CLASSES_GIB if c < plan.gpu_memory_gib]
    assert all(mem.per_gpu(8) > c for c in smaller)
    assert not plan.warnings


def test_explicit_gpu_memory_picks_enough_gpus():
    plan = sizing.plan(make("34B", "full", resources__gpuMemory="80GB"))
    assert plan.gpu_memory_gib == 80
    assert not plan.warnings
    assert plan.gpus >= 8


@pytest.mark.parametrize(
    ("gpus", "per_node_max", "nodes", "per_node"),
    [(16, 8, 2, 8), (8, 8, 1, 8), (12, 8, 2, 6), (32, 8, 4, 8), (16, 4, 4, 4), (3, 8, 1, 3)],
)
def test_nodes_are_ceil_of_gpus_over_gpus_per_node(gpus, per_node_max, nodes, per_node):
    plan = sizing.plan(make("70B", "full", resources__gpus=gpus, resources__gpusPerNode=per_node_max))
    assert (plan.nodes, plan.gpus_per_node) == (nodes, per_node)


def test_uneven_split_is_a_planning_error_naming_the_field():
    with pytest.raises(sizing.PlanningError) as err:
        sizing.plan(make("70B", "full", resources__gpus=11, resources__gpusPerNode=8))
    assert err.value.field == "spec.resources.gpus"
    assert "split evenly" in err.value.message


def test_shape_widths_are_multiples_of_64():
    for size in (0.1, 1, 7, 70, 180):
        hidden, layers = sizing.shape(size)
        assert hidden % 64 == 0 and layers >= 1


def test_a_run_whose_activations_fit_no_gpu_is_refused_with_advice():
    # batch 8 x 4096 fits no layout: the plan lowers the micro-batch (keeping 8 x 4 per step) rather than refuse
    lowered = sizing.plan(make("180B", "qlora", hyperparameters__batchSize=8, hyperparameters__maxSeqLength=4096))
    assert lowered.rung is not None and lowered.rung.micro_batch < 8 and lowered.warnings == []
    assert lowered.rung.micro_batch * lowered.rung.grad_accum == 32 and "(at batchSize 8 none does)" in lowered.reason
    # not even micro-batch 1 with checkpointing fits: refused, and batchSize is no help
    spec = make("180B", "qlora", hyperparameters__maxSeqLength=262144)
    with pytest.raises(sizing.PlanningError) as err:
        sizing.plan(spec)
    assert err.value.field == "spec.baseModel.parameters"
    assert "even at micro-batch 1 x 16 accumulation, gradient checkpointing on" in err.value.message
    assert "lower hyperparameters.maxSeqLength" in err.value.message and "batchSize" not in err.value.message
    assert "use method qlora" not in err.value.message


def test_table_cells_lower_the_rung_before_they_warn():
    fits = sizing.plan(make("7B", "qlora", hyperparameters__batchSize=4, hyperparameters__maxSeqLength=512))
    assert (fits.gpus, fits.gpu_memory_gib, fits.warnings) == (1, 12, [])
    tight = sizing.plan(make("7B", "qlora", hyperparameters__batchSize=4, hyperparameters__maxSeqLength=2048))
    assert (tight.gpus, tight.gpu_memory_gib, tight.source, tight.warnings) == (1, 12, "table", [])  # the table rules
    assert tight.rung is not None and tight.rung.gradient_checkpointing  # a rung that fits, not a warning
    long = sizing.plan(make("7B", "qlora", hyperparameters__maxSeqLength=16384))
    (warning,) = long.warnings  # not even micro-batch 1 with checkpointing fits: the lowest rung, and a warning
    assert long.rung == rung(1, 16, True)
    assert "maxSeqLength 16384" in warning and "even at micro-batch 1 x 16" in warning
    assert "lower hyperparameters.maxSeqLength" in warning and "gradientCheckpointing" not in warning
    assert long.headroom_gib is not None and long.headroom_gib < 12 * sizing.HEADROOM_FRACTION
    off = sizing.plan(make("7B", "qlora", hyperparameters__maxSeqLength=16384, hyperparameters__gradientCheckpointing=False))
    (warning,) = off.warnings
    assert "unset (or set true) gradientCheckpointing" in warning
    weights = sizing.plan(make("70B", "lora", hyperparameters__batchSize=1, hyperparameters__maxSeqLength=512))
    (warning,) = weights.warnings
    assert "weights and optimizer state alone" in warning and "set spec.resources" in warning


def rung(micro: int, accum: int, checkpointing: bool) -> MemoryRung:
    return MemoryRung(micro_batch=micro, grad_accum=accum, gradient_checkpointing=checkpointing)


def test_the_plan_tries_rungs_fastest_first_keeping_the_examples_per_step():
    # checkpointing unset: off from batchSize down (largest divisor at most half), then on from batchSize down
    spec = make("7B", "lora", hyperparameters__batchSize=6, hyperparameters__gradientAccumulationSteps=2)
    assert sizing.rung_candidates(spec, "lora") == [
        rung(6, 2, False), rung(3, 4, False), rung(1, 12, False), rung(6, 2, True), rung(3, 4, True), rung(1, 12, True)]
    # set explicitly, only the micro-batch varies; prefix (unset means off) never turns it on
    on = make("7B", "lora", hyperparameters__batchSize=4, hyperparameters__gradientCheckpointing=True)
    assert sizing.rung_candidates(on, "lora") == [rung(4, 4, True), rung(2, 8, True), rung(1, 16, True)]
    assert sizing.rung_candidates(make("7B", "prefix"), "prefix") == [rung(4, 4, False), rung(2, 8, False),
                                                                      rung(1, 16, False)]


#: (case, size, method, hyperparameters, layout, checkpointing, micro-batch lowered, warns); None: whatever the
#: memory model's coefficients make it (the cases are chosen with wide margins, so that a recalibration moves the
#: figures, not these outcomes). Every case also checks the rung is the first candidate that fits.
RUNGS = [
    # the case: every default (batch 4 x 4 at 2048 tokens) on the table's 1x24GiB, which the memory model
    # had 25.2 GiB for at 4 x 4 with checkpointing (a warning, before plans chose a rung)
    ("default 7B lora: the table's layout and no warning", "7B", "lora", {}, (1, 24), None, None, False),
    ("7B qlora at 2048 tokens on 12GiB: checkpointing on", "7B", "qlora", {}, (1, 12), True, None, False),
    ("short sequences", "7B", "lora", {"maxSeqLength": 512}, (1, 24), None, None, False),
    ("room to spare: the requested rung, no checkpointing", "1B", "lora", {"maxSeqLength": 512}, (1, 12), False,
     False, False),
    ("explicit checkpointing kept", "7B", "lora", {"maxSeqLength": 512, "gradientCheckpointing": True}, (1, 24),
     True, False, False),
    ("explicit no checkpointing that fits nowhere", "7B", "lora", {"gradientCheckpointing": False}, (1, 24), False,
     True, True),
    ("estimated layout, then the fastest rung", "8B", "lora", {}, None, None, None, False),
    ("odd micro-batch and accumulation", "13B", "qlora", {"batchSize": 6, "gradientAccumulationSteps": 3}, (1, 24),
     None, None, False),
    ("nothing fits the table cell", "7B", "qlora", {"maxSeqLength": 16384}, (1, 12), True, True, True),
]


@pytest.mark.parametrize(("size", "method", "hyper", "layout", "checkpointing", "lowered", "warns"),
                         [c[1:] for c in RUNGS], ids=[c[0] for c in RUNGS])
def test_the_plan_starts_at_the_fastest_rung_that_fits_with_headroom(size, method, hyper, layout, checkpointing,
                                                                     lowered, warns):
    spec = make(size, method, **{f"hyperparameters__{k}": v for k, v in hyper.items()})
    hp = spec.hyperparameters
    plan = sizing.plan(spec)
    rung_ = plan.rung
    assert rung_ is not None and bool(plan.warnings) is warns
    if layout is not None:
        assert (plan.gpus, plan.gpu_memory_gib) == layout
    if checkpointing is not None:
        assert rung_.gradient_checkpointing is checkpointing
    if lowered is not None:
        assert (rung_.micro_batch < hp.batch_size) is lowered
    # the effective batch the user asked for, always; the micro-batch never raised
    assert rung_.micro_batch * rung_.grad_accum == hp.batch_size * hp.gradient_accumulation_steps
    assert rung_.micro_batch <= hp.batch_size and hp.batch_size % rung_.micro_batch == 0
    if hp.gradient_checkpointing is not None:
        assert rung_.gradient_checkpointing is hp.gradient_checkpointing
    # the plan's figures are the memory model's at that rung
    at = sizing.estimate_memory(at_rung(spec, rung_), method)
    assert plan.memory_per_gpu_gib == round(at.per_gpu(plan.gpus), 1)
    assert plan.headroom_gib == round(plan.gpu_memory_gib - at.per_gpu(plan.gpus), 1)
    assert plan.estimated_memory_gib == round(at.total(plan.gpus), 1)
    usable = plan.gpu_memory_gib * (1 - sizing.HEADROOM_FRACTION)
    assert (at.per_gpu(plan.gpus) <= usable) is not warns
    # the first candidate that fits is taken (every faster one does not); where none fits, the last
    candidates = sizing.rung_candidates(spec, method)
    assert rung_ == (candidates[-1] if warns else rung_)
    for faster in candidates[:candidates.index(rung_)]:
        assert sizing.estimate_memory(at_rung(spec, faster), method).per_gpu(plan.gpus) > usable
    assert f"{plan.headroom_gib:.1f} GiB" in plan.reason and contract.describe(rung_) in plan.reason
    if rung_.micro_batch != hp.batch_size and not warns:
        assert f"batchSize {hp.batch_size} lowered to {rung_.micro_batch}" in plan.reason


def test_explicit_resources_get_a_rung_and_warn_only_where_none_fits():
    small = sizing.plan(make("7B", "lora", resources__gpus=1, resources__gpuMemory="24Gi"))
    assert small.rung is not None and small.warnings == []
    tiny = sizing.plan(make("7B", "lora", resources__gpus=1, resources__gpuMemory="12Gi"))  # 13 GiB of weights
    assert tiny.rung == rung(1, 16, True)  # the least memory
    (warning,) = [w for w in tiny.warnings if "model-size table" not in w]
    assert "spec.resources gives 1x12GiB" in warning and "even at micro-batch 1 x 16" in warning
    roomy = sizing.plan(make("7B", "lora", hyperparameters__maxSeqLength=512, resources__gpus=1,
                             resources__gpuMemory="80Gi"))
    assert roomy.rung == rung(4, 4, False) and roomy.warnings == [w for w in roomy.warnings if "table" in w]


def per_gpu(spec: FineTuneJobSpec, method: str, at: MemoryRung) -> float:
    return sizing.estimate_memory(at_rung(spec, at), method).per_gpu(1)  # type: ignore[arg-type]


def test_the_rung_is_where_the_gpus_memory_falls_between_the_rungs():
    """GPU memory set between two rungs' needs (from the memory model, whatever its coefficients): the plan starts
    at the faster rung that fits, and the effective batch stays 16."""
    spec = make("7B", "lora", hyperparameters__maxSeqLength=2048)
    off4, off2, off1 = (per_gpu(spec, "lora", rung(b, 16 // b, False)) for b in (4, 2, 1))
    on4, on2, on1 = (per_gpu(spec, "lora", rung(b, 16 // b, True)) for b in (4, 2, 1))
    assert on1 < on2 < on4 < off1 < off2 < off4  # checkpointing frees more than any micro-batch does, at 2048 tokens

    def planned(need_below: float, need_above: float) -> Plan:
        """1 GPU whose usable memory lies halfway between the two needs."""
        usable = (need_below + need_above) / 2
        gib = usable / (1 - sizing.HEADROOM_FRACTION)
        return sizing.plan(make("7B", "lora", hyperparameters__maxSeqLength=2048, resources__gpus=1,
                                resources__gpuMemory=f"{gib * 1024:.0f}Mi"))

    smaller = planned(off2, off4)  # 4 without checkpointing does not fit, 2 does: no recompute at 2 x 8
    assert smaller.rung == rung(2, 8, False) and "batchSize 4 lowered to 2 with 8 accumulation steps" in smaller.reason
    assert "gradient checkpointing off: it fits without" in smaller.reason
    recompute = planned(on4, off1)  # not even 1 fits without checkpointing: on, at the largest micro-batch, 4
    assert recompute.rung == rung(4, 4, True) and "gradient checkpointing on: no micro-batch fits without it" in (
        recompute.reason)
    lowest = planned(on1, on2)
    assert lowest.rung == rung(1, 16, True)
    for plan in (smaller, recompute, lowest):
        assert [w for w in plan.warnings if "model-size table" not in w] == []
        assert plan.headroom_gib is not None and plan.headroom_gib >= round(
            plan.gpu_memory_gib * sizing.HEADROOM_FRACTION, 1) - 0.1


def test_the_headroom_is_what_the_spec_documents():
    from finetune_operator.spec import Plan

    described = Plan.model_fields["headroom_gib"].description
    assert described is not None and f"{sizing.HEADROOM_FRACTION:.0%} of gpuMemoryGiB" in described


# Prefix and prompt tuning: the memory model (source: estimate), frozen base weights plus a tiny trainable
# state, replicated on each GPU (data-parallel) rather than sharded.
#: (size, method, block settings, maxSeqLength, GPUs, GiB, trainable parameters), bf16, batch 4. Shapes from
#: sizing.shape: 1B h=2176 L=18; 7B h=4224 L=33; 13B h=5184 L=40.
VIRTUAL = [
    ("7B", "prompt", {}, 2048, 1, 24, 20 * 4224),  # n x h
    ("7B", "prefix", {}, 2048, 1, 40, 20 * 2 * 33 * 4224),  # n x 2L x h; no checkpointing with prefix
    ("7B", "prefix", {}, 512, 1, 40, 20 * 2 * 33 * 4224),
    ("13B", "prompt", {"virtualTokens": 100}, 2048, 1, 40, 100 * 5184),
    ("1B", "prefix", {"virtualTokens": 30}, 2048, 1, 40, 30 * 2 * 18 * 2176),
    ("7B", "prefix", {"projection": True}, 512, 1, 48,  # + the MLP: Linear(h, h), Linear(h, 2Lh)
     20 * 4224 + 4224 * 4224 + 4224 + 4224 * 2 * 33 * 4224 + 2 * 33 * 4224),
]


@pytest.mark.parametrize(("size", "method", "block", "seq", "gpus", "gib", "trainable"), VIRTUAL)
def test_prefix_and_prompt_are_estimated_with_a_frozen_base(size, method, block, seq, gpus, gib, trainable):
    spec = make(size, method, hyperparameters__maxSeqLength=seq, **{f"{method}__{k}": v for k, v in block.items()})
    plan = sizing.plan(spec)
    assert (plan.method, plan.gpus, plan.gpu_memory_gib, plan.nodes, plan.source) == (method, gpus, gib, 1, "estimate")
    mem = estimate(spec, method)
    assert mem.trainable_parameters == trainable
    assert mem.trainable_state == pytest.approx(trainable * 16 / sizing.GIB)  # fp32 tokens, grads, AdamW
    lora = estimate(make(size, "lora"), "lora")
    assert mem.weights == pytest.approx(lora.weights)  # the same frozen 16-bit base as LoRA's
    assert not mem.sharded and mem.per_gpu(4) == mem.per_gpu(1)
    assert plan.memory_per_gpu_gib is not None and plan.memory_per_gpu_gib <= plan.gpu_memory_gib  # at its rung
    assert "frozen base weights" in plan.reason and "replicated on each GPU" in plan.reason
    assert ("a tiny trainable state" in plan.reason) is not block.get("projection", False)


def test_virtual_token_memory_responds_to_its_settings():
    prompt = estimate(make("8B", "prompt"), "prompt")
    longer = estimate(make("8B", "prompt", prompt__virtualTokens=1000), "prompt")
    assert longer.trainable_parameters == 50 * prompt.trainable_parameters
    assert longer.activations > prompt.activations  # every sequence is 980 positions longer
    prefix = estimate(make("8B", "prefix"), "prefix")
    checkpointed = estimate(make("8B", "lora"), "lora")
    assert prefix.activations > 5 * checkpointed.activations  # prefix cannot checkpoint activations


def test_prefix_on_a_base_that_fits_no_single_gpu_is_refused_with_advice():
    with pytest.raises(sizing.PlanningError) as err:
        sizing.plan(make("70B", "prefix"))
    assert err.value.field == "spec.method"
    assert "use method lora or qlora" in err.value.message and "does not fit one GPU of 80GiB" in err.value.message


def test_prompt_with_explicit_gpus_plans_them_without_sharding():
    plan = sizing.plan(make("7B", "prompt", resources__gpus=4))
    one = sizing.plan(make("7B", "prompt"))
    assert (plan.gpus, plan.gpu_memory_gib) == (4, one.gpu_memory_gib)  # each GPU holds the whole base
    assert plan.estimated_memory_gib == pytest.approx(4 * one.estimated_memory_gib, abs=0.2)


# A known architecture (finetune_operator.architecture, read from config.json and safetensors by
# `finetune plan --inspect`) refines the memory model; the table still decides nominal 7B/13B/70B.
def arch(**overrides: object) -> Architecture:
    """Llama-2-7B's architecture (6,738,415,616 parameters), with overrides."""
    fields: dict = {"parameters": 6_738_415_616, "parameters_source": "safetensors headers", "layers": 32,
                    "hidden_size": 4096, "intermediate_size": 11008, "vocab_size": 32000, "attention_heads": 32,
                    "kv_heads": 32, "head_dim": 128, "tied_embeddings": False, "dtype": "float16",
                    "path": "/models/base"}
    return Architecture(**(fields | overrides))


LLAMA3_8B = {"parameters": 8_030_261_248, "intermediate_size": 14336, "vocab_size": 128256, "kv_heads": 8}


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_the_table_still_decides_nominal_sizes_with_an_architecture(method):
    with_arch = sizing.plan(make("7B", method), arch())
    expected = sizing.TABLE[7][method]
    assert (with_arch.gpus, with_arch.gpu_memory_gib, with_arch.source) == (*expected, "table")
    assert "6,738,415,616 parameters" in with_arch.reason


@pytest.mark.parametrize(("architecture", "adapters"), [
    (arch(), 16_777_216),  # peft's count for Llama-2-7B, r=16 on q,k,v,o
    (arch(**LLAMA3_8B), 13_631_488),  # Llama-3-8B: k and v are 1024 wide (8 KV heads of 128)
])
def test_lora_adapters_follow_the_real_projection_widths(architecture, adapters):
    mem = estimate(make("6.5B", "lora"), "lora", architecture)
    assert mem.trainable_parameters == adapters


def test_the_estimate_uses_the_exact_parameter_count():
    a = arch(**LLAMA3_8B)
    full = estimate(make("6.5B", "full"), "full", a)  # the spec's size is ignored for memory
    assert full.weights == pytest.approx(8_030_261_248 * 2 / sizing.GIB)
    assert full.trainable_parameters == 8_030_261_248
    assert full.trainable_state == pytest.approx(8_030_261_248 * 6 / sizing.GIB)


def test_gqa_vocabulary_and_mlp_change_the_activations_by_their_terms():
    spec = make("8B", "lora", hyperparameters__batchSize=2, hyperparameters__maxSeqLength=1024,
                hyperparameters__gradientCheckpointing=False)
    b_s = 2 * 1024
    mha = estimate(spec, "lora", arch())
    gqa = estimate(spec, "lora", arch(kv_heads=8))
    vocab = estimate(spec, "lora", arch(vocab_size=128256))
    wide = estimate(spec, "lora", arch(intermediate_size=14336))
    layers = 32  # without checkpointing every layer keeps its activations
    # GQA: 16-bit keys and values 4 bytes narrower per unit of key/value width, in every layer
    assert (mha.activations - gqa.activations) * sizing.GIB == pytest.approx(layers * b_s * 4 * (4096 - 1024))
    # sft's fused loss holds a fixed chunk of logits, never vocabulary-wide ones: the vocabulary costs nothing here
    assert vocab.activations == pytest.approx(mha.activations)
    # a wider MLP: its 4 stored 16-bit tensors in every layer, and at most its gradient in the layer back-propagated
    wider = (wide.activations - mha.activations) * sizing.GIB
    assert layers * b_s * 8 * (14336 - 11008) <= wider <= (layers * 8 + 2) * b_s * (14336 - 11008)


def test_the_default_shape_is_the_architecture_the_guess_assumes():
    hidden, layers = sizing.shape(7)
    guessed = arch(parameters=7_000_000_000, hidden_size=hidden, layers=layers, intermediate_size=hidden * 8 // 3,
                   head_dim=hidden // 32)
    for method in ("full", "lora", "qlora"):
        a = estimate(make("7B", method), method, guessed)
        b = estimate(make("7B", method), method)
        # the MLP width rounds down to a whole number: the only difference
        assert a.weights == pytest.approx(b.weights) and a.activations == pytest.approx(b.activations, rel=1e-3)


def test_tied_embeddings_are_held_once_under_qlora():
    untied = estimate(make("1B", "qlora"), "qlora", arch(parameters=1_498_482_688, vocab_size=128256,
                                                                        hidden_size=2048, layers=16))
    tied = estimate(make("1B", "qlora"), "qlora", arch(parameters=1_235_814_400, vocab_size=128256,
                                                                      hidden_size=2048, layers=16,
                                                                      tied_embeddings=True))
    # the tied model has one V x h matrix fewer, and that matrix is fp32 under QLoRA: 4 bytes each
    assert (untied.weights - tied.weights) * sizing.GIB == pytest.approx(128256 * 2048 * 4)


def test_an_estimate_from_an_architecture_says_where_the_numbers_came_from():
    plan = sizing.plan(make("8.03B", "lora"), arch(**LLAMA3_8B))
    assert plan.source == "estimate"
    assert "architecture read from /models/base/config.json and the safetensors headers" in plan.reason
    assert "8 of 32 KV heads" in plan.reason and "vocabulary 128,256" in plan.reason
    assert "8,030,261,248 parameters" in plan.reason
    mem = estimate(make("8.03B", "lora"), "lora", arch(**LLAMA3_8B))
    assert mem.per_gpu(plan.gpus) <= plan.gpu_memory_gib


def test_a_long_model_path_keeps_the_reason_within_its_limit():
    long_path = "/models/" + "deep/" * 500 + "base"
    plan = sizing.plan(make("8.03B", "lora"), arch(path=long_path, **LLAMA3_8B))
    assert len(plan.reason) <= 2048 and long_path[-200:] + "/config.json" in plan.reason
    far = sizing.plan(make("80B", "lora"), arch(path=long_path, **LLAMA3_8B))  # warns, naming the path
    assert far.warnings and all(len(w) <= 1024 for w in far.warnings)


def test_a_nominal_size_far_from_the_files_is_warned_about():
    near = sizing.plan(make("7B", "lora"), arch()).warnings
    assert not any(w.startswith("the spec's size") for w in near)  # 6.74B is a 7B model
    plan = sizing.plan(make("7B", "lora"), arch(parameters=70_553_706_496, hidden_size=8192, layers=80))
    (warning,) = [w for w in plan.warnings if w.startswith("the spec's size")]
    assert "7B" in warning and "90% above" not in warning and "below the 70,553,706,496 parameters" in warning
    assert "fix spec.baseModel.parameters" in warning
    warnings = sizing.plan(make("13B", "lora"), arch()).warnings
    assert any(w.startswith("the spec's size 13B") and "is 93% above the 6,738,415,616" in w for w in warnings)


def test_the_loss_chunk_is_the_trainers():
    # the memory model counts the fused loss's chunk of logits; the trainer's fused loss sets it
    from finetune_trainer import fused_loss

    assert sizing.FUSED_LOSS_CHUNK_BYTES == fused_loss.CHUNK_BYTES


def test_full_fine_tuning_peaks_where_its_gradients_meet_its_activations():
    # with checkpointing the activations are small and the peak is at the end of the backward or AdamW's
    # step, every gradient held; without it at the start of the backward, before the layers' gradients exist
    on = estimate(make("8B", "full"), "full")
    off = estimate(make("8B", "full", hyperparameters__gradientCheckpointing=False), "full")
    state = on.weights + on.trainable_state - on.gradients
    assert on.body(1) == pytest.approx(state + on.gradients + max(on.late_activations, on.optimizer_temporaries))
    assert off.body(1) == pytest.approx(state + off.activations)
    # on CUDA AdamW's foreach temporaries are sharded with the state; on CPU two of the largest tensor
    assert on.optimizer_temporaries == pytest.approx(on.gradients)
    cpu = sizing.estimate_memory(make("8B", "full"), "full", device="cpu")
    assert cpu.optimizer_temporaries < on.optimizer_temporaries / 10


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_adapter_input_copies_count_only_in_16_bit_runs(method):
    """Each adapted module's 16-bit input copy (autocast) exists only in a 16-bit run: without checkpointing every
    layer stores it, so adapting more modules adds it to a bf16 estimate, per layer, and nothing to an fp32 one
    (whose adapters take the float32 input itself). At this size the loss path outweighs one layer's backward,
    so only the stored activations move."""
    rung = MemoryRung(micro_batch=4, grad_accum=4, gradient_checkpointing=False)

    def activations(precision: str, targets: list[str]) -> float:
        spec = make("1B", method, hyperparameters__precision=precision, hyperparameters__maxSeqLength=512,
                    lora__targetModules=targets)
        return sizing.estimate_memory(spec, method, rung=rung).activations * sizing.GIB  # type: ignore[arg-type]

    dims = sizing.Dims.guess(1)
    t = 4 * 512
    grown_inputs = 3 * dims.hidden  # k_proj, v_proj and o_proj's inputs (o_proj's: the attention width, h here)
    every = ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert activations("fp32", every) - activations("fp32", ["q_proj"]) == pytest.approx(0)
    assert activations("bf16", every) - activations("bf16", ["q_proj"]) == pytest.approx(
        dims.layers * sizing.ADAPTER_STORED_16BIT * t * grown_inputs)
