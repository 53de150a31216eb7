"""FineTunePolicy: what a tenant's FineTuneJob may ask for, enforced by the API server itself.

A FineTunePolicy (`finetune.dev/v1alpha1`, cluster-scoped) lists the images, service accounts, Secrets,
tolerations, node-selector keys, priority classes, GPU resource names, GPU and GPU-hour caps and URI
prefixes that FineTuneJobs in its namespaces may use. A namespace picks its policy with the label
`finetune.dev/policy: <name>`; a namespace without the label gets the policy named `default`, which the
Helm chart installs with secure values.

The policy is enforced by a `ValidatingAdmissionPolicy` (`build_admission_policy`), not by the operator:
the API server refuses a FineTuneJob that breaks it at `kubectl apply` time, whether the operator runs or
not, with a message naming the field, the value and the policy. Its binding selects every FineTunePolicy
as a parameter; each validation first asks whether the parameter is the namespace's policy (`applies`), so
the others pass and the selected one decides. A namespace labelled with a policy that does not exist
therefore admits anything at the API server; the operator closes that gap (`missing_policy`): it refuses to
run a job whose namespace names no existing policy, before any pod exists. The operator also applies the
GPU cap to the plan it sizes (`over_gpu_cap`): `maxGpus` at admission only sees an explicit
`spec.resources.gpus`, and an auto-sized job's GPU count is known only after the pre-flight.

Checks run at CREATE only: the spec is immutable after creation (but for `suspend`), and a policy tightened
later must not block the suspension of a running job or the operator's finalizer patches.

`crds/finetune.dev_finetunepolicies.yaml` and the chart's `templates/admission-policy.yaml` are this
module's output (`make crd`); tests fail when they drift.
"""

from __future__ import annotations

from typing import Annotated, Any

import yaml
from pydantic import Field

from finetune_operator import spec as api
from finetune_operator.crd import crd_object, model_schema

KIND = "FineTunePolicy"
PLURAL = "finetunepolicies"
SINGULAR = "finetunepolicy"
SHORT_NAMES = ["ftp"]
#: The namespace label that selects a namespace's FineTunePolicy by name.
NAMESPACE_LABEL = f"{api.GROUP}/policy"
#: The policy of namespaces without NAMESPACE_LABEL.
DEFAULT_POLICY = "default"
#: GPU resource names allowed when a policy does not list any.
DEFAULT_GPU_RESOURCE_NAMES = ["nvidia.com/gpu"]
ADMISSION_POLICY_NAME = f"{SINGULAR}.{api.GROUP}"

_PREFIX_HELP = ("Each prefix may contain `{namespace}`, replaced by the FineTuneJob's namespace (for example "
                "`s3://artifacts/{namespace}/`); end prefixes with `/` so that `team-a/` does not also match "
                "`team-ab/`.")


class TolerationRule(api._Model):
    """A toleration FineTuneJobs may carry: same key, and the same effect and value where these are set."""

    key: str = Field(min_length=1, max_length=317, description="Taint key that may be tolerated.")
    value: str | None = Field(
        default=None, max_length=63, description="Only this taint value. Defaults to any value.")
    effect: str | None = Field(
        default=None, max_length=32, pattern=r"^(NoSchedule|PreferNoSchedule|NoExecute)$",
        description="Only this effect (NoSchedule, PreferNoSchedule, NoExecute). Defaults to any effect; a "
        "toleration without an effect tolerates every effect, so it is allowed only by a rule without one.",
    )


_Names = list[Annotated[str, Field(min_length=1, max_length=512)]]


class FineTunePolicySpec(api._Model):
    """What FineTuneJobs in the namespaces of this policy may ask for. An unset list means no restriction,
    except where its description says otherwise; an empty list allows nothing."""

    images: _Names = Field(
        default_factory=list, max_length=64,
        description="Trainer images `spec.image` may name: exact references, or prefixes ending in `*` (for "
        "example `registry.example.com/ml/*`). A job without `spec.image` runs the operator's configured "
        "trainer image and is always allowed. Defaults to none (only the configured trainer image; the chart's "
        "default policy lists it).",
    )
    service_accounts: _Names = Field(
        default_factory=list, max_length=64,
        description="Service accounts `spec.serviceAccountName` may name (an IRSA or workload-identity account "
        "carries its cloud role). Defaults to none: only the namespace's `default` account.",
    )
    secrets: _Names | None = Field(
        default=None, max_length=256,
        description="Secret names the `secretRef`s of baseModel, dataset, retrieval, output and tracking.mlflow may "
        "name. Defaults to any Secret of the FineTuneJob's namespace.",
    )
    tolerations: list[TolerationRule] | None = Field(
        default=None, max_length=64,
        description="Tolerations `spec.resources.tolerations` may carry. A toleration without a key (operator "
        "Exists: every taint, control-plane nodes included) is refused by every policy. Defaults to any "
        "toleration with a key.",
    )
    node_selector_keys: _Names | None = Field(
        default=None, max_length=64,
        description="Label keys `spec.resources.nodeSelector` may use. Defaults to any key (the chart's default "
        "policy lists the GPU-product, instance-type and zone labels).",
    )
    priority_classes: _Names | None = Field(
        default=None, max_length=64,
        description="PriorityClasses `spec.resources.priorityClassName` may name. Names starting with `system-` "
        "are refused by every policy. Defaults to any other class.",
    )
    gpu_resource_names: _Names | None = Field(
        default=None, max_length=16,
        description="Extended resource names `spec.resources.gpuResourceName` may name. Defaults to "
        "`nvidia.com/gpu` only.",
    )
    max_gpus: int | None = Field(
        default=None, ge=1, le=100_000,
        description="Most GPUs one job may use: checked at admission against `spec.resources.gpus`, and by the "
        "operator against the planned GPUs of an auto-sized job (it then fails with reason PolicyViolation "
        "before any training pod). Defaults to no cap.",
    )
    max_gpu_hours: float | None = Field(
        default=None, gt=0, le=10_000_000,
        description="Most GPU-hours one job may use: every job must then set `spec.budget.maxGpuHours` at or "
        "below it (the operator's pre-flight holds the job to its budget). Defaults to no cap.",
    )
    output_uri_prefixes: _Names | None = Field(
        default=None, max_length=64,
        description="Prefixes `spec.output.uri` must start with. " + _PREFIX_HELP + " Defaults to any URI.",
    )
    data_uri_prefixes: _Names | None = Field(
        default=None, max_length=64,
        description="Prefixes the data URIs (dataset.train, dataset.validation, retrieval.corpus, "
        "evaluation.testSet, evaluation.preferenceTestSet, evaluation.glossary) must start with. " + _PREFIX_HELP
        + " Defaults to any URI.",
    )
    model_uri_prefixes: _Names | None = Field(
        default=None, max_length=64,
        description="Prefixes `spec.baseModel.uri` must start with (for example `hf://` for the hub only); a chained "
        "stage (baseModel.fromJob) has none to check. " + _PREFIX_HELP + " Defaults to any URI.",
    )


class PolicyMeta(api._Model):
    name: str = Field(max_length=253, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class FineTunePolicy(api._Model):
    """A whole FineTunePolicy object."""

    api_version: str = Field(alias="apiVersion", pattern=rf"^{api.GROUP}/{api.VERSION}$")
    kind: str = Field(pattern=rf"^{KIND}$")
    metadata: PolicyMeta
    spec: FineTunePolicySpec = Field(default_factory=FineTunePolicySpec)


# --- the policy's CRD --------------------------------------------------------------------------------

PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Max-GPUs", "type": "integer", "jsonPath": ".spec.maxGpus", "description": "GPU cap per job."},
    {"name": "Max-GPU-Hours", "type": "number", "jsonPath": ".spec.maxGpuHours",
     "description": "GPU-hour cap per job."},
    {"name": "Output-Prefixes", "type": "string", "jsonPath": ".spec.outputUriPrefixes",
     "description": "Where outputs may go."},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def build_policy_crd() -> dict[str, Any]:
    schema = {
        "type": "object",
        "description": "FineTunePolicy says what FineTuneJobs may ask for in the namespaces that "
        f"select it (label `{NAMESPACE_LABEL}: <name>`; namespaces without the label get the policy "
        f"named `{DEFAULT_POLICY}`). The API server enforces it at admission.",
        "properties": {
            "apiVersion": {"type": "string", "description": f"{api.API_VERSION}."},
            "kind": {"type": "string", "description": f"{KIND}."},
            "metadata": {"type": "object"},
            "spec": model_schema(FineTunePolicySpec),
        },
    }
    return crd_object(KIND, PLURAL, SINGULAR, SHORT_NAMES, "Cluster", schema, PRINTER_COLUMNS)


# --- the ValidatingAdmissionPolicy -----------------------------------------------------------------------

def _present(path: str) -> str:
    """CEL: every step of `object.spec.<path>` is set (`resources.gpus` -> has(...resources) && has(...gpus))."""
    parts = path.split(".")
    return " && ".join(f"has(object.spec.{'.'.join(parts[:i + 1])})" for i in range(len(parts)))


def _quoted(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


_BY = "' is not allowed by FineTunePolicy ' + params.metadata.name"
_PREFIX_MATCH = "params.spec.{field}.exists(p, {uri}.startsWith(p.replace('{{namespace}}', namespaceObject.metadata.name)))"
_IMAGE_MATCH = ("params.spec.?images.orValue([]).exists(p, p.endsWith('*') ? "
                "object.spec.image.startsWith(p.substring(0, p.size() - 1)) : object.spec.image == p)")
_SECRET_OK = "!has(params.spec.secrets) || s in params.spec.secrets"
_TOLERATION_OK = ("!has(params.spec.tolerations) || params.spec.tolerations.exists(a, a.key == t.key "
                  "&& (!has(a.effect) || (has(t.effect) && t.effect == a.effect)) "
                  "&& (!has(a.value) || (has(t.value) && t.value == a.value)))")
_GPU_NAMES = f"params.spec.?gpuResourceNames.orValue({DEFAULT_GPU_RESOURCE_NAMES!r})"


def _listed(field: str) -> str:
    return f"(has(params.spec.{field}) ? params.spec.{field}.join(', ') : 'any')"


def _validation(expression: str, message: str) -> dict[str, Any]:
    """One check: passes when the parameter is not the namespace's policy, else when `expression` holds."""
    return {
        "expression": f"!variables.applies || ({expression})",
        "messageExpression": message,
        "reason": "Forbidden",
    }


def _validations() -> list[dict[str, Any]]:
    uri_checks = []
    for field, variable, what in (
        ("outputUriPrefixes", "outputUris", "spec.output.uri"),
        ("dataUriPrefixes", "dataUris", "a data URI (dataset.train, dataset.validation, retrieval.corpus, "
                                         "evaluation.testSet, evaluation.preferenceTestSet or evaluation.glossary)"),
        ("modelUriPrefixes", "modelUris", "spec.baseModel.uri"),
    ):
        bad = f"variables.{variable}.filter(u, !({_PREFIX_MATCH.format(field=field, uri='u')}))"
        uri_checks.append(_validation(
            f"!has(params.spec.{field}) || size({bad}) == 0",
            f"'{what}: ' + {bad}[0] + ' is outside the prefixes of FineTunePolicy ' + params.metadata.name + "
            f"' (' + params.spec.{field}.map(p, p.replace('{{namespace}}', namespaceObject.metadata.name))"
            ".join(', ') + '); write it under one of them'",
        ))
    bad_secrets = f"variables.secretNames.filter(s, !({_SECRET_OK}))"
    bad_tolerations = f"variables.tolerations.filter(t, has(t.key) && t.key != '' && !({_TOLERATION_OK}))"
    return [
        _validation(
            f"!has(object.spec.image) || {_IMAGE_MATCH}",
            f"'spec.image: ' + object.spec.image + {_BY} + ' (allowed: ' + "
            "(params.spec.?images.orValue([]).size() == 0 ? 'none' : params.spec.images.join(', ')) + "
            "'); remove spec.image to run the operator trainer image, or ask the cluster admin to allow it'",
        ),
        _validation(
            "!has(object.spec.serviceAccountName) || object.spec.serviceAccountName == 'default' || "
            "object.spec.serviceAccountName in params.spec.?serviceAccounts.orValue([])",
            f"'spec.serviceAccountName: ' + object.spec.serviceAccountName + {_BY} + ' (allowed: default' + "
            "(params.spec.?serviceAccounts.orValue([]).size() == 0 ? '' : ', ' + params.spec.serviceAccounts.join(', ')) "
            "+ '); remove it to use the namespace default service account'",
        ),
        _validation(
            f"size({bad_secrets}) == 0",
            f"'secretRef.name: ' + {bad_secrets}[0] + {_BY} + ' (allowed: ' + {_listed('secrets')} + ')'",
        ),
        _validation(
            "variables.tolerations.all(t, has(t.key) && t.key != '')",
            "'spec.resources.tolerations: a toleration without a key (operator Exists) tolerates every taint, "
            "control-plane nodes included, and is refused by FineTunePolicy ' + params.metadata.name + "
            "'; name the taint key'",
        ),
        _validation(
            f"size({bad_tolerations}) == 0",
            f"'spec.resources.tolerations: key ' + {bad_tolerations}[0].key + {_BY} + "
            "' (allowed keys: ' + params.spec.tolerations.map(a, a.key).join(', ') + ')'",
        ),
        _validation(
            "!has(params.spec.nodeSelectorKeys) || variables.nodeSelectorKeys.all(k, k in params.spec.nodeSelectorKeys)",
            "'spec.resources.nodeSelector: key ' + variables.nodeSelectorKeys.filter(k, !(k in "
            f"params.spec.nodeSelectorKeys))[0] + {_BY} + ' (allowed keys: ' + {_listed('nodeSelectorKeys')} + ')'",
        ),
        _validation(
            f"!({_present('resources.priorityClassName')}) || "
            "!object.spec.resources.priorityClassName.startsWith('system-')",
            "'spec.resources.priorityClassName: ' + object.spec.resources.priorityClassName + ' is a system "
            "priority class (it can preempt cluster-critical pods) and is refused by FineTunePolicy ' + "
            "params.metadata.name",
        ),
        _validation(
            f"!({_present('resources.priorityClassName')}) || !has(params.spec.priorityClasses) || "
            "object.spec.resources.priorityClassName in params.spec.priorityClasses",
            f"'spec.resources.priorityClassName: ' + object.spec.resources.priorityClassName + {_BY} + "
            f"' (allowed: ' + {_listed('priorityClasses')} + ')'",
        ),
        _validation(
            f"!({_present('resources.gpuResourceName')}) || object.spec.resources.gpuResourceName in {_GPU_NAMES}",
            f"'spec.resources.gpuResourceName: ' + object.spec.resources.gpuResourceName + {_BY} + "
            f"' (allowed: ' + {_GPU_NAMES}.join(', ') + ')'",
        ),
        _validation(
            f"!has(params.spec.maxGpus) || !({_present('resources.gpus')}) || "
            "object.spec.resources.gpus <= params.spec.maxGpus",
            "'spec.resources.gpus: ' + string(object.spec.resources.gpus) + ' is more than the ' + "
            "string(params.spec.maxGpus) + ' GPUs per job that FineTunePolicy ' + params.metadata.name + ' allows'",
        ),
        _validation(
            f"!has(params.spec.maxGpuHours) || ({_present('budget.maxGpuHours')} && "
            "object.spec.budget.maxGpuHours <= params.spec.maxGpuHours)",
            "'spec.budget.maxGpuHours: ' + (has(object.spec.budget) ? string(object.spec.budget.maxGpuHours) : "
            "'unset') + ' - FineTunePolicy ' + params.metadata.name + ' requires a budget of at most ' + "
            "string(params.spec.maxGpuHours) + ' GPU-hours per job; set spec.budget.maxGpuHours'",
        ),
        *uri_checks,
    ]


def _variables() -> list[dict[str, str]]:
    labels = "namespaceObject.metadata.labels"
    return [
        {"name": "applies", "expression":
            f"has({labels}) && {_quoted(NAMESPACE_LABEL)} in {labels} ? "
            f"{labels}[{_quoted(NAMESPACE_LABEL)}] == params.metadata.name : "
            f"params.metadata.name == {_quoted(DEFAULT_POLICY)}"},
        {"name": "secretNames", "expression":
            "[?object.spec.?baseModel.?secretRef.?name, ?object.spec.?dataset.?secretRef.?name, "
            "?object.spec.?retrieval.?secretRef.?name, ?object.spec.?output.?secretRef.?name, "
            "?object.spec.?tracking.?mlflow.?secretRef.?name]"},
        {"name": "tolerations", "expression":
            f"{_present('resources.tolerations')} ? object.spec.resources.tolerations : []"},
        {"name": "nodeSelectorKeys", "expression":
            f"{_present('resources.nodeSelector')} ? object.spec.resources.nodeSelector.map(k, k) : []"},
        {"name": "outputUris", "expression": "[object.spec.output.uri]"},
        # A chained stage (baseModel.fromJob) has no URI: it starts from its base job's output, which that
        # job's own outputUriPrefixes confined.
        {"name": "modelUris", "expression": "[?object.spec.baseModel.?uri]"},
        {"name": "dataUris", "expression":
            "[object.spec.dataset.train, ?object.spec.dataset.?validation, ?object.spec.?retrieval.?corpus, "
            "?object.spec.?evaluation.?testSet, ?object.spec.?evaluation.?preferenceTestSet, "
            "?object.spec.?evaluation.?glossary]"},
    ]


def build_admission_policy() -> list[dict[str, Any]]:
    """The ValidatingAdmissionPolicy and its binding (every FineTunePolicy as a parameter)."""
    labels = {"app.kubernetes.io/name": "finetune-operator", "app.kubernetes.io/part-of": "finetune-operator"}
    vap = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": ADMISSION_POLICY_NAME, "labels": labels},
        "spec": {
            "failurePolicy": "Fail",
            "paramKind": {"apiVersion": api.API_VERSION, "kind": KIND},
            "matchConstraints": {"resourceRules": [{
                "apiGroups": [api.GROUP],
                "apiVersions": [api.VERSION],
                "operations": ["CREATE"],
                "resources": [api.PLURAL],
            }]},
            "variables": _variables(),
            "validations": _validations(),
        },
    }
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": ADMISSION_POLICY_NAME, "labels": labels},
        "spec": {
            "policyName": ADMISSION_POLICY_NAME,
            # Every FineTunePolicy is a parameter; `applies` keeps only the namespace's own. None at all:
            # every FineTuneJob is refused (fail closed).
            "paramRef": {"selector": {}, "parameterNotFoundAction": "Deny"},
            "validationActions": ["Deny"],
        },
    }
    return [vap, binding]


# --- what the operator checks itself ---------------------------------------------------------------------

def policy_name(namespace_labels: dict[str, str] | None) -> str:
    """The FineTunePolicy a namespace selects."""
    return (namespace_labels or {}).get(NAMESPACE_LABEL) or DEFAULT_POLICY


def missing_policy(name: str, namespace: str) -> str:
    return (f"namespace {namespace} selects FineTunePolicy {name} (label {NAMESPACE_LABEL}), which does not "
            f"exist; create it, or label the namespace with an existing policy")


def over_gpu_cap(policy: dict[str, Any] | None, gpus: int) -> str | None:
    """Why a plan of `gpus` GPUs breaks the policy's maxGpus, or None."""
    if not policy:
        return None
    cap = (policy.get("spec") or {}).get("maxGpus")
    if cap is None or gpus <= cap:
        return None
    name = (policy.get("metadata") or {}).get("name")
    return (f"the plan needs {gpus} GPUs, more than the {cap} GPUs per job that FineTunePolicy {name} allows; "
            "lower the need (method lora or qlora, a smaller model or maxSeqLength) or ask the cluster admin")


CRD_HEADER = "# Generated from finetune_operator.policy by `make crd`. Do not edit by hand.\n"
TEMPLATE_HEADER = ("# Generated from finetune_operator.policy by `make crd`. Do not edit by hand.\n"
                   "{{- if .Values.policy.enabled }}\n")


def policy_crd_yaml() -> str:
    return CRD_HEADER + yaml.safe_dump(build_policy_crd(), sort_keys=False, width=120)


HELM_LABELS = '  labels:\n    {{- include "finetune-operator.labels" . | nindent 4 }}\n'


def admission_policy_template() -> str:
    """The chart template: the two objects with the release's labels, rendered only with `policy.enabled`."""
    objects = build_admission_policy()
    for obj in objects:
        del obj["metadata"]["labels"]
    # Helm parses templates for `{{`: the CEL here has none (a test keeps it that way), the labels' include
    # is the only action.
    body = yaml.safe_dump_all(objects, sort_keys=False, width=120, explicit_start=True)
    name = f"metadata:\n  name: {ADMISSION_POLICY_NAME}\n"
    assert body.count(name) == len(objects)
    return TEMPLATE_HEADER + body.replace(name, name + HELM_LABELS) + "{{- end }}\n"
