"""The Helm chart (`charts/finetune-operator`), rendered by Helm's own template engine.

`helm-python-sdk` embeds the Helm 4 Go SDK (no `helm` binary needed). Rendered objects are validated
against the Kubernetes schemas (`kubernetes-validate`), the RBAC rules are checked for least privilege
(and for covering what the renderers create), the operator pod for the Pod Security Standards
"restricted" profile, and the chart's values wiring against `OperatorSettings.from_env`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

import finetune_operator
from finetune_operator import handlers, metrics, render
from finetune_operator.settings import DEFAULT_TRAINER_IMAGE, OperatorSettings
from tests.unit.test_render import K8S_VERSIONS, pss_restricted_violations, rendered

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "finetune-operator"
REPO_CRD = ROOT / "crds" / "finetune.dev_finetunejobs.yaml"
RELEASE, NAMESPACE = "ft", "finetune-system"


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def objects(chart: helm.Chart, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    manifests = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE)
    docs: list[dict[str, Any]] = []
    for path, text in sorted(manifests.items()):
        if path.endswith(".txt"):
            continue
        docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


def one(docs: list[dict[str, Any]], kind: str, suffix: str = "") -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]
    return found


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (c,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def test_lint(chart: helm.Chart) -> None:
    report = helm.lint(CHART, strict=True)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []
    assert chart.metadata["appVersion"] == finetune_operator.__version__


def test_chart_crd_is_the_generated_crd(chart: helm.Chart) -> None:
    (crd,) = chart.crds
    assert crd["filename"].endswith("crds/finetune.dev_finetunejobs.yaml")
    assert crd["data"] == REPO_CRD.read_text(), "the chart's CRD differs from crds/; run `make crd`"
    kubernetes_validate.validate(yaml.safe_load(crd["data"]), K8S_VERSIONS[0], strict=True)


def test_values_match_their_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(yaml.safe_load((CHART / "values.yaml").read_text()), schema)


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"trainer": {"image": "x", "imgae": "typo"}}, "imgae"),
        ({"trainer": {"image": "x", "imagePullPolicy": "Sometimes"}}, "imagePullPolicy"),
        ({"trainer": {"image": "x", "useGpus": "yes"}}, "useGpus"),
        ({"s3": {"endpoint": "minio:9000"}}, "endpoint"),
        ({"metrics": {"port": 80}}, "port"),
        ({"podSecurityContext": {"runAsNonRoot": False}}, "runAsNonRoot"),
    ],
)
def test_schema_rejects_bad_values(chart: helm.Chart, values: dict[str, Any], complaint: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=complaint):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "everything": {
        "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/finetune"}},
        "s3": {"endpoint": "https://minio.storage:9000", "region": "us-east-1", "defaultSecret": "s3-credentials", "operatorSecret": "operator-s3"},
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
        "imagePullSecrets": [{"name": "registry"}],
        "priorityClassName": "system-cluster-critical",
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
        "extraEnv": [{"name": "KOPF_LOG_LEVEL", "value": "debug"}],
        "kopf": {"extraArgs": ["--verbose"]},
    },
    "no-metrics": {"metrics": {"enabled": False}},
}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rendered_objects_are_valid(chart: helm.Chart, variant: str, version: str) -> None:
    docs = objects(chart, VARIANTS[variant])
    kinds = sorted(d["kind"] for d in docs)
    expected = ["ClusterRole", "ClusterRoleBinding", "Deployment", "Service", "ServiceAccount"]
    if variant == "everything":
        expected = sorted([*expected, "ServiceMonitor"])
    if variant == "no-metrics":
        expected.remove("Service")
    assert kinds == expected
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":
            continue  # a Prometheus operator CRD: no schema in kubernetes-validate
        kubernetes_validate.validate(doc, version, strict=True)
        assert len(doc["metadata"]["name"]) <= 63


def test_service_monitor_selects_the_metrics_service(chart: helm.Chart) -> None:
    docs = objects(chart, VARIANTS["everything"])
    monitor = one(docs, "ServiceMonitor")
    service = one(docs, "Service", "-metrics")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert monitor["metadata"]["labels"]["release"] == "prometheus"


def test_metrics_service_selects_only_the_operator(chart: helm.Chart) -> None:
    docs = objects(chart)
    selector = one(docs, "Service", "-metrics")["spec"]["selector"]
    deployment = one(docs, "Deployment")
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"] == selector
    # Training pods carry app.kubernetes.io/name=finetune-operator too; the component label keeps them out.
    for case in ("lora-7b", "full-70b-multinode"):
        (job,) = [o for o in rendered(case) if o["kind"] == "Job"]
        assert not selector.items() <= job["spec"]["template"]["metadata"]["labels"].items()


# ------------------------------------------------------------------------------------------------
# RBAC
# ------------------------------------------------------------------------------------------------

EXPECTED_PERMISSIONS = {
    ("finetune.dev", "finetunejobs"): {"get", "list", "watch"},
    ("finetune.dev", "finetunejobs/status"): {"get", "patch", "update"},
    ("finetune.dev", "finetunejobs/finalizers"): {"update"},
    ("batch", "jobs"): {"create", "get", "list", "watch", "patch"},
    ("", "services"): {"create", "get", "list", "watch", "patch"},
    ("", "configmaps"): {"create", "get", "list", "watch", "patch"},
    ("", "pods"): {"get", "list", "watch"},
    ("", "events"): {"create", "patch"},
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"get", "list", "watch"},
    ("", "namespaces"): {"list", "watch"},
}


def permissions(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "nonResourceURLs" not in rule and "resourceNames" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    return granted


def test_rbac_is_least_privilege(chart: helm.Chart) -> None:
    docs = objects(chart)
    role = one(docs, "ClusterRole")
    for rule in role["rules"]:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], f"wildcard in {field}: {rule}"
    granted = permissions(role)
    assert not any(resource.startswith("secrets") for _, resource in granted)
    assert not any(verbs & {"escalate", "bind", "impersonate", "deletecollection"} for verbs in granted.values())
    assert granted == EXPECTED_PERMISSIONS
    binding = one(docs, "ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role["metadata"]["name"]}
    account = one(docs, "ServiceAccount")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": NAMESPACE}]
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]


def test_rbac_covers_what_the_renderers_create(chart: helm.Chart) -> None:
    """Every child kind the operator renders can be created, read, watched and patched. Nothing is deleted:
    children go with their owner through garbage collection."""
    granted = permissions(one(objects(chart), "ClusterRole"))
    plural = {"ConfigMap": "configmaps", "Service": "services", "Job": "jobs"}
    for obj in rendered("full-70b-multinode"):
        group = obj["apiVersion"].rpartition("/")[0]
        verbs = granted[(group, plural[obj["kind"]])]
        assert {"create", "get", "list", "watch", "patch"} <= verbs
        assert "delete" not in verbs


def test_rbac_can_be_disabled(chart: helm.Chart) -> None:
    kinds = {d["kind"] for d in objects(chart, {"rbac": {"create": False}})}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding"}


# ------------------------------------------------------------------------------------------------
# The operator Deployment
# ------------------------------------------------------------------------------------------------


def test_operator_pod_is_restricted_and_probed(chart: helm.Chart) -> None:
    docs = objects(chart)
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pss_restricted_violations(pod) == []
    c = container(docs)
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    command = c["command"]
    assert command[:2] == ["kopf", "run"]
    assert "--module=finetune_operator.handlers" in command
    assert "--all-namespaces" in command
    (liveness,) = [a for a in command if a.startswith("--liveness=")]
    assert liveness == "--liveness=http://0.0.0.0:8080/healthz"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"health": 8080, "metrics": 9090}
    for probe in ("livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert "envFrom" not in c  # no operator secret unless one is named


def settings_from(docs: list[dict[str, Any]]) -> OperatorSettings:
    env = {e["name"]: e["value"] for e in container(docs)["env"] if "value" in e}
    return OperatorSettings.from_env(env)


def test_default_values_give_default_settings(chart: helm.Chart) -> None:
    docs = objects(chart)
    assert settings_from(docs) == OperatorSettings()
    assert chart.values["trainer"]["image"] == DEFAULT_TRAINER_IMAGE
    # The operator loop's own variables parse too, and the metrics port is the one the Service targets.
    env = {e["name"]: e["value"] for e in container(docs)["env"]}
    assert metrics.port_from_env(env) == one(docs, "Service", "-metrics")["spec"]["ports"][0]["port"]
    assert handlers.status_interval(env) == chart.values["kopf"]["statusIntervalSeconds"]
    assert env["FT_LOG_FORMAT"] == "json"


def test_values_reach_the_operator_settings(chart: helm.Chart) -> None:
    values = {
        "trainer": {
            "image": "registry.example.com/trainer:1.2.3",
            "imagePullPolicy": "Always",
            "jobTtlSeconds": 600,
            "terminationGracePeriodSeconds": 120,
            "gpuMemoryLabel": "",
            "gpuMemoryTolerance": 0.95,
            "useGpus": False,
            "cpuProcsPerNode": 2,
            "cpuPerProcess": "500m",
            "memoryPerProcess": "2Gi",
            "cacheSize": "10Gi",
            "shmSize": "1Gi",
            "runAsUser": 2000,
        },
        "s3": {"endpoint": "http://seaweedfs.storage:8333", "region": "eu-west-1", "defaultSecret": "s3-credentials", "operatorSecret": "operator-s3"},
        "metrics": {"enabled": False},
    }
    docs = objects(chart, values)
    assert settings_from(docs) == OperatorSettings(
        trainer_image="registry.example.com/trainer:1.2.3",
        image_pull_policy="Always",
        job_ttl_seconds=600,
        termination_grace_seconds=120,
        gpu_memory_label="",
        gpu_memory_tolerance=0.95,
        use_gpus=False,
        cpu_procs_per_node=2,
        cpu_per_process="500m",
        memory_per_process="2Gi",
        cache_size="10Gi",
        shm_size="1Gi",
        run_as_user=2000,
        s3_endpoint="http://seaweedfs.storage:8333",
        s3_region="eu-west-1",
        s3_secret="s3-credentials",
    )
    env = {e["name"]: e.get("value") for e in container(docs)["env"]}
    assert metrics.port_from_env(env) is None  # metrics disabled
    # The operator's own S3 keys come by reference, never as values.
    assert container(docs)["envFrom"] == [{"secretRef": {"name": "operator-s3"}}]
    assert "metrics" not in {p["name"] for p in container(docs)["ports"]}


def test_chart_renders_nothing_secret(chart: helm.Chart) -> None:
    for doc in objects(chart, VARIANTS["everything"]):
        assert doc["kind"] != "Secret"
        text = yaml.safe_dump(doc)
        assert "secretKeyRef" not in text


def test_renderer_labels_constant_matches_chart(chart: helm.Chart) -> None:
    """The chart's operator pods and the training pods share app.kubernetes.io/name (see selector test)."""
    labels = one(objects(chart), "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == render.APP_NAME
