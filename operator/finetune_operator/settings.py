"""The operator's configuration, read once from its environment.

Every knob is an environment variable of the operator Deployment (the Helm chart maps its values onto
them, see `charts/finetune-operator/values.yaml`). These are the settings the renderers need; the
operator loop's own knobs (FT_METRICS_PORT, FT_STATUS_INTERVAL, FT_PEERING, FT_LOG_FORMAT) are read by
`metrics` and `handlers`. `OperatorSettings.from_env()` only reads the mapping it
is given and checks each value; a bad value raises `SettingsError` naming the variable and the fix, so
the operator fails at start-up instead of rendering broken pods later.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Literal

from finetune_operator import contract

DEFAULT_TRAINER_IMAGE = "ghcr.io/finetune-dev/finetune-trainer:0.1.0"
DEFAULT_GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"

PullPolicy = Literal["Always", "IfNotPresent", "Never"]
_PULL_POLICIES: tuple[PullPolicy, ...] = ("Always", "IfNotPresent", "Never")

_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$")
_IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@-]*$")
_K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
_URL = re.compile(r"^https?://[A-Za-z0-9._~:/@%+=,-]+$")
_REGION = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class SettingsError(ValueError):
    """A bad operator setting; the message names the environment variable and what it accepts."""


@dataclass(frozen=True)
class OperatorSettings:
    """Everything the renderers need that is not in a FineTuneJob. Defaults suit a GPU cluster."""

    #: FT_TRAINER_IMAGE: image of the training pods when a spec sets no `image`.
    trainer_image: str = DEFAULT_TRAINER_IMAGE
    #: FT_IMAGE_PULL_POLICY: Always, IfNotPresent or Never.
    image_pull_policy: PullPolicy = "IfNotPresent"
    #: FT_S3_ENDPOINT: S3 endpoint URL for every training pod (MinIO, SeaweedFS, ...); None: AWS default.
    s3_endpoint: str | None = None
    #: FT_S3_REGION: S3 region for every training pod; None: boto3's default chain.
    s3_region: str | None = None
    #: FT_S3_SECRET: Secret (in the job's namespace) with S3 keys, used when a spec names no secretRef.
    s3_secret: str | None = None
    #: FT_JOB_TTL_SECONDS: finished Jobs (and their pods) are deleted this long after they end.
    job_ttl_seconds: int = 86_400
    #: FT_GPU_MEMORY_LABEL: node label with the memory of one GPU in MiB (NVIDIA GPU feature discovery's
    #: `nvidia.com/gpu.memory`). Empty: no GPU-memory affinity (clusters without GFD).
    gpu_memory_label: str = DEFAULT_GPU_MEMORY_LABEL
    #: FT_GPU_MEMORY_TOLERANCE: fraction of the plan's GiB a node's label must reach. GPUs sold as "24GB"
    #: report less usable memory (A10G 23028 MiB, L40S "48GB" 46068 MiB, T4 "16GB" 15360 MiB), so an
    #: exact GiB*1024 bound would shut them out; 0.9 admits them and still excludes the next smaller class.
    gpu_memory_tolerance: float = 0.9
    #: FT_MAIN_PORT: rendezvous port of rank 0.
    main_port: int = contract.DEFAULT_MAIN_PORT
    #: FT_USE_GPUS: request GPUs for training pods. `false` runs the same world on CPU (tests, kind).
    use_gpus: bool = True
    #: FT_CPU_PROCS_PER_NODE: processes per pod when use_gpus is false.
    cpu_procs_per_node: int = 1
    #: FT_CPU_PER_PROCESS / FT_MEMORY_PER_PROCESS: default requests per GPU (or CPU process) of a pod,
    #: when the spec sets no resources.cpu / resources.memory (the spec documents 4 CPU and 32Gi per GPU).
    cpu_per_process: str = "4"
    memory_per_process: str = "32Gi"
    #: FT_MEMORY_LIMIT_FACTOR: a training pod's memory limit is this many times its request. Above 1: loading a
    #: checkpoint (rank 0 materializes full weights before FSDP shards them) peaks above the steady state the
    #: request reserves; bounded, so that one job cannot take a node's memory from its neighbours.
    memory_limit_factor: int = 2
    #: FT_TMP_SIZE: sizeLimit of /tmp (HOME and TMPDIR: compiler and kernel caches, temporary files; models,
    #: data and checkpoint staging go to the cache volume, FT_CACHE_SIZE).
    tmp_size: str = "8Gi"
    #: FT_CACHE_SIZE: size limit of the per-pod cache emptyDir (downloaded model, datasets, staging).
    cache_size: str = "200Gi"
    #: FT_SHM_SIZE: size limit of the memory-backed /dev/shm (NCCL and data-loader workers use it).
    shm_size: str = "16Gi"
    #: FT_RUN_AS_USER: UID (and GID) of the training container; the trainer image's user.
    run_as_user: int = 1000
    #: FT_TERMINATION_GRACE_SECONDS: time a training pod gets between SIGTERM (preemption, eviction,
    #: suspend) and SIGKILL to save a checkpoint. Kubernetes' default of 30s is too short for large models.
    termination_grace_seconds: int = 300
    #: FT_PREFLIGHT: run the CPU pre-flight Job (`finetune_operator.preflight`) before a job's first GPU Job.
    #: `false` creates the training Job at once (no data check, plan from the model's size, no budget
    #: refusal before start).
    preflight: bool = True
    #: FT_PREFLIGHT_CPU / FT_PREFLIGHT_MEMORY: requests of the pre-flight pod (its limits are twice them).
    #: It reads config, tokenizer and safetensors headers, and parses the data files with the trainer's
    #: readers (every row of every file is held in memory once, as the trainer does).
    preflight_cpu: str = "1"
    preflight_memory: str = "2Gi"
    #: FT_PREFLIGHT_DEADLINE_SECONDS: the pre-flight Job's activeDeadlineSeconds.
    preflight_deadline_seconds: int = 900
    #: FT_POLICY: the cluster has FineTunePolicies (the chart's `policy.enabled`). The API server enforces
    #: them at admission; the operator then also refuses a job whose namespace names a policy that does not
    #: exist, and an auto-sized plan above the policy's maxGpus (`finetune_operator.policy`), before any pod.
    policy: bool = False
    #: FT_POLICY_CACHE_SECONDS: how long the operator reuses a namespace's label and a FineTunePolicy it read
    #: (a thousand jobs in a namespace cost two reads, not two thousand); a change shows after at most this.
    policy_cache_seconds: int = 10
    #: FT_NETWORK_POLICY: give each training stage a NetworkPolicy (ingress only from the same stage's pods).
    #: Enforced only where the cluster's network plugin enforces NetworkPolicies.
    network_policy: bool = True
    #: FT_NETWORK_POLICY_EGRESS: a JSON list of NetworkPolicyEgressRule objects. Empty: egress stays open. Set:
    #: training pods may reach only the same job's pods, DNS (port 53) and these (S3, the model hub, ...).
    network_policy_egress: tuple[dict[str, object], ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorSettings:
        """Read the settings from `env` (default: os.environ). Unset or empty variables keep the default."""
        env = os.environ if env is None else env

        def get(name: str) -> str | None:
            value = env.get(name)
            return value.strip() if value is not None and value.strip() != "" else None

        defaults = {f.name: f.default for f in fields(cls)}
        values: dict[str, object] = {}

        image = get("FT_TRAINER_IMAGE")
        if image is not None:
            _check(_IMAGE.match(image) is not None, "FT_TRAINER_IMAGE", image, "an image reference like repo/name:tag")
            values["trainer_image"] = image
        policy = get("FT_IMAGE_PULL_POLICY")
        if policy is not None:
            _check(policy in _PULL_POLICIES, "FT_IMAGE_PULL_POLICY", policy, "Always, IfNotPresent or Never")
            values["image_pull_policy"] = policy
        endpoint = get("FT_S3_ENDPOINT")
        if endpoint is not None:
            _check(_URL.match(endpoint) is not None, "FT_S3_ENDPOINT", endpoint, "an http:// or https:// URL")
            values["s3_endpoint"] = endpoint
        region = get("FT_S3_REGION")
        if region is not None:
            _check(_REGION.match(region) is not None, "FT_S3_REGION", region, "a region name like us-east-1")
            values["s3_region"] = region
        secret = get("FT_S3_SECRET")
        if secret is not None:
            _check(
                _K8S_NAME.match(secret) is not None and len(secret) <= 253,
                "FT_S3_SECRET",
                secret,
                "a Secret name (lowercase letters, digits, '-', '.')",
            )
            values["s3_secret"] = secret
        values["job_ttl_seconds"] = _int(get("FT_JOB_TTL_SECONDS"), "FT_JOB_TTL_SECONDS", 0, 315_360_000, defaults["job_ttl_seconds"])
        label = env.get("FT_GPU_MEMORY_LABEL")
        if label is not None:
            label = label.strip()
            _check(
                label == "" or _LABEL_KEY.match(label) is not None,
                "FT_GPU_MEMORY_LABEL",
                label,
                "a node label key like nvidia.com/gpu.memory, or empty to disable the GPU-memory affinity",
            )
            values["gpu_memory_label"] = label
        tolerance = get("FT_GPU_MEMORY_TOLERANCE")
        if tolerance is not None:
            try:
                parsed = float(tolerance)
            except ValueError:
                parsed = -1.0
            _check(0.5 <= parsed <= 1.0, "FT_GPU_MEMORY_TOLERANCE", tolerance, "a fraction in [0.5, 1.0]")
            values["gpu_memory_tolerance"] = parsed
        values["main_port"] = _int(get("FT_MAIN_PORT"), "FT_MAIN_PORT", 1024, 65535, defaults["main_port"])
        use_gpus = get("FT_USE_GPUS")
        if use_gpus is not None:
            _check(use_gpus.lower() in _TRUE | _FALSE, "FT_USE_GPUS", use_gpus, "true or false")
            values["use_gpus"] = use_gpus.lower() in _TRUE
        values["cpu_procs_per_node"] = _int(get("FT_CPU_PROCS_PER_NODE"), "FT_CPU_PROCS_PER_NODE", 1, 256, defaults["cpu_procs_per_node"])
        for var, attr in (
            ("FT_CPU_PER_PROCESS", "cpu_per_process"),
            ("FT_MEMORY_PER_PROCESS", "memory_per_process"),
            ("FT_CACHE_SIZE", "cache_size"),
            ("FT_SHM_SIZE", "shm_size"),
            ("FT_TMP_SIZE", "tmp_size"),
            ("FT_PREFLIGHT_CPU", "preflight_cpu"),
            ("FT_PREFLIGHT_MEMORY", "preflight_memory"),
        ):
            quantity = get(var)
            if quantity is not None:
                _check(_QUANTITY.match(quantity) is not None, var, quantity, "a Kubernetes quantity like 4, 500m or 32Gi")
                values[attr] = quantity
        preflight = get("FT_PREFLIGHT")
        if preflight is not None:
            _check(preflight.lower() in _TRUE | _FALSE, "FT_PREFLIGHT", preflight, "true or false")
            values["preflight"] = preflight.lower() in _TRUE
        for var, attr in (("FT_POLICY", "policy"), ("FT_NETWORK_POLICY", "network_policy")):
            flag = get(var)
            if flag is not None:
                _check(flag.lower() in _TRUE | _FALSE, var, flag, "true or false")
                values[attr] = flag.lower() in _TRUE
        egress = get("FT_NETWORK_POLICY_EGRESS")
        if egress is not None:
            try:
                rules = json.loads(egress)
            except ValueError:
                rules = None
            _check(isinstance(rules, list) and all(isinstance(r, dict) for r in rules), "FT_NETWORK_POLICY_EGRESS",
                   egress, 'a JSON list of NetworkPolicyEgressRule objects, like [{"ports": [{"port": 443}]}]')
            values["network_policy_egress"] = tuple(rules or ())
        values["preflight_deadline_seconds"] = _int(
            get("FT_PREFLIGHT_DEADLINE_SECONDS"), "FT_PREFLIGHT_DEADLINE_SECONDS", 30, 86_400,
            defaults["preflight_deadline_seconds"])
        values["policy_cache_seconds"] = _int(get("FT_POLICY_CACHE_SECONDS"), "FT_POLICY_CACHE_SECONDS", 0, 3600,
                                              defaults["policy_cache_seconds"])
        values["memory_limit_factor"] = _int(get("FT_MEMORY_LIMIT_FACTOR"), "FT_MEMORY_LIMIT_FACTOR", 1, 16,
                                             defaults["memory_limit_factor"])
        values["run_as_user"] = _int(get("FT_RUN_AS_USER"), "FT_RUN_AS_USER", 1, 2_147_483_647, defaults["run_as_user"])
        values["termination_grace_seconds"] = _int(
            get("FT_TERMINATION_GRACE_SECONDS"), "FT_TERMINATION_GRACE_SECONDS", 1, 86_400,
            defaults["termination_grace_seconds"],
        )

        return cls(**{name: values.get(name, defaults[name]) for name in defaults})  # type: ignore[arg-type]

    def env(self) -> dict[str, str]:
        """The settings as the environment variables `from_env` reads (for the chart's docs and tests)."""
        out = {
            "FT_TRAINER_IMAGE": self.trainer_image,
            "FT_IMAGE_PULL_POLICY": self.image_pull_policy,
            "FT_JOB_TTL_SECONDS": str(self.job_ttl_seconds),
            "FT_GPU_MEMORY_LABEL": self.gpu_memory_label,
            "FT_GPU_MEMORY_TOLERANCE": repr(self.gpu_memory_tolerance),
            "FT_MAIN_PORT": str(self.main_port),
            "FT_USE_GPUS": "true" if self.use_gpus else "false",
            "FT_CPU_PROCS_PER_NODE": str(self.cpu_procs_per_node),
            "FT_CPU_PER_PROCESS": self.cpu_per_process,
            "FT_MEMORY_PER_PROCESS": self.memory_per_process,
            "FT_CACHE_SIZE": self.cache_size,
            "FT_SHM_SIZE": self.shm_size,
            "FT_TMP_SIZE": self.tmp_size,
            "FT_MEMORY_LIMIT_FACTOR": str(self.memory_limit_factor),
            "FT_RUN_AS_USER": str(self.run_as_user),
            "FT_TERMINATION_GRACE_SECONDS": str(self.termination_grace_seconds),
            "FT_PREFLIGHT": "true" if self.preflight else "false",
            "FT_PREFLIGHT_CPU": self.preflight_cpu,
            "FT_PREFLIGHT_MEMORY": self.preflight_memory,
            "FT_PREFLIGHT_DEADLINE_SECONDS": str(self.preflight_deadline_seconds),
            "FT_POLICY": "true" if self.policy else "false",
            "FT_POLICY_CACHE_SECONDS": str(self.policy_cache_seconds),
            "FT_NETWORK_POLICY": "true" if self.network_policy else "false",
            "FT_NETWORK_POLICY_EGRESS": json.dumps(list(self.network_policy_egress)),
        }
        for var, value in (
            ("FT_S3_ENDPOINT", self.s3_endpoint),
            ("FT_S3_REGION", self.s3_region),
            ("FT_S3_SECRET", self.s3_secret),
        ):
            if value is not None:
                out[var] = value
        return out


def _check(ok: bool, var: str, value: str, expected: str) -> None:
    if not ok:
        raise SettingsError(f"{var}={value!r} is not valid; expected {expected}")


def _int(value: str | None, var: str, low: int, high: int, default: object) -> int:
    if value is None:
        assert isinstance(default, int)
        return default
    try:
        parsed = int(value)
    except ValueError:
        parsed = low - 1
    _check(low <= parsed <= high, var, value, f"an integer in [{low}, {high}]")
    return parsed
