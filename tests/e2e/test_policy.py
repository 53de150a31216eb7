"""FineTunePolicy on a real API server: what a tenant who may create FineTuneJobs gets, and no more.

The chart is installed with default values (plus its sample tenant Role). A tenant - a ServiceAccount bound
only to that Role in its namespace - applies manifests one by one: each that asks for more than a
FineTuneJob (a foreign image, a foreign service account, a key-less `Exists` toleration, a system priority
class, a node-selector key or GPU resource the policy does not list, an output outside the namespace's
prefix, more GPUs than allowed) is refused by the API server at admission, the message naming the field,
the value and the policy; a compliant one is admitted and the operator (as the chart runs it, with the
chart's token) gives it its children, a NetworkPolicy among them. The same attempts by the cluster admin
in a namespace whose policy allows them are admitted: the policy decides, not a list in the code. What
admission cannot see - a namespace naming a policy that does not exist, an auto-sized plan above the GPU
cap - the operator refuses before any child exists.
"""

from __future__ import annotations

import copy
import json
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from finetune_operator import policy
from finetune_operator.contract import REPORT_KEY
from tests.e2e.conftest import KEEP, OUTPUT_BUCKET, kubectl_explain, wait_for
from tests.e2e.test_chart import (
    RBAC,
    Release,
    chart_manifest,
    chart_operator,
    fresh_namespace,
    installed_release,
    service_account_token,
    token_kubeconfig,
)
from tests.kube import Kube, KubeError

pytestmark = pytest.mark.e2e

FTJ = "/apis/finetune.dev/v1alpha1"
POLICIES = f"{FTJ}/finetunepolicies"
SUFFIX = secrets.token_hex(3)
TENANT_ROLE = f"finetune-tenant-{SUFFIX}"


@pytest.fixture(scope="module")
def release(kube: Kube, kubeconfig: str, crd: Any) -> Iterator[Release]:
    """The chart with default values and its sample tenant Role (a cluster-scoped name of this run)."""
    with installed_release(kube, kubeconfig, f"ftp-{SUFFIX}", {"tenantRole": {"create": True, "name": TENANT_ROLE}}) \
            as installed:
        yield installed


@pytest.fixture(scope="module")
def team(kube: Kube, release: Release) -> Iterator[str]:
    """The tenant's namespace, labelled for Pod Security Admission's restricted profile."""
    with fresh_namespace(kube, "team") as name:
        kube.patch(f"/api/v1/namespaces/{name}", {"metadata": {"labels": {
            "pod-security.kubernetes.io/enforce": "restricted"}}}, strategic=False)
        yield name


@pytest.fixture(scope="module")
def tenant(kube: Kube, kubeconfig: str, team: str, tmp_path_factory: pytest.TempPathFactory) -> Kube:
    """A client whose only credential is a ServiceAccount token bound to the tenant Role in `team`."""
    kube.request("POST", f"/api/v1/namespaces/{team}/serviceaccounts", body={
        "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "tenant"}})
    kube.request("POST", f"{RBAC}/namespaces/{team}/rolebindings", body={
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "tenant"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": TENANT_ROLE},
        "subjects": [{"kind": "ServiceAccount", "name": "tenant", "namespace": team}]})
    token = service_account_token(kube, team, "tenant")
    return Kube.from_kubeconfig(token_kubeconfig(kubeconfig, token, tmp_path_factory.mktemp("tenant") / "kubeconfig"))


def manifest(namespace: str, name: str, **changes: Any) -> dict[str, Any]:
    """The chart tests' small job, compliant with the default policy (a node-selector key it lists), with
    `changes` applied to its spec (`resources` merged)."""
    body = chart_manifest(namespace, name)
    spec = body["spec"]
    spec["resources"] = {"nodeSelector": {"node.kubernetes.io/instance-type": "no-such-type"}}
    for key, value in changes.items():
        if key == "resources":
            spec["resources"].update(value)
        else:
            spec[key] = value
    return body


def create(client: Kube, body: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
    return client.request("POST", f"{FTJ}/namespaces/{body['metadata']['namespace']}/finetunejobs", body=body,
                          query={"dryRun": "All"} if dry_run else None)


def refusal(client: Kube, body: dict[str, Any]) -> str:
    with pytest.raises(KubeError) as err:
        create(client, body)
    assert err.value.status in (403, 422), err.value
    return str(err.value)


def apply_policy(kube: Kube, name: str, spec: dict[str, Any]) -> None:
    body = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTunePolicy", "metadata": {"name": name}, "spec": spec}
    existing = kube.get(f"{POLICIES}/{name}")
    if existing is None:
        kube.request("POST", POLICIES, body=body)
    else:
        kube.request("PUT", f"{POLICIES}/{name}", body={**body, "metadata": existing["metadata"]})


def label(kube: Kube, namespace: str, value: str | None) -> None:
    kube.patch(f"/api/v1/namespaces/{namespace}", {"metadata": {"labels": {policy.NAMESPACE_LABEL: value}}},
               strategic=False)


def wait_enforced(client: Kube, body: dict[str, Any]) -> None:
    """The API server applies a new policy, binding or parameter after its informers see it (about a
    second): wait until a dry run of `body` is refused."""
    def refused() -> bool:
        try:
            create(client, body, dry_run=True)
        except KubeError:
            return True
        return False

    wait_for("the admission policy in force", refused, timeout=60, interval=0.5)


#: (what, spec changes, what the refusal must say) under the chart's default policy.
DEFAULT_REFUSALS = [
    ("foreign image", {"image": "evil.example.com/miner:1"}, "spec.image: evil.example.com/miner:1"),
    ("foreign service account", {"serviceAccountName": "admin-irsa"}, "spec.serviceAccountName: admin-irsa"),
    ("key-less Exists toleration", {"resources": {"tolerations": [{"operator": "Exists"}]}},
     "spec.resources.tolerations: a toleration without a key"),
    ("system priority class", {"resources": {"priorityClassName": "system-node-critical"}},
     "spec.resources.priorityClassName: system-node-critical"),
    ("unlisted node-selector key", {"resources": {"nodeSelector": {"kubernetes.io/hostname": "control-plane"}}},
     "spec.resources.nodeSelector: key kubernetes.io/hostname"),
    ("unlisted GPU resource", {"resources": {"gpuResourceName": "example.com/fpga"}},
     "spec.resources.gpuResourceName: example.com/fpga"),
]


def test_the_chart_installs_the_policy_with_secure_defaults(kube: Kube, release: Release) -> None:
    kinds = {o["kind"] for o in release.objects}
    assert {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding", "FineTunePolicy"} <= kinds
    default = kube.get(f"{POLICIES}/default")
    assert default is not None
    assert default["spec"]["images"] == [release.container()["env"][0]["value"]]  # FT_TRAINER_IMAGE
    vap = kube.get(f"/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicies/{policy.ADMISSION_POLICY_NAME}")
    assert vap is not None
    # The API server type-checked every expression against the two CRDs' schemas: no warnings.
    status = wait_for("the policy's type check", lambda: (kube.get(
        f"/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicies/{policy.ADMISSION_POLICY_NAME}")
        or {}).get("status", {}).get("observedGeneration"), timeout=60, interval=0.5) and (kube.get(
        f"/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicies/{policy.ADMISSION_POLICY_NAME}")
        or {})["status"]
    assert "typeChecking" in status and not status["typeChecking"].get("expressionWarnings"), status


def test_a_tenant_gets_no_more_than_a_finetunejob(kube: Kube, tenant: Kube, team: str, release: Release,
                                                   s3: Any, tmp_path: Path, kubeconfig: str) -> None:
    wait_enforced(tenant, manifest(team, "probe", image="evil.example.com/miner:1"))
    for what, changes, expected in DEFAULT_REFUSALS:
        message = refusal(tenant, manifest(team, "refused", **changes))
        assert expected in message and "FineTunePolicy default" in message, (what, message)

    # The tenant cannot widen its own limits: no FineTunePolicy, no namespace label, no pods of its own.
    for method, path, body in (
        ("POST", POLICIES, {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTunePolicy",
                            "metadata": {"name": "mine"}, "spec": {}}),
        ("PATCH", f"/api/v1/namespaces/{team}", {"metadata": {"labels": {policy.NAMESPACE_LABEL: "mine"}}}),
        ("POST", f"/api/v1/namespaces/{team}/pods", {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                                                     "spec": {"containers": [{"name": "c", "image": "x:1"}]}}),
    ):
        with pytest.raises(KubeError) as err:
            tenant.request(method, path, body=body,
                           content_type="application/merge-patch+json" if method == "PATCH" else "application/json")
        assert err.value.status == 403, (method, path, err.value)

    # A policy of the admin's for this namespace: outputs under the namespace's prefix, at most 2 GPUs.
    limits = f"limits-{SUFFIX}"
    apply_policy(kube, limits, {"outputUriPrefixes": ["s3://finetune-artifacts/{namespace}/"], "maxGpus": 2,
                                "nodeSelectorKeys": ["node.kubernetes.io/instance-type"]})
    label(kube, team, limits)
    outside = manifest(team, "outside")
    outside["spec"]["output"]["uri"] = "s3://finetune-artifacts/another-team/run/"
    wait_enforced(tenant, outside)
    message = refusal(tenant, outside)
    assert "spec.output.uri: s3://finetune-artifacts/another-team/run/" in message
    assert f"FineTunePolicy {limits}" in message and f"s3://finetune-artifacts/{team}/" in message
    message = refusal(tenant, manifest(team, "greedy", resources={"gpus": 4}))
    assert "spec.resources.gpus: 4 is more than the 2 GPUs" in message and limits in message

    # A compliant job is admitted and gets its children, the NetworkPolicy among them.
    good = manifest(team, "compliant")
    good["spec"]["output"]["uri"] = f"s3://finetune-artifacts/{team}/compliant/"
    # An auto-sized plan above the cap: 70B full is 16 GPUs in the model-size table. Admission sees no
    # spec.resources.gpus; the operator refuses the plan before any child.
    big = manifest(team, "big-plan", method="full")
    big["spec"]["baseModel"]["parameters"] = "70B"
    big["spec"]["output"]["uri"] = f"s3://finetune-artifacts/{team}/big/"
    create(tenant, good)
    create(tenant, big)
    account = release.one("ServiceAccount")["metadata"]["name"]
    chart_token = token_kubeconfig(kubeconfig, service_account_token(kube, release.namespace, account),
                                   tmp_path / "chart-kubeconfig")
    # The pre-flight Job never completes here (no kubelet): the operator plans from the model's size.
    # FT_POLICY_CACHE_SECONDS=0: the label change below counts at once (a deployment caches for 10 s).
    with chart_operator(release, chart_token, team, s3, tmp_path / "operator.log", FT_PREFLIGHT="false",
                        FT_POLICY_CACHE_SECONDS="0"):
        def children() -> dict[str, str] | None:
            found = {kind: (kube.get(path) or {}).get("metadata", {}).get("name", "") for kind, path in (
                ("ConfigMap", f"/api/v1/namespaces/{team}/configmaps/compliant-config"),
                ("Service", f"/api/v1/namespaces/{team}/services/compliant"),
                ("NetworkPolicy", f"/apis/networking.k8s.io/v1/namespaces/{team}/networkpolicies/compliant"),
                ("Job", f"/apis/batch/v1/namespaces/{team}/jobs/compliant"))}
            return found if all(found.values()) else None

        wait_for("the compliant job's children", children, timeout=120)
        # The Job controller's pod passed the real Pod Security admission (restricted), with a memory limit,
        # a disk request and a bounded /tmp.
        pods = wait_for("the compliant job's pod", lambda: kube.request(
            "GET", f"/api/v1/namespaces/{team}/pods", query={"labelSelector": "finetune.dev/job=compliant"})["items"],
            timeout=120)
        resources = pods[0]["spec"]["containers"][0]["resources"]
        assert resources["limits"]["memory"] and resources["requests"]["ephemeral-storage"], resources
        assert all("sizeLimit" in v["emptyDir"] for v in pods[0]["spec"]["volumes"] if "emptyDir" in v)
        netpol = kube.get(f"/apis/networking.k8s.io/v1/namespaces/{team}/networkpolicies/compliant")
        assert netpol is not None
        assert netpol["spec"]["ingress"] == [{"from": [{"podSelector": netpol["spec"]["podSelector"]}]}]
        assert netpol["metadata"]["ownerReferences"][0]["name"] == "compliant"

        # Another job's report at this job's output (a tenant pointing output.uri at someone else's prefix):
        # ignored, with one Warning event; the status shows none of it.
        report = {"jobUid": "00000000-0000-4000-8000-000000000000", "phase": "training", "step": 90,
                  "totalSteps": 100, "loss": 0.01, "updatedAt": datetime.now(UTC).isoformat(),
                  "artifacts": {"model": "s3://tenant-b/secret-model/"}}
        s3.client().put_object(Bucket=OUTPUT_BUCKET, Key=f"{team}/compliant/{REPORT_KEY}",
                               Body=json.dumps(report).encode())
        events = wait_for("the ReportIgnored event", lambda: [
            e for e in kube.request("GET", f"/api/v1/namespaces/{team}/events")["items"]
            if e["involvedObject"].get("name") == "compliant" and e["reason"] == "ReportIgnored"], timeout=120)
        assert len(events) == 1 and events[0]["type"] == "Warning", events
        assert "another FineTuneJob" in events[0]["message"] and "secret-model" not in events[0]["message"]
        shown = (kube.get(f"{FTJ}/namespaces/{team}/finetunejobs/compliant") or {}).get("status") or {}
        assert "progress" not in shown and "artifacts" not in shown, shown

        failed = wait_for("the over-cap plan refused", lambda: _failed(kube, team, "big-plan"), timeout=120)
        assert failed["reason"] == "PolicyViolation" and "16 GPUs" in failed["message"], failed
        assert kube.get(f"/apis/batch/v1/namespaces/{team}/jobs/big-plan") is None
        assert kube.get(f"/api/v1/namespaces/{team}/configmaps/big-plan-config") is None

        # A namespace label naming no policy: every admission parameter passes; the operator refuses.
        label(kube, team, f"no-such-policy-{SUFFIX}")
        wait_for("the label seen by admission", lambda: _admitted(tenant, manifest(team, "probe2")), timeout=60,
                 interval=0.5)
        orphan = manifest(team, "orphan")
        create(tenant, orphan)
        failed = wait_for("the job of a missing policy refused", lambda: _failed(kube, team, "orphan"), timeout=120)
        assert failed["reason"] == "PolicyViolation" and f"no-such-policy-{SUFFIX}" in failed["message"], failed
        assert kube.get(f"/apis/batch/v1/namespaces/{team}/jobs/orphan") is None
    label(kube, team, None)
    if not KEEP:
        kube.request("DELETE", f"{POLICIES}/{limits}")


def test_the_policy_decides_not_the_code(kube: Kube, release: Release) -> None:
    """The cluster admin's attempts: refused under the default policy like the tenant's, admitted in a
    namespace whose policy allows them - but for what no policy may allow."""
    permissive = f"permissive-{SUFFIX}"
    apply_policy(kube, permissive, {
        "images": ["evil.example.com/*"], "serviceAccounts": ["admin-irsa"],
        "nodeSelectorKeys": ["kubernetes.io/hostname", "node.kubernetes.io/instance-type"],
        "gpuResourceNames": ["nvidia.com/gpu", "example.com/fpga"], "priorityClasses": ["system-node-critical"],
        "outputUriPrefixes": ["s3://"], "maxGpus": 64, "tolerations": [{"key": "dedicated"}],
    })
    with fresh_namespace(kube, "admin") as namespace:
        for what, changes, expected in DEFAULT_REFUSALS:
            message = refusal(kube, manifest(namespace, "admin", **changes))
            assert expected in message and "FineTunePolicy default" in message, (what, message)
        label(kube, namespace, permissive)
        wait_for("the permissive policy in force",
                 lambda: _admitted(kube, manifest(namespace, "probe", image="evil.example.com/miner:1")),
                 timeout=60, interval=0.5)
        admitted = [*[c for c in DEFAULT_REFUSALS if c[0] not in ("key-less Exists toleration", "system priority class")],
                    ("more GPUs", {"resources": {"gpus": 16}}, ""),
                    ("output anywhere", {"output": {"uri": "s3://elsewhere/run/"}}, ""),
                    ("a listed toleration", {"resources": {"tolerations": [{"key": "dedicated", "operator": "Exists"}]}}, "")]
        for what, changes, _ in admitted:
            body = manifest(namespace, "admin", **changes)
            assert _admitted(kube, body), what
        # Never allowed, whatever a policy lists: a key-less toleration (every taint) and system-* classes.
        for what, changes, expected in DEFAULT_REFUSALS:
            if what in ("key-less Exists toleration", "system priority class"):
                message = refusal(kube, manifest(namespace, "admin", **changes))
                assert expected in message and f"FineTunePolicy {permissive}" in message, message
    if not KEEP:
        kube.request("DELETE", f"{POLICIES}/{permissive}")


def test_uri_prefixes_see_chained_stages_and_preference_test_sets(kube: Kube, release: Release) -> None:
    """A chained stage (spec.baseModel.fromJob) has no model URI to check: admitted under modelUriPrefixes; a
    DPO stage's evaluation.preferenceTestSet is a data URI: refused outside dataUriPrefixes, naming it."""
    confined = f"confined-{SUFFIX}"
    apply_policy(kube, confined, {"modelUriPrefixes": ["s3://ft-e2e-models/"],
                                  "dataUriPrefixes": ["s3://healthcare-data/"],
                                  "nodeSelectorKeys": ["node.kubernetes.io/instance-type"]})
    try:
        with fresh_namespace(kube, "chain") as namespace:
            label(kube, namespace, confined)
            foreign = manifest(namespace, "foreign-model")
            foreign["spec"]["baseModel"]["uri"] = "hf://org/model"
            wait_enforced(kube, foreign)
            assert "spec.baseModel.uri: hf://org/model" in refusal(kube, foreign)

            chained = manifest(namespace, "dpo-stage", objective="dpo", method="lora")
            chained["spec"]["baseModel"] = {"fromJob": "sft-stage", "parameters": "1M"}
            chained["spec"]["dataset"] = {"train": "s3://healthcare-data/preference/train.jsonl",
                                          "format": "preference"}
            chained["spec"]["evaluation"] = {"preferenceTestSet": "s3://healthcare-data/preference/test.jsonl"}
            assert _admitted(kube, chained)

            leaked = copy.deepcopy(chained)
            leaked["spec"]["evaluation"]["preferenceTestSet"] = "s3://elsewhere/pairs.jsonl"
            message = refusal(kube, leaked)
            assert "evaluation.preferenceTestSet" in message and "s3://elsewhere/pairs.jsonl" in message, message
            assert f"FineTunePolicy {confined}" in message
    finally:
        if not KEEP:
            kube.request("DELETE", f"{POLICIES}/{confined}")


def test_no_policy_at_all_refuses_every_job(kube: Kube, release: Release) -> None:
    """The binding's parameterNotFoundAction is Deny: without any FineTunePolicy nothing is admitted."""
    default = kube.get(f"{POLICIES}/default")
    assert default is not None
    others = [p for p in kube.request("GET", POLICIES)["items"] if p["metadata"]["name"] != "default"]
    assert others == [], "the other tests remove their policies"
    kube.request("DELETE", f"{POLICIES}/default")
    try:
        with fresh_namespace(kube, "nopolicy") as namespace:
            wait_for("no parameter left", lambda: not _admitted(kube, manifest(namespace, "x")), timeout=60,
                     interval=0.5)
            message = refusal(kube, manifest(namespace, "x"))
            assert "no params found" in message, message
    finally:
        restored = copy.deepcopy(default)
        for key in ("resourceVersion", "uid", "creationTimestamp", "generation", "managedFields"):
            restored["metadata"].pop(key, None)
        kube.request("POST", POLICIES, body=restored)


def _admitted(client: Kube, body: dict[str, Any]) -> bool:
    try:
        create(client, body, dry_run=True)
    except KubeError:
        return False
    return True


def _failed(kube: Kube, namespace: str, name: str) -> dict[str, Any] | None:
    obj = kube.get(f"{FTJ}/namespaces/{namespace}/finetunejobs/{name}") or {}
    status = obj.get("status") or {}
    if status.get("phase") != "Failed":
        return None
    return next((c for c in status.get("conditions") or [] if c["type"] == "Failed"), None)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_explains_and_lists_policies(kubeconfig: str, release: Release) -> None:
    text = kubectl_explain(kubeconfig, "finetunepolicy.spec")
    for field in policy.FineTunePolicySpec.model_fields.values():
        assert field.alias in text, f"kubectl explain does not show spec.{field.alias}:\n{text}"
    assert "{namespace}" in text and "system-" in text
    listed = subprocess.run(["kubectl", "--kubeconfig", kubeconfig, "get", "ftp"], capture_output=True, text=True,
                            timeout=60)
    assert listed.returncode == 0 and "default" in listed.stdout and "MAX-GPUS" in listed.stdout, listed
