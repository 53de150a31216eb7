"""Golden and property tests of the child renderers (`finetune_operator.render`).

Every case renders the ConfigMap, Service and Job of a FineTuneJob and compares them with
`tests/unit/golden/<case>.yaml`. After an intended change of the renderers, regenerate the goldens and
review the diff:

    UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/unit/test_render.py

Every rendered object is also validated against the Kubernetes OpenAPI schemas shipped by
`kubernetes-validate` (strict: unknown fields fail) and checked against the Pod Security Standards
"restricted" profile.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from finetune_operator import contract, render
from finetune_operator.settings import OperatorSettings, SettingsError
from finetune_operator.sizing import plan
from finetune_operator.spec import MAX_NAME_LENGTH, FineTuneJob

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"
#: Oldest and newest Kubernetes minor versions the rendered objects must be valid for.
K8S_VERSIONS = ["1.30", "1.37"]

UID = "5f0c3c4e-8d2a-4b7e-9a61-2b1d8c0e7f10"


def manifest(name: str, spec: dict[str, Any], **meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": "ml-team", "uid": UID, "generation": 1, **meta},
        "spec": spec,
    }


S3_OUT = {"uri": "s3://finetune-artifacts/run/", "secretRef": {"name": "s3-credentials"}}

#: case name -> (FineTuneJob manifest, operator environment)
CASES: dict[str, tuple[dict[str, Any], dict[str, str]]] = {
    # 7B LoRA: 1x24GiB, one pod, model from the hub with an HF token, data and output in S3.
    "lora-7b": (
        manifest(
            "healthcare-assistant",
            {
                "baseModel": {"uri": "hf://meta-llama/Llama-2-7b-hf", "secretRef": {"name": "hf-token"}},
                "method": "lora",
                "dataset": {"train": "s3://healthcare-data/train.jsonl", "secretRef": {"name": "s3-credentials"}},
                "output": S3_OUT,
            },
        ),
        {},
    ),
    # 7B QLoRA: 1x12GiB; operator-wide S3 endpoint, region and default secret (no secretRef in the spec).
    "qlora-7b": (
        manifest(
            "qlora-small",
            {
                "baseModel": {"uri": "hf://meta-llama/Llama-2-7b-hf"},
                "method": "qlora",
                "dataset": {"train": "s3://data/train.jsonl"},
                "output": {"uri": "s3://finetune-artifacts/qlora-small/"},
            },
        ),
        {"FT_S3_ENDPOINT": "http://seaweedfs.storage:8333", "FT_S3_REGION": "us-east-1", "FT_S3_SECRET": "s3-default"},
    ),
    # 7B full: 4x24GiB, one pod with four GPUs.
    "full-7b": (
        manifest(
            "mistral-full",
            {
                "baseModel": {"uri": "s3://models/mistral/Mistral-7B-v0.1/"},
                "method": "full",
                "dataset": {"train": "s3://data/train.jsonl"},
                "output": S3_OUT,
                "backoffLimit": 5,
            },
        ),
        {},
    ),
    # 70B full: 16x48GiB -> an Indexed Job of 2 pods with 8 GPUs each.
    "full-70b-multinode": (
        manifest(
            "llama2-70b-full",
            {
                "baseModel": {"uri": "hf://meta-llama/Llama-2-70b-hf"},
                "method": "full",
                "dataset": {"train": "s3://training-data/train.jsonl", "validationSplit": 0.05},
                "output": S3_OUT,
                "resources": {
                    "gpusPerNode": 8,
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                },
                "activeDeadlineSeconds": 259200,
            },
        ),
        {"FT_TRAINER_IMAGE": "registry.example.com/ml/finetune-trainer:0.1.0", "FT_JOB_TTL_SECONDS": "3600"},
    ),
    # Queued through Kueue, with placement constraints and a priority class.
    "kueue": (
        manifest(
            "queued-lora",
            {
                "baseModel": {"uri": "hf://meta-llama/Llama-2-13b-hf"},
                "method": "lora",
                "dataset": {"train": "s3://data/train.jsonl"},
                "output": S3_OUT,
                "resources": {
                    "priorityClassName": "training-low",
                    "nodeSelector": {"cloud.google.com/gke-accelerator": "nvidia-l4", "topology.kubernetes.io/zone": "us-central1-a"},
                    "tolerations": [{"key": "spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"}],
                    "cpu": "12",
                    "memory": "96Gi",
                },
            },
            labels={"kueue.x-k8s.io/queue-name": "team-a", "kueue.x-k8s.io/priority-class": "low", "team": "a"},
        ),
        {},
    ),
    # IRSA: the service account carries the AWS role; the operator's default secret must not shadow it.
    "irsa": (
        manifest(
            "irsa-lora",
            {
                "baseModel": {"uri": "s3://models/llama/Llama-2-7b-hf/"},
                "method": "lora",
                "dataset": {"train": "s3://data/train.jsonl"},
                "output": {"uri": "s3://finetune-artifacts/irsa/"},
                "serviceAccountName": "finetune-trainer",
                "suspend": True,
            },
        ),
        {"FT_S3_SECRET": "s3-default", "FT_S3_REGION": "eu-west-1"},
    ),
    # Everything on PersistentVolumeClaims: model and data read-only, output writable.
    "pvc-model": (
        manifest(
            "pvc-qlora",
            {
                "baseModel": {"uri": "pvc://models/llama-2-13b", "parameters": "13B"},
                "method": "qlora",
                "dataset": {"train": "pvc://datasets/legal/train.jsonl", "validation": "pvc://datasets/legal/val.jsonl"},
                "output": {"uri": "pvc://artifacts/pvc-qlora"},
                "evaluation": {"glossary": "pvc://datasets/legal/glossary.txt"},
                "image": "registry.example.com/ml/trainer@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            },
        ),
        {"FT_IMAGE_PULL_POLICY": "Always"},
    ),
    # CPU mode (FT_USE_GPUS=false): the same world without GPUs, as the e2e suite runs it on kind.
    "cpu-mode": (
        manifest(
            "tiny-cpu",
            {
                "baseModel": {"uri": "file:///opt/models/tiny-llama", "parameters": "5M"},
                "method": "lora",
                "dataset": {"train": "s3://data/train.jsonl"},
                "output": S3_OUT,
                "resources": {"gpus": 2, "gpusPerNode": 1},
            },
        ),
        {
            "FT_USE_GPUS": "false",
            "FT_CPU_PROCS_PER_NODE": "2",
            "FT_CPU_PER_PROCESS": "500m",
            "FT_MEMORY_PER_PROCESS": "2Gi",
            "FT_S3_ENDPOINT": "http://127.0.0.1:8333",
        },
    ),
}


def load(case: str) -> tuple[FineTuneJob, OperatorSettings]:
    data, env = CASES[case]
    return FineTuneJob.model_validate(copy.deepcopy(data)), OperatorSettings.from_env(env)


def rendered(case: str) -> list[dict[str, Any]]:
    job, settings = load(case)
    return render.render_children(job, plan(job.spec), settings)


def dump(objects: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(objects, sort_keys=False, default_flow_style=False, width=110)


def pod_spec(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return kind(objects, "Job")["spec"]["template"]["spec"]


def kind(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == name]
    return found


def env_of(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in pod_spec(objects)["containers"][0]["env"]}


# ------------------------------------------------------------------------------------------------
# Pod Security Standards "restricted" (https://kubernetes.io/docs/concepts/security/pod-security-standards/)
# ------------------------------------------------------------------------------------------------

PSS_ALLOWED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def pss_restricted_violations(spec: dict[str, Any]) -> list[str]:
    """Violations of the "restricted" profile (baseline checks included) in a pod spec."""
    problems: list[str] = []
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(host):
            problems.append(f"{host} is true")
    pod_sc = spec.get("securityContext", {})
    for volume in spec.get("volumes", []):
        types = set(volume) - {"name"}
        if not types <= PSS_ALLOWED_VOLUMES:
            problems.append(f"volume {volume['name']} has a disallowed type {sorted(types - PSS_ALLOWED_VOLUMES)}")
    for sysctl in pod_sc.get("sysctls", []):
        problems.append(f"sysctl {sysctl['name']} set")
    containers = spec.get("initContainers", []) + spec.get("containers", []) + spec.get("ephemeralContainers", [])
    for c in containers:
        sc = c.get("securityContext", {})
        where = f"container {c['name']}"
        if sc.get("privileged"):
            problems.append(f"{where} is privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation must be false")
        if not (sc.get("runAsNonRoot") is True or (pod_sc.get("runAsNonRoot") is True and sc.get("runAsNonRoot") is not False)):
            problems.append(f"{where}: runAsNonRoot must be true")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            problems.append(f"{where}: runAsUser is 0")
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{where}: seccompProfile must be RuntimeDefault or Localhost, not {seccomp}")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            problems.append(f"{where}: capabilities must drop ALL")
        added = set(caps.get("add", [])) - {"NET_BIND_SERVICE"}
        if added:
            problems.append(f"{where}: adds capabilities {sorted(added)}")
        if sc.get("procMount", "Default") != "Default":
            problems.append(f"{where}: procMount is not Default")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            problems.append(f"{where}: uses a hostPort")
        if sc.get("seLinuxOptions", {}).get("user") or sc.get("seLinuxOptions", {}).get("role"):
            problems.append(f"{where}: sets seLinuxOptions user or role")
        if sc.get("appArmorProfile", {}).get("type") == "Unconfined":
            problems.append(f"{where}: AppArmor Unconfined")
    return problems


def test_pss_checker_catches_violations() -> None:
    """The checker itself must fail on the things it is meant to catch."""
    spec = copy.deepcopy(pod_spec(rendered("lora-7b")))
    assert pss_restricted_violations(spec) == []
    bad = copy.deepcopy(spec)
    bad["hostNetwork"] = True
    bad["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    c = bad["containers"][0]["securityContext"]
    c["allowPrivilegeEscalation"] = True
    c["capabilities"] = {"drop": [], "add": ["SYS_ADMIN", "NET_BIND_SERVICE"]}
    c["seccompProfile"] = {"type": "Unconfined"}
    c["privileged"] = True
    c["runAsNonRoot"] = False
    problems = "\n".join(pss_restricted_violations(bad))
    for expected in (
        "hostNetwork",
        "disallowed type ['hostPath']",
        "allowPrivilegeEscalation",
        "drop ALL",
        "SYS_ADMIN",
        "Unconfined",
        "privileged",
        "runAsNonRoot",
    ):
        assert expected in problems
    assert "NET_BIND_SERVICE" not in problems


# ------------------------------------------------------------------------------------------------
# Goldens, schemas, security
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str) -> None:
    text = dump(rendered(case))
    path = GOLDEN / f"{case}.yaml"
    if UPDATE:
        path.write_text(text)
    assert path.exists(), f"no golden file {path}; create it with UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{case} differs from {path.name}; if intended, rerun with UPDATE_GOLDEN=1"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_valid_kubernetes_objects(case: str, version: str) -> None:
    for obj in rendered(case):
        # A JSON round trip: what is sent to the API server (and what yaml.safe_dump writes).
        kubernetes_validate.validate(json.loads(json.dumps(obj)), version, strict=True)


def test_schema_validation_rejects_a_broken_job() -> None:
    """The schema check is not vacuous: an unknown field and a wrong type are caught."""
    job = kind(rendered("lora-7b"), "Job")
    typo = copy.deepcopy(job)
    typo["spec"]["template"]["spec"]["containers"][0]["evnFrom"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, K8S_VERSIONS[0], strict=True)
    wrong = copy.deepcopy(job)
    wrong["spec"]["completions"] = "2"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong, K8S_VERSIONS[0], strict=True)


@pytest.mark.parametrize("case", sorted(CASES))
def test_pod_security_restricted(case: str) -> None:
    assert pss_restricted_violations(pod_spec(rendered(case))) == []


@pytest.mark.parametrize("case", sorted(CASES))
def test_deterministic(case: str) -> None:
    assert rendered(case) == rendered(case)
    assert dump(rendered(case)) == dump(rendered(case))


@pytest.mark.parametrize("case", sorted(CASES))
def test_owner_references_and_labels(case: str) -> None:
    job, _ = load(case)
    for obj in rendered(case):
        (owner,) = obj["metadata"]["ownerReferences"]
        assert owner == {
            "apiVersion": "finetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "name": job.metadata.name,
            "uid": UID,
            "controller": True,
            "blockOwnerDeletion": True,
        }
        assert obj["metadata"]["namespace"] == "ml-team"
        assert obj["metadata"]["labels"][render.LABEL_JOB] == job.metadata.name
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "finetune-operator"


def test_plan_time_render_has_no_owner_reference() -> None:
    """`finetune plan -o yaml` renders before the object exists: no uid, so no owner reference."""
    data = copy.deepcopy(CASES["lora-7b"][0])
    del data["metadata"]["uid"]
    job = FineTuneJob.model_validate(data)
    objects = render.render_children(job, plan(job.spec), OperatorSettings())
    assert [o["kind"] for o in objects] == ["ConfigMap", "Service", "NetworkPolicy", "Job"]
    for obj in objects:
        assert "ownerReferences" not in obj["metadata"]
        kubernetes_validate.validate(obj, K8S_VERSIONS[-1], strict=True)
    with pytest.raises(ValueError, match=r"metadata\.uid"):
        render.owner_reference(job.metadata)
    assert render.owner_reference({"name": "x", "uid": "u"})["uid"] == "u"


# ------------------------------------------------------------------------------------------------
# Names
# ------------------------------------------------------------------------------------------------


def test_child_names() -> None:
    names = render.child_names("my-run")
    assert (names.config_map, names.service, names.job) == ("my-run-config", "my-run", "my-run")
    assert render.main_address("my-run", "ns") == "my-run-0.my-run.ns.svc"


def test_names_fit_at_the_longest_job_name() -> None:
    """With a 52-character name every name, label value and the highest pod host name fit in 63."""
    data = copy.deepcopy(CASES["full-70b-multinode"][0])
    data["metadata"]["name"] = "a" * (MAX_NAME_LENGTH - 1) + "z"
    data["spec"]["resources"]["gpus"] = 4096  # the most GPUs a plan may hold: 512 pods
    job = FineTuneJob.model_validate(data)
    p = plan(job.spec)
    assert p.nodes == 512
    objects = render.render_children(job, p, OperatorSettings())
    for obj in objects:
        assert len(obj["metadata"]["name"]) <= 63
        assert all(len(v) <= 63 for v in obj["metadata"]["labels"].values())
    spec = pod_spec(objects)
    highest_host = f"{kind(objects, 'Job')['metadata']['name']}-{p.nodes - 1}"
    assert len(highest_host) <= 63
    assert len(f"{highest_host}.{spec['subdomain']}") <= 253
    assert all(len(v["name"]) <= 63 for v in spec["volumes"])


def test_child_names_reject_too_long_names() -> None:
    with pytest.raises(AssertionError, match="longer than 63"):
        render.child_names("a" * 60)


# ------------------------------------------------------------------------------------------------
# The Job: world, resources, placement, failure policy
# ------------------------------------------------------------------------------------------------


def test_multinode_world() -> None:
    objects = rendered("full-70b-multinode")
    job = kind(objects, "Job")
    service = kind(objects, "Service")
    spec = pod_spec(objects)
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    assert spec["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    env = env_of(objects)
    assert env[contract.ENV_NUM_MACHINES] == "2"
    assert env[contract.ENV_PROCS_PER_MACHINE] == "8"
    assert env[contract.ENV_MAIN_ADDRESS] == "llama2-70b-full-0.llama2-70b-full.ml-team.svc"
    assert env[contract.ENV_MAIN_PORT] == "29500"
    assert env[contract.ENV_MACHINE_RANK] == {
        "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
    }
    assert env[contract.ENV_CONFIG] == contract.CONFIG_PATH
    assert env[contract.ENV_OUTPUT_URI] == "s3://finetune-artifacts/run/"
    container = spec["containers"][0]
    assert container["command"] == ["python", "-m", "finetune_trainer.launch"]
    assert "args" not in container
    # Memory limit: twice the request (FT_MEMORY_LIMIT_FACTOR); disk: /tmp's 8Gi + 70B bf16 weights (131 GiB).
    assert container["resources"]["limits"] == {"memory": "512Gi", "nvidia.com/gpu": "8"}
    assert container["resources"]["requests"] == {"cpu": "32", "memory": "256Gi", "ephemeral-storage": "139Gi",
                                                  "nvidia.com/gpu": "8"}
    assert container["image"] == "registry.example.com/ml/finetune-trainer:0.1.0"
    assert job["spec"]["ttlSecondsAfterFinished"] == 3600
    assert job["spec"]["activeDeadlineSeconds"] == 259200
    # The spec's own nvidia.com/gpu toleration is not duplicated.
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def test_config_map_is_the_contract_snapshot() -> None:
    objects = rendered("lora-7b")
    job, settings = load("lora-7b")
    data = kind(objects, "ConfigMap")["data"]
    assert list(data) == [contract.CONFIG_KEY]
    snapshot = contract.TrainerConfig.model_validate_json(data[contract.CONFIG_KEY])
    assert snapshot.name == "healthcare-assistant"
    assert snapshot.uid == UID
    assert snapshot.method == "lora" and snapshot.plan == plan(job.spec)
    assert snapshot.image == settings.trainer_image
    spec = pod_spec(objects)
    (config_volume,) = [v for v in spec["volumes"] if "configMap" in v]
    assert config_volume["configMap"]["name"] == kind(objects, "ConfigMap")["metadata"]["name"]
    (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == config_volume["name"]]
    key_path = config_volume["configMap"]["items"][0]["path"]
    assert f"{mount['mountPath']}/{key_path}" == contract.CONFIG_PATH
    assert mount["readOnly"] is True


def test_pod_failure_policy() -> None:
    job = kind(rendered("lora-7b"), "Job")
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
    (fail,) = [r for r in rules if r["action"] == "FailJob"]
    assert fail["onExitCodes"] == {
        "containerName": "trainer",
        "operator": "In",
        "values": [contract.EXIT_CONFIG_ERROR, contract.EXIT_GATES_FAILED],
    }
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert job["spec"]["backoffLimit"] == 3
    assert kind(rendered("full-7b"), "Job")["spec"]["backoffLimit"] == 5


def test_backoff_limit_counts_failed_attempts_of_the_whole_group() -> None:
    # One failed pod of a multi-node job fails its peers too: the Job's limit is spec.backoffLimit x nodes.
    job = kind(rendered("full-70b-multinode"), "Job")
    assert job["spec"]["parallelism"] == 2
    assert job["spec"]["backoffLimit"] == 2 * CASES["full-70b-multinode"][0]["spec"].get("backoffLimit", 3)


# Node labels as NVIDIA GPU feature discovery publishes them (MiB per GPU).
GFD_MEMORY = {
    "Tesla-T4 (16GB)": 15360,
    "A10G (24GB)": 23028,
    "L4 (24GB)": 23034,
    "RTX-A4500 (20GB)": 20480,
    "V100 (32GB)": 32768,
    "A100-SXM4-40GB": 40960,
    "L40S (48GB)": 46068,
    "A100-SXM4-80GB": 81920,
    "H100-PCIe (80GB)": 81559,
}


def admitted(expression: dict[str, Any], value: int) -> bool:
    assert expression["operator"] == "Gt"
    (bound,) = expression["values"]
    return value > int(bound)


@pytest.mark.parametrize(
    ("case", "gib", "expected"),
    [
        ("qlora-7b", 12, {"Tesla-T4 (16GB)", "A10G (24GB)", "L4 (24GB)", "RTX-A4500 (20GB)", "V100 (32GB)", "A100-SXM4-40GB", "L40S (48GB)", "A100-SXM4-80GB", "H100-PCIe (80GB)"}),
        ("lora-7b", 24, {"A10G (24GB)", "L4 (24GB)", "V100 (32GB)", "A100-SXM4-40GB", "L40S (48GB)", "A100-SXM4-80GB", "H100-PCIe (80GB)"}),
        ("full-70b-multinode", 48, {"L40S (48GB)", "A100-SXM4-80GB", "H100-PCIe (80GB)"}),
    ],
)
def test_gpu_memory_affinity(case: str, gib: int, expected: set[str]) -> None:
    """Real GPUs of the plan's class are admitted although they report less than the marketing size;
    the next smaller class is not."""
    job, _ = load(case)
    assert plan(job.spec).gpu_memory_gib == gib
    terms = pod_spec(rendered(case))["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    (term,) = terms["nodeSelectorTerms"]
    (expression,) = term["matchExpressions"]
    assert expression["key"] == "nvidia.com/gpu.memory"
    assert {gpu for gpu, mib in GFD_MEMORY.items() if admitted(expression, mib)} == expected


def test_gpu_memory_label_can_be_disabled() -> None:
    job, _ = load("lora-7b")
    settings = OperatorSettings.from_env({"FT_GPU_MEMORY_LABEL": ""})
    spec = pod_spec(render.render_children(job, plan(job.spec), settings))
    assert "affinity" not in spec
    assert spec["containers"][0]["resources"]["limits"] == {"memory": "64Gi", "nvidia.com/gpu": "1"}


def test_cpu_mode_requests_no_gpu() -> None:
    objects = rendered("cpu-mode")
    spec = pod_spec(objects)
    container = spec["containers"][0]
    # Disk: /tmp's 8Gi and the 5M model's weights, rounded up to 1Gi.
    assert container["resources"] == {"requests": {"cpu": "1", "memory": "4Gi", "ephemeral-storage": "9Gi"},
                                      "limits": {"memory": "8Gi"}}
    assert "affinity" not in spec and "tolerations" not in spec
    env = env_of(objects)
    assert env[contract.ENV_PROCS_PER_MACHINE] == "2"
    assert env[contract.ENV_NUM_MACHINES] == "2"
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:8333"


def test_kueue_and_placement() -> None:
    objects = rendered("kueue")
    job = kind(objects, "Job")
    labels = job["metadata"]["labels"]
    assert labels["kueue.x-k8s.io/queue-name"] == "team-a"
    assert labels["kueue.x-k8s.io/priority-class"] == "low"
    assert "team" not in labels
    assert job["spec"]["suspend"] is True  # Kueue admits it by unsuspending
    # The other children are not Kueue workloads.
    for other in (kind(objects, "ConfigMap"), kind(objects, "Service")):
        assert "kueue.x-k8s.io/queue-name" not in other["metadata"]["labels"]
    spec = pod_spec(objects)
    assert spec["priorityClassName"] == "training-low"
    assert spec["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4", "topology.kubernetes.io/zone": "us-central1-a"}
    assert {"key": "spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"} in spec["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["containers"][0]["resources"]["requests"] == {"cpu": "12", "memory": "96Gi", "ephemeral-storage": "33Gi",
                                                              "nvidia.com/gpu": "1"}
    # Without the queue label the Job starts right away.
    assert kind(rendered("lora-7b"), "Job")["spec"]["suspend"] is False


def test_suspend_is_passed_on() -> None:
    assert kind(rendered("irsa"), "Job")["spec"]["suspend"] is True


def test_pvc_volumes() -> None:
    spec = pod_spec(rendered("pvc-model"))
    claims = {v["persistentVolumeClaim"]["claimName"]: v for v in spec["volumes"] if "persistentVolumeClaim" in v}
    assert set(claims) == {"models", "datasets", "artifacts"}
    mounts = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}
    for claim, volume in claims.items():
        mount = mounts[volume["name"]]
        assert mount["mountPath"] == f"{contract.DEFAULT_PVC_ROOT}/{claim}"
        writable = claim == "artifacts"
        assert mount["readOnly"] is not writable
        assert volume["persistentVolumeClaim"]["readOnly"] is not writable
    container = spec["containers"][0]
    assert container["imagePullPolicy"] == "Always"
    assert container["image"].startswith("registry.example.com/ml/trainer@sha256:")


def test_output_claim_shared_with_data_is_writable() -> None:
    data = copy.deepcopy(CASES["pvc-model"][0])
    data["spec"]["output"]["uri"] = "pvc://datasets/out"
    job = FineTuneJob.model_validate(data)
    (shared,) = [m for m in render.pvc_mounts(job) if m.claim == "datasets"]
    assert shared.read_only is False


# ------------------------------------------------------------------------------------------------
# Credentials
# ------------------------------------------------------------------------------------------------

CREDENTIAL_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_no_secret_values(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials only travel as Secret references; none of the operator's own secrets leak."""
    sentinel = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
    for name in CREDENTIAL_ENV:
        monkeypatch.setenv(name, sentinel)
    data, env = CASES[case]
    job = FineTuneJob.model_validate(copy.deepcopy(data))
    settings = OperatorSettings.from_env({**os.environ, **env})
    objects = render.render_children(job, plan(job.spec), settings)
    text = dump(objects)
    assert sentinel not in text
    assert all(o["kind"] != "Secret" for o in objects)
    spec = pod_spec(objects)
    container = spec["containers"][0]
    for var in container["env"]:
        assert var["name"] not in CREDENTIAL_ENV
        assert not any(word in var["name"] for word in ("SECRET", "TOKEN", "PASSWORD"))
        assert "secretKeyRef" not in var.get("valueFrom", {})
    assert all(set(source) == {"secretRef"} for source in container.get("envFrom", []))
    assert all("secret" not in v for v in spec["volumes"])
    assert spec["automountServiceAccountToken"] is False


def test_secret_references_and_precedence() -> None:
    lora = pod_spec(rendered("lora-7b"))["containers"][0]
    # One reference per Secret; the output's Secret last, so its S3 keys win over the model's.
    assert lora["envFrom"] == [{"secretRef": {"name": "hf-token"}}, {"secretRef": {"name": "s3-credentials"}}]
    qlora = pod_spec(rendered("qlora-7b"))["containers"][0]
    assert qlora["envFrom"] == [{"secretRef": {"name": "s3-default"}}]
    env = env_of(rendered("qlora-7b"))
    assert env["AWS_ENDPOINT_URL"] == "http://seaweedfs.storage:8333"
    assert env["AWS_REGION"] == env["AWS_DEFAULT_REGION"] == "us-east-1"


def test_irsa_uses_the_service_account_only() -> None:
    spec = pod_spec(rendered("irsa"))
    assert spec["serviceAccountName"] == "finetune-trainer"
    assert "envFrom" not in spec["containers"][0]  # the default secret would shadow the web identity
    assert spec["automountServiceAccountToken"] is False  # the IRSA webhook projects its own token


def test_no_default_secret_without_s3() -> None:
    job, settings = load("pvc-model")
    settings = OperatorSettings.from_env({"FT_S3_SECRET": "s3-default"})
    assert render.secret_names(job, settings) == []


# ------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------


def test_settings_defaults_and_round_trip() -> None:
    settings = OperatorSettings.from_env({})
    assert settings.trainer_image == "ghcr.io/finetune-dev/finetune-trainer:0.1.0"
    assert settings.job_ttl_seconds == 86400
    assert settings.gpu_memory_label == "nvidia.com/gpu.memory"
    assert settings.main_port == contract.DEFAULT_MAIN_PORT
    assert settings.s3_endpoint is None and settings.s3_secret is None
    custom = OperatorSettings.from_env(CASES["cpu-mode"][1] | {"FT_S3_REGION": "eu-west-1", "FT_S3_SECRET": "s"})
    assert OperatorSettings.from_env(custom.env()) == custom


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("FT_IMAGE_PULL_POLICY", "Sometimes"),
        ("FT_S3_ENDPOINT", "seaweedfs:8333"),
        ("FT_JOB_TTL_SECONDS", "-1"),
        ("FT_MAIN_PORT", "http"),
        ("FT_USE_GPUS", "maybe"),
        ("FT_CACHE_SIZE", "lots"),
        ("FT_GPU_MEMORY_TOLERANCE", "2"),
        ("FT_S3_SECRET", "Bad_Name"),
        ("FT_TRAINER_IMAGE", "image with spaces"),
    ],
)
def test_settings_errors_name_the_variable(var: str, value: str) -> None:
    with pytest.raises(SettingsError, match=var):
        OperatorSettings.from_env({var: value})


def test_config_snapshot_carries_adjustments_only_when_there_are_some() -> None:
    job, _ = load("lora-7b")
    config = contract.resolve(job, plan(job.spec), image="trainer:1")
    assert "adjustments" not in json.loads(contract.config_json(config))  # a first pod's snapshot, as before
    start = config.start_rung()
    lower = contract.MemoryRung(microBatch=max(1, start.micro_batch // 2), gradAccum=start.grad_accum * 2,
                                gradientCheckpointing=start.gradient_checkpointing)
    step_down = contract.Adjustment.model_validate({
        "step": 0, "from": start.model_dump(by_alias=True), "to": lower.model_dump(by_alias=True),
        "reason": "the training pod was OOMKilled", "by": "operator"})
    snapshot = contract.config_json(config.model_copy(update={"adjustments": [step_down]}))
    again = contract.TrainerConfig.model_validate_json(snapshot)
    assert again.adjustments == [step_down] and again.start_rung() == lower


# ------------------------------------------------------------------------------------------------
# spec.retrieval
# ------------------------------------------------------------------------------------------------


def test_retrieval_corpus_gets_its_claim_its_secret_and_the_snapshot() -> None:
    """The corpus is read like the data: its pvc:// claim mounted read-only, its secretRef projected between
    the dataset's and the output's; the config snapshot carries the block only when it is set."""
    data = copy.deepcopy(CASES["pvc-model"][0])
    data["spec"]["retrieval"] = {"corpus": "pvc://corpora/healthcare/", "topK": 2,
                                 "secretRef": {"name": "corpus-reader"}}
    job = FineTuneJob.model_validate(data)
    mounts = {m.claim: m.read_only for m in render.pvc_mounts(job)}
    assert mounts["corpora"] is True
    settings = OperatorSettings.from_env({"FT_S3_SECRET": "s3-default"})
    assert "corpus-reader" in render.secret_names(job, settings)
    snapshot = json.loads(contract.config_json(contract.resolve(job, plan(job.spec))))
    assert snapshot["spec"]["retrieval"] == {"corpus": "pvc://corpora/healthcare/", "topK": 2, "chunkTokens": 128,
                                             "distractorShare": 0.2, "secretRef": {"name": "corpus-reader"}}
    plain = FineTuneJob.model_validate(copy.deepcopy(CASES["pvc-model"][0]))
    text = contract.config_json(contract.resolve(plain, plan(plain.spec)))
    assert "retrieval" not in text and "hallucinationThreshold" not in text


# -- multi-tenant hygiene: NetworkPolicy, rendezvous id, limits, disk -------------------------------------


def test_network_policy_admits_only_the_same_stage_pods() -> None:
    job, settings = load("full-70b-multinode")
    objects = render.render_children(job, plan(job.spec), settings)
    policy = kind(objects, "NetworkPolicy")
    selector = kind(objects, "Service")["spec"]["selector"]
    pod_labels = kind(objects, "Job")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"] == {"matchLabels": selector}
    assert selector.items() <= pod_labels.items()  # it selects the training pods...
    # ...and lets in only pods with the same labels (the ranks' collectives use ports beyond the rendezvous).
    assert policy["spec"]["ingress"] == [{"from": [{"podSelector": {"matchLabels": selector}}]}]
    assert policy["spec"]["policyTypes"] == ["Ingress"]  # egress open by default
    assert [o["kind"] for o in objects].index("NetworkPolicy") < [o["kind"] for o in objects].index("Job")
    pilot_selector = render.pod_selector(job, "pilot")
    assert pilot_selector != selector, "a pilot's pods are another group: they must not reach the main stage"


def test_network_policy_egress_rules_from_settings() -> None:
    job, _ = load("lora-7b")
    rules = [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"port": 443, "protocol": "TCP"}]}]
    settings = OperatorSettings.from_env({"FT_NETWORK_POLICY_EGRESS": json.dumps(rules)})
    policy = kind(render.render_children(job, plan(job.spec), settings), "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    egress = policy["spec"]["egress"]
    assert egress[0] == {"to": [{"podSelector": {"matchLabels": render.pod_selector(job)}}]}
    assert {"port": 53, "protocol": "UDP"} in egress[1]["ports"] and egress[2:] == rules
    kubernetes_validate.validate(policy, K8S_VERSIONS[-1], strict=True)
    with pytest.raises(SettingsError, match="FT_NETWORK_POLICY_EGRESS"):
        OperatorSettings.from_env({"FT_NETWORK_POLICY_EGRESS": '{"not": "a list"}'})


def test_network_policy_can_be_turned_off() -> None:
    job, _ = load("lora-7b")
    settings = OperatorSettings.from_env({"FT_NETWORK_POLICY": "false"})
    assert [o["kind"] for o in render.render_children(job, plan(job.spec), settings)] == ["ConfigMap", "Service", "Job"]


def test_rendezvous_id_is_kept_in_the_snapshot() -> None:
    job, settings = load("lora-7b")
    objects = render.render_children(job, plan(job.spec), settings, rendezvous_id="0123abcd" * 4)
    snapshot = json.loads(kind(objects, "ConfigMap")["data"][contract.CONFIG_KEY])
    assert snapshot["rendezvousId"] == "0123abcd" * 4
    assert contract.TrainerConfig.model_validate(snapshot).rendezvous_id == "0123abcd" * 4
    plain = json.loads(kind(rendered("lora-7b"), "ConfigMap")["data"][contract.CONFIG_KEY])
    assert "rendezvousId" not in plain  # golden renders carry none: the caller draws it


@pytest.mark.parametrize("case", ["lora-7b", "cpu-mode", "full-70b-multinode"])
def test_pods_have_memory_limits_disk_requests_and_a_bounded_tmp(case: str) -> None:
    spec = pod_spec(rendered(case))
    (container,) = spec["containers"]
    res = container["resources"]
    assert res["limits"]["memory"] and res["requests"]["ephemeral-storage"].endswith("Gi")
    from finetune_operator.quantity import parse_quantity_bytes as size
    assert size(res["limits"]["memory"]) == 2 * size(res["requests"]["memory"])
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert all("sizeLimit" in v["emptyDir"] for v in volumes.values() if "emptyDir" in v), volumes
    assert volumes[render.VOLUME_TMP]["emptyDir"]["sizeLimit"] == "8Gi"


def test_memory_limit_factor_and_tmp_size_from_settings() -> None:
    job, _ = load("lora-7b")
    settings = OperatorSettings.from_env({"FT_MEMORY_LIMIT_FACTOR": "3", "FT_TMP_SIZE": "2Gi"})
    spec = pod_spec(render.render_children(job, plan(job.spec), settings))
    res = spec["containers"][0]["resources"]
    assert res["limits"]["memory"] == "96Gi"
    assert res["requests"]["ephemeral-storage"] == "16Gi"  # 2Gi + 7B x 2 bytes (13.04 GiB, rounded up)
    with pytest.raises(SettingsError, match="FT_MEMORY_LIMIT_FACTOR"):
        OperatorSettings.from_env({"FT_MEMORY_LIMIT_FACTOR": "0"})
