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
from .invalid_corpus import CASES, Case

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
