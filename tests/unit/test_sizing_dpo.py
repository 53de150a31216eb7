"""Sizing of objective dpo and of chained stages (`finetune_operator.sizing`).

The model-size table is the contract for sft; a dpo plan comes from the memory model, with a micro-batch of b
pairs counted as 2b rows and the reference as what it costs for the method (the adapter switched off under
no_grad for lora/qlora, a table precomputed before training for full, nothing when reference-free), never a
second copy of the weights. A chained stage (spec.baseModel.fromJob) is planned from spec.baseModel.parameters,
which `chain.apply` fills in from the base job.

The whole plans of a few dpo cases are compared with `tests/unit/golden/sizing/<case>.yaml`. After an intended
change of the memory model, regenerate them and review the diff:

    UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/unit/test_sizing_dpo.py
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator import chain, sizing
from finetune_operator.spec import BaseJobStatus, FineTuneJobSpec

from .test_sizing import TABLE, arch, estimate

GOLDEN = Path(__file__).parent / "golden" / "sizing"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"


def make(parameters: str | None, method: str = "lora", objective: str = "dpo", dpo: dict[str, Any] | None = None,
         **overrides: object) -> FineTuneJobSpec:
    raw: dict[str, Any] = {
        "baseModel": {"uri": "hf://org/some-model"} | ({"parameters": parameters} if parameters else {}),
        "method": method,
        "objective": objective,
        "dataset": {"train": "s3://data/pairs.jsonl", "format": "preference" if objective == "dpo" else "auto"},
        "output": {"uri": "s3://out/run/"},
    }
    if dpo is not None:
        raw["dpo"] = dpo
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        raw.setdefault(section, {})[field] = value
    return FineTuneJobSpec.model_validate(raw)


@pytest.mark.parametrize(("size", "method", "gpus", "gib", "nodes", "per_node"), TABLE)
def test_the_table_stays_the_contract_for_sft_and_dpo_is_estimated(size, method, gpus, gib, nodes, per_node):
    sft = sizing.plan(make(size, method, objective="sft"))
    assert (sft.gpus, sft.gpu_memory_gib, sft.source) == (gpus, gib, "table")
    dpo_spec = make(size, method)
    dpo = sizing.plan(dpo_spec)
    assert dpo.source == "estimate"
    assert f"objective dpo with {size} {method}: the model-size table is for sft, so the memory model sized it" \
        in dpo.reason
    # at the rung the plan starts at (it may lower the micro-batch to fit, keeping the examples per step)
    assert dpo.memory_per_gpu_gib is not None and dpo.memory_per_gpu_gib <= dpo.gpu_memory_gib
    # two sequences per example (and for lora/qlora a reference) need more per GPU than sft on the same layout
    sft_mem = estimate(make(size, method, objective="sft"), method)
    assert estimate(dpo_spec, method).per_gpu(gpus) > sft_mem.per_gpu(gpus)


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
@pytest.mark.parametrize("checkpointing", [True, False])
def test_a_pair_is_two_rows_of_activations(method, checkpointing):
    pairs = estimate(make("8B", method, hyperparameters__batchSize=2,
                                        hyperparameters__gradientCheckpointing=checkpointing), method)
    rows = estimate(make("8B", method, objective="sft", hyperparameters__batchSize=4,
                                       hyperparameters__gradientCheckpointing=checkpointing), method)
    assert pairs.rows == 4 and rows.rows == 4
    # every layer's activations are those of 4 rows (the end of the backward holds no loss) ...
    assert pairs.late_activations == pytest.approx(rows.late_activations)
    # ... and only the loss differs: dpo's log-probabilities hold vocabulary-wide logits, sft's fused loss does not
    assert pairs.activations > rows.activations
    # no second copy of the weights, and the same trainable state as sft
    assert (pairs.weights, pairs.trainable_state) == (rows.weights, rows.trainable_state)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_the_adapter_reference_is_one_layer_and_its_logits_under_no_grad(method):
    a = arch()  # Llama-2-7B: h 4096, MLP 11008, MHA, vocabulary 32,000
    spec = make("7B", method, hyperparameters__batchSize=2, hyperparameters__maxSeqLength=1024)
    mem = estimate(spec, method, a)
    rows, seq = 4, 1024
    # stored per position: 24h + 8I, and 2 bytes per unit of each adapted module's input (q, k, v, o: 4h);
    # qlora 14h more (float32 residual and norm outputs, a 16-bit input copy per 4-bit projection)
    one_layer = rows * seq * (24 * 4096 + 8 * 11008 + 2 * 4 * 4096 + (14 * 4096 if method == "qlora" else 0))
    logits = 6 * rows * seq * 32000  # 16-bit logits and their fp32 upcast
    assert mem.reference * sizing.GIB == pytest.approx(one_layer + logits)
    # one layer's worth: far below the policy's stored activations plus its loss path
    assert mem.reference < mem.activations


@pytest.mark.parametrize(("method", "dpo"), [
    ("full", None),  # auto: full precomputes
    ("full", {"precomputeReference": "always"}),
    ("lora", {"precomputeReference": "always"}),
    ("qlora", {"precomputeReference": "always"}),
    ("full", {"referenceFree": True, "precomputeReference": "never"}),
    ("lora", {"referenceFree": True}),
])
def test_a_precomputed_or_absent_reference_costs_nothing_on_the_gpu(method, dpo):
    spec = make("7B", method, dpo=dpo)
    mem = estimate(spec, method)
    assert mem.reference == 0.0
    reason = sizing.plan(spec).reason
    if (dpo or {}).get("referenceFree"):
        assert "no reference (referenceFree)" in reason
    else:
        assert "its log-probabilities computed in a pass before training" in reason
        assert "no second copy of the weights" in reason


def test_the_reason_says_how_the_rows_and_the_reference_were_counted():
    plan = sizing.plan(make("7B", "lora", hyperparameters__batchSize=3))
    assert "6 rows per micro-batch (batchSize 3 pairs x chosen and rejected)" in plan.reason
    assert "the base with the adapter switched off, under no_grad" in plan.reason
    assert "no second copy of the weights" in plan.reason
    assert len(plan.reason) <= 2048


def test_method_auto_decides_on_pairs_as_examples():
    plan = sizing.plan(make("7B", "auto", dataset__examples=2_000))
    assert plan.method == "qlora" and plan.source == "estimate"
    assert "method auto: 2,000 examples < 10,000 -> qlora" in plan.reason


def test_explicit_resources_for_dpo_are_checked_against_the_estimate_not_the_table():
    plan = sizing.plan(make("7B", "lora", resources__gpus=1, resources__gpuMemory="24Gi",
                            hyperparameters__maxSeqLength=4096))
    assert (plan.gpus, plan.gpu_memory_gib, plan.source) == (1, 24, "estimate")
    assert not any("model-size table gives" in w for w in plan.warnings)
    (warning,) = plan.warnings
    assert "the memory model needs" in warning and "expect out-of-memory" in warning


# ---- chained stages: planned from spec.baseModel.parameters, which chain.apply fills in


def chained(parameters: str | None) -> FineTuneJobSpec:
    raw: dict[str, Any] = {
        "baseModel": {"fromJob": "sft-stage"} | ({"parameters": parameters} if parameters else {}),
        "method": "lora", "objective": "dpo",
        "dataset": {"train": "s3://data/pairs.jsonl", "format": "preference"},
        "output": {"uri": "s3://out/dpo/"},
    }
    return FineTuneJobSpec.model_validate(raw)


def test_an_unresolved_chained_stage_without_a_size_is_a_clear_planning_error():
    with pytest.raises(sizing.BaseJobUnresolved) as err:
        sizing.plan(chained(None))
    assert err.value.field == "spec.baseModel.fromJob"
    assert "'sft-stage' succeeded" in err.value.message and "set spec.baseModel.parameters" in err.value.message
    assert isinstance(err.value, sizing.PlanningError)  # `finetune plan` reports it as an issue on the field


def test_a_chained_stage_plans_from_its_given_size_before_and_after_resolution():
    before = sizing.plan(chained("7B"))
    resolved = BaseJobStatus(name="sft-stage", model_uri="s3://out/sft/merged/", parameters=6_738_415_616)
    after = sizing.plan(chain.apply(chained("7B"), resolved))
    assert (before.gpus, before.gpu_memory_gib) == (after.gpus, after.gpu_memory_gib)


def test_a_resolved_chained_stage_plans_with_the_base_jobs_parameter_count():
    resolved = BaseJobStatus(name="sft-stage", model_uri="s3://out/sft/merged/", parameters=6_738_415_616)
    spec = chain.apply(chained(None), resolved)
    assert spec.base_model.uri == "s3://out/sft/merged/" and spec.base_model.from_job is None
    plan = sizing.plan(spec)
    assert "6.74B lora" in plan.reason
    assert plan == sizing.plan(make("6.74B", "lora"))


# ---- goldens: whole dpo plans

GOLDEN_CASES: dict[str, dict[str, Any]] = {
    "dpo-lora-7b": {"parameters": "7B", "method": "lora"},
    "dpo-qlora-13b": {"parameters": "13B", "method": "qlora", "hyperparameters__maxSeqLength": 1024},
    "dpo-full-7b": {"parameters": "7B", "method": "full"},
    "dpo-full-7b-reference-free": {"parameters": "7B", "method": "full",
                                   "dpo": {"referenceFree": True, "precomputeReference": "never"}},
    "dpo-lora-70b-precomputed": {"parameters": "70B", "method": "lora", "dpo": {"precomputeReference": "always"},
                                 "hyperparameters__batchSize": 1, "hyperparameters__maxSeqLength": 1024},
}


@pytest.mark.parametrize("case", sorted(GOLDEN_CASES))
def test_golden(case: str) -> None:
    settings = dict(GOLDEN_CASES[case])
    plan = sizing.plan(make(settings.pop("parameters"), settings.pop("method"), **settings))
    text = yaml.safe_dump({"plan": plan.wire()}, sort_keys=False, width=120)
    path = GOLDEN / f"{case}.yaml"
    if UPDATE:
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"no golden file {path}; create it with UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{case} differs from {path.name}; if intended, rerun with UPDATE_GOLDEN=1"
