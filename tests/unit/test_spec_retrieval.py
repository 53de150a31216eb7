"""`spec.retrieval` and `spec.evaluation.hallucinationThreshold` in the spec: what `finetune plan` and the
operator accept, the combinations refused with the field and the fix named (by the spec model and, through
CEL, by the CRD at admission), and what the trainer's config snapshot carries."""

from __future__ import annotations

import json
from typing import Any

import pytest

from finetune_operator import contract, crd, sizing
from finetune_operator.contract import TrainerConfig
from finetune_operator.manifests import validate_document
from finetune_operator.spec import DEFAULT_HALLUCINATION_THRESHOLD, FineTuneJob, RetrievalSpec

from .admission import admit
from .test_spec_methods import manifest

CORPUS = "s3://healthcare-data/corpus/"

VALID = [
    ("defaults", {"retrieval": {"corpus": CORPUS}}),
    ("all-fields", {"retrieval": {"corpus": "s3://healthcare-data/corpus/handbook.jsonl", "topK": 4,
                                  "chunkTokens": 96, "distractorShare": 0.0, "secretRef": {"name": "corpus-keys"}}}),
    ("pvc-prefix-chat", {"retrieval": {"corpus": "pvc://corpora/healthcare/"}, "dataset__format": "chat"}),
    ("budget-just-fits", {"retrieval": {"corpus": CORPUS, "topK": 3, "chunkTokens": 170}}),  # 510 < 512
    ("threshold-without-retrieval", {"evaluation__hallucinationThreshold": 0.3}),
    ("threshold-with-retrieval", {"retrieval": {"corpus": CORPUS}, "evaluation__hallucinationThreshold": 1.0}),
]


@pytest.mark.parametrize(("case", "spec"), VALID, ids=[c[0] for c in VALID])
def test_valid_retrieval_manifests_plan_and_are_admitted(case: str, spec: dict[str, Any]) -> None:
    doc = manifest("lora", **spec)
    loaded = validate_document(doc)
    assert loaded.ok, [str(i) for i in loaded.issues]
    verdict = admit(doc)
    assert verdict.admitted, (verdict.schema_errors, verdict.cel_errors)


INVALID = [
    ("retrieval-with-text-format", {"retrieval": {"corpus": CORPUS}, "dataset__format": "text"}, "spec",
     ["spec.retrieval cannot be used with spec.dataset.format text", "use format instruction or chat"]),
    ("passages-overflow-max-seq-length", {"retrieval": {"corpus": CORPUS, "topK": 4, "chunkTokens": 128}}, "spec",
     ["spec.retrieval.chunkTokens", "4 x 128 = 512", "maxSeqLength 512", "lower retrieval.chunkTokens"]),
    ("default-budget-over-a-short-max-seq-length",
     {"retrieval": {"corpus": CORPUS}, "hyperparameters__maxSeqLength": 256}, "spec",
     ["spec.retrieval.chunkTokens", "3 x 128 = 384", "maxSeqLength 256"]),
    ("corpus-on-the-hub", {"retrieval": {"corpus": "hf://datasets/medical"}}, "spec.retrieval.corpus",
     ["hf"]),
    ("corpus-missing", {"retrieval": {"topK": 2}}, "spec.retrieval.corpus", ["required"]),
    ("top-k-zero", {"retrieval": {"corpus": CORPUS, "topK": 0}}, "spec.retrieval.topK", [">= 1"]),
    ("chunk-tokens-tiny", {"retrieval": {"corpus": CORPUS, "chunkTokens": 4}}, "spec.retrieval.chunkTokens",
     [">= 16"]),
    ("all-distractors", {"retrieval": {"corpus": CORPUS, "distractorShare": 1.0}},
     "spec.retrieval.distractorShare", ["< 1"]),
    ("negative-distractors", {"retrieval": {"corpus": CORPUS, "distractorShare": -0.1}},
     "spec.retrieval.distractorShare", [">= 0"]),
    ("threshold-above-one", {"evaluation__hallucinationThreshold": 1.5}, "spec.evaluation.hallucinationThreshold",
     ["<= 1"]),
    ("retrieval-unknown-field", {"retrieval": {"corpus": CORPUS, "k": 3}}, "spec.retrieval.k",
     ["unknown field"]),
]


@pytest.mark.parametrize(("case", "spec", "path", "fragments"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_retrieval_gets_field_named_errors(case: str, spec: dict[str, Any], path: str,
                                                   fragments: list[str]) -> None:
    loaded = validate_document(manifest("lora", **spec))
    assert not loaded.ok
    messages = [str(i) for i in loaded.issues if i.path == path]
    assert any(all(f in m for f in fragments) for m in messages), [str(i) for i in loaded.issues]


#: Refused by the CRD at `kubectl apply` too: all but unknown fields (the API server prunes those) and URI
#: schemes, which the operator checks (InvalidSpec) as it does for spec.dataset.
AT_ADMISSION = [c for c in INVALID if c[0] not in ("retrieval-unknown-field", "corpus-on-the-hub")]


@pytest.mark.parametrize(("case", "spec", "path", "fragments"), AT_ADMISSION, ids=[c[0] for c in AT_ADMISSION])
def test_the_crd_refuses_them_at_admission(case: str, spec: dict[str, Any], path: str, fragments: list[str]) -> None:
    verdict = admit(manifest("lora", **spec))
    assert not verdict.admitted, case


def test_the_crd_rule_names_the_field() -> None:
    rules = crd.build_schema()["properties"]["spec"]["x-kubernetes-validations"]
    by_path: dict[str, list[str]] = {}
    for r in rules:
        if "immutable" not in r["message"]:
            by_path.setdefault(r["fieldPath"], []).append(r["message"])
    assert any("spec.retrieval.chunkTokens" in m for m in by_path[".retrieval.chunkTokens"])
    assert any("format text" in m for m in by_path[".retrieval"])  # and objective dpo: the same field


def test_every_retrieval_field_is_described_with_its_default() -> None:
    schema = crd.build_schema()["properties"]["spec"]["properties"]
    block = schema["retrieval"]
    assert block["description"]
    for name, prop in block["properties"].items():
        assert prop.get("description"), name
    for name in ("topK", "chunkTokens", "distractorShare", "secretRef"):
        assert "Defaults to" in block["properties"][name]["description"], name
    threshold = schema["evaluation"]["properties"]["hallucinationThreshold"]["description"]
    assert f"Defaults to {DEFAULT_HALLUCINATION_THRESHOLD}" in threshold and "HallucinationHigh" in threshold


def test_the_snapshot_carries_retrieval_to_the_trainer() -> None:
    job = FineTuneJob.model_validate(manifest("lora", retrieval={"corpus": CORPUS, "topK": 2}))
    snapshot = json.loads(contract.config_json(contract.resolve(job, sizing.plan(job.spec))))
    assert snapshot["spec"]["retrieval"] == RetrievalSpec(corpus=CORPUS, top_k=2).wire()
    again = TrainerConfig.model_validate(snapshot).spec.retrieval
    assert again is not None and (again.top_k, again.chunk_tokens, again.distractor_share) == (2, 128, 0.2)
    plain = FineTuneJob.model_validate(manifest("lora"))
    assert plain.spec.evaluation.resolved_hallucination_threshold() == DEFAULT_HALLUCINATION_THRESHOLD
    assert "hallucinationThreshold" not in contract.config_json(contract.resolve(plain, sizing.plan(plain.spec)))
