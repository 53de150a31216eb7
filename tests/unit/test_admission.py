"""The CRD as the API server applies it: valid manifests are admitted; bad ones are stopped at admission
where the schema or CEL can tell, and by the operator (the same spec model as `finetune plan`) otherwise.

The simulator (admission.py) runs without a cluster; tests/e2e/test_api_server.py checks it against a
real kube-apiserver case by case, and the real server against MUST_FAIL_AT_ADMISSION."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from finetune_operator.manifests import validate_document

from .admission import admit
from .invalid_corpus import CASES, DELETE, DPO, FROM_JOB, Case

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))

# Cases the CRD alone must stop at `kubectl apply` (the rest are stopped by the operator: InvalidSpec).
MUST_FAIL_AT_ADMISSION = {
    "wrong-api-version",
    "wrong-kind",
    "unknown-method",
    "uppercase-name",
    "name-too-long",
    "missing-base-model",
    "zero-rank",
    "dropout-above-one",
    "quantization-with-lora",
    "validation-and-split",
    "unknown-format",
    "missing-train",
    "negative-epochs",
    "fractional-batch",
    "zero-gpus",
    "missing-output",
    "gate-without-bounds",
    "gate-min-above-max",
    "shell-image",
    "bad-secret-name",
    "oversized-uri",
    "too-many-gates",
    "pilot-on-lora",
    "pilot-both-bounds",
    "pilot-without-gates",
    "pilot-unknown-gate-metric",
    "pilot-gate-without-bounds",
    "pilot-without-evaluation",
    "pilot-format-gate-without-format",
    "serving-with-prefix",
    "serving-with-prompt",
    "serving-rank-above-max-rank",
    "serving-default-rank-above-max-rank",
    "serving-max-rank-not-a-vllm-rank",
    "uri-and-from-job",
    "neither-uri-nor-from-job",
    "revision-with-from-job",
    "from-job-is-itself",
    "chained-serving-without-merged",
    "dpo-domain-gate-without-test-set",
    "pilot-preference-gate",
    "from-job-not-a-name",
    "dpo-block-without-dpo-objective",
    "dpo-with-prefix",
    "dpo-with-prompt",
    "dpo-with-instruction-data",
    "dpo-with-chat-data",
    "dpo-with-text-data",
    "preference-data-without-dpo",
    "dpo-with-packing",
    "dpo-with-retrieval",
    "dpo-with-pilot",
    "dpo-full-without-precomputed-reference",
    "dpo-unknown-loss",
    "dpo-zero-beta",
    "unknown-objective",
    "preference-gate-without-pairs",
    "reward-margin-gate-without-pairs",
}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_is_admitted(path: Path):
    verdict = admit(yaml.safe_load(path.read_text()))
    assert verdict.admitted, verdict


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_every_bad_manifest_is_stopped_with_its_field_named(case: Case):
    manifest = case.manifest()
    verdict = admit(manifest)
    by_operator = validate_document(manifest)
    assert not by_operator.ok  # the operator validates with the same model as `finetune plan`
    assert any(i.path == case.path for i in by_operator.issues)
    if case.id in MUST_FAIL_AT_ADMISSION:
        assert not verdict.admitted, f"{case.id} should be refused by the CRD"


def test_admission_figures(capsys: pytest.CaptureFixture[str]):
    stopped = sum(not admit(c.manifest()).admitted for c in CASES)
    with capsys.disabled():
        print(f"\nadmission: {stopped} of {len(CASES)} bad manifests refused by the CRD schema/CEL; "
              f"{len(CASES) - stopped} left to the operator (InvalidSpec)")
    assert stopped >= len(MUST_FAIL_AT_ADMISSION)


def test_updates_other_than_suspend_are_refused_at_admission():
    doc = yaml.safe_load(EXAMPLES[0].read_text())
    suspended = copy.deepcopy(doc)
    suspended["spec"]["suspend"] = True
    assert admit(suspended, old=doc).admitted
    edited = copy.deepcopy(doc)
    edited["spec"]["dataset"]["train"] = "s3://elsewhere/train.jsonl"
    verdict = admit(edited, old=doc)
    assert any("spec.dataset is immutable" in e for e in verdict.cel_errors), verdict


SERVING_REFUSALS = {
    "serving-with-prefix": "spec.serving cannot be used with methods prefix and prompt",
    "serving-with-prompt": "spec.serving cannot be used with methods prefix and prompt",
    "serving-rank-above-max-rank": "spec.serving.maxRank must be at least spec.lora.r",
    "serving-default-rank-above-max-rank": "spec.serving.maxRank must be at least spec.lora.r (default 16)",
}


@pytest.mark.parametrize("case_id", sorted(SERVING_REFUSALS))
def test_serving_refusals_name_the_field(case_id: str):
    (case,) = [c for c in CASES if c.id == case_id]
    verdict = admit(case.manifest())
    assert any(SERVING_REFUSALS[case_id] in e for e in verdict.cel_errors), verdict


@pytest.mark.parametrize("changes", [
    {"serving": {}},
    {"serving": {"maxRank": 16}},  # the default lora.r 16
    {"lora": {"r": 64}, "serving": {}},  # maxRank unset: the plan picks 64
    {"method": "full", "lora": {"r": 64}, "serving": {"maxRank": 8}},  # full: no adapter, no rank
    {"method": "auto", "lora": {"r": 8}, "serving": {"maxRank": 8, "adapterName": "triage", "apply": True}},
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_serving_combinations_that_vllm_loads_are_admitted(changes: dict):
    doc = yaml.safe_load(EXAMPLES[0].read_text())
    doc["spec"].update(changes)
    assert admit(doc).admitted, admit(doc)
    assert validate_document(doc).ok


#: Each DPO and chain rule's refusal at admission (the CRD's CEL message, worded as the spec model's; the API
#: server prefixes the rule's fieldPath: tests/e2e/test_api_server.py).
OBJECTIVE_REFUSALS = {
    "uri-and-from-job": "spec.baseModel needs exactly one of uri (a model's location) and fromJob",
    "neither-uri-nor-from-job": "spec.baseModel needs exactly one of uri (a model's location) and fromJob",
    "revision-with-from-job": "spec.baseModel.revision applies to hf:// URIs, not to fromJob",
    "from-job-is-itself": "spec.baseModel.fromJob names this FineTuneJob itself",
    "dpo-block-without-dpo-objective": "spec.dpo is only valid with spec.objective dpo; set objective: dpo",
    "dpo-with-prefix": "spec.objective dpo cannot be used with methods prefix and prompt",
    "dpo-with-prompt": "spec.objective dpo cannot be used with methods prefix and prompt",
    "dpo-with-instruction-data": "spec.dataset.format instruction, chat and text cannot be used with spec.objective dpo",
    "dpo-with-chat-data": "spec.dataset.format instruction, chat and text cannot be used with spec.objective dpo",
    "dpo-with-text-data": "spec.dataset.format instruction, chat and text cannot be used with spec.objective dpo",
    "preference-data-without-dpo": "spec.dataset.format preference needs spec.objective dpo",
    "dpo-with-packing": "spec.hyperparameters.packing cannot be used with spec.objective dpo",
    "dpo-with-retrieval": "spec.retrieval cannot be used with spec.objective dpo",
    "dpo-with-pilot": "spec.pilot cannot be used with spec.objective dpo",
    "dpo-full-without-precomputed-reference": "spec.dpo.precomputeReference never cannot be used with method full",
    "preference-gate-without-pairs": "preferenceAccuracy and rewardMargin are measured on preference pairs",
    "reward-margin-gate-without-pairs": "preferenceAccuracy and rewardMargin are measured on preference pairs",
    "dpo-domain-gate-without-test-set": "which a dpo job has only with spec.evaluation.testSet",
    "pilot-preference-gate": "which the pilot (an sft LoRA run) is not scored on",
    "chained-serving-without-merged": "spec.serving with spec.baseModel.fromJob needs spec.output.saveMerged: true",
}


@pytest.mark.parametrize("case_id", sorted(OBJECTIVE_REFUSALS))
def test_objective_and_chain_refusals_name_the_field_and_the_fix(case_id: str):
    (case,) = [c for c in CASES if c.id == case_id]
    verdict = admit(case.manifest())
    assert not verdict.schema_errors, verdict
    assert any(OBJECTIVE_REFUSALS[case_id] in e for e in verdict.cel_errors), verdict


def _changed(changes: dict) -> dict:
    return Case("valid", changes, "", "").manifest()


#: DPO stages and chains both the CRD and the spec model accept (each a change of the healthcare example).
VALID_OBJECTIVES = {
    "dpo-lora": DPO,
    "dpo-qlora-auto-format": {**DPO, "spec.method": "qlora", "spec.dataset.format": "auto",
                              "spec.dpo": {"beta": 0.5, "loss": "ipo"}},
    "dpo-auto-method": {**DPO, "spec.method": "auto", "spec.dataset.examples": 2000},
    "dpo-full": {**DPO, "spec.method": "full", "spec.dpo": {"precomputeReference": "auto"}},
    "dpo-full-reference-free": {**DPO, "spec.method": "full",
                                "spec.dpo": {"precomputeReference": "never", "referenceFree": True}},
    "dpo-lora-never-precomputed": {**DPO, "spec.dpo": {"precomputeReference": "never"}},
    "dpo-preference-gates": {**DPO, "spec.evaluation.gates": [{"metric": "preferenceAccuracy", "min": 0.6},
                                                              {"metric": "rewardMargin", "minImprovement": 0.1}]},
    "sft-with-preference-test-set": {
        "spec.evaluation.preferenceTestSet": "s3://healthcare-data/preference/test.jsonl",
        "spec.evaluation.gates": [{"metric": "preferenceAccuracy", "min": 0.5}]},
    "from-job": FROM_JOB,
    "dpo-from-job": {**DPO, **FROM_JOB},
}


@pytest.mark.parametrize("case_id", sorted(VALID_OBJECTIVES))
def test_dpo_stages_and_chains_are_admitted_and_planned(case_id: str):
    doc = _changed(VALID_OBJECTIVES[case_id])
    verdict = admit(doc)
    assert verdict.admitted, verdict
    loaded = validate_document(doc)
    assert loaded.ok, [str(i) for i in loaded.issues]


def test_a_chained_stage_without_a_size_is_admitted_but_planned_only_once_resolved():
    """The CRD admits a fromJob stage with no size; `finetune plan` cannot size it before the base job succeeded
    (the operator plans after resolving the chain, with the base job's parameter count)."""
    doc = _changed({**FROM_JOB, "spec.baseModel.parameters": DELETE})
    assert admit(doc).admitted
    loaded = validate_document(doc)
    (issue,) = loaded.issues
    assert issue.path == "spec.baseModel.fromJob" and "set spec.baseModel.parameters" in issue.message


def test_objective_and_base_model_are_immutable():
    doc = _changed(DPO)
    sft = copy.deepcopy(doc)
    sft["spec"]["objective"] = "sft"
    assert any("spec.objective is immutable" in e for e in admit(sft, old=doc).cel_errors)
    chained = _changed(FROM_JOB)
    moved = copy.deepcopy(chained)
    moved["spec"]["baseModel"]["fromJob"] = "another-stage"
    assert any("spec.baseModel is immutable" in e for e in admit(moved, old=chained).cel_errors)
