"""The Helm chart on a real API server, and the chart's RBAC as the operator's only authority.

1. `charts/finetune-operator` is installed with the Helm 4 SDK (`helm_python`) into a namespace of its
   own; its objects are on the API server as rendered. Its Deployment's pod stays Pending (nothing runs
   pods here);
2. a TokenRequest token of the chart's ServiceAccount holds the chart's RBAC and no more: what the
   operator lists and watches cluster-wide is allowed, what the chart does not grant is refused;
3. the operator runs as a local process (the `kopf run` arguments and environment the chart's Deployment
   renders) with the token of a ServiceAccount bound to the chart's rules minus one verb it needs (derived
   from the rendered ClusterRole, so the test follows the chart): it makes no progress on a FineTuneJob
   and logs the API server's 403;
4. the release is upgraded (the change reaches the Deployment; the ServiceAccount, and so the token, is
   kept) and uninstalled (its namespaced objects and cluster-scoped RBAC are gone, the token is refused,
   the CRD stays).

The operator under the chart's RBAC alone taking a FineTuneJob to Succeeded is tests/node's: there it runs
in-cluster, from its image, as the chart's ServiceAccount, and its pods run on a real node.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import os
import re
import secrets
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from finetune_operator.handlers import ftj_url
from finetune_operator.spec import FineTuneJob
from tests.e2e.conftest import KEEP, OUTPUT_BUCKET, REPO, Operator, start_operator, wait_for
from tests.envtest import free_port
from tests.kube import Kube, KubeError

pytestmark = pytest.mark.e2e

CHART = REPO / "charts" / "finetune-operator"
EXAMPLE = REPO / "examples" / "healthcare-lora.yaml"
#: The base model the FineTuneJobs here name; never read: none of their pods runs.
MODEL_URI = "s3://ft-e2e-models/tiny-llama/"
RBAC = "/apis/rbac.authorization.k8s.io/v1"
ADMISSION = "/apis/admissionregistration.k8s.io/v1"
#: What the upgrade changes, and where it must show in the Deployment.
UPGRADE_VALUES = {"resources": {"requests": {"cpu": "250m", "memory": "300Mi"}, "limits": {"memory": "640Mi"}},
                  "kopf": {"extraArgs": ["--verbose"]}}
#: The API server's authorization refusal, as it appears in the operator's log (JSON logs escape quotes).
REFUSAL = re.compile(r'cannot (\w+) resource \\*"([\w./-]+)\\*"')


# -- the release ----------------------------------------------------------------------------------


@dataclass
class Release:
    name: str
    namespace: str
    config: helm.Config
    objects: list[dict[str, Any]] = field(default_factory=list)
    installed: bool = True

    def load(self, summary: dict[str, Any]) -> None:
        """The rendered objects of a revision (the release's manifest, as Helm applied it)."""
        self.objects = [doc for doc in yaml.safe_load_all(summary["manifest"]) if doc]

    def one(self, kind: str) -> dict[str, Any]:
        (found,) = [o for o in self.objects if o["kind"] == kind]
        return found

    def url(self, obj: dict[str, Any]) -> str:
        name = obj["metadata"]["name"]
        return {
            "Deployment": f"/apis/apps/v1/namespaces/{self.namespace}/deployments/{name}",
            "ServiceAccount": f"/api/v1/namespaces/{self.namespace}/serviceaccounts/{name}",
            "Service": f"/api/v1/namespaces/{self.namespace}/services/{name}",
            "ClusterRole": f"{RBAC}/clusterroles/{name}",
            "ClusterRoleBinding": f"{RBAC}/clusterrolebindings/{name}",
            "FineTunePolicy": f"/apis/finetune.dev/v1alpha1/finetunepolicies/{name}",
            "ValidatingAdmissionPolicy": f"{ADMISSION}/validatingadmissionpolicies/{name}",
            "ValidatingAdmissionPolicyBinding": f"{ADMISSION}/validatingadmissionpolicybindings/{name}",
        }[obj["kind"]]

    def container(self) -> dict[str, Any]:
        (found,) = self.one("Deployment")["spec"]["template"]["spec"]["containers"]
        return found


@pytest.fixture(scope="module")
def release(kube: Kube, kubeconfig: str, crd: Any) -> Iterator[Release]:
    """The chart installed with default values, as `helm install --create-namespace` would.

    The CRD is already there (the `crd` fixture): Helm leaves an existing CRD of the chart's crds/ alone,
    and never removes it on uninstall."""
    # cluster-scoped RBAC names derive from the release name: unique per run
    with installed_release(kube, kubeconfig, f"ft-{secrets.token_hex(3)}", {}) as installed:
        yield installed


@contextlib.contextmanager
def installed_release(kube: Kube, kubeconfig: str, name: str, values: dict[str, Any]) -> Iterator[Release]:
    """The chart installed as release `name` with `values` into a fresh namespace `finetune-system-<random>`
    (as `helm install --create-namespace` would); uninstalled, and its namespace deleted, afterwards. No
    wait: the Deployment's pod never runs here (no scheduler, no kubelet for it). The admission policy and
    the FineTunePolicy `default` are cluster-wide singletons: one release with `policy.enabled` at a time."""
    namespace = f"finetune-system-{secrets.token_hex(3)}"
    config = helm.Config(kubeconfig_path=kubeconfig, namespace=namespace)
    installed = Release(name, namespace, config)
    try:
        installed.load(config.install(CHART, name, values, namespace=namespace, create_namespace=True, timeout=120))
        yield installed
    finally:
        if installed.installed and not KEEP:
            with contextlib.suppress(helm.HelmError):
                config.uninstall(name, ignore_not_found=True, timeout=60)
        if not KEEP:
            with contextlib.suppress(KubeError):
                kube.request("DELETE", f"/api/v1/namespaces/{namespace}")
        config.close()


def service_account_token(kube: Kube, namespace: str, account: str) -> str:
    """A bound token of the ServiceAccount through the TokenRequest API (`kubectl create token`)."""
    answer = kube.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token", body={
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 3600}})
    return str(answer["status"]["token"])


def token_kubeconfig(admin_kubeconfig: str, token: str, path: Path) -> str:
    """A kubeconfig with `token` as its only credential, for the server and CA of the admin kubeconfig's
    current context (a KUBECONFIG list is merged as kubectl does: the first file to name a thing wins)."""
    merged: dict[str, Any] = {"clusters": [], "contexts": []}
    for part in admin_kubeconfig.split(os.pathsep):
        if not part:
            continue
        loaded = yaml.safe_load(Path(part).expanduser().read_text()) or {}
        merged.setdefault("current-context", loaded.get("current-context"))
        for key in ("clusters", "contexts"):
            for entry in loaded.get(key) or []:
                entry.setdefault("_dir", str(Path(part).expanduser().resolve().parent))
                merged[key].append(entry)
    (context,) = [c["context"] for c in merged["contexts"] if c["name"] == merged["current-context"]][:1]
    (entry,) = [c for c in merged["clusters"] if c["name"] == context["cluster"]][:1]
    source = entry["cluster"]
    cluster: dict[str, Any] = {"server": source["server"]}
    if source.get("certificate-authority-data"):
        cluster["certificate-authority-data"] = source["certificate-authority-data"]
    elif source.get("certificate-authority"):
        ca = Path(entry["_dir"], Path(source["certificate-authority"]).expanduser())
        cluster["certificate-authority-data"] = base64.b64encode(ca.read_bytes()).decode()
    for key in ("insecure-skip-tls-verify", "tls-server-name"):
        if key in source:
            cluster[key] = source[key]
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "cluster", "cluster": cluster}],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "cluster", "user": "sa"}}],
    }))
    path.chmod(0o600)
    return str(path)


@pytest.fixture(scope="module")
def chart_kubeconfig(kube: Kube, kubeconfig: str, release: Release, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A kubeconfig whose only credential is a token of the chart's ServiceAccount."""
    account = release.one("ServiceAccount")["metadata"]["name"]
    token = service_account_token(kube, release.namespace, account)
    return token_kubeconfig(kubeconfig, token, tmp_path_factory.mktemp("chart-sa") / "kubeconfig")


# -- the operator as the chart runs it ---------------------------------------------------------------


def chart_kopf_args(release: Release, namespace: str | None, liveness_port: int) -> list[str]:
    """The `kopf run` arguments of the chart's Deployment, changed only where a local process must differ.

    - `--all-namespaces` -> `--namespace=<namespace>`: cluster-wide, this operator would also reconcile
      every other FineTuneJob on the API server (those of the other e2e tests, and on a cluster of yours,
      yours). In namespace mode kopf lists and watches namespaces, which `--all-namespaces`
      does not: the chart grants both (its namespace rule exists for this mode), and the cluster-wide
      list/watch that `--all-namespaces` makes instead is checked with the same token in
      `test_the_service_account_holds_the_chart_rbac_and_no_more`.
    - `--liveness` listens on loopback at a free port instead of 0.0.0.0:8080.

    `namespace` None: a release with `watchNamespaces`, whose `--namespace` arguments are kept as rendered
    (test_chart_least_privilege.py).
    """
    container = release.container()
    command = [*container["command"], *container.get("args", [])]
    assert command[:2] == ["kopf", "run"], command
    assert ("--all-namespaces" in command) == (namespace is not None), command
    args: list[str] = []
    for arg in command[1:]:
        if arg == "--all-namespaces":
            args.append(f"--namespace={namespace}")
        elif arg.startswith("--liveness="):
            args.append(f"--liveness=http://127.0.0.1:{liveness_port}/healthz")
        else:
            args.append(arg)
    return args


def chart_env(release: Release, s3: Any) -> dict[str, str]:
    """The Deployment's environment, changed only where a local process must differ."""
    container = release.container()
    assert all("value" in e for e in container["env"]), "an env entry from a reference: not reproduced here"
    env = {e["name"]: str(e["value"]) for e in container["env"]}
    env["FT_METRICS_PORT"] = "0"  # any free port: 9090 may be taken on this machine
    # The operator's own S3 identity for progress reports: in the cluster the chart gives it by
    # s3.operatorSecret (envFrom) or IRSA; here the local S3 server's keys and endpoint.
    env.update(s3.env())
    return env


@contextlib.contextmanager
def chart_operator(release: Release, kubeconfig: str, namespace: str | None, s3: Any,
                   log_path: Path, **env: str) -> Iterator[Operator]:
    """The operator as the chart's Deployment runs it, with `kubeconfig`'s identity, serving `namespace`
    (None: the release's `watchNamespaces`); yielded once its liveness endpoint answers. `env`: settings
    that differ from the chart's (FT_PREFLIGHT=false where no pre-flight pod can run)."""
    port = free_port()
    operator = start_operator(chart_kopf_args(release, namespace, port), kubeconfig, log_path,
                              {**chart_env(release, s3), **env})
    try:
        def alive() -> bool:
            operator.check_alive()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as answer:
                    return bool(answer.status == 200)
            except OSError:
                return False

        wait_for("the operator's liveness endpoint", alive, timeout=60, interval=0.5)
        yield operator
    finally:
        operator.stop()


@contextlib.contextmanager
def namespace_operator(kube: Kube, kubeconfig: str, s3: Any, namespace: str, work: Path,
                       **env: str) -> Iterator[Operator]:
    """The chart (watching `namespace` only, without the FineTunePolicy singletons) and its operator, logged in
    with the chart ServiceAccount's token (`chart_operator`; `env` as there)."""
    name = f"ft-{secrets.token_hex(3)}"
    with installed_release(kube, kubeconfig, name, {"watchNamespaces": [namespace], "policy": {"enabled": False}}) \
            as release:
        account = release.one("ServiceAccount")["metadata"]["name"]
        config = token_kubeconfig(kubeconfig, service_account_token(kube, release.namespace, account),
                                  work / "kubeconfig")
        with chart_operator(release, config, None, s3, work / "operator.log", **env) as running:
            yield running


@contextlib.contextmanager
def fresh_namespace(kube: Kube, prefix: str) -> Iterator[str]:
    name = f"{prefix}-{secrets.token_hex(3)}"
    kube.request("POST", "/api/v1/namespaces", body={
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": {"finetune.dev/e2e": "true"}}})
    try:
        yield name
    finally:
        if not KEEP:
            with contextlib.suppress(KubeError):
                kube.request("DELETE", f"/api/v1/namespaces/{name}")


def chart_manifest(namespace: str, name: str) -> dict[str, Any]:
    """examples/healthcare-lora.yaml as `name` in `namespace`, small (a tiny model of explicit size, a few
    steps of short sequences) and pinned to a node that does not exist, so no pod of it runs on a cluster
    that has nodes: these tests are about the operator's requests, not the training."""
    manifest = yaml.safe_load(EXAMPLE.read_text())
    manifest["metadata"].update({"name": name, "namespace": namespace})
    spec = manifest["spec"]
    spec["baseModel"] = {"uri": MODEL_URI, "parameters": "1M", "secretRef": {"name": "s3-credentials"}}
    spec["hyperparameters"].update(
        {"epochs": 1, "maxSteps": 4, "batchSize": 4, "gradientAccumulationSteps": 1, "maxSeqLength": 256,
         "precision": "fp32", "gradientCheckpointing": False}
    )
    # A node-selector key the chart's default FineTunePolicy allows (it refuses kubernetes.io/hostname).
    spec["resources"] = {"nodeSelector": {"node.kubernetes.io/instance-type": "no-such-node-type"}}
    spec["backoffLimit"] = 0
    spec["output"]["uri"] = f"s3://{OUTPUT_BUCKET}/{name}-{secrets.token_hex(3)}/"
    FineTuneJob.model_validate(manifest)
    return manifest


def refusals(log: str) -> set[tuple[str, str]]:
    """(verb, resource) of every authorization refusal the API server gave, as quoted in the log."""
    return set(REFUSAL.findall(log))


# -- the tests ----------------------------------------------------------------------------------------


def test_chart_installs_with_the_helm_sdk(kube: Kube, release: Release) -> None:
    kinds = sorted(o["kind"] for o in release.objects)
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "Deployment", "FineTunePolicy", "Service", "ServiceAccount",
                     "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"]
    for obj in release.objects:
        found = kube.get(release.url(obj))
        assert found is not None, f"{obj['kind']} {obj['metadata']['name']} is not on the API server"
        assert found["metadata"]["labels"]["app.kubernetes.io/instance"] == release.name
    role = kube.get(release.url(release.one("ClusterRole")))
    assert role is not None and role["rules"] == release.one("ClusterRole")["rules"]
    binding = kube.get(release.url(release.one("ClusterRoleBinding")))
    account = release.one("ServiceAccount")["metadata"]["name"]
    assert binding is not None
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": release.namespace}]
    deployment = kube.get(release.url(release.one("Deployment")))
    assert deployment is not None
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == account
    assert deployment["spec"]["template"]["spec"]["containers"][0]["command"] == release.container()["command"]
    stored = release.config.status(release.name)
    assert (stored["status"], stored["revision"]) == ("deployed", 1)


def test_the_service_account_holds_the_chart_rbac_and_no_more(release: Release, chart_kubeconfig: str) -> None:
    """The token is the chart's ServiceAccount and nothing else: what `--all-namespaces` needs is allowed
    cluster-wide, what the chart does not grant is refused."""
    as_chart = Kube.from_kubeconfig(chart_kubeconfig)
    # kopf --all-namespaces lists and watches these cluster-wide (the local operator runs namespaced).
    for path in ("/apis/finetune.dev/v1alpha1/finetunejobs", "/apis/batch/v1/jobs", "/api/v1/pods",
                 "/api/v1/namespaces", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"):
        assert "items" in as_chart.request("GET", path, query={"limit": "1"}), path
    refused = [
        ("GET", f"/api/v1/namespaces/{release.namespace}/secrets", None),  # no Secrets at all
        ("GET", "/apis/apps/v1/deployments", None),
        ("DELETE", f"/apis/batch/v1/namespaces/{release.namespace}/jobs/anything", None),  # no delete
        # No writes to a FineTuneJob but its status (no kopf annotations or finalizers).
        ("PATCH", f"/apis/finetune.dev/v1alpha1/namespaces/{release.namespace}/finetunejobs/anything", {}),
        ("POST", f"/api/v1/namespaces/{release.namespace}/pods", {"apiVersion": "v1", "kind": "Pod",
                                                                  "metadata": {"name": "x"}, "spec": {}}),
    ]
    for method, path, body in refused:
        with pytest.raises(KubeError) as refusal:
            as_chart.request(method, path, body=body)
        assert refusal.value.status == 403, (method, path, refusal.value)


#: Verbs the operator needs, each dropped in turn from the chart's rules: (group, resource, verb, what the
#: API server's refusal names) and what must then not happen.
MISSING = {
    "jobs-create": ("batch", "jobs", "create"),
    "finetunejobs-status-patch": ("finetune.dev", "finetunejobs/status", "patch"),
}


def rules_without(rules: list[dict[str, Any]], group: str, resource: str, verb: str) -> list[dict[str, Any]]:
    """The rules with `verb` taken away from `group`/`resource` only (a rule naming more is split)."""
    out: list[dict[str, Any]] = []
    dropped = False
    for rule in copy.deepcopy(rules):
        if not (group in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"]):
            out.append(rule)
            continue
        dropped = True
        if len(rule["apiGroups"]) > 1:
            out.append({**rule, "apiGroups": [g for g in rule["apiGroups"] if g != group]})
        if len(rule["resources"]) > 1:
            out.append({**rule, "apiGroups": [group], "resources": [r for r in rule["resources"] if r != resource]})
        if len(rule["verbs"]) > 1:
            out.append({**rule, "apiGroups": [group], "resources": [resource],
                        "verbs": [v for v in rule["verbs"] if v != verb]})
    assert dropped, f"the chart's ClusterRole does not grant {verb} on {group}/{resource}"
    return out


@pytest.mark.parametrize("missing", sorted(MISSING))
def test_a_missing_verb_stops_the_operator(
    kube: Kube, kubeconfig: str, release: Release, s3: Any, missing: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The chart's rules minus one verb, bound to a ServiceAccount of their own: the same operator run
    makes no progress on a FineTuneJob and logs the API server's refusal, on its first pass and on a retry."""
    group, resource, verb = MISSING[missing]
    role = release.one("ClusterRole")
    rules = rules_without(role["rules"], group, resource, verb)
    name = f"{release.name}-no-{missing}"[:63]
    work = tmp_path_factory.mktemp(f"missing-{missing}")
    account_url = f"/api/v1/namespaces/{release.namespace}/serviceaccounts"
    made: list[str] = []
    try:
        kube.request("POST", account_url, body={"apiVersion": "v1", "kind": "ServiceAccount",
                                                "metadata": {"name": name, "namespace": release.namespace}})
        made.append(f"{account_url}/{name}")
        kube.request("POST", f"{RBAC}/clusterroles", body={
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": name},
            "rules": rules})
        made.append(f"{RBAC}/clusterroles/{name}")
        kube.request("POST", f"{RBAC}/clusterrolebindings", body={
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": release.namespace}]})
        made.append(f"{RBAC}/clusterrolebindings/{name}")
        config = token_kubeconfig(kubeconfig, service_account_token(kube, release.namespace, name),
                                  work / "kubeconfig")
        with fresh_namespace(kube, "ft-chart-no") as namespace, \
                chart_operator(release, config, namespace, s3, work / "operator.log") as operator:
            ftj = "missing-verb"
            kube.request("POST", ftj_url(namespace), body=chart_manifest(namespace, ftj))

            def refused_twice() -> bool:
                operator.check_alive()
                log = operator.log_path.read_text(errors="replace")
                return sum(1 for line in log.splitlines() if (verb, resource) in refusals(line)) >= 2

            # Bounded by the refusal itself: the first pass and kopf's retry 5 s later.
            wait_for(f"the operator's log to show {verb} on {resource} refused twice", refused_twice, timeout=60,
                     interval=0.5)
            log = operator.log_path.read_text(errors="replace")
            assert refusals(log) == {(verb, resource)}, refusals(log)  # nothing else was missing
            obj = kube.get(ftj_url(namespace, ftj)) or {}
            job = kube.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/{ftj}")
            if resource == "jobs":
                assert job is None, "a Job exists although its creation was refused"
                assert (obj.get("status") or {}).get("phase") not in ("Running", "Succeeded"), obj.get("status")
            else:
                assert not obj.get("status"), f"the status was written: {obj.get('status')}"
    finally:
        for url in reversed(made):
            with contextlib.suppress(KubeError):
                kube.request("DELETE", url)


def test_upgrade_changes_the_deployment(kube: Kube, release: Release) -> None:
    account_before = kube.get(release.url(release.one("ServiceAccount")))
    assert account_before is not None
    summary = release.config.upgrade(CHART, release.name, UPGRADE_VALUES, namespace=release.namespace, timeout=120)
    assert summary["revision"] == 2 and summary["status"] == "deployed", summary.get("status")
    release.load(summary)
    deployment = kube.get(release.url(release.one("Deployment")))
    assert deployment is not None
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["resources"] == UPGRADE_VALUES["resources"]
    assert container["command"][-1] == "--verbose"
    assert deployment["metadata"]["generation"] >= 2
    # The ServiceAccount is kept (same uid), so a running operator's token stays valid across an upgrade.
    account_after = kube.get(release.url(release.one("ServiceAccount")))
    assert account_after is not None and account_after["metadata"]["uid"] == account_before["metadata"]["uid"]
    role = kube.get(release.url(release.one("ClusterRole")))
    assert role is not None and role["rules"] == release.one("ClusterRole")["rules"]


def test_uninstall_removes_the_release(kube: Kube, release: Release, chart_kubeconfig: str, crd: Any) -> None:
    urls = [release.url(o) for o in release.objects]
    as_chart = Kube.from_kubeconfig(chart_kubeconfig)
    as_chart.request("GET", "/apis/finetune.dev/v1alpha1/finetunejobs", query={"limit": "1"})  # valid until now
    release.config.uninstall(release.name, timeout=120)
    release.installed = False

    def gone() -> list[str] | None:
        left = [url for url in urls if kube.get(url) is not None]
        return None if left else urls

    wait_for("the release's objects to be deleted", gone, timeout=120, interval=1)
    storage = kube.request("GET", f"/api/v1/namespaces/{release.namespace}/secrets",
                           query={"labelSelector": f"owner=helm,name={release.name}"})
    assert storage["items"] == [], [s["metadata"]["name"] for s in storage["items"]]
    # The token was bound to the deleted ServiceAccount: refused, at once by RBAC (403, the binding is
    # gone) and then by authentication (401: the API server's lookup no longer finds the ServiceAccount).
    def answer() -> int:
        try:
            as_chart.request("GET", "/apis/finetune.dev/v1alpha1/finetunejobs", query={"limit": "1"})
        except KubeError as err:
            return err.status
        return 200

    assert answer() in (401, 403)
    wait_for("the deleted ServiceAccount's token to be refused as unauthenticated", lambda: answer() == 401,
             timeout=60, interval=1)
    # Helm never deletes a CRD of crds/: FineTuneJobs elsewhere survive an uninstall.
    assert kube.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd['metadata']['name']}")
