"""The CRD on a real API server: it installs and becomes Established, every example is admitted, the
invalid-manifest corpus is refused where the project says the CRD refuses it (naming the field), the
admission simulator of the unit tests agrees with the real server case by case, the published OpenAPI
v3 document describes every field (what `kubectl explain` shows), and the spec is immutable but for
`spec.suspend`.

The emulator, `kubernetes-validate` and the simulator once all accepted a CRD that every real API server
refused; these tests are the ones that meet the real component (tests/conftest.py: a KUBEBUILDER_ASSETS
control plane, or `--e2e` with KUBECONFIG).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator.handlers import ftj_url
from tests.e2e.conftest import kubectl_explain, wait_for
from tests.kube import Kube, KubeError
from tests.unit.admission import admit
from tests.unit.invalid_corpus import CASES, Case
from tests.unit.test_admission import MUST_FAIL_AT_ADMISSION

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
GROUP_VERSION = "finetune.dev/v1alpha1"
MERGE = "application/merge-patch+json"
#: How the API server words a field in its refusal where it does not use the field's path.
SERVER_NAMES = {"apiVersion": "API version"}


def dry_run_create(kube: Kube, namespace: str, manifest: Any) -> str | None:
    """Create `manifest` with `dryRun=All` (full admission: schema, CEL, defaulting; nothing stored).

    Returns None when admitted, else the API server's message."""
    body = copy.deepcopy(manifest)
    if isinstance(body, dict) and isinstance(body.get("metadata"), dict):
        body["metadata"]["namespace"] = namespace
    try:
        kube.request("POST", ftj_url(namespace), body=body, query={"dryRun": "All"})
    except KubeError as err:
        assert 400 <= err.status < 500, f"not an admission refusal: {err.status} {err}"
        return str(err)
    return None


def test_crd_is_established_with_its_printer_columns(kube: Kube, crd: dict[str, Any]) -> None:
    conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conditions["Established"] == "True"
    assert conditions["NamesAccepted"] == "True"
    assert crd["spec"]["names"]["shortNames"] == ["ftj"]
    # The server kept the schema as generated: the root metadata is a bare object, as it must be.
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert schema["properties"]["metadata"] == {"type": "object"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_is_admitted(kube: Kube, crd: Any, namespace: str, path: Path) -> None:
    assert dry_run_create(kube, namespace, yaml.safe_load(path.read_text())) is None


def _refusals(kube: Kube, namespace: str) -> dict[str, str | None]:
    return {case.id: dry_run_create(kube, namespace, case.manifest()) for case in CASES}


@pytest.fixture(scope="module")
def refusals(kube: Kube, crd: Any, namespace: str) -> dict[str, str | None]:
    """Every corpus case, submitted once: case id -> the API server's refusal (None when admitted)."""
    return _refusals(kube, namespace)


@pytest.mark.parametrize("case_id", sorted(MUST_FAIL_AT_ADMISSION))
def test_the_crd_refuses_what_the_project_says_it_refuses(refusals: dict[str, str | None], case_id: str) -> None:
    case = next(c for c in CASES if c.id == case_id)
    message = refusals[case_id]
    assert message is not None, f"{case_id}: the API server admitted it; the project says the CRD refuses it"
    named = SERVER_NAMES.get(case.path, case.path)
    assert named in message, f"{case_id}: the refusal does not name {named}: {message}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_the_admission_simulator_agrees_with_the_api_server(refusals: dict[str, str | None], case: Case) -> None:
    real = refusals[case.id] is None
    simulated = admit(case.manifest()).admitted
    assert simulated == real, (
        f"{case.id}: simulator says {'admitted' if simulated else 'refused'}, the API server "
        f"{'admitted it' if real else 'refused it: ' + str(refusals[case.id])}")


def test_corpus_figures(refusals: dict[str, str | None], capsys: pytest.CaptureFixture[str]) -> None:
    refused = sorted(k for k, v in refusals.items() if v is not None)
    with capsys.disabled():
        print(f"\nreal admission: {len(refused)} of {len(CASES)} bad manifests refused by kube-apiserver; "
              f"{len(CASES) - len(refused)} admitted and left to the operator (InvalidSpec)")
    assert set(MUST_FAIL_AT_ADMISSION) <= set(refused)


def _undescribed(node: dict[str, Any], path: str, schemas: dict[str, Any]) -> list[str]:
    """Paths under `node` (an OpenAPI v3 schema) whose property has no description."""
    if "$ref" in node:
        node = schemas[node["$ref"].rsplit("/", 1)[-1]]
    for wrapper in ("allOf", "oneOf", "anyOf"):
        if len(node.get(wrapper) or []) == 1:
            node = {**node, **node[wrapper][0]}
    missing = []
    for name, child in (node.get("properties") or {}).items():
        if not child.get("description"):
            missing.append(f"{path}.{name}")
        missing += _undescribed(child, f"{path}.{name}", schemas)
    if isinstance(node.get("items"), dict):
        missing += _undescribed(node["items"], f"{path}[]", schemas)
    if isinstance(node.get("additionalProperties"), dict):
        missing += _undescribed(node["additionalProperties"], f"{path}{{}}", schemas)
    return missing


def test_published_openapi_describes_every_spec_and_status_field(kube: Kube, crd: Any) -> None:
    def published() -> dict[str, Any] | None:
        try:
            return kube.get(f"/openapi/v3/apis/{GROUP_VERSION}")
        except KubeError:
            return None

    # The API server publishes a new CRD's OpenAPI a moment after it is Established.
    document = wait_for("the OpenAPI v3 document of finetune.dev/v1alpha1", published, timeout=60, interval=1)
    schemas = document["components"]["schemas"]
    name = next(k for k in schemas if k.endswith(".FineTuneJob"))
    root = schemas[name]
    for part in ("spec", "status"):
        assert root["properties"][part].get("description"), part
        missing = _undescribed(root["properties"][part], part, schemas)
        assert not missing, f"fields without a description in the published OpenAPI: {missing}"
    spec = root["properties"]["spec"]["properties"]
    assert {"lora", "objective", "dpo"} <= set(spec)
    base_model = spec["baseModel"]
    for wrapper in ("allOf", "oneOf", "anyOf"):  # how the server may wrap a described object
        if len(base_model.get(wrapper) or []) == 1:
            base_model = {**base_model, **base_model[wrapper][0]}
    base_model = schemas[base_model["$ref"].rsplit("/", 1)[-1]] if "$ref" in base_model else base_model
    assert {"uri", "fromJob"} <= set(base_model["properties"])


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_explain_teaches_the_lora_fields(kubeconfig: str, crd: Any) -> None:
    text = kubectl_explain(kubeconfig, "finetunejob.spec.lora")
    assert "Adapter settings" in text
    for field in ("rank", "alpha", "dropout", "targetModules"):
        assert field in text, f"kubectl explain does not show spec.lora.{field}:\n{text}"


def test_spec_is_immutable_except_suspend(kube: Kube, crd: Any, namespace: str) -> None:
    doc = yaml.safe_load((REPO / "examples" / "healthcare-lora.yaml").read_text())
    doc["metadata"]["name"] = "immutability-check"
    doc["metadata"]["namespace"] = namespace
    # Stored for real (no operator watches this object long enough to matter: it is suspended at once).
    doc["spec"]["suspend"] = True
    created = kube.request("POST", ftj_url(namespace), body=doc)
    url = ftj_url(namespace, "immutability-check")
    try:
        kube.request("PATCH", url, body={"spec": {"suspend": False}},
                     content_type=MERGE)
        with pytest.raises(KubeError) as refused:
            kube.request("PATCH", url, body={"spec": {"dataset": {"train": "s3://elsewhere/train.jsonl"}}},
                         content_type=MERGE)
        assert refused.value.status == 422
        assert "spec.dataset is immutable" in str(refused.value), json.dumps(str(refused.value))
        with pytest.raises(KubeError) as refused_method:
            kube.request("PATCH", url, body={"spec": {"method": "full"}},
                         content_type=MERGE)
        assert refused_method.value.status == 422
        assert created["metadata"]["uid"] == kube.get(url)["metadata"]["uid"]
    finally:
        kube.request("DELETE", url)


def _retrieval_cases() -> tuple[list[Any], list[Any]]:
    from tests.unit import test_spec_retrieval as retrieval

    return retrieval.VALID, retrieval.AT_ADMISSION


@pytest.mark.parametrize("case", _retrieval_cases()[0], ids=lambda c: c[0])
def test_retrieval_manifests_are_admitted(kube: Kube, crd: Any, namespace: str, case: Any) -> None:
    from tests.unit.test_spec_methods import manifest

    _, spec = case
    assert dry_run_create(kube, namespace, manifest("lora", **spec)) is None


@pytest.mark.parametrize("case", _retrieval_cases()[1], ids=lambda c: c[0])
def test_invalid_retrieval_is_refused_naming_the_field(kube: Kube, crd: Any, namespace: str, case: Any) -> None:
    """spec.retrieval's CEL rules and ranges on the real API server (the unit tests check the simulator)."""
    from tests.unit.test_spec_methods import manifest

    case_id, spec, path, _ = case
    message = dry_run_create(kube, namespace, manifest("lora", **spec))
    assert message is not None, f"{case_id}: admitted"
    named = "spec.retrieval" if path == "spec" else path
    assert named in message, f"{case_id}: the refusal does not name {named}: {message}"


@pytest.mark.parametrize(("case_id", "named"), [
    ("serving-with-prefix", "spec.serving: Forbidden: spec.serving cannot be used with methods prefix and prompt"),
    ("serving-rank-above-max-rank", "spec.serving.maxRank: Invalid value"),
    ("serving-default-rank-above-max-rank", "spec.serving.maxRank must be at least spec.lora.r (default 16)"),
])
def test_invalid_serving_is_refused_naming_the_field(refusals: dict[str, str | None], case_id: str, named: str) -> None:
    """spec.serving's CEL rules on the real API server: the refusal names the field (the CEL rule's fieldPath)."""
    message = refusals[case_id]
    assert message is not None, f"{case_id}: admitted"
    assert named in message, f"{case_id}: the refusal does not say {named!r}: {message}"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize(("what", "fields"), [
    ("finetunejob.spec.serving", ("baseModelName", "adapterName", "maxRank", "image", "gpus", "apply",
                                  "--max-lora-rank", "LLMInferenceService")),
    ("finetunejob.spec.tracking.mlflow", ("trackingUri", "experiment", "registeredModel", "secretRef",
                                          "MLFLOW_TRACKING_USERNAME")),
    ("finetunejob.status.serving", ("name", "ready", "url")),
])
def test_kubectl_explain_teaches_the_serving_and_tracking_fields(kubeconfig: str, crd: Any, what: str,
                                                                fields: tuple[str, ...]) -> None:
    text = kubectl_explain(kubeconfig, what)
    for field in fields:
        assert field in text, f"kubectl explain {what} does not show {field}:\n{text}"


# Objective dpo and chained stages (spec.objective, spec.dpo, spec.baseModel.fromJob): each CEL rule on the real
# API server, whose refusal names the field through the rule's fieldPath (or the node it sits on).
@pytest.mark.parametrize(("case_id", "named"), [
    ("uri-and-from-job", "spec.baseModel: Invalid value: spec.baseModel needs exactly one of uri"),
    ("neither-uri-nor-from-job", "spec.baseModel: Invalid value: spec.baseModel needs exactly one of uri"),
    ("revision-with-from-job", "spec.baseModel.revision: Forbidden: spec.baseModel.revision applies to hf:// URIs"),
    ("from-job-is-itself", "spec.baseModel.fromJob: Invalid value"),
    ("dpo-block-without-dpo-objective", "spec.dpo: Forbidden: spec.dpo is only valid with spec.objective dpo"),
    ("dpo-with-prefix", "spec.method: Forbidden: spec.objective dpo cannot be used with methods prefix and prompt"),
    ("dpo-with-prompt", "spec.method: Forbidden: spec.objective dpo cannot be used with methods prefix and prompt"),
    ("dpo-with-chat-data", "spec.dataset.format: Forbidden: spec.dataset.format instruction, chat and text"),
    ("preference-data-without-dpo", "spec.dataset.format: Forbidden: spec.dataset.format preference needs"),
    ("dpo-with-packing", "spec.hyperparameters.packing: Forbidden: spec.hyperparameters.packing cannot be used "
                         "with spec.objective dpo"),
    ("dpo-with-retrieval", "spec.retrieval: Forbidden: spec.retrieval cannot be used with spec.objective dpo"),
    ("dpo-with-pilot", "spec.pilot: Forbidden: spec.pilot cannot be used with spec.objective dpo"),
    ("dpo-full-without-precomputed-reference", "spec.dpo.precomputeReference: Forbidden: "
                                               "spec.dpo.precomputeReference never cannot be used with method full"),
    ("preference-gate-without-pairs", "spec.evaluation.gates: Forbidden: spec.evaluation.gates preferenceAccuracy "
                                      "and rewardMargin are measured on preference pairs"),
])
def test_invalid_objective_and_chain_are_refused_naming_the_field(refusals: dict[str, str | None], case_id: str,
                                                                 named: str) -> None:
    message = refusals[case_id]
    assert message is not None, f"{case_id}: admitted"
    assert named in message, f"{case_id}: the refusal does not say {named!r}: {message}"


def _objective_manifests() -> dict[str, dict[str, Any]]:
    from tests.unit.test_admission import VALID_OBJECTIVES, _changed

    return {case_id: _changed(changes) for case_id, changes in VALID_OBJECTIVES.items()}


@pytest.mark.parametrize("case_id", sorted(_objective_manifests()))
def test_dpo_stages_and_chains_are_admitted(kube: Kube, crd: Any, namespace: str, case_id: str) -> None:
    assert dry_run_create(kube, namespace, _objective_manifests()[case_id]) is None


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize(("what", "fields"), [
    ("finetunejob.spec.dpo", ("beta", "loss", "referenceFree", "precomputeReference", "sigmoid", "ipo",
                              "Defaults to 0.1", "second copy of the weights")),
    ("finetunejob.spec.baseModel", ("uri", "fromJob", "WaitingForBaseJob", "Exactly one of uri and fromJob")),
    ("finetunejob.spec.objective", ("sft", "dpo", "Defaults to sft")),
    ("finetunejob.status.baseJob", ("modelUri", "adapters", "chain", "parameters")),
    ("finetunejob.status.preflight", ("pairs", "tokensPerPair", "lengthBias")),
])
def test_kubectl_explain_teaches_the_dpo_and_chain_fields(kubeconfig: str, crd: Any, what: str,
                                                          fields: tuple[str, ...]) -> None:
    text = kubectl_explain(kubeconfig, what)
    flowed = " ".join(text.split())  # kubectl wraps descriptions at 80 columns
    for field in fields:
        assert field in flowed, f"kubectl explain {what} does not show {field}:\n{text}"
