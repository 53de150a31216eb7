"""The chart's least-privilege mode on a real API server: `watchNamespaces` and the sample tenant role.

The chart is installed with `watchNamespaces: [team-a, team-b]` (fresh namespaces with a random suffix, so
the suite can run on a cluster of yours) and `tenantRole.create: true`; a third namespace, team-c, exists
but is not watched.

1. A token of the chart's ServiceAccount writes the operator's children (Job, ConfigMap, Service,
   NetworkPolicy) in team-a, is refused (403) the same in team-c and in the release namespace, and has no
   cluster-wide write: what the API server says it may do in a namespace no Role covers
   (SelfSubjectRulesReview) is read only, cluster-scoped creates and cluster-wide lists of FineTuneJobs and
   Jobs are refused;
2. the operator, run as test_chart.py runs it (a local `kopf run` with the Deployment's rendered arguments,
   here `--namespace=team-a --namespace=team-b`, and environment) with that token, reconciles a FineTuneJob
   in team-a (children, status) and leaves one in team-c untouched, without a single 403 or kopf
   permission warning in its log;
3. a ServiceAccount bound to the tenant ClusterRole by examples/rbac/tenant-rbac.yaml (its namespace and
   role name adapted) submits, reads and deletes FineTuneJobs in its namespace and cannot create a Pod, a
   Job or a Secret there, nor a FineTuneJob in another namespace.
"""

from __future__ import annotations

import contextlib
import copy
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from finetune_operator import render
from finetune_operator.handlers import ftj_url
from tests.e2e.conftest import REPO, wait_for
from tests.e2e.test_chart import (
    RBAC,
    Release,
    chart_manifest,
    chart_operator,
    fresh_namespace,
    installed_release,
    refusals,
    service_account_token,
    token_kubeconfig,
)
from tests.kube import Kube, KubeError

pytestmark = pytest.mark.e2e

TENANT_EXAMPLE = REPO / "examples" / "rbac" / "tenant-rbac.yaml"
#: Verbs that change nothing.
READ_ONLY = {"get", "list", "watch"}
#: What every authenticated identity may create (system:basic-user): asking the API server about itself.
SELF_REVIEWS = {"selfsubjectaccessreviews", "selfsubjectrulesreviews", "selfsubjectreviews"}


@pytest.fixture(scope="module")
def teams(kube: Kube) -> Iterator[dict[str, str]]:
    """team-a and team-b (watched) and team-c (not), as namespaces of their own."""
    with contextlib.ExitStack() as stack:
        yield {team: stack.enter_context(fresh_namespace(kube, team)) for team in ("team-a", "team-b", "team-c")}


@pytest.fixture(scope="module")
def scoped(kube: Kube, kubeconfig: str, crd: Any, teams: dict[str, str]) -> Iterator[Release]:
    """The chart with `watchNamespaces: [team-a, team-b]` and the tenant role (named per run: cluster-scoped)."""
    name = f"ft-{secrets.token_hex(3)}"
    values = {"watchNamespaces": [teams["team-a"], teams["team-b"]],
              "tenantRole": {"create": True, "name": f"{name}-tenant"}}
    with installed_release(kube, kubeconfig, name, values) as installed:
        yield installed


@pytest.fixture(scope="module")
def scoped_kubeconfig(kube: Kube, kubeconfig: str, scoped: Release, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A kubeconfig whose only credential is a token of the scoped release's ServiceAccount."""
    account = scoped.one("ServiceAccount")["metadata"]["name"]
    token = service_account_token(kube, scoped.namespace, account)
    return token_kubeconfig(kubeconfig, token, tmp_path_factory.mktemp("scoped-sa") / "kubeconfig")


def manifest(namespace: str, name: str) -> dict[str, Any]:
    """test_chart.py's small FineTuneJob, pinned to no node by a node-selector key the chart's default
    FineTunePolicy allows (its admission policy refuses `kubernetes.io/hostname`)."""
    body = chart_manifest(namespace, name)
    body["spec"]["resources"]["nodeSelector"] = {"nvidia.com/gpu.product": "no-such-gpu"}
    return body


def children(namespace: str, name: str = "probe") -> dict[str, tuple[str, dict[str, Any]]]:
    """One object of each kind the operator creates: collection URL and body."""
    meta = {"name": name, "namespace": namespace, "labels": {"finetune.dev/e2e": "true"}}
    return {
        "Job": (f"/apis/batch/v1/namespaces/{namespace}/jobs", {
            "apiVersion": "batch/v1", "kind": "Job", "metadata": meta,
            # Suspended: no pod is ever created for it.
            "spec": {"suspend": True, "template": {"spec": {"restartPolicy": "Never", "containers": [
                {"name": "c", "image": "registry.invalid/none:0"}]}}}}),
        "ConfigMap": (f"/api/v1/namespaces/{namespace}/configmaps", {
            "apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"k": "v"}}),
        "Service": (f"/api/v1/namespaces/{namespace}/services", {
            "apiVersion": "v1", "kind": "Service", "metadata": meta,
            "spec": {"clusterIP": "None", "selector": {"finetune.dev/job": name}}}),
        "NetworkPolicy": (f"/apis/networking.k8s.io/v1/namespaces/{namespace}/networkpolicies", {
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta,
            "spec": {"podSelector": {"matchLabels": {"finetune.dev/job": name}}, "policyTypes": ["Ingress"]}}),
    }


def status_of(as_who: Kube, method: str, path: str, body: Any = None) -> int:
    try:
        as_who.request(method, path, body=body)
    except KubeError as err:
        return err.status
    return 200


def rules_review(as_who: Kube, namespace: str) -> list[dict[str, Any]]:
    answer = as_who.request("POST", "/apis/authorization.k8s.io/v1/selfsubjectrulesreviews", body={
        "apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectRulesReview", "spec": {"namespace": namespace}})
    assert not answer["status"].get("incomplete"), answer["status"]
    return list(answer["status"]["resourceRules"])


def allowed(as_who: Kube, verb: str, group: str, resource: str, namespace: str = "") -> bool:
    answer = as_who.request("POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", body={
        "apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": {"verb": verb, "group": group, "resource": resource, "namespace": namespace}}})
    return bool(answer["status"]["allowed"])


# -- the tests ----------------------------------------------------------------------------------------


def test_the_scoped_release_has_roles_in_the_watched_namespaces(kube: Kube, scoped: Release,
                                                                 teams: dict[str, str]) -> None:
    watched = [teams["team-a"], teams["team-b"]]
    # The operator's ClusterRole (read only) and its binding, the tenant ClusterRole, a Role and RoleBinding
    # per watched namespace (other kinds, the admission policy's, are not this test's).
    kinds = sorted(o["kind"] for o in scoped.objects if o["apiVersion"].startswith("rbac.authorization.k8s.io/"))
    assert kinds == ["ClusterRole", "ClusterRole", "ClusterRoleBinding", "Role", "Role", "RoleBinding", "RoleBinding"]
    command = scoped.container()["command"]
    assert "--all-namespaces" not in command
    assert [a for a in command if a.startswith("--namespace")] == [f"--namespace={n}" for n in watched]
    account = scoped.one("ServiceAccount")["metadata"]["name"]
    for obj in scoped.objects:
        if obj["kind"] not in ("Role", "RoleBinding"):
            continue
        namespace = obj["metadata"]["namespace"]
        assert namespace in watched
        plural = "roles" if obj["kind"] == "Role" else "rolebindings"
        found = kube.get(f"{RBAC}/namespaces/{namespace}/{plural}/{obj['metadata']['name']}")
        assert found is not None, f"{obj['kind']} in {namespace} is not on the API server"
        if obj["kind"] == "Role":
            assert found["rules"] == obj["rules"]
        else:
            assert found["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": scoped.namespace}]
    (operator_role,) = [o for o in scoped.objects if o["kind"] == "ClusterRole"
                        and o["metadata"]["name"] != f"{scoped.name}-tenant"]
    found = kube.get(f"{RBAC}/clusterroles/{operator_role['metadata']['name']}")
    assert found is not None and all(set(rule["verbs"]) <= READ_ONLY for rule in found["rules"]), found


def test_the_service_account_writes_only_in_the_watched_namespaces(
    scoped: Release, scoped_kubeconfig: str, teams: dict[str, str],
) -> None:
    as_chart = Kube.from_kubeconfig(scoped_kubeconfig)
    team_a, team_c = teams["team-a"], teams["team-c"]
    # In a watched namespace: each child kind is created, read, listed and patched; the NetworkPolicy deleted.
    for kind, (url, body) in children(team_a).items():
        as_chart.request("POST", url, body=body)
        assert as_chart.get(f"{url}/probe") is not None, kind
        assert "items" in as_chart.request("GET", url, query={"limit": "1"})
        as_chart.patch(f"{url}/probe", {"metadata": {"labels": {"patched": "yes"}}})
    networkpolicies = children(team_a)["NetworkPolicy"][0]
    as_chart.request("DELETE", f"{networkpolicies}/probe")
    # Nothing else is deleted there, and there are no Secrets, no Pod writes.
    assert status_of(as_chart, "DELETE", f"{children(team_a)['Job'][0]}/probe") == 403
    assert status_of(as_chart, "GET", f"/api/v1/namespaces/{team_a}/secrets") == 403
    assert status_of(as_chart, "POST", f"/api/v1/namespaces/{team_a}/pods", {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": {}}) == 403

    # Anywhere else, the same requests are refused: a namespace no Role covers, and the release's own.
    for namespace in (team_c, scoped.namespace):
        for kind, (url, body) in children(namespace).items():
            assert status_of(as_chart, "POST", url, body) == 403, (kind, namespace)
            assert status_of(as_chart, "GET", url) == 403, (kind, namespace)
        assert status_of(as_chart, "GET", ftj_url(namespace)) == 403
        assert status_of(as_chart, "GET", f"/api/v1/namespaces/{namespace}/pods") == 403

    # No cluster-wide list of what it serves, no cluster-scoped write.
    for path in ("/apis/finetune.dev/v1alpha1/finetunejobs", "/apis/batch/v1/jobs", "/api/v1/pods",
                 "/api/v1/configmaps", "/apis/networking.k8s.io/v1/networkpolicies"):
        assert status_of(as_chart, "GET", path) == 403, path
    assert status_of(as_chart, "POST", "/api/v1/namespaces", {
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": f"nope-{secrets.token_hex(3)}"}}) == 403
    assert status_of(as_chart, "POST", f"{RBAC}/clusterroles", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": f"nope-{secrets.token_hex(3)}"}, "rules": []}) == 403
    # What stays cluster-wide is kopf's read-only machinery and the FineTunePolicies.
    for path in ("/api/v1/namespaces", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"):
        assert "items" in as_chart.request("GET", path, query={"limit": "1"}), path
    for verb in ("get", "list", "watch"):
        assert allowed(as_chart, verb, "finetune.dev", "finetunepolicies")
    for verb in ("create", "update", "patch", "delete"):
        assert not allowed(as_chart, verb, "finetune.dev", "finetunepolicies")

    # The API server's own account: in a namespace no Role covers, every rule that applies (the
    # ClusterRoleBindings') is read only, but for asking the API server about oneself.
    writes = [rule for rule in rules_review(as_chart, team_c)
              if set(rule["verbs"]) - READ_ONLY and not set(rule.get("resources", [])) <= SELF_REVIEWS]
    assert writes == [], writes
    in_team_a = rules_review(as_chart, team_a)
    assert any("create" in r["verbs"] and "networkpolicies" in r.get("resources", []) for r in in_team_a), in_team_a


def test_the_operator_serves_only_the_watched_namespaces(
    kube: Kube, scoped: Release, scoped_kubeconfig: str, teams: dict[str, str], s3: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The chart's `--namespace` arguments and Roles: FineTuneJobs in team-a and team-b are reconciled, one in
    team-c is not touched, and nothing the operator asks for is refused."""
    team_a, team_b, team_c = teams["team-a"], teams["team-b"], teams["team-c"]
    work = tmp_path_factory.mktemp("scoped-operator")
    with chart_operator(scoped, scoped_kubeconfig, None, s3, work / "operator.log") as operator:
        kube.request("POST", ftj_url(team_c), body=manifest(team_c, "unwatched"))
        kube.request("POST", ftj_url(team_a), body=manifest(team_a, "watched"))
        kube.request("POST", ftj_url(team_b), body=manifest(team_b, "watched"))

        def owned(namespace: str, name: str) -> list[str]:
            found = []
            for url in (f"/apis/batch/v1/namespaces/{namespace}/jobs", f"/api/v1/namespaces/{namespace}/configmaps",
                        f"/api/v1/namespaces/{namespace}/services",
                        f"/apis/networking.k8s.io/v1/namespaces/{namespace}/networkpolicies"):
                items = kube.request("GET", url, query={"labelSelector": f"{render.LABEL_JOB}={name}"})["items"]
                found += [f"{url.rsplit('/', 1)[1]}/{item['metadata']['name']}" for item in items]
            return found

        def reconciled() -> bool:
            operator.check_alive()
            for namespace in (team_a, team_b):
                obj = kube.get(ftj_url(namespace, "watched")) or {}
                if not (obj.get("status") or {}).get("phase"):
                    return False
                if not any(c.startswith("jobs/") for c in owned(namespace, "watched")):
                    return False
            return True

        wait_for("the FineTuneJobs in team-a and team-b to be reconciled (a status phase and a Job each)",
                 reconciled, timeout=90, interval=0.5)
        # The team-c one was created first; the operator, which has reconciled the two created after it,
        # has not touched it. Had it tried to, it would have been refused and logged the 403 (checked below).
        unwatched = kube.get(ftj_url(team_c, "unwatched")) or {}
        assert not unwatched.get("status"), unwatched.get("status")
        assert owned(team_c, "unwatched") == []
        assert not any(a.startswith("kopf.") for a in (unwatched["metadata"].get("annotations") or {}))
        log = operator.log_path.read_text(errors="replace")
    assert refusals(log) == set(), refusals(log)
    assert "Not enough permissions" not in log  # kopf's fallback when it may not list namespaces or CRDs
    assert team_c not in log


def test_a_tenant_submits_finetunejobs_and_nothing_else(
    kube: Kube, kubeconfig: str, scoped: Release, teams: dict[str, str], tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """examples/rbac/tenant-rbac.yaml applied to team-a (its namespace and the release's tenant role name
    substituted): the ServiceAccount `tenant` may submit, read and delete FineTuneJobs there, and nothing else."""
    team_a, team_b = teams["team-a"], teams["team-b"]
    tenant_role = f"{scoped.name}-tenant"
    assert kube.get(f"{RBAC}/clusterroles/{tenant_role}") is not None
    for doc in (d for d in yaml.safe_load_all(TENANT_EXAMPLE.read_text()) if d):
        doc = copy.deepcopy(doc)
        assert doc["metadata"]["namespace"] == "team-a"
        doc["metadata"]["namespace"] = team_a
        if doc["kind"] == "RoleBinding":
            assert doc["roleRef"]["name"] == "finetune-tenant"
            doc["roleRef"]["name"] = tenant_role
            doc["subjects"] = [{**s, "namespace": team_a} for s in doc["subjects"]]
            kube.request("POST", f"{RBAC}/namespaces/{team_a}/rolebindings", body=doc)
        else:
            kube.request("POST", f"/api/v1/namespaces/{team_a}/serviceaccounts", body=doc)
    token = service_account_token(kube, team_a, "tenant")
    as_tenant = Kube.from_kubeconfig(token_kubeconfig(kubeconfig, token, tmp_path_factory.mktemp("tenant") / "kc"))

    as_tenant.request("POST", ftj_url(team_a), body=manifest(team_a, "by-tenant"))
    assert as_tenant.get(ftj_url(team_a, "by-tenant")) is not None
    assert as_tenant.get(ftj_url(team_a, "by-tenant") + "/status") is not None
    assert "by-tenant" in [o["metadata"]["name"] for o in as_tenant.request("GET", ftj_url(team_a))["items"]]
    # Nothing but FineTuneJobs: no Pods, Jobs or Secrets of its own, no status writes, no spec patches.
    refused: list[tuple[str, str, Any]] = [
        ("POST", f"/api/v1/namespaces/{team_a}/pods", {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
                                                      "spec": {"containers": [{"name": "c", "image": "busybox"}]}}),
        ("POST", children(team_a, "by-tenant")["Job"][0], children(team_a, "by-tenant")["Job"][1]),
        ("POST", f"/api/v1/namespaces/{team_a}/secrets", {"apiVersion": "v1", "kind": "Secret",
                                                         "metadata": {"name": "x"}, "stringData": {"k": "v"}}),
        ("GET", f"/api/v1/namespaces/{team_a}/secrets", None),
        ("PATCH", ftj_url(team_a, "by-tenant") + "/status", {"status": {"phase": "Succeeded"}}),
        # Another namespace: the RoleBinding holds in team-a only.
        ("POST", ftj_url(team_b), manifest(team_b, "elsewhere")),
        ("GET", "/apis/finetune.dev/v1alpha1/finetunejobs", None),
    ]
    for method, path, body in refused:
        if method == "PATCH":
            with pytest.raises(KubeError) as refusal:
                as_tenant.patch(path, body, strategic=False)
            assert refusal.value.status == 403, (method, path, refusal.value)
            continue
        assert status_of(as_tenant, method, path, body) == 403, (method, path)
    for verb in ("update", "patch"):
        assert not allowed(as_tenant, verb, "finetune.dev", "finetunejobs", team_a)
    as_tenant.request("DELETE", ftj_url(team_a, "by-tenant"))


def test_uninstall_removes_the_roles(kube: Kube, scoped: Release, teams: dict[str, str]) -> None:
    scoped.config.uninstall(scoped.name, timeout=120)
    scoped.installed = False

    def gone() -> bool:
        return all(kube.get(f"{RBAC}/namespaces/{n}/roles/{o['metadata']['name']}") is None
                   for o in scoped.objects if o["kind"] == "Role" for n in [o["metadata"]["namespace"]])

    wait_for("the release's Roles to be deleted", gone, timeout=60, interval=1)
