"""FineTunePolicy's generated objects (CRD, admission policy, chart template) and the operator's pure checks.

Whether the API server enforces the policy as intended is tests/e2e/test_policy.py's job (a real API
server); here: the generated files match the model, every policy field is enforced by some validation and
documented, and the pure helpers say the right thing."""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from finetune_operator import policy
from finetune_operator.crd import model_schema

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "finetune.dev_finetunepolicies.yaml"
CHART = ROOT / "charts" / "finetune-operator"
TEMPLATE = CHART / "templates" / "admission-policy.yaml"


def test_crds_dir_matches_the_policy_model() -> None:
    assert CRD_FILE.read_text() == policy.policy_crd_yaml(), "crds/ drifted from the policy model: run `make crd`"
    assert (CHART / "crds" / CRD_FILE.name).resolve() == CRD_FILE.resolve(), "the chart must ship the same CRD"


def test_chart_template_matches_the_admission_policy() -> None:
    assert TEMPLATE.read_text() == policy.admission_policy_template(), "run `make crd`"
    body = policy.admission_policy_template().split("\n", 2)[2].rsplit("{{- end }}", 1)[0]
    assert "{{" not in body.replace(policy.HELM_LABELS, ""), "Helm would read CEL with '{{' as a template action"


def test_generated_objects_are_valid_kubernetes_objects() -> None:
    kubernetes_validate.validate(policy.build_policy_crd(), "1.31.0", strict=True)
    for obj in policy.build_admission_policy():
        kubernetes_validate.validate(obj, "1.31.0", strict=True)


def _described(schema: dict, path: str = "spec") -> list[str]:
    missing = [] if schema.get("description") else [path]
    for name, sub in (schema.get("properties") or {}).items():
        missing += _described(sub, f"{path}.{name}")
    if "items" in schema:
        missing += _described(schema["items"], f"{path}[]") if schema["items"].get("properties") else []
    return missing


def test_every_policy_field_is_documented_for_kubectl_explain() -> None:
    spec = policy.build_policy_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert _described(spec) == []


def test_every_policy_field_is_enforced_by_a_validation_or_the_operator() -> None:
    vap, binding = policy.build_admission_policy()
    expressions = " ".join(v["expression"] for v in vap["spec"]["validations"])
    fields = set(model_schema(policy.FineTunePolicySpec)["properties"])
    unenforced = {f for f in fields if f"params.spec.{f}" not in expressions and f"params.spec.?{f}" not in expressions}
    assert unenforced == set()
    assert binding["spec"]["paramRef"] == {"selector": {}, "parameterNotFoundAction": "Deny"}
    assert vap["spec"]["failurePolicy"] == "Fail"
    assert vap["spec"]["matchConstraints"]["resourceRules"][0]["operations"] == ["CREATE"]


def test_every_validation_checks_only_the_namespace_policy_and_explains_itself() -> None:
    (vap, _) = policy.build_admission_policy()
    for check in vap["spec"]["validations"]:
        assert check["expression"].startswith("!variables.applies || ("), check
        message = check["messageExpression"]
        assert "params.metadata.name" in message, "the refusal names the policy"
        assert re.match(r"^'(spec\.|secretRef|a data URI)", message), "the refusal starts with the field"


@pytest.mark.parametrize(("labels", "expected"), [
    (None, "default"),
    ({}, "default"),
    ({"team": "a"}, "default"),
    ({policy.NAMESPACE_LABEL: "gpu-team"}, "gpu-team"),
    ({policy.NAMESPACE_LABEL: ""}, "default"),
])
def test_a_namespace_selects_its_policy_by_label(labels: dict[str, str] | None, expected: str) -> None:
    assert policy.policy_name(labels) == expected


def test_the_applies_variable_matches_policy_name() -> None:
    (vap, _) = policy.build_admission_policy()
    applies = next(v["expression"] for v in vap["spec"]["variables"] if v["name"] == "applies")
    assert f"'{policy.NAMESPACE_LABEL}'" in applies and f"'{policy.DEFAULT_POLICY}'" in applies


def test_gpu_cap_of_a_plan() -> None:
    capped = {"metadata": {"name": "small"}, "spec": {"maxGpus": 8}}
    assert policy.over_gpu_cap(capped, 8) is None
    message = policy.over_gpu_cap(capped, 16)
    assert message is not None and "16 GPUs" in message and "8 GPUs" in message and "FineTunePolicy small" in message
    assert policy.over_gpu_cap({"metadata": {"name": "open"}, "spec": {}}, 4096) is None
    assert policy.over_gpu_cap(None, 4096) is None


def test_missing_policy_message_names_the_label_and_the_fix() -> None:
    message = policy.missing_policy("typo", "team-a")
    assert "typo" in message and "team-a" in message and policy.NAMESPACE_LABEL in message and "create it" in message


def test_policy_objects_parse_with_the_model() -> None:
    obj = policy.FineTunePolicy.model_validate({
        "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTunePolicy", "metadata": {"name": "default"},
        "spec": {"images": ["ghcr.io/x/*"], "maxGpus": 8, "tolerations": [{"key": "gpu", "effect": "NoSchedule"}],
                 "outputUriPrefixes": ["s3://artifacts/{namespace}/"]}})
    assert obj.spec.max_gpus == 8 and obj.spec.tolerations and obj.spec.tolerations[0].key == "gpu"
    with pytest.raises(ValueError):
        policy.FineTunePolicySpec.model_validate({"maxGpus": 0})
    with pytest.raises(ValueError):
        policy.FineTunePolicySpec.model_validate({"unknownField": 1})


def test_chart_default_policy_lists_the_trainer_image() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["policy"]["enabled"] is True
    template = (CHART / "templates" / "finetunepolicy.yaml").read_text()
    assert ".Values.trainer.image" in template and "name: default" in template
    # The defaults refuse what an unrestricted pod spec would allow (issue: secure defaults).
    default = values["policy"]["default"]
    assert default["serviceAccounts"] == [] and default["images"] == []
    assert "kubernetes.io/hostname" not in default["nodeSelectorKeys"]
    assert default["gpuResourceNames"] == ["nvidia.com/gpu"]
    policy.FineTunePolicySpec.model_validate(default)
