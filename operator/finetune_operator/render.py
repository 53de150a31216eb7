"""Pure renderers: a FineTuneJob and its sizing plan in, the child objects as plain dicts out.

No kopf, no Kubernetes client, no I/O: the same functions serve the operator (which creates what they
return), `finetune plan -o yaml` (which prints it for `kubectl apply -f -`) and the golden tests. Output is
deterministic: the same inputs give equal dicts, so re-rendering never produces a spurious diff.

A FineTuneJob `<name>` owns three children:

- ConfigMap `<name>-config`: the trainer's frozen config snapshot (`contract.CONFIG_KEY`), mounted
  read-only at `contract.CONFIG_PATH`.
- Service `<name>`: headless, publishing not-ready addresses, so every pod has the DNS name
  `<name>-<index>.<name>` from the moment it starts (rank 0 must be resolvable before it is Ready).
- Job `<name>`: an Indexed Job with one pod per node; `JOB_COMPLETION_INDEX` is the machine rank and
  pod 0 is the rendezvous host.

With `spec.pilot`, the pilot stage (`finetune_operator.pilot`) is rendered by the same functions with
`stage="pilot"` from the derived pilot job: `<name>-pilot-config`, Service and Job `<name>-pilot`, every
object and pod labelled `finetune.dev/stage: pilot` (the pilot Service selects only pilot pods). The main
stage's objects are exactly what they are without a pilot.

Design choices (why, not what):

- GPU memory placement uses NVIDIA GPU feature discovery's `nvidia.com/gpu.memory` node label (MiB per
  GPU). GPUs report less than their marketing size (A10G "24GB" = 23028 MiB, L40S "48GB" = 46068 MiB,
  H100 80GB = 81559 MiB), so the node must have at least `tolerance * GiB * 1024` MiB (default 0.9), which
  still shuts out the next smaller class (16 of 24, 40 of 48). Node affinity only has `Gt`, so the bound
  is written as `Gt (minimum - 1)`.
- `FT_MAIN_ADDRESS` is `<name>-0.<service>.<namespace>.svc`: namespace-qualified so it does not depend
  on the pod's DNS search list order, and without the cluster domain (`cluster.local` is configurable
  per cluster) -- the `<cluster-domain>` search entry completes it.
- Credentials only ever arrive as `envFrom: secretRef` (or the service account's projected token), never
  as values. `envFrom` sources later in the list win on duplicate keys, so the output's secret comes last
  and its S3 keys are the ones boto3 sees; a model secret usually only adds HF_TOKEN.
- `automountServiceAccountToken: false` always: the trainer never calls the Kubernetes API, and IRSA,
  EKS Pod Identity and Azure workload identity inject their own projected token volume through their
  mutating webhooks (independent of automount); GKE workload identity uses the metadata server.
- The operator's S3 endpoint/region (settings) go in as `AWS_ENDPOINT_URL` / `AWS_REGION` /
  `AWS_DEFAULT_REGION`, which boto3 reads natively. Kubernetes gives `env` precedence over `envFrom`, so
  when the operator configures an endpoint it applies to every job; leave it unset to let each job's
  Secret carry its own `AWS_ENDPOINT_URL`.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from finetune_operator import contract, preflight, uris
from finetune_operator.quantity import parse_quantity_bytes
from finetune_operator.settings import OperatorSettings
from finetune_operator.spec import API_VERSION, KIND, BaseJobStatus, FineTuneJob, ObjectMeta, Plan

#: Kubernetes caps names used as DNS labels (Service names, pod host names, label values) at 63.
MAX_DNS_LABEL = 63

LABEL_JOB = "finetune.dev/job"
LABEL_STAGE = "finetune.dev/stage"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_PART_OF = "app.kubernetes.io/part-of"
APP_NAME = "finetune-operator"
MANAGED_BY = "finetune-operator"
COMPONENT_TRAINER = "trainer"

KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"

CONTAINER_NAME = "trainer"
TRAINER_COMMAND = ["python", "-m", "finetune_trainer.launch"]
PORT_NAME = "rendezvous"
NVIDIA_GPU = "nvidia.com/gpu"

CONFIG_DIR = posixpath.dirname(contract.CONFIG_PATH)
CACHE_DIR = "/var/cache/finetune"
TMP_DIR = "/tmp"
SHM_DIR = "/dev/shm"
VOLUME_CONFIG = "config"
VOLUME_SHM = "dshm"
VOLUME_CACHE = "cache"
VOLUME_TMP = "tmp"


@dataclass(frozen=True)
class ChildNames:
    """Names of a FineTuneJob's children (all in the FineTuneJob's namespace)."""

    config_map: str
    service: str
    job: str


def child_names(job_name: str, stage: str | None = None) -> ChildNames:
    """Deterministic child names. The spec model limits `job_name` to 52 characters, so each name, and the
    longest pod host name `<job>-<index>` (sizing caps a run at 4096 GPUs, so index <= 4095), fit in 63.

    `stage="pilot"`: `<name>-pilot-config` (a ConfigMap name may have 253 characters) and `<name>-pilot`
    (58 at most: pod host names fit 63 up to index 9999; a LoRA pilot has a node or two).
    `stage="preflight"`: `<name>-preflight-config` and the Job `<name>-preflight` (62 at most; no Service)."""
    if stage is not None:
        base = f"{job_name}-{stage}"
        names = ChildNames(config_map=f"{base}-config", service=base, job=base)
        # The pre-flight's one non-indexed pod has a generated name: only the Job name (a label value) counts.
        longest = MAX_DNS_LABEL if stage == preflight.STAGE else MAX_DNS_LABEL - 5
        assert len(base) <= longest, f"child name {base!r} is too long"
        return names
    names = ChildNames(config_map=f"{job_name}-config", service=job_name, job=job_name)
    for name in (names.config_map, names.service, names.job):
        assert len(name) <= MAX_DNS_LABEL, f"child name {name!r} is longer than {MAX_DNS_LABEL} characters"
    return names


def main_address(job_name: str, namespace: str, stage: str | None = None) -> str:
    """DNS name of pod 0 (the rendezvous host) through the headless Service."""
    names = child_names(job_name, stage)
    return f"{names.job}-0.{names.service}.{namespace}.svc"


def labels(job: FineTuneJob, stage: str | None = None) -> dict[str, str]:
    """Labels every child carries; `finetune.dev/job` selects a job's objects and pods (of both stages),
    `finetune.dev/stage` marks the pilot stage's."""
    name = job.metadata.name
    result = {
        LABEL_NAME: APP_NAME,
        LABEL_INSTANCE: name,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_PART_OF: "finetune",
        LABEL_JOB: name,
    }
    if stage is not None:
        result[LABEL_STAGE] = stage
    return result


def pod_selector(job: FineTuneJob, stage: str | None = None) -> dict[str, str]:
    """Labels that select the training pods of a job (the Service's selector). The main stage's also
    matches the pilot's pods (it predates stages; `stage_of` tells them apart), the pilot's only its own."""
    component = preflight.COMPONENT if stage == preflight.STAGE else COMPONENT_TRAINER
    selector = {LABEL_JOB: job.metadata.name, LABEL_COMPONENT: component}
    if stage is not None:
        selector[LABEL_STAGE] = stage
    return selector


def stage_of(obj: Mapping[str, Any]) -> str | None:
    """The stage of a child or pod: "pilot", or None for the main stage."""
    return ((obj.get("metadata") or {}).get("labels") or {}).get(LABEL_STAGE)


def owner_reference(job_meta: ObjectMeta | Mapping[str, Any]) -> dict[str, Any]:
    """The controller owner reference to a FineTuneJob: its children are garbage-collected with it."""
    name: str | None
    uid: str | None
    if isinstance(job_meta, ObjectMeta):
        name, uid = job_meta.name, job_meta.uid
    else:
        name, uid = job_meta.get("name"), job_meta.get("uid")
    if not name or not uid:
        raise ValueError("an owner reference needs the FineTuneJob's metadata.name and metadata.uid")
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(job: FineTuneJob, name: str, extra_labels: Mapping[str, str] | None = None,
              stage: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": job.metadata.namespace,
        "labels": {**labels(job, stage), **(extra_labels or {})},
    }
    # Without a uid (plan time, `finetune plan -o yaml`) there is nothing to own the children yet;
    # `kubectl apply` rejects an owner reference without a uid.
    if job.metadata.uid:
        meta["ownerReferences"] = [owner_reference(job.metadata)]
    return meta


def trainer_image(job: FineTuneJob, settings: OperatorSettings) -> str:
    return job.spec.image or settings.trainer_image


def render_config_map(job: FineTuneJob, plan: Plan, settings: OperatorSettings,
                      stage: str | None = None, rendezvous_id: str | None = None,
                      base: BaseJobStatus | None = None) -> dict[str, Any]:
    """The ConfigMap holding the trainer's config snapshot (`rendezvous_id`, `base`: see `render_children`)."""
    names = child_names(job.metadata.name, stage)
    snapshot = contract.resolve(job, plan, trainer_image(job, settings),
                                "pilot" if stage == "pilot" else "preflight" if stage == preflight.STAGE else None,
                                rendezvous_id=rendezvous_id, base=base)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, names.config_map, stage=stage),
        "data": {contract.CONFIG_KEY: contract.config_json(snapshot)},
    }


def render_service(job: FineTuneJob, plan: Plan, settings: OperatorSettings,
                   stage: str | None = None) -> dict[str, Any]:
    """The headless Service that gives each training pod a stable DNS name."""
    names = child_names(job.metadata.name, stage)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, names.service, stage=stage),
        "spec": {
            "clusterIP": "None",
            # Rank 0 must resolve while the pods start, long before any readiness.
            "publishNotReadyAddresses": True,
            "selector": pod_selector(job, stage),
            "ports": [
                {
                    "name": PORT_NAME,
                    "port": settings.main_port,
                    "targetPort": settings.main_port,
                    "protocol": "TCP",
                }
            ],
        },
    }


def render_network_policy(job: FineTuneJob, settings: OperatorSettings, stage: str | None = None) -> dict[str, Any]:
    """The NetworkPolicy around a stage's training pods: ingress only from the same stage's pods.

    All ports, not only the rendezvous port: after the rendezvous the ranks connect to each other on ports
    the collective library picks (gloo, NCCL). Nothing else needs to reach a training pod (kubelet probes
    are exempt from NetworkPolicies). Egress stays open unless the chart lists egress rules
    (`settings.network_policy_egress`): then same-job pods, DNS and those rules only."""
    selector = pod_selector(job, stage)
    spec: dict[str, Any] = {
        "podSelector": {"matchLabels": selector},
        "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"podSelector": {"matchLabels": selector}}]}],
    }
    if settings.network_policy_egress:
        spec["policyTypes"].append("Egress")
        spec["egress"] = [
            {"to": [{"podSelector": {"matchLabels": selector}}]},
            {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]},
            *settings.network_policy_egress,
        ]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(job, child_names(job.metadata.name, stage).service, stage=stage),
        "spec": spec,
    }


@dataclass(frozen=True)
class _PvcMount:
    claim: str
    read_only: bool


def pvc_mounts(job: FineTuneJob) -> list[_PvcMount]:
    """Claims named by `pvc://` URIs, sorted; the output's claim is writable, the others read-only."""
    spec = job.spec
    read = [
        spec.base_model.resolved_uri(),
        spec.dataset.train,
        spec.dataset.validation,
        spec.evaluation.test_set,
        spec.evaluation.preference_test_set,
        spec.evaluation.glossary,
        spec.retrieval.corpus if spec.retrieval else None,
    ]
    claims: dict[str, bool] = {}
    for uri in read:
        if uri and uri.startswith("pvc://"):
            claims.setdefault(uris.parse(uri, ("pvc",)).authority, True)
    if spec.output.uri.startswith("pvc://"):
        claims[uris.parse(spec.output.uri, ("pvc",)).authority] = False
    return [_PvcMount(claim, read_only) for claim, read_only in sorted(claims.items())]


def _uses_s3(job: FineTuneJob) -> bool:
    spec = job.spec
    named = [
        spec.base_model.resolved_uri(),
        spec.dataset.train,
        spec.dataset.validation,
        spec.output.uri,
        spec.evaluation.test_set,
        spec.evaluation.preference_test_set,
        spec.evaluation.glossary,
        spec.retrieval.corpus if spec.retrieval else None,
    ]
    return any(uri and uri.startswith("s3://") for uri in named)


#: The keys of spec.tracking.mlflow.secretRef the training pods get: MLflow's own credential variables.
MLFLOW_SECRET_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def tracking_env(job: FineTuneJob) -> list[dict[str, Any]]:
    """spec.tracking.mlflow.secretRef, key by key (`secretKeyRef`, each optional): only MLflow's credential
    variables. Not `envFrom`: an MLflow Secret often holds AWS keys too (for clients that upload artifacts to
    the server's bucket), which would shadow the storage Secrets or the pod's IRSA identity; and as `env` these
    win over any MLFLOW_* key a storage Secret happens to hold."""
    mlflow = job.spec.tracking.mlflow if job.spec.tracking else None
    if mlflow is None or mlflow.secret_ref is None:
        return []
    return [{"name": key, "valueFrom": {"secretKeyRef": {"name": mlflow.secret_ref.name, "key": key,
                                                         "optional": True}}}
            for key in MLFLOW_SECRET_KEYS]


def secret_names(job: FineTuneJob, settings: OperatorSettings) -> list[str]:
    """Secrets projected with `envFrom`, in precedence order (last wins): model, dataset, retrieval corpus,
    output. (The MLflow Secret is projected key by key: `tracking_env`.)

    The operator's default S3 secret stands in when the spec names no dataset or output secret, uses S3,
    and sets no service account -- static keys in the environment would shadow IRSA's web identity.
    """
    spec = job.spec
    retrieval = spec.retrieval.secret_ref if spec.retrieval else None
    refs = [spec.base_model.secret_ref, spec.dataset.secret_ref, retrieval, spec.output.secret_ref]
    ordered = [ref.name for ref in refs if ref is not None]
    if (
        settings.s3_secret
        and spec.dataset.secret_ref is None
        and retrieval is None
        and spec.output.secret_ref is None
        and spec.service_account_name is None
        and _uses_s3(job)
    ):
        ordered.append(settings.s3_secret)
    # One entry per Secret, at its last (strongest) position.
    result: list[str] = []
    for name in reversed(ordered):
        if name not in result:
            result.insert(0, name)
    return result


def _scale(quantity: str, factor: int) -> str:
    """`"32Gi" x 8 -> "256Gi"`: multiply a Kubernetes quantity, keeping its suffix."""
    digits = quantity.rstrip("kKMGTPEimu")
    suffix = quantity[len(digits) :]
    value = (Decimal(digits) * factor).normalize()
    if suffix == "m" and value % 1000 == 0:  # "1000m" -> "1", as Kubernetes itself would write it
        value, suffix = (value / 1000).normalize(), ""
    return f"{value:f}{suffix}"


def _processes(plan: Plan, settings: OperatorSettings) -> int:
    return plan.gpus_per_node if settings.use_gpus else settings.cpu_procs_per_node


#: Bytes per parameter of the base model's weights as downloaded (bf16/fp16 safetensors).
WEIGHT_BYTES_PER_PARAMETER = 2


def ephemeral_storage(job: FineTuneJob, plan: Plan | None, settings: OperatorSettings, weights: bool = True) -> str:
    """The local disk a pod asks the scheduler for: /tmp's sizeLimit plus the base model's weights (the
    cache volume holds them; its sizeLimit, FT_CACHE_SIZE, caps the rest: data, checkpoint staging).
    Parameters from the pre-flight's count, else the spec's; unknown: /tmp only. `weights=False`: the
    pre-flight, which reads headers, never the weights."""
    parameters = plan.estimate.parameters if plan is not None and plan.estimate is not None else None
    if not weights:
        parameters = 0
    elif parameters is None:
        billions = job.spec.base_model.parameters_billion()
        parameters = int(billions * 1e9) if billions else 0
    weights_gib = -(-parameters * WEIGHT_BYTES_PER_PARAMETER // 2**30)  # ceiling
    tmp_gib = -(-parse_quantity_bytes(settings.tmp_size) // 2**30)
    return f"{tmp_gib + weights_gib}Gi"


def _resources(job: FineTuneJob, plan: Plan, settings: OperatorSettings) -> dict[str, Any]:
    res = job.spec.resources
    procs = _processes(plan, settings)
    cpu = res.cpu or _scale(settings.cpu_per_process, procs)
    memory = res.memory or _scale(settings.memory_per_process, procs)
    requests: dict[str, str] = {"cpu": cpu, "memory": memory,
                                "ephemeral-storage": ephemeral_storage(job, plan, settings)}
    # No CPU limit: it throttles the data loader and starves the GPUs. A memory limit of
    # settings.memory_limit_factor x the request: a checkpoint load peaks above the steady state the request
    # reserves, and the memory-backed /dev/shm counts against it too; bounded, one job cannot take a node's
    # memory from its neighbours (and an OOMKilled pod steps down the ladder, finetune_operator.oomkill).
    limits: dict[str, str] = {"memory": _scale(memory, settings.memory_limit_factor)}
    if settings.use_gpus:
        requests[res.gpu_resource_name] = str(plan.gpus_per_node)
        limits[res.gpu_resource_name] = str(plan.gpus_per_node)
    return {"requests": requests, "limits": limits}


def gpu_memory_min_mib(plan: Plan, settings: OperatorSettings) -> int:
    """Least `nvidia.com/gpu.memory` (MiB) a node needs for the plan's GPU class (see module docstring)."""
    return int(plan.gpu_memory_gib * 1024 * settings.gpu_memory_tolerance)


def _affinity(job: FineTuneJob, plan: Plan, settings: OperatorSettings) -> dict[str, Any] | None:
    if not settings.use_gpus or not settings.gpu_memory_label:
        return None
    minimum = gpu_memory_min_mib(plan, settings)
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {
                        "matchExpressions": [
                            {"key": settings.gpu_memory_label, "operator": "Gt", "values": [str(minimum - 1)]}
                        ]
                    }
                ]
            }
        }
    }


def _tolerations(job: FineTuneJob, settings: OperatorSettings) -> list[dict[str, Any]]:
    result = [t.wire() for t in job.spec.resources.tolerations]
    if settings.use_gpus:
        # GPU node pools are commonly tainted `<gpu resource>:NoSchedule` (GKE, EKS and AKS GPU pools use
        # nvidia.com/gpu); tolerating it is what lets GPU pods land there at all.
        for key in dict.fromkeys([NVIDIA_GPU, job.spec.resources.gpu_resource_name]):
            toleration = {"key": key, "operator": "Exists", "effect": "NoSchedule"}
            if toleration not in result:
                result.append(toleration)
    return result


def _env(job: FineTuneJob, plan: Plan, settings: OperatorSettings, stage: str | None = None) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": contract.ENV_CONFIG, "value": contract.CONFIG_PATH},
        {"name": contract.ENV_NUM_MACHINES, "value": str(plan.nodes)},
        # Kubernetes injects the same variable into Indexed Job pods; spelled out here so the contract is
        # visible in the manifest (the Job controller keeps an existing definition).
        {
            "name": contract.ENV_MACHINE_RANK,
            "valueFrom": {
                "fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}
            },
        },
        {"name": contract.ENV_MAIN_ADDRESS, "value": main_address(job.metadata.name, job.metadata.namespace, stage)},
        {"name": contract.ENV_MAIN_PORT, "value": str(settings.main_port)},
        {"name": contract.ENV_PROCS_PER_MACHINE, "value": str(_processes(plan, settings))},
        {"name": contract.ENV_OUTPUT_URI, "value": job.spec.output.uri},
        {"name": contract.ENV_CACHE_DIR, "value": CACHE_DIR},
        {"name": contract.ENV_PVC_ROOT, "value": contract.DEFAULT_PVC_ROOT},
        # The root filesystem is read-only: home, temp files and the Hugging Face cache live on volumes.
        {"name": "HOME", "value": TMP_DIR},
        {"name": "TMPDIR", "value": TMP_DIR},
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
        *tracking_env(job),
    ]
    if settings.s3_endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": settings.s3_endpoint})
    if settings.s3_region:
        env.append({"name": "AWS_REGION", "value": settings.s3_region})
        env.append({"name": "AWS_DEFAULT_REGION", "value": settings.s3_region})
    return env


def _volumes(job: FineTuneJob, settings: OperatorSettings,
             stage: str | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    names = child_names(job.metadata.name, stage)
    volumes: list[dict[str, Any]] = [
        {
            "name": VOLUME_CONFIG,
            "configMap": {
                "name": names.config_map,
                "items": [{"key": contract.CONFIG_KEY, "path": posixpath.basename(contract.CONFIG_PATH)}],
            },
        },
        # The container runtime's default /dev/shm is 64MiB; NCCL and data-loader workers need far more.
        {"name": VOLUME_SHM, "emptyDir": {"medium": "Memory", "sizeLimit": settings.shm_size}},
        {"name": VOLUME_CACHE, "emptyDir": {"sizeLimit": settings.cache_size}},
        {"name": VOLUME_TMP, "emptyDir": {"sizeLimit": settings.tmp_size}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": VOLUME_CONFIG, "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": VOLUME_SHM, "mountPath": SHM_DIR},
        {"name": VOLUME_CACHE, "mountPath": CACHE_DIR},
        {"name": VOLUME_TMP, "mountPath": TMP_DIR},
    ]
    # Volume names are indexed, not the claim name: "pvc-" + a 63-character claim would exceed 63.
    for index, pvc in enumerate(pvc_mounts(job)):
        volume = f"pvc-{index}"
        volumes.append(
            {"name": volume, "persistentVolumeClaim": {"claimName": pvc.claim, "readOnly": pvc.read_only}}
        )
        mounts.append(
            {"name": volume, "mountPath": f"{contract.DEFAULT_PVC_ROOT}/{pvc.claim}", "readOnly": pvc.read_only}
        )
    return volumes, mounts


def _pod_security(settings: OperatorSettings) -> tuple[dict[str, Any], dict[str, Any]]:
    """Pod and container security contexts meeting the Pod Security Standards "restricted" profile."""
    pod = {
        "runAsNonRoot": True,
        "runAsUser": settings.run_as_user,
        "runAsGroup": settings.run_as_user,
        "fsGroup": settings.run_as_user,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    container = {
        "runAsNonRoot": True,
        "runAsUser": settings.run_as_user,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    return pod, container


def _pod_failure_policy() -> dict[str, Any]:
    return {
        "rules": [
            # Preemption, eviction, node drain: not the trainer's fault, so not counted against backoffLimit.
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            # Bad config/data/credentials or missed quality gates: a retry gives the same answer.
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": CONTAINER_NAME,
                    "operator": "In",
                    "values": [contract.EXIT_CONFIG_ERROR, contract.EXIT_GATES_FAILED],
                },
            },
        ]
    }


def _container(job: FineTuneJob, settings: OperatorSettings, command: list[str], env: list[dict[str, Any]],
               resources: dict[str, Any], mounts: list[dict[str, Any]],
               ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The trainer image's container (training or pre-flight): the job's Secrets by `envFrom`, the restricted
    security context, the termination message from the logs when the process wrote none."""
    _, container_security = _pod_security(settings)
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": trainer_image(job, settings),
        "imagePullPolicy": settings.image_pull_policy,
        # An argv list, never a shell string: no spec value is ever parsed by a shell.
        "command": command,
        "env": env,
    }
    if ports:
        container["ports"] = ports
    container.update({
        "resources": resources,
        "volumeMounts": mounts,
        "securityContext": container_security,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    })
    env_from = [{"secretRef": {"name": name}} for name in secret_names(job, settings)]
    if env_from:
        container["envFrom"] = env_from
    return container


def _pod_spec(job: FineTuneJob, settings: OperatorSettings, container: dict[str, Any],
              volumes: list[dict[str, Any]], *, subdomain: str | None = None,
              grace_seconds: int | None = None) -> dict[str, Any]:
    """What every pod of a job has (training or pre-flight); the caller adds its own placement.
    `subdomain` (the headless Service) and `grace_seconds` are the training pods'."""
    pod_security, _ = _pod_security(settings)
    pod_spec: dict[str, Any] = {}
    if subdomain:
        pod_spec["subdomain"] = subdomain
    pod_spec.update({
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        # Service links would add variables for every Service in the namespace to the trainer's env.
        "enableServiceLinks": False,
    })
    if grace_seconds is not None:
        pod_spec["terminationGracePeriodSeconds"] = grace_seconds
    pod_spec.update({"securityContext": pod_security, "containers": [container], "volumes": volumes})
    if job.spec.service_account_name:
        pod_spec["serviceAccountName"] = job.spec.service_account_name
    return pod_spec


def kueue_labels(job: FineTuneJob) -> dict[str, str]:
    """Kueue's queue and priority labels, copied from the FineTuneJob to the Job."""
    own = job.metadata.labels
    return {key: own[key] for key in (KUEUE_QUEUE_LABEL, KUEUE_PRIORITY_LABEL) if key in own}


def render_job(job: FineTuneJob, plan: Plan, settings: OperatorSettings, stage: str | None = None) -> dict[str, Any]:
    """The Indexed Job running one training pod per node."""
    names = child_names(job.metadata.name, stage)
    spec = job.spec
    volumes, mounts = _volumes(job, settings, stage)
    queued = kueue_labels(job)

    container = _container(job, settings, list(TRAINER_COMMAND), _env(job, plan, settings, stage),
                           _resources(job, plan, settings), mounts,
                           ports=[{"name": PORT_NAME, "containerPort": settings.main_port, "protocol": "TCP"}])
    pod_spec = _pod_spec(job, settings, container, volumes, subdomain=names.service,
                         grace_seconds=settings.termination_grace_seconds)
    if spec.resources.priority_class_name:
        pod_spec["priorityClassName"] = spec.resources.priority_class_name
    if spec.resources.node_selector:
        pod_spec["nodeSelector"] = dict(sorted(spec.resources.node_selector.items()))
    affinity = _affinity(job, plan, settings)
    if affinity:
        pod_spec["affinity"] = affinity
    tolerations = _tolerations(job, settings)
    if tolerations:
        pod_spec["tolerations"] = tolerations

    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": plan.nodes,
        "parallelism": plan.nodes,
        # The Job counts failed pods; one failure of a multi-node group fails every pod of it (a lost peer
        # breaks the collectives; measured with two-node jobs: 2 failures per incident on 2 nodes), so the
        # user's count of tolerated failed attempts is scaled by the group's size.
        "backoffLimit": spec.backoff_limit * plan.nodes,
        # Kueue creates the Job suspended and unsuspends it on admission.
        "suspend": spec.suspend or bool(queued.get(KUEUE_QUEUE_LABEL)),
        "ttlSecondsAfterFinished": settings.job_ttl_seconds,
        "podFailurePolicy": _pod_failure_policy(),
        # A replacement pod starts only once the old one is gone, so two pods never share a rank's host name.
        "podReplacementPolicy": "Failed",
        "template": {
            "metadata": {"labels": {**labels(job, stage), LABEL_COMPONENT: COMPONENT_TRAINER}},
            "spec": pod_spec,
        },
    }
    if spec.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds

    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(job, names.job, queued, stage),
        "spec": job_spec,
    }


def render_preflight_job(job: FineTuneJob, settings: OperatorSettings) -> dict[str, Any]:
    """The CPU pre-flight's Job (`finetune_operator.preflight`): one pod of the trainer image running the
    checks, with the training pods' secrets, volumes, security and service account, and no GPU."""
    stage = preflight.STAGE
    names = child_names(job.metadata.name, stage)
    spec = job.spec
    volumes, mounts = _volumes(job, settings, stage)
    # No /dev/shm: there are no collectives or data-loader workers.
    volumes = [v for v in volumes if v["name"] != VOLUME_SHM]
    mounts = [m for m in mounts if m["name"] != VOLUME_SHM]
    keep = {contract.ENV_CONFIG, contract.ENV_OUTPUT_URI, contract.ENV_CACHE_DIR, contract.ENV_PVC_ROOT, "HOME",
            "TMPDIR", "HF_HOME", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION"}
    env = [e for e in _env(job, preflight.placeholder_plan(spec), settings, stage) if e["name"] in keep]
    requests = {"cpu": settings.preflight_cpu, "memory": settings.preflight_memory}
    # Small and bounded: it reads headers, a tokenizer and the data files, never the weights.
    resources = {"requests": {**requests, "ephemeral-storage": ephemeral_storage(job, None, settings, weights=False)},
                 "limits": {k: _scale(v, 2) for k, v in requests.items()}}
    container = _container(job, settings, list(preflight.COMMAND), env, resources, mounts)
    pod_spec = _pod_spec(job, settings, container, volumes)
    pod_labels = {**labels(job, stage), LABEL_COMPONENT: preflight.COMPONENT}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(job, names.job, stage=stage),
        "spec": {
            "completions": 1,
            "parallelism": 1,
            "backoffLimit": preflight.BACKOFF_LIMIT,
            "activeDeadlineSeconds": settings.preflight_deadline_seconds,
            # spec.suspend holds every pod of the job, this one too; Kueue is not involved (no GPU, no quota).
            "suspend": bool(spec.suspend),
            "ttlSecondsAfterFinished": settings.job_ttl_seconds,
            "podFailurePolicy": _pod_failure_policy(),
            "podReplacementPolicy": "Failed",
            "template": {"metadata": {"labels": pod_labels}, "spec": pod_spec},
        },
    }


def render_children(job: FineTuneJob, plan: Plan, settings: OperatorSettings,
                    stage: str | None = None, rendezvous_id: str | None = None,
                    base: BaseJobStatus | None = None) -> list[dict[str, Any]]:
    """All children in creation order: ConfigMap, Service, NetworkPolicy (when `settings.network_policy`),
    Job: the Job's pods need the first two, and the policy is in place before any pod exists.

    `rendezvous_id`: the random id of the job's c10d rendezvous, kept in the config snapshot (the caller draws
    it; it matters only when the ConfigMap is created, which is the only time a snapshot is written whole).
    `base`: with spec.baseModel.fromJob, the chain's resolution (`TrainerConfig.base`); `job` is then
    `chain.apply`'s (its spec.baseModel.uri set).

    `stage="pilot"`: the pilot stage's, rendered from `pilot.pilot_job(job)` and its plan.
    `stage="preflight"`: the pre-flight's ConfigMap and Job (`plan` is ignored: `preflight.placeholder_plan`)."""
    if stage == preflight.STAGE:
        return [
            render_config_map(job, preflight.placeholder_plan(job.spec), settings, stage, base=base),
            render_preflight_job(job, settings),
        ]
    return [
        render_config_map(job, plan, settings, stage, rendezvous_id, base),
        render_service(job, plan, settings, stage),
        *([render_network_policy(job, settings, stage)] if settings.network_policy else []),
        render_job(job, plan, settings, stage),
    ]
