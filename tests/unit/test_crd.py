"""The CRD: generated from the spec model, structural, fully described, with working CEL rules."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml

from finetune_operator import crd

CRD_FILE = Path(__file__).resolve().parents[2] / "crds" / "finetune.dev_finetunejobs.yaml"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "healthcare-lora.yaml"


def schema() -> dict[str, Any]:
    return crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def walk(node: dict[str, Any], path: str = ""):
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}")
    if "items" in node:
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


def test_crds_dir_matches_the_spec_model():
    assert CRD_FILE.read_text() == crd.crd_yaml(), "crds/ drifted from the spec model: run `make crd`"


def test_every_property_has_a_description():
    # `metadata` is the one exception: the API server refuses any keyword there but `type` (and
    # name/generateName constraints), "must not specify anything other than name and generateName".
    missing = [
        path for path, node in walk(schema())
        if path and path != ".metadata" and not path.endswith(("[]", "{}")) and not node.get("description")
    ]
    assert not missing, f"properties without description: {missing}"


def test_metadata_is_only_an_object():
    # What a real API server accepts at the root `metadata` (tests/cluster checks the server itself).
    assert schema()["properties"]["metadata"] == {"type": "object"}


def test_schema_is_structural():
    for path, node in walk(schema()):
        for banned in ("$ref", "anyOf", "allOf", "oneOf", "patternProperties", "propertyNames", "title", "default"):
            assert banned not in node, f"{path} has {banned}"
        assert (
            "type" in node or node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")
        ), f"{path} has no type"
        assert not ("properties" in node and "additionalProperties" in node), path


def test_crd_validates_against_the_kubernetes_schema():
    import kubernetes_validate

    kubernetes_validate.validate(crd.build_crd(), "1.31.0", strict=True)


def test_names_columns_and_subresources():
    spec = crd.build_crd()["spec"]
    assert spec["group"] == "finetune.dev"
    assert spec["names"]["shortNames"] == ["ftj"] and spec["names"]["categories"]
    version = spec["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Phase",
        "Stage",
        "Method",
        "Model",
        "From",
        "GPUs",
        "Progress",
        "Loss",
        "Age",
    ]


def test_kubectl_explain_lora_teaches_the_fields():
    lora = schema()["properties"]["spec"]["properties"]["lora"]
    assert "Adapter settings" in lora["description"]
    for field in ("r", "alpha", "dropout", "targetModules"):
        assert "Defaults to" in lora["properties"][field]["description"]


def test_printer_column_paths_exist_in_the_schema():
    root = schema()
    for column in crd.PRINTER_COLUMNS:
        node = root
        for part in column["jsonPath"].strip(".").split("."):
            if part == "metadata":
                break
            node = node["properties"][part]


# ---- CEL rules, evaluated with cel-python the way the API server binds self and oldSelf ----


def rules_at(path: list[str]) -> list[dict[str, Any]]:
    node = schema()
    for part in path:
        node = node["items"] if part == "[]" else node["properties"][part]
    return node.get("x-kubernetes-validations", [])


def evaluate(rule: str, self_obj: Any, old: Any = None) -> bool:
    env = celpy.Environment()
    program = env.program(env.compile(rule))
    activation = {"self": celpy.json_to_cel(self_obj)}
    if old is not None:
        activation["oldSelf"] = celpy.json_to_cel(old)
    return bool(program.evaluate(activation))


def failing(path: list[str], obj: Any, old: Any = None, transition: bool = False) -> list[str]:
    out = []
    for r in rules_at(path):
        if ("oldSelf" in r["rule"]) != transition:
            continue
        if not evaluate(r["rule"], obj, old):
            out.append(r["message"])
    return out


def example_spec() -> dict[str, Any]:
    return yaml.safe_load(EXAMPLE.read_text())["spec"]


def test_cel_valid_example_passes_every_rule():
    spec = example_spec()
    assert failing(["spec"], spec) == []
    assert failing(["spec", "dataset"], spec["dataset"]) == []
    assert failing([], {"metadata": {"name": "healthcare-assistant"}}) == []


def test_cel_quantization_only_with_qlora():
    spec = example_spec() | {"quantization": {"bits": 4}}
    assert any("quantization" in m for m in failing(["spec"], spec))
    assert failing(["spec"], spec | {"method": "qlora"}) == []
    assert any("quantization" in m for m in failing(["spec"], {k: v for k, v in spec.items() if k != "method"}))


def test_cel_validation_xor_split():
    ds = example_spec()["dataset"] | {"validation": "s3://healthcare-data/val.jsonl"}
    assert failing(["spec", "dataset"], ds) == ["set at most one of spec.dataset.validation and spec.dataset.validationSplit"]


@pytest.mark.parametrize(
    ("gate", "ok"),
    [({"metric": "accuracy"}, False), ({"metric": "accuracy", "min": 0.5}, True), ({"metric": "x", "min": 2, "max": 1}, False)],
)
def test_cel_gates(gate, ok):
    assert (failing(["spec", "evaluation", "gates", "[]"], gate) == []) is ok


@pytest.mark.parametrize(("name", "ok"), [("a" * 52, True), ("a" * 53, False), ("9lives", False), ("ok-name", True)])
def test_cel_name_rules(name, ok):
    assert (failing([], {"metadata": {"name": name}}) == []) is ok


def test_cel_spec_is_immutable_except_suspend():
    old = example_spec()
    assert failing(["spec"], old | {"suspend": True}, old, transition=True) == []
    changed = copy.deepcopy(old)
    changed["hyperparameters"]["learningRate"] = 1e-3
    assert failing(["spec"], changed, old, transition=True) == [
        "spec.hyperparameters is immutable after creation; only spec.suspend may change. "
        "Create a new FineTuneJob to change it."
    ]
    added = old | {"image": "registry.example.com/trainer:2"}
    assert any("spec.image" in m for m in failing(["spec"], added, old, transition=True))
    removed = {k: v for k, v in old.items() if k != "checkpoint"}
    assert any("spec.checkpoint" in m for m in failing(["spec"], removed, old, transition=True))


def test_cel_node_selector_keys():
    rules = rules_at(["spec", "resources", "nodeSelector"])
    assert rules and evaluate(rules[0]["rule"], {"nvidia.com/gpu.product": "A100"})
    assert not evaluate(rules[0]["rule"], {"bad key!": "x"})
