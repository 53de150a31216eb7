"""What a chained job starts from (`finetune_operator.chain.resolve` and `apply`): table tests of the pure
resolution over the base job's method, artifacts and own chain."""

from __future__ import annotations

from typing import Any

import pytest

from finetune_operator import chain, sizing
from finetune_operator.spec import FineTuneJob, FineTuneJobSpec, FineTuneJobStatus

OUT = "s3://out/sft/"
HUB = "hf://meta-llama/Llama-2-7b-hf"


def job(name: str = "sft", *, method: str = "lora", base: dict[str, Any] | None = None) -> FineTuneJob:
    return FineTuneJob.model_validate({
        "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": "ml"},
        "spec": {"baseModel": base or {"uri": HUB, "revision": "abc123", "secretRef": {"name": "hf-token"}},
                 "method": method, "dataset": {"train": "s3://data/train.jsonl"}, "output": {"uri": OUT}},
    })


def status(method: str = "lora", **artifacts: str) -> FineTuneJobStatus:
    return FineTuneJobStatus.model_validate({
        "phase": "Succeeded", "artifacts": artifacts,
        "plan": {"method": method, "gpus": 1, "gpuMemoryGiB": 24, "nodes": 1, "gpusPerNode": 1,
                 "estimatedMemoryGiB": 18.0, "source": "table", "reason": "r"},
        "preflight": {"parameters": 6_738_415_616},
    })


def test_a_lora_base_without_merged_starts_from_its_base_with_its_adapter() -> None:
    resolved = chain.resolve(job(), status(model=OUT + "model/"), uid="u1")
    assert (resolved.model_uri, resolved.revision, resolved.adapters) == (HUB, "abc123", [OUT + "model/"])
    assert resolved.secret_ref is not None and resolved.secret_ref.name == "hf-token"
    # The size the base job was planned with (7B from the name), not the pre-flight's exact count: the
    # chained stage plans from the same model-size table row.
    assert resolved.parameters == 7_000_000_000
    assert [(s.name, s.uid, s.method, s.output_uri) for s in resolved.chain] == [("sft", "u1", "lora", OUT)]


@pytest.mark.parametrize(("method", "artifacts", "model"), [
    ("lora", {"model": OUT + "model/", "merged": OUT + "merged/"}, OUT + "merged/"),
    ("qlora", {"model": OUT + "model/", "merged": OUT + "merged/"}, OUT + "merged/"),
    ("full", {"model": OUT + "model/"}, OUT + "model/"),
])
def test_a_whole_model_result_is_loaded_as_it_is(method: str, artifacts: dict[str, str], model: str) -> None:
    resolved = chain.resolve(job(method=method), status(method, **artifacts))
    assert (resolved.model_uri, resolved.adapters, resolved.revision) == (model, [], None)


def test_a_chain_of_chains_accumulates_adapters_in_order() -> None:
    first = chain.resolve(job("sft"), status(model="s3://out/sft/model/"), uid="u1")
    second_job = job("dpo", base={"fromJob": "sft"})
    second_status = status(model="s3://out/dpo/model/")
    second_status.base_job = first
    third = chain.resolve(second_job, second_status, uid="u2")
    assert third.model_uri == HUB and third.revision == "abc123"
    assert third.adapters == ["s3://out/sft/model/", "s3://out/dpo/model/"]
    assert [s.name for s in third.chain] == ["sft", "dpo"]
    assert third.secret_ref is not None and third.secret_ref.name == "hf-token"  # inherited down the chain
    assert third.parameters == first.parameters


@pytest.mark.parametrize(("method", "artifacts", "message"), [
    ("prompt", {"model": OUT + "model/"}, "virtual tokens are not weights"),
    ("prefix", {"model": OUT + "model/"}, "virtual tokens are not weights"),
    ("lora", {}, "reports no model artifact"),
])
def test_unchainable_bases_are_refused_naming_them(method: str, artifacts: dict[str, str], message: str) -> None:
    with pytest.raises(chain.BaseUnchainable, match=message) as err:
        chain.resolve(job(method=method), status(method, **artifacts))
    assert "sft" in str(err.value)


def test_apply_points_the_spec_at_the_resolution_and_it_plans_from_the_table() -> None:
    dependent = FineTuneJobSpec.model_validate({
        "baseModel": {"fromJob": "sft"}, "objective": "sft", "method": "lora",
        "dataset": {"train": "s3://data/more.jsonl"}, "output": {"uri": "s3://out/stage2/"}})
    with pytest.raises(ValueError, match="not resolved"):
        dependent.base_model.resolved_uri()
    applied = chain.apply(dependent, chain.resolve(job(), status(model=OUT + "model/")))
    assert applied.base_model.uri == HUB and applied.base_model.from_job is None
    assert applied.base_model.secret_ref is not None and applied.base_model.secret_ref.name == "hf-token"
    plan = sizing.plan(applied)
    assert (plan.gpus, plan.gpu_memory_gib, plan.source) == (1, 24, "table")  # 7B lora: the table's 1x24GB


def test_apply_keeps_the_dependents_own_secret_and_size() -> None:
    dependent = FineTuneJobSpec.model_validate({
        "baseModel": {"fromJob": "sft", "parameters": "13B", "secretRef": {"name": "mine"}}, "method": "lora",
        "dataset": {"train": "s3://data/more.jsonl"}, "output": {"uri": "s3://out/stage2/"}})
    applied = chain.apply(dependent, chain.resolve(job(), status(model=OUT + "model/")))
    assert applied.base_model.secret_ref is not None and applied.base_model.secret_ref.name == "mine"
    assert applied.base_model.parameters == "13B"
