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
from finetune_operator import handlers, metrics, policy, render, serving, serving_apply
from finetune_operator.settings import DEFAULT_TRAINER_IMAGE, OperatorSettings
from finetune_operator.spec import FineTuneJob
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


def test_chart_crds_are_the_generated_crds(chart: helm.Chart) -> None:
    jobs, policies = sorted(chart.crds, key=lambda c: c["filename"])
    assert jobs["filename"].endswith("crds/finetune.dev_finetunejobs.yaml")
    assert jobs["data"] == REPO_CRD.read_text(), "the chart's CRD differs from crds/; run `make crd`"
    assert policies["filename"].endswith("crds/finetune.dev_finetunepolicies.yaml")
    assert policies["data"] == policy.policy_crd_yaml(), "the chart's FineTunePolicy CRD is stale; run `make crd`"
    for crd in (jobs, policies):
        kubernetes_validate.validate(yaml.safe_load(crd["data"]), K8S_VERSIONS[0], strict=True)


def test_policy_can_be_turned_off(chart: helm.Chart) -> None:
    docs = objects(chart, {"policy": {"enabled": False}})
    assert not {"FineTunePolicy", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"} & {
        d["kind"] for d in docs}
    assert settings_from(docs).policy is False


def test_default_policy_holds_the_trainer_image_and_the_defaults(chart: helm.Chart) -> None:
    default = one(objects(chart, {"trainer": {"image": "registry.example.com/trainer:2"},
                                  "policy": {"default": {"images": ["registry.example.com/extra/*"]}}}),
                  "FineTunePolicy")
    assert default["metadata"]["name"] == policy.DEFAULT_POLICY
    assert default["spec"]["images"] == ["registry.example.com/trainer:2", "registry.example.com/extra/*"]
    assert default["spec"]["serviceAccounts"] == [] and default["spec"]["gpuResourceNames"] == ["nvidia.com/gpu"]


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
    "namespaced": {"watchNamespaces": ["team-a", "team-b"], "tenantRole": {"create": True, "aggregateToEdit": True}},
}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rendered_objects_are_valid(chart: helm.Chart, variant: str, version: str) -> None:
    docs = objects(chart, VARIANTS[variant])
    kinds = sorted(d["kind"] for d in docs)
    # FineTunePolicy `default` and the admission policy enforcing it (policy.enabled, the default).
    expected = sorted(["ClusterRole", "ClusterRoleBinding", "Deployment", "Service", "ServiceAccount", "FineTunePolicy",
                       "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"])
    if variant == "everything":
        expected = sorted([*expected, "ServiceMonitor"])
    if variant == "no-metrics":
        expected.remove("Service")
    if variant == "namespaced":  # a Role and RoleBinding per watched namespace, and the tenant ClusterRole
        expected = sorted([*expected, "ClusterRole", "Role", "Role", "RoleBinding", "RoleBinding"])
    assert kinds == expected
    for doc in docs:
        if doc["kind"] == "FineTunePolicy":
            policy.FineTunePolicy.model_validate(doc)  # this project's CRD: its model is its schema
            continue
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

#: What the operator needs in each namespace it serves: a ClusterRole's rules without watchNamespaces, a Role
#: in each watched namespace with it.
NAMESPACED_PERMISSIONS = {
    ("finetune.dev", "finetunejobs"): {"get", "list", "watch"},
    ("finetune.dev", "finetunejobs/status"): {"get", "patch", "update"},
    ("finetune.dev", "finetunejobs/finalizers"): {"update"},
    ("batch", "jobs"): {"create", "get", "list", "watch", "patch"},
    ("", "services"): {"create", "get", "list", "watch", "patch"},
    ("", "configmaps"): {"create", "get", "list", "watch", "patch"},
    ("networking.k8s.io", "networkpolicies"): {"create", "get", "list", "watch", "patch", "delete"},
    # spec.serving.apply: created, read by name (polled, not watched), labels patched on adoption; no delete.
    ("serving.kserve.io", "llminferenceservices"): {"create", "get", "patch"},
    ("", "pods"): {"get", "list", "watch"},
    ("", "events"): {"create", "patch"},
}
#: Cluster-scoped and read only, in both modes: kopf's CRD and namespace observers, a job's namespace (its
#: policy label), the FineTunePolicies.
CLUSTER_PERMISSIONS = {
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"get", "list", "watch"},
    ("", "namespaces"): {"get", "list", "watch"},
    ("finetune.dev", "finetunepolicies"): {"get", "list", "watch"},
}
EXPECTED_PERMISSIONS = {**NAMESPACED_PERMISSIONS, **CLUSTER_PERMISSIONS}
READ_ONLY = {"get", "list", "watch"}
WATCHED = ["team-a", "team-b"]
TENANT_PERMISSIONS = {
    ("finetune.dev", "finetunejobs"): {"create", "get", "list", "watch", "delete"},
    ("finetune.dev", "finetunejobs/status"): {"get"},
}
TENANT_EXAMPLE = ROOT / "examples" / "rbac" / "tenant-rbac.yaml"


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


@pytest.mark.parametrize("values", [{}, {"watchNamespaces": WATCHED}], ids=["cluster-wide", "namespaced"])
def test_rbac_covers_what_the_renderers_create(chart: helm.Chart, values: dict[str, Any]) -> None:
    """Every child kind the operator renders can be created, read, watched and patched, in each namespace
    it serves. Nothing is deleted but the NetworkPolicy: children go with their owner through garbage
    collection."""
    docs = objects(chart, values)
    roles = [d for d in docs if d["kind"] == "Role"] or [one(docs, "ClusterRole")]
    plural = {"ConfigMap": "configmaps", "Service": "services", "Job": "jobs", "NetworkPolicy": "networkpolicies"}
    for role in roles:
        granted = permissions(role)
        for obj in rendered("full-70b-multinode"):
            group = obj["apiVersion"].rpartition("/")[0]
            verbs = granted[(group, plural[obj["kind"]])]
            assert {"create", "get", "list", "watch", "patch"} <= verbs
            assert ("delete" in verbs) == (obj["kind"] == "NetworkPolicy")
        # spec.serving.apply's LLMInferenceService: what `inference_service` does to it (read, create, adopt), never
        # a delete (garbage collection removes it with its FineTuneJob).
        served = serving_apply_object()
        verbs = granted[(served["apiVersion"].rpartition("/")[0], serving.LLMISVC_PLURAL)]
        assert {"create", "get", "patch"} <= verbs and "delete" not in verbs
    assert NAMESPACED_PERMISSIONS[("networking.k8s.io", "networkpolicies")] >= {"create", "patch", "delete"}


def serving_apply_object() -> dict[str, Any]:
    """The LLMInferenceService the operator creates for a finished job with spec.serving.apply."""
    job = FineTuneJob.model_validate({
        "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": "served", "namespace": "team-a", "uid": "11111111-2222-4333-8444-555555555555"},
        "spec": {"baseModel": {"uri": "hf://org/base"}, "method": "lora", "dataset": {"train": "s3://data/t.jsonl"},
                 "output": {"uri": "s3://out/served/"}, "serving": {"apply": True}}})
    plan = serving.serving_plan(job, "lora")
    assert plan is not None
    return serving_apply.desired(job, plan, render.owner_reference(job.metadata))


def test_watch_namespaces_runs_kopf_on_those_namespaces(chart: helm.Chart) -> None:
    command = container(objects(chart, {"watchNamespaces": WATCHED}))["command"]
    assert "--all-namespaces" not in command
    assert [a for a in command if a.startswith("--namespace")] == ["--namespace=team-a", "--namespace=team-b"]
    assert command[:3] == ["kopf", "run", "--module=finetune_operator.handlers"]
    assert "--all-namespaces" in container(objects(chart, {"watchNamespaces": []}))["command"]


def test_watch_namespaces_writes_only_in_those_namespaces(chart: helm.Chart) -> None:
    """One Role + RoleBinding per watched namespace with the namespaced rules; the ClusterRole keeps only
    read-only rules on cluster-scoped resources."""
    docs = objects(chart, {"watchNamespaces": WATCHED})
    account = one(docs, "ServiceAccount")["metadata"]["name"]
    cluster_role = one(docs, "ClusterRole")
    assert permissions(cluster_role) == CLUSTER_PERMISSIONS
    assert all(set(rule["verbs"]) <= READ_ONLY for rule in cluster_role["rules"])
    binding = one(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["kind"] == "ClusterRole" and binding["roleRef"]["name"] == cluster_role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]
    roles = {d["metadata"]["namespace"]: d for d in docs if d["kind"] == "Role"}
    bindings = {d["metadata"]["namespace"]: d for d in docs if d["kind"] == "RoleBinding"}
    assert sorted(roles) == sorted(bindings) == WATCHED
    for namespace in WATCHED:
        role, bound = roles[namespace], bindings[namespace]
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], f"wildcard in {field}: {rule}"
        assert permissions(role) == NAMESPACED_PERMISSIONS
        assert bound["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
        assert bound["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]
    # The same permissions as cluster-wide mode, only scoped.
    assert {**permissions(roles["team-a"]), **permissions(cluster_role)} == permissions(one(objects(chart), "ClusterRole"))


@pytest.mark.parametrize(
    ("namespaces", "complaint"),
    [(["Team-A"], "watchNamespaces"), (["team-a", "team-a"], "watchNamespaces"), (["a" * 64], "watchNamespaces"),
     ("team-a", "watchNamespaces")],
)
def test_schema_rejects_bad_watch_namespaces(chart: helm.Chart, namespaces: Any, complaint: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=complaint):
        chart.render({"watchNamespaces": namespaces}, name=RELEASE, namespace=NAMESPACE)


def test_tenant_role_is_opt_in_and_grants_finetunejobs_only(chart: helm.Chart) -> None:
    assert [d for d in objects(chart) if d["metadata"]["name"] == "finetune-tenant"] == []
    docs = objects(chart, {"tenantRole": {"create": True}})
    (tenant,) = [d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "finetune-tenant"]
    assert permissions(tenant) == TENANT_PERMISSIONS
    assert "rbac.authorization.k8s.io/aggregate-to-edit" not in tenant["metadata"]["labels"]
    aggregated = objects(chart, {"tenantRole": {"create": True, "name": "ml-tenant", "aggregateToEdit": True}})
    (tenant,) = [d for d in aggregated if d["metadata"]["name"] == "ml-tenant"]
    assert tenant["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_tenant_example_binds_the_tenant_role_in_its_namespace(chart: helm.Chart, version: str) -> None:
    docs = [d for d in yaml.safe_load_all(TENANT_EXAMPLE.read_text()) if d]
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)
    account, binding = one(docs, "ServiceAccount"), one(docs, "RoleBinding")
    assert (account["metadata"]["name"], account["metadata"]["namespace"]) == ("tenant", "team-a")
    assert binding["metadata"]["namespace"] == "team-a"  # a RoleBinding: the ClusterRole's rights in team-a only
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": chart.values["tenantRole"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "tenant", "namespace": "team-a"}]


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
    # The chart installs FineTunePolicies: its operator also checks what admission cannot see.
    assert settings_from(docs) == OperatorSettings(policy=True)
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
            "tmpSize": "2Gi",
            "memoryLimitFactor": 3,
            "networkPolicy": {"enabled": False, "egress": [{"ports": [{"port": 443}]}]},
            "runAsUser": 2000,
        },
        "policy": {"enabled": False, "default": {}},
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
        tmp_size="2Gi",
        memory_limit_factor=3,
        network_policy=False,
        network_policy_egress=({"ports": [{"port": 443}]},),
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
