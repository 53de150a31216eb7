"""`method: prefix` and `method: prompt` in the spec: their blocks, the combinations that cannot work (refused
with the field and the fix named, by the operator's validation and, where CEL can tell, by the CRD at
admission), and what the trainer's config snapshot carries."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from finetune_operator import contract, sizing
from finetune_operator.contract import TrainerConfig
from finetune_operator.manifests import validate_document
from finetune_operator.spec import FineTuneJob, PrefixSpec, PromptSpec

from .admission import admit
from .invalid_corpus import base_manifest


def manifest(method: str, **spec: Any) -> dict[str, Any]:
    doc = base_manifest()  # healthcare-lora.yaml: packing off, gradientCheckpointing unset, no saveMerged
    doc["spec"]["method"] = method
    assert "gradientCheckpointing" not in doc["spec"]["hyperparameters"]
    for dotted, value in spec.items():
        *parents, last = dotted.split("__")
        node = doc["spec"]
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return doc


VALID = [
    ("prefix", {}),
    ("prefix", {"prefix": {"virtualTokens": 30, "projection": True}}),
    ("prefix", {"hyperparameters__gradientCheckpointing": False}),
    ("prompt", {}),
    ("prompt", {"prompt": {"virtualTokens": 50, "init": "text", "initText": "Answer the clinical question"}}),
    ("prompt", {"prompt": {"init": "random"}, "hyperparameters__gradientCheckpointing": True}),
]


@pytest.mark.parametrize(("method", "spec"), VALID)
def test_valid_prefix_and_prompt_manifests_plan_and_are_admitted(method: str, spec: dict[str, Any]) -> None:
    doc = manifest(method, **spec)
    loaded = validate_document(doc)
    assert loaded.ok, [str(i) for i in loaded.issues]
    assert loaded.plan is not None and loaded.plan.method == method and loaded.plan.source == "estimate"
    assert admit(doc).admitted, admit(doc)


#: (id, method, spec changes, field path the error names, fragments of the message: field and fix)
INVALID = [
    ("prefix-block-with-lora", "lora", {"prefix": {"virtualTokens": 10}}, "spec",
     ["spec.prefix is only valid with method 'prefix'", "set method: prefix or remove prefix"]),
    ("prompt-block-with-prefix", "prefix", {"prompt": {"virtualTokens": 10}}, "spec",
     ["spec.prompt is only valid with method 'prompt'", "remove prompt"]),
    ("prompt-block-with-full", "full", {"prompt": {}}, "spec", ["spec.prompt is only valid with method 'prompt'"]),
    ("prefix-with-packing", "prefix", {"hyperparameters__packing": True}, "spec",
     ["spec.hyperparameters.packing cannot be used with method prefix", "set packing: false"]),
    ("prompt-with-packing", "prompt", {"hyperparameters__packing": True}, "spec",
     ["spec.hyperparameters.packing cannot be used with method prompt", "set packing: false"]),
    ("prefix-with-gradient-checkpointing", "prefix", {"hyperparameters__gradientCheckpointing": True}, "spec",
     ["spec.hyperparameters.gradientCheckpointing cannot be used with method prefix", "gradientCheckpointing: false"]),
    ("prefix-save-merged", "prefix", {"output__saveMerged": True}, "spec",
     ["spec.output.saveMerged cannot be used with method prefix", "set saveMerged: false"]),
    ("prompt-save-merged", "prompt", {"output__saveMerged": True}, "spec",
     ["spec.output.saveMerged cannot be used with method prompt"]),
    ("prompt-text-without-init-text", "prompt", {"prompt": {"init": "text"}}, "spec.prompt",
     ["spec.prompt.initText is required with init: text", "use init: random"]),
    ("prompt-init-text-with-random", "prompt", {"prompt": {"initText": "Answer"}}, "spec.prompt",
     ["spec.prompt.initText is only used with init: text"]),
    ("prompt-unknown-init", "prompt", {"prompt": {"init": "vocab"}}, "spec.prompt.init", ["must be one of"]),
    ("prefix-zero-tokens", "prefix", {"prefix": {"virtualTokens": 0}}, "spec.prefix.virtualTokens", [">= 1"]),
    ("prompt-too-many-tokens", "prompt", {"prompt": {"virtualTokens": 5000}}, "spec.prompt.virtualTokens", ["<= 1024"]),
    ("prefix-unknown-field", "prefix", {"prefix": {"tokens": 8}}, "spec.prefix.tokens",
     ["unknown field", "virtualTokens, projection"]),
    ("prompt-empty-init-text", "prompt", {"prompt": {"init": "text", "initText": ""}}, "spec.prompt.initText",
     ["at least 1"]),
]


@pytest.mark.parametrize(("case", "method", "spec", "path", "fragments"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_combinations_get_field_named_errors(case: str, method: str, spec: dict[str, Any], path: str,
                                                     fragments: list[str]) -> None:
    loaded = validate_document(manifest(method, **spec))
    assert not loaded.ok
    messages = [str(i) for i in loaded.issues if i.path == path]
    assert any(all(f in m for f in fragments) for m in messages), [str(i) for i in loaded.issues]


#: Refused by the CRD already at `kubectl apply` (CEL or schema), not only by the operator: all but unknown
#: fields, which the API server prunes instead (the operator never sees them).
AT_ADMISSION = [c for c in INVALID if c[0] != "prefix-unknown-field"]


@pytest.mark.parametrize(("case", "method", "spec", "path", "fragments"), AT_ADMISSION,
                         ids=[c[0] for c in AT_ADMISSION])
def test_the_crd_refuses_them_at_admission(case: str, method: str, spec: dict[str, Any], path: str,
                                           fragments: list[str]) -> None:
    verdict = admit(manifest(method, **spec))
    assert not verdict.admitted, case


def test_prefix_turns_gradient_checkpointing_off_by_default_and_the_snapshot_keeps_it() -> None:
    job = FineTuneJob.model_validate(manifest("prefix"))
    assert job.spec.hyperparameters.gradient_checkpointing is False
    # the other methods leave it to the plan (status.plan.rung)
    assert FineTuneJob.model_validate(manifest("prompt")).spec.hyperparameters.gradient_checkpointing is None
    assert FineTuneJob.model_validate(manifest("lora")).spec.hyperparameters.gradient_checkpointing is None
    plan = sizing.plan(job.spec)
    assert plan.rung is not None and plan.rung.gradient_checkpointing is False
    config = contract.resolve(job, plan)
    snapshot = json.loads(contract.config_json(config))
    assert snapshot["spec"]["hyperparameters"]["gradientCheckpointing"] is False
    again = TrainerConfig.model_validate(snapshot)
    assert again.spec.hyperparameters.gradient_checkpointing is False and again.gradient_checkpointing() is False


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_the_snapshot_carries_the_resolved_block_to_the_trainer(method: str) -> None:
    job = FineTuneJob.model_validate(manifest(method))
    assert getattr(job.spec, method) is None
    config = contract.resolve(job, sizing.plan(job.spec))
    snapshot = json.loads(contract.config_json(config))
    assert snapshot["method"] == method
    default = (PrefixSpec() if method == "prefix" else PromptSpec()).wire()
    assert snapshot["spec"][method] == default
    other = "prompt" if method == "prefix" else "prefix"
    assert other not in snapshot["spec"] and "quantization" not in snapshot["spec"]
    again = TrainerConfig.model_validate(snapshot)
    assert getattr(again.spec, method) == getattr(config.spec, method)
    text = FineTuneJob.model_validate(manifest("prompt", prompt={"init": "text", "initText": "Answer briefly"}))
    resolved = contract.resolve(text, sizing.plan(text.spec)).spec.prompt
    assert resolved is not None and (resolved.init, resolved.init_text) == ("text", "Answer briefly")


def test_auto_never_picks_prefix_or_prompt() -> None:
    for examples in (10, 1_000_000):
        doc = copy.deepcopy(manifest("auto", dataset__examples=examples))
        doc["spec"].pop("lora")
        loaded = validate_document(doc)
        assert loaded.ok and loaded.plan is not None and loaded.plan.method in ("lora", "qlora")


def test_every_new_field_is_documented_in_the_crd() -> None:
    from finetune_operator import crd

    props = crd.build_schema()["properties"]["spec"]["properties"]
    for block, fields in (("prefix", {"virtualTokens", "projection"}), ("prompt", {"virtualTokens", "init", "initText"})):
        assert props[block]["description"]
        assert set(props[block]["properties"]) == fields
        for name, schema in props[block]["properties"].items():
            assert len(schema.get("description", "")) > 40, (block, name)
    assert props["prompt"]["properties"]["init"]["enum"] == ["random", "text"]
    assert {"prefix", "prompt"} <= set(props["method"]["enum"])
