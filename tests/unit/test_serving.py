"""The serving plan and manifests (`finetune_operator.serving`): goldens, schemas, security.

Each case renders the serving plan and both files written under `<output.uri>/serving/` and compares them with
`tests/unit/golden/serving/<case>.yaml`. After an intended change, regenerate and review the diff:

    UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/unit/test_serving.py

The vLLM Deployment and Service are validated against Kubernetes' OpenAPI schemas (kubernetes-validate, strict)
and the Pod Security Standards "restricted" profile; the LLMInferenceService against KServe's CRD schema
(`tests/e2e/fixtures/llminferenceservice-crd.yaml`): types with jsonschema, and no field the schema does not
name (the API server would prune it silently), with its `spec.template` checked as a core/v1 PodSpec.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from finetune_operator import serving
from finetune_operator.spec import FineTuneJob, ServingPlan
from tests.unit.test_render import K8S_VERSIONS, pss_restricted_violations

GOLDEN = Path(__file__).parent / "golden" / "serving"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"
CRD = Path(__file__).resolve().parents[1] / "e2e" / "fixtures" / "llminferenceservice-crd.yaml"
TRAINER_IMAGE = "ghcr.io/finetune-dev/trainer:0.9.0"


def job(name: str, spec: dict[str, Any]) -> FineTuneJob:
    return FineTuneJob.model_validate({
        "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": "ml-team"},
        "spec": {"dataset": {"train": "s3://healthcare-data/train.jsonl"}, **spec},
    })


#: case -> (FineTuneJob, resolved method)
CASES: dict[str, tuple[FineTuneJob, str]] = {
    # LoRA on a hub model: vLLM loads the base itself (HF token), the adapter is fetched from S3.
    "lora-hf": (job("healthcare-assistant", {
        "baseModel": {"uri": "hf://meta-llama/Llama-2-7b-hf", "revision": "01c7f73d", "secretRef": {"name": "hf-token"}},
        "method": "lora",
        "output": {"uri": "s3://finetune-artifacts/run/", "secretRef": {"name": "s3-credentials"}},
        "serving": {},
    }), "lora"),
    # A rank-64 adapter on an S3 base, named names, a higher maxRank, AMD GPUs, IRSA: both fetched.
    "lora-s3-named": (job("claims-coder", {
        "baseModel": {"uri": "s3://models/llama-3-8b/"},
        "method": "lora",
        "lora": {"r": 64, "targetModules": ["all-linear"]},
        "resources": {"gpuResourceName": "amd.com/gpu"},
        "serviceAccountName": "finetune-irsa",
        "output": {"uri": "s3://finetune-artifacts/claims/"},
        "serving": {"baseModelName": "llama-3-8b", "adapterName": "claims", "maxRank": 128, "apply": True},
    }), "lora"),
    # QLoRA merged: the merged model is served (no adapter) on two GPUs, on tainted GPU nodes.
    "qlora-merged": (job("support-bot", {
        "baseModel": {"uri": "hf://mistralai/Mistral-7B-v0.1"},
        "method": "qlora",
        "resources": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                      "nodeSelector": {"gpu-class": "l40s"}},
        "output": {"uri": "s3://finetune-artifacts/support/", "saveMerged": True},
        "serving": {"gpus": 2, "image": "vllm/vllm-openai:v0.10.2"},
    }), "qlora"),
    # Full fine-tuning on a PVC: the weights are mounted read-only, nothing is fetched.
    "full-pvc": (job("legal-full", {
        "baseModel": {"uri": "pvc://models/llama-2-7b", "parameters": "7B"},
        "method": "full",
        "output": {"uri": "pvc://results/legal/"},
        "serving": {"baseModelName": "legal-7b"},
    }), "full"),
}


def plan_of(case: str) -> tuple[FineTuneJob, ServingPlan]:
    ftj, method = CASES[case]
    plan = serving.serving_plan(ftj, method)  # type: ignore[arg-type]
    assert plan is not None
    return ftj, plan


def files(case: str) -> dict[str, str]:
    ftj, plan = plan_of(case)
    return serving.manifest_files(ftj, plan, TRAINER_IMAGE)


def llmisvc(case: str) -> dict[str, Any]:
    return yaml.safe_load(files(case)[serving.LLMISVC_FILE])


def vllm(case: str) -> list[dict[str, Any]]:
    return list(yaml.safe_load_all(files(case)[serving.VLLM_FILE]))


def crd_schema() -> dict[str, Any]:
    (version,) = yaml.safe_load(CRD.read_text())["spec"]["versions"]
    return dict(version["schema"]["openAPIV3Schema"])


def unknown_fields(obj: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Paths in `obj` that `schema` does not name: the API server prunes those silently (structural schemas),
    so a manifest using one would lose it. Subtrees under x-kubernetes-preserve-unknown-fields are accepted,
    but fields the schema does spell out there are still followed."""
    found: list[str] = []
    if isinstance(obj, dict):
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, value in obj.items():
            where = f"{path}.{key}"
            if properties is not None and key in properties:
                found += unknown_fields(value, properties[key], where)
            elif isinstance(extra, dict):
                found += unknown_fields(value, extra, where)
            elif not schema.get("x-kubernetes-preserve-unknown-fields") and path != ".metadata":
                found.append(where)
    elif isinstance(obj, list) and "items" in schema:
        for index, item in enumerate(obj):
            found += unknown_fields(item, schema["items"], f"{path}[{index}]")
    return found


# ------------------------------------------------------------------------------------------------ plan


def test_plan_per_method() -> None:
    lora = plan_of("lora-hf")[1]
    assert lora.model_dump() == {
        "base_model_name": "meta-llama/Llama-2-7b-hf",
        "model_uri": "hf://meta-llama/Llama-2-7b-hf",
        "adapter_name": "healthcare-assistant",
        "adapter_uri": "s3://finetune-artifacts/run/model/",
        "max_rank": 16,
        "manifests": ["s3://finetune-artifacts/run/serving/llminferenceservice.yaml",
                      "s3://finetune-artifacts/run/serving/vllm.yaml"],
        "apply": False,
    }
    named = plan_of("lora-s3-named")[1]
    assert (named.base_model_name, named.adapter_name, named.max_rank, named.apply) == ("llama-3-8b", "claims", 128, True)
    merged = plan_of("qlora-merged")[1]
    assert (merged.model_uri, merged.adapter_name, merged.adapter_uri, merged.max_rank) == (
        "s3://finetune-artifacts/support/merged/", None, None, None)
    full = plan_of("full-pvc")[1]
    assert (full.model_uri, full.adapter_name, full.base_model_name) == ("pvc://results/legal/model/", None, "legal-7b")


@pytest.mark.parametrize(("r", "expected"), [(1, 1), (8, 8), (12, 16), (16, 16), (17, 32), (300, 320), (512, 512)])
def test_default_max_rank_is_the_smallest_vllm_rank_at_least_r(r: int, expected: int) -> None:
    ftj = job("x", {"baseModel": {"uri": "hf://org/model-7b"}, "method": "lora", "lora": {"r": r},
                    "output": {"uri": "s3://out-bucket/x/"}, "serving": {}})
    plan = serving.serving_plan(ftj, "lora")
    assert plan is not None and plan.max_rank == expected


def test_no_plan_without_serving_and_none_for_virtual_tokens() -> None:
    ftj = job("x", {"baseModel": {"uri": "hf://org/model-7b"}, "method": "prefix", "output": {"uri": "s3://out-bucket/x/"}})
    assert serving.serving_plan(ftj, "prefix") is None
    ftj = job("x", {"baseModel": {"uri": "hf://org/model-7b"}, "output": {"uri": "s3://out-bucket/x/"}, "serving": {}})
    with pytest.raises(ValueError, match=r"spec\.serving cannot serve method prompt"):
        serving.serving_plan(ftj, "prompt")


# ------------------------------------------------------------------------------------------------ goldens


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str) -> None:
    _, plan = plan_of(case)
    text = yaml.safe_dump({"plan": plan.wire()}, sort_keys=False) + "".join(
        f"# ----- {key}\n{body}" for key, body in files(case).items())
    path = GOLDEN / f"{case}.yaml"
    if UPDATE:
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"no golden file {path}; create it with UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{case} differs from {path.name}; if intended, rerun with UPDATE_GOLDEN=1"


@pytest.mark.parametrize("case", sorted(CASES))
def test_deterministic_and_without_owner(case: str) -> None:
    assert files(case) == files(case)
    for obj in [llmisvc(case), *vllm(case)]:
        assert "ownerReferences" not in obj["metadata"]  # the files are for people; the operator adds its own
        assert obj["metadata"]["namespace"] == "ml-team"


# ------------------------------------------------------------------------------------------------ KServe


@pytest.mark.parametrize("case", sorted(CASES))
def test_llm_inference_service_fits_kserve_schema(case: str) -> None:
    obj = llmisvc(case)
    schema = crd_schema()
    jsonschema.validate(obj, schema)
    assert unknown_fields(obj, schema) == []
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": obj["spec"]["template"]}
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(json.loads(json.dumps(pod)), version, strict=True)


def test_schema_checks_catch_mistakes() -> None:
    """The checks above must fail on what they are meant to catch: a misspelt field, a wrong type."""
    obj = llmisvc("lora-hf")
    schema = crd_schema()
    typo = copy.deepcopy(obj)
    typo["spec"]["model"]["lora"]["maxLoraRank"] = 16
    assert unknown_fields(typo, schema) == [".spec.model.lora.maxLoraRank"]
    wrong = copy.deepcopy(obj)
    wrong["spec"]["model"]["lora"]["maxRank"] = "16"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(wrong, schema)
    missing = copy.deepcopy(obj)
    del missing["spec"]["model"]["uri"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(missing, schema)


def test_llm_inference_service_content() -> None:
    obj = llmisvc("lora-s3-named")
    assert obj["apiVersion"] == "serving.kserve.io/v1alpha1" and obj["kind"] == "LLMInferenceService"
    assert obj["metadata"]["name"] == "claims-coder"
    assert obj["spec"]["model"] == {
        "uri": "s3://models/llama-3-8b/", "name": "llama-3-8b",
        "lora": {"adapters": [{"name": "claims", "uri": "s3://finetune-artifacts/claims/model/"}], "maxRank": 128},
    }
    template = obj["spec"]["template"]
    assert template["containers"] == [{"name": "main", "resources": {"limits": {"amd.com/gpu": "1"},
                                                                      "requests": {"amd.com/gpu": "1"}}}]
    assert template["serviceAccountName"] == "finetune-irsa"
    merged = llmisvc("qlora-merged")
    assert merged["spec"]["model"] == {"uri": "s3://finetune-artifacts/support/merged/", "name": "mistralai/Mistral-7B-v0.1"}
    assert merged["spec"]["parallelism"] == {"tensor": 2}


# ------------------------------------------------------------------------------------------------ vLLM


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_vllm_objects_are_valid_kubernetes(case: str, version: str) -> None:
    objects = vllm(case)
    assert [o["kind"] for o in objects] == ["Deployment", "Service"]
    for obj in objects:
        kubernetes_validate.validate(json.loads(json.dumps(obj)), version, strict=True)


@pytest.mark.parametrize("case", sorted(CASES))
def test_vllm_pod_is_restricted_and_served(case: str) -> None:
    deployment, service = vllm(case)
    pod = deployment["spec"]["template"]
    assert pss_restricted_violations(pod["spec"]) == []
    # The Service reaches the pods, and only them (the training pods have component trainer).
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == "serving"
    (container,) = pod["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    ftj, _ = plan_of(case)
    assert ftj.spec.serving is not None and container["image"] == ftj.spec.serving.image


def args_of(case: str) -> list[str]:
    return list(vllm(case)[0]["spec"]["template"]["spec"]["containers"][0]["args"])


def test_vllm_arguments() -> None:
    assert args_of("lora-hf") == [
        "--model", "meta-llama/Llama-2-7b-hf", "--revision", "01c7f73d",
        "--served-model-name", "meta-llama/Llama-2-7b-hf", "--port", "8000",
        "--enable-lora", "--lora-modules", "healthcare-assistant=/models/adapter", "--max-lora-rank", "16",
    ]
    assert args_of("lora-s3-named") == [
        "--model", "/models/model", "--served-model-name", "llama-3-8b", "--port", "8000",
        "--enable-lora", "--lora-modules", "claims=/models/adapter", "--max-lora-rank", "128",
    ]
    assert args_of("qlora-merged") == [
        "--model", "/models/model", "--served-model-name", "mistralai/Mistral-7B-v0.1", "--port", "8000",
        "--tensor-parallel-size", "2",
    ]
    assert args_of("full-pvc") == ["--model", "/mnt/pvc/results/legal/model", "--served-model-name", "legal-7b",
                                   "--port", "8000"]


def test_vllm_fetches_from_s3_with_the_trainer_image_and_mounts_pvcs() -> None:
    pod = vllm("lora-hf")[0]["spec"]["template"]["spec"]
    (fetch,) = pod["initContainers"]
    assert fetch["image"] == TRAINER_IMAGE
    assert fetch["command"] == ["python", "-m", "finetune_trainer.fetch", "s3://finetune-artifacts/run/model/",
                                "/models/adapter"]
    assert fetch["envFrom"] == [{"secretRef": {"name": "hf-token"}}, {"secretRef": {"name": "s3-credentials"}}]
    assert pod["containers"][0]["envFrom"] == [{"secretRef": {"name": "hf-token"}}]  # vLLM downloads the base
    named = vllm("lora-s3-named")[0]["spec"]["template"]["spec"]
    assert [c["command"][3:] for c in named["initContainers"]] == [
        ["s3://models/llama-3-8b/", "/models/model"], ["s3://finetune-artifacts/claims/model/", "/models/adapter"]]
    assert named["serviceAccountName"] == "finetune-irsa"
    assert named["containers"][0]["resources"]["limits"] == {"amd.com/gpu": "1"}
    pvc = vllm("full-pvc")[0]["spec"]["template"]["spec"]
    assert "initContainers" not in pvc
    assert {"name": "pvc-0", "persistentVolumeClaim": {"claimName": "results", "readOnly": True}} in pvc["volumes"]
    merged = vllm("qlora-merged")[0]["spec"]["template"]["spec"]
    assert merged["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert merged["nodeSelector"] == {"gpu-class": "l40s"}
    assert merged["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "2"}


def test_manifest_keys_and_artifact_kinds() -> None:
    assert set(files("lora-hf")) == {"serving/llminferenceservice.yaml", "serving/vllm.yaml"}
    assert set(serving.ARTIFACT_KINDS.values()) == set(files("lora-hf"))
    assert plan_of("lora-hf")[1].manifests == [f"s3://finetune-artifacts/run/{key}" for key in serving.ARTIFACT_KINDS.values()]


# ------------------------------------------------------------------------------------------------ vLLM's LoRA modules


def adapter_job(targets: list[str], **spec: Any) -> FineTuneJob:
    return job("x", {"baseModel": {"uri": "hf://org/model-7b"}, "method": "lora", "lora": {"targetModules": targets},
                     "output": {"uri": "s3://out-bucket/x/", **spec.pop("output", {})}, "serving": {}, **spec})


@pytest.mark.parametrize(("model_type", "targets", "field", "fragments"), [
    ("llama", ["q_proj", "k_proj", "v_proj", "o_proj"], None, []),
    ("llama", ["all-linear"], None, []),
    ("mistral", ["gate_proj", "up_proj", "down_proj", "lm_head"], None, []),
    ("qwen2", ["model.layers.0.self_attn.q_proj"], None, []),  # peft matches the last part
    ("llama", ["q_proj", "c_attn", "fc1"], "spec.lora.targetModules",
     ["spec.lora.targetModules ['c_attn', 'fc1']", "'llama'", "spec.output.saveMerged: true"]),
    ("qwen2", ["q_proj", "embed_tokens"], "spec.lora.targetModules", ["['embed_tokens']", "'qwen2'"]),
    ("gemma2", ["lm_head"], "spec.lora.targetModules", ["['lm_head']"]),
    ("phi3", ["q_proj", "v_proj"], "spec.lora.targetModules", ["['q_proj', 'v_proj']", "qkv_proj"]),
    ("phi3", ["qkv_proj", "o_proj"], None, []),
    ("gpt_neox", ["query_key_value"], "spec.serving", ["model type 'gpt_neox'", "saveMerged"]),
    (None, ["q_proj"], "spec.serving", ["model type None"]),
])
def test_target_modules_vllm_loads(model_type: str | None, targets: list[str], field: str | None,
                                   fragments: list[str]) -> None:
    problem = serving.target_module_problem(adapter_job(targets).spec, "lora", model_type)
    if field is None:
        assert problem is None
        return
    assert problem is not None and problem[0] == field
    for fragment in fragments:
        assert fragment in problem[1], problem[1]


def test_no_check_where_vllm_loads_no_adapter() -> None:
    odd = ["c_attn"]
    assert serving.target_module_problem(adapter_job(odd, output={"saveMerged": True}).spec, "lora", "llama") is None
    assert serving.target_module_problem(adapter_job(odd).spec, "full", "llama") is None
    no_serving = adapter_job(odd)
    no_serving.spec.serving = None
    assert serving.target_module_problem(no_serving.spec, "qlora", "gpt_neox") is None
    assert serving.target_module_problem(adapter_job(odd).spec, "qlora", "llama") is not None


def test_the_default_target_modules_load_everywhere_but_phi3() -> None:
    """spec.lora's default (the attention projections) serves on every listed architecture but Phi-3, whose
    Hugging Face model fuses q/k/v into qkv_proj (peft would not find q_proj there either)."""
    assert set(serving.VLLM_LORA_MODULES) >= {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"}
    default = job("x", {"baseModel": {"uri": "hf://org/model-7b"}, "method": "lora",
                        "output": {"uri": "s3://out-bucket/x/"}, "serving": {}}).spec
    refused = {t for t in serving.VLLM_LORA_MODULES if serving.target_module_problem(default, "lora", t)}
    assert refused == {"phi3"}
