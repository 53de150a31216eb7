"""Serving a finished FineTuneJob: the serving plan and the manifests written under `<output.uri>/serving/`.

Pure functions (no torch, no Kubernetes client, no I/O), shared by the operator (status.plan.serving and, with
spec.serving.apply, the LLMInferenceService it creates), `finetune plan` and the trainer (which writes
`manifest_files()` next to the model at publish).

What is served (`serving_plan`):

- lora/qlora: the base model (spec.baseModel.uri) under `baseModelName`, with the adapter `<output.uri>/model/`
  under `adapterName`; vLLM needs `--max-lora-rank` at least the adapter's rank (`maxRank`).
- lora/qlora with spec.output.saveMerged: the merged model `<output.uri>/merged/` under `baseModelName`, no adapter.
- full: the fine-tuned weights `<output.uri>/model/` under `baseModelName`, no adapter.
- prefix/prompt: never (the spec refuses spec.serving with them: vLLM loads no virtual tokens).

Two manifests:

- `serving/llminferenceservice.yaml`: a KServe `LLMInferenceService` (serving.kserve.io/v1alpha1). Only fields of
  KServe's CRD are used (`tests/e2e/fixtures/llminferenceservice-crd.yaml` holds that part of its schema):
  `spec.model.{uri,name}`, `spec.model.lora.{adapters[{name,uri}],maxRank}` (KServe turns maxRank into vLLM's
  `--max-lora-rank`; see KServe's `LoRASpec` in pkg/apis/serving/v1alpha1/llm_inference_service_types.go),
  `spec.replicas`, `spec.parallelism.tensor` (more than one GPU) and `spec.template` (a core/v1 PodSpec KServe
  merges into its vLLM pod by container name: the `main` container gets the GPUs). KServe's own storage
  initializer fetches `s3://` and `hf://` URIs and mounts `pvc://` ones; its S3 credentials come from the
  service account (KServe's convention), so the job's spec.serviceAccountName is passed on. No owner reference:
  the file is for people to apply; the operator adds one when it applies it (spec.serving.apply).
- `serving/vllm.yaml`: a plain vLLM Deployment and Service for clusters without KServe. The model and the adapter
  come from S3 through init containers running the trainer image (`python -m finetune_trainer.fetch URI DIR`,
  with the spec's Secrets as `envFrom`) into an emptyDir; `pvc://` URIs are mounted read-only instead; `hf://`
  bases are loaded by vLLM itself (`--revision` pinned when spec.baseModel.revision is set).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any

import yaml

from finetune_operator import contract, render, uris
from finetune_operator.settings import DEFAULT_TRAINER_IMAGE
from finetune_operator.spec import (
    API_VERSION,
    KIND,
    FineTuneJob,
    FineTuneJobSpec,
    ObjectMeta,
    Plan,
    ResolvedMethod,
    ServingPlan,
)

KSERVE_GROUP = "serving.kserve.io"
KSERVE_VERSION = "v1alpha1"
LLMISVC_API_VERSION = f"{KSERVE_GROUP}/{KSERVE_VERSION}"
LLMISVC_KIND = "LLMInferenceService"
LLMISVC_PLURAL = "llminferenceservices"

#: Keys under `<output.uri>/` of the two manifests (`manifest_files`), and the artifact kinds the trainer names
#: them by in status.artifacts.
LLMISVC_FILE = "serving/llminferenceservice.yaml"
VLLM_FILE = "serving/vllm.yaml"
ARTIFACT_KINDS = {"servingLLMInferenceService": LLMISVC_FILE, "servingVllm": VLLM_FILE}

#: Methods whose result is a LoRA adapter vLLM loads with `--lora-modules` (unless merged).
ADAPTER_METHODS = ("lora", "qlora")
#: KServe's LLMInferenceService merges spec.template into its vLLM container by this name.
KSERVE_MAIN_CONTAINER = "main"
COMPONENT_SERVING = "serving"
VLLM_CONTAINER = "vllm"
VLLM_PORT = 8000
#: Where the init containers put what they fetch, and where vLLM reads it.
MODELS_DIR = "/models"
VOLUME_MODELS = "models"
VOLUME_HOME = "home"
VOLUME_TMP = "tmp"
VOLUME_SHM = "dshm"
HOME_DIR = "/home/vllm"
#: The restricted Pod Security profile needs a non-root uid; vLLM's image defaults to root, so HOME and the caches
#: are pointed at writable emptyDirs for this uid (not run on a GPU here: see the docs' serving notes).
RUN_AS_USER = 1000


def _under(base: str, key: str) -> str:
    """`<base>/<key>/`: a prefix under the output URI, in the form the trainer names artifacts by."""
    return f"{base.rstrip('/')}/{key}/"


def serving_plan(job: FineTuneJob, method: ResolvedMethod) -> ServingPlan | None:
    """What spec.serving serves (None without spec.serving). `method` is the resolved method (status.plan.method)."""
    spec = job.spec
    serving = spec.serving
    if serving is None:
        return None
    if spec.base_model.uri is None:
        # A chained stage before its base job succeeded: what it serves (merged/, named after the chain's start) is
        # known once the operator resolved the chain (`chain.apply`); `finetune plan` shows the rest of the plan.
        return None
    if method not in (*ADAPTER_METHODS, "full"):
        # The spec refuses spec.serving with prefix and prompt; a resolved method never reaches here otherwise.
        raise ValueError(f"spec.serving cannot serve method {method}: use lora, qlora or full")
    output = spec.output.uri
    adapter = serves_adapter(spec, method)
    if method == "full":
        model_uri = _under(output, "model")
    elif spec.output.save_merged:
        model_uri = _under(output, "merged")
    else:
        model_uri = spec.base_model.resolved_uri()
    return ServingPlan(
        base_model_name=spec.served_base_model_name(),
        model_uri=model_uri,
        adapter_name=(serving.adapter_name or job.metadata.name) if adapter else None,
        adapter_uri=_under(output, "model") if adapter else None,
        max_rank=spec.resolved_max_rank(serving) if adapter else None,
        manifests=[f"{output.rstrip('/')}/{key}" for key in (LLMISVC_FILE, VLLM_FILE)],
        apply=serving.apply,
    )


def _labels(job: FineTuneJob) -> dict[str, str]:
    return {**render.labels(job), render.LABEL_COMPONENT: COMPONENT_SERVING}


def _metadata(job: FineTuneJob, name: str) -> dict[str, Any]:
    return {"name": name, "namespace": job.metadata.namespace, "labels": _labels(job)}


def _gpu_resources(job: FineTuneJob) -> dict[str, Any]:
    assert job.spec.serving is not None
    gpus = {job.spec.resources.gpu_resource_name: str(job.spec.serving.gpus)}
    return {"limits": dict(gpus), "requests": dict(gpus)}


def _placement(job: FineTuneJob) -> dict[str, Any]:
    """The training pods' node selector and tolerations: GPU nodes are usually tainted and labelled alike."""
    resources = job.spec.resources
    placement: dict[str, Any] = {}
    if resources.node_selector:
        placement["nodeSelector"] = dict(sorted(resources.node_selector.items()))
    if resources.tolerations:
        placement["tolerations"] = [t.wire() for t in resources.tolerations]
    return placement


def render_llm_inference_service(job: FineTuneJob, plan: ServingPlan) -> dict[str, Any]:
    """The KServe LLMInferenceService serving `plan` (named after the job, no owner reference)."""
    assert job.spec.serving is not None, "render_llm_inference_service needs spec.serving"
    model: dict[str, Any] = {"uri": plan.model_uri, "name": plan.base_model_name}
    if plan.adapter_name and plan.adapter_uri:
        model["lora"] = {
            "adapters": [{"name": plan.adapter_name, "uri": plan.adapter_uri}],
            "maxRank": plan.max_rank,
        }
    template: dict[str, Any] = {
        "containers": [{"name": KSERVE_MAIN_CONTAINER, "resources": _gpu_resources(job)}],
        **_placement(job),
    }
    if job.spec.service_account_name:
        template["serviceAccountName"] = job.spec.service_account_name
    spec: dict[str, Any] = {"model": model, "replicas": 1}
    gpus = job.spec.serving.gpus
    if gpus > 1:
        # vLLM uses one GPU unless told otherwise; KServe passes this on as --tensor-parallel-size.
        spec["parallelism"] = {"tensor": gpus}
    spec["template"] = template
    return {
        "apiVersion": LLMISVC_API_VERSION,
        "kind": LLMISVC_KIND,
        "metadata": _metadata(job, job.metadata.name),
        "spec": spec,
    }


def vllm_name(job_name: str) -> str:
    """The plain vLLM Deployment's and Service's name (the job's name is at most 52 characters: fits 63)."""
    return f"{job_name}-vllm"


def _secret_env_from(job: FineTuneJob) -> list[dict[str, Any]]:
    """The spec's model and output Secrets (S3 keys, HF token) for the init containers; later ones win."""
    spec = job.spec
    names: list[str] = []
    for ref in (spec.base_model.secret_ref, spec.output.secret_ref):
        if ref is not None and ref.name not in names:
            names.append(ref.name)
    return [{"secretRef": {"name": name}} for name in names]


def _restricted_container() -> dict[str, Any]:
    """Pod Security Standards "restricted" for a container. The root filesystem is read-only: vLLM's caches go
    to HOME (an emptyDir), scratch files to /tmp."""
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


class _Sources:
    """Where vLLM reads the model and adapter, and the init containers and PVC mounts that put them there."""

    def __init__(self, job: FineTuneJob, trainer_image: str) -> None:
        self.job = job
        self.trainer_image = trainer_image
        self.init_containers: list[dict[str, Any]] = []
        self.claims: dict[str, int] = {}

    def path(self, uri: str, role: str) -> str:
        """A local path for `uri` (a prefix ending in `/` or a model URI); `role` names the init container."""
        parsed = uris.parse(uri)
        if parsed.scheme == "pvc":
            # Mounted read-only at the same place the trainer mounts it: no copy.
            self.claims.setdefault(parsed.authority, len(self.claims))
            mount = f"{contract.DEFAULT_PVC_ROOT}/{parsed.authority}"
            return posixpath.join(mount, parsed.path.strip("/")) if parsed.path.strip("/") else mount
        target = f"{MODELS_DIR}/{role}"
        container: dict[str, Any] = {
            "name": f"fetch-{role}",
            "image": self.trainer_image,
            # An argv list, never a shell string: no spec value is parsed by a shell.
            "command": ["python", "-m", "finetune_trainer.fetch", uri, target],
            "env": [{"name": "HOME", "value": "/tmp"}],
            "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}},
            "securityContext": _restricted_container(),
            "volumeMounts": [
                {"name": VOLUME_MODELS, "mountPath": MODELS_DIR},
                {"name": VOLUME_TMP, "mountPath": "/tmp"},
            ],
        }
        env_from = _secret_env_from(self.job)
        if env_from:
            container["envFrom"] = env_from
        self.init_containers.append(container)
        return target


def _vllm_args(job: FineTuneJob, plan: ServingPlan, sources: _Sources) -> list[str]:
    spec = job.spec
    if plan.model_uri.startswith("hf://"):
        # vLLM downloads hub models itself (HF_TOKEN from the model's Secret); the revision is pinned.
        model = uris.parse(plan.model_uri, ("hf",)).authority
        args = ["--model", model]
        if spec.base_model.revision:
            args += ["--revision", spec.base_model.revision]
    else:
        args = ["--model", sources.path(plan.model_uri, "model")]
    args += ["--served-model-name", plan.base_model_name, "--port", str(VLLM_PORT)]
    assert spec.serving is not None
    if spec.serving.gpus > 1:
        args += ["--tensor-parallel-size", str(spec.serving.gpus)]
    if plan.adapter_name and plan.adapter_uri:
        adapter = sources.path(plan.adapter_uri, "adapter")
        args += ["--enable-lora", "--lora-modules", f"{plan.adapter_name}={adapter}",
                 "--max-lora-rank", str(plan.max_rank)]
    return args


def render_vllm(job: FineTuneJob, plan: ServingPlan, trainer_image: str) -> list[dict[str, Any]]:
    """A vLLM Deployment and its Service serving `plan` without KServe; `trainer_image` fetches from S3."""
    spec = job.spec
    assert spec.serving is not None, "render_vllm needs spec.serving"
    name = vllm_name(job.metadata.name)
    selector = {render.LABEL_JOB: job.metadata.name, render.LABEL_COMPONENT: COMPONENT_SERVING}
    sources = _Sources(job, trainer_image)
    args = _vllm_args(job, plan, sources)

    volumes: list[dict[str, Any]] = [
        {"name": VOLUME_HOME, "emptyDir": {}},
        {"name": VOLUME_TMP, "emptyDir": {}},
        # The runtime's default 64MiB /dev/shm is too small for vLLM's tensor-parallel workers.
        {"name": VOLUME_SHM, "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": VOLUME_HOME, "mountPath": HOME_DIR},
        {"name": VOLUME_TMP, "mountPath": "/tmp"},
        {"name": VOLUME_SHM, "mountPath": "/dev/shm"},
    ]
    if sources.init_containers:
        # What the init containers fetched; vLLM only reads it.
        volumes.insert(0, {"name": VOLUME_MODELS, "emptyDir": {}})
        mounts.insert(0, {"name": VOLUME_MODELS, "mountPath": MODELS_DIR, "readOnly": True})
    for claim, index in sorted(sources.claims.items(), key=lambda item: item[1]):
        volume = f"pvc-{index}"
        volumes.append({"name": volume, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": volume, "mountPath": f"{contract.DEFAULT_PVC_ROOT}/{claim}", "readOnly": True})

    container: dict[str, Any] = {
        "name": VLLM_CONTAINER,
        "image": spec.serving.image,
        "args": args,
        # HOME, the Hugging Face cache and vLLM's caches on the writable emptyDir (the root filesystem is read-only).
        "env": [
            {"name": "HOME", "value": HOME_DIR},
            {"name": "HF_HOME", "value": f"{HOME_DIR}/.cache/huggingface"},
            {"name": "VLLM_NO_USAGE_STATS", "value": "1"},
        ],
        "ports": [{"name": "http", "containerPort": VLLM_PORT, "protocol": "TCP"}],
        "readinessProbe": {
            "httpGet": {"path": "/health", "port": "http"},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        # Loading weights takes minutes: the startup probe holds off the liveness probe until then (up to 30 min).
        "startupProbe": {
            "httpGet": {"path": "/health", "port": "http"},
            "periodSeconds": 10,
            "failureThreshold": 180,
        },
        "livenessProbe": {
            "httpGet": {"path": "/health", "port": "http"},
            "periodSeconds": 30,
            "failureThreshold": 3,
        },
        "resources": _gpu_resources(job),
        "securityContext": _restricted_container(),
        "volumeMounts": mounts,
    }
    if plan.model_uri.startswith("hf://") and spec.base_model.secret_ref is not None:
        container["envFrom"] = [{"secretRef": {"name": spec.base_model.secret_ref.name}}]

    pod_spec: dict[str, Any] = {
        # vLLM never calls the Kubernetes API.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if sources.init_containers:
        pod_spec["initContainers"] = sources.init_containers
    pod_spec.update({"containers": [container], "volumes": volumes, **_placement(job)})
    if spec.service_account_name:
        pod_spec["serviceAccountName"] = spec.service_account_name

    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(job, name),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": selector},
            # One GPU pod at a time: a rolling update would need a second replica's GPUs.
            "strategy": {"type": "Recreate"},
            "template": {"metadata": {"labels": _labels(job)}, "spec": pod_spec},
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, name),
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
            "ports": [{"name": "http", "port": VLLM_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }
    return [deployment, service]


def _dump(objects: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(objects, sort_keys=False, default_flow_style=False, width=120)


def manifest_files(job: FineTuneJob, plan: ServingPlan, trainer_image: str) -> dict[str, str]:
    """`serving/llminferenceservice.yaml` and `serving/vllm.yaml` (keys under `<output.uri>/`) -> YAML text."""
    return {
        LLMISVC_FILE: _dump([render_llm_inference_service(job, plan)]),
        VLLM_FILE: _dump(render_vllm(job, plan, trainer_image)),
    }


def config_manifest_files(config: contract.TrainerConfig) -> dict[str, str]:
    """The trainer's view (at publish): the manifests of a run's config snapshot, `{}` for the pilot stage (its
    output is a means to the main run, not a model to serve) or without spec.serving. The plan is the snapshot's
    (status.plan.serving) when the operator filled it, else made here; the fetch image is the run's own."""
    if config.stage is not None or config.spec.serving is None:
        return {}
    job = FineTuneJob.model_validate({
        "apiVersion": API_VERSION, "kind": KIND,
        "metadata": ObjectMeta(name=config.name, namespace=config.namespace).model_dump(),
        "spec": config.spec.model_dump(),
    })
    plan = config.plan.serving or serving_plan(job, config.method)
    if plan is None:
        return {}
    return manifest_files(job, plan, config.image or DEFAULT_TRAINER_IMAGE)


def attach(job: FineTuneJob, plan: Plan) -> Plan:
    """`plan` (a whole job's: not the pilot's) with plan.serving filled in from spec.serving; returns it."""
    plan.serving = serving_plan(job, plan.method)
    return plan


def describe(plan: ServingPlan) -> list[str]:
    """The serving plan in a few lines (`finetune plan`)."""
    lines = [f"model {plan.model_uri} served as {plan.base_model_name!r}"]
    if plan.adapter_name and plan.adapter_uri:
        lines.append(f"adapter {plan.adapter_name!r} from {plan.adapter_uri} (vLLM --max-lora-rank {plan.max_rank})")
    else:
        lines.append("no adapter: the served model is the whole fine-tuned model")
    lines.append(f"manifests (written when training succeeds): {', '.join(plan.manifests)}")
    lines.append("apply: the operator creates the LLMInferenceService once the job Succeeded with every gate passed"
                 if plan.apply else "apply: false: nothing is created; apply a manifest yourself")
    return lines


# ------------------------------------------------------------------------------------------------------------------
# Which target modules vLLM loads as LoRA, per architecture (the pre-flight's check of spec.serving)
# ------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraModules:
    """The module names (as in the Hugging Face model, what a peft adapter's target_modules say) of one
    architecture: `linear` is what peft's `all-linear` expands to (every linear layer but the output head), and
    vLLM loads LoRA on `linear` plus `embeddings`."""

    linear: tuple[str, ...]
    embeddings: tuple[str, ...] = ()

    @property
    def supported(self) -> tuple[str, ...]:
        return self.linear + self.embeddings


_ATTENTION_MLP = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_INPUT_OUTPUT = ("embed_tokens", "lm_head")

#: By config.json's model_type. vLLM gives every linear layer (LinearBase) of a model LoRA (vllm/lora/utils.py,
#: `get_supported_lora_modules`: "In vLLM, all linear layers support LoRA"), plus the model class's
#: `embedding_modules`; an adapter's Hugging Face module names are matched through the class's
#: `packed_modules_mapping` (vllm/model_executor/models/*.py):
#: - llama (LlamaForCausalLM; vLLM serves mistral with it too): packed qkv_proj <- q/k/v_proj and gate_up_proj <-
#:   gate/up_proj, with o_proj and down_proj; embedding_modules embed_tokens and lm_head.
#: - qwen2 (Qwen2ForCausalLM), qwen3 (Qwen3ForCausalLM): the same packing; embedding_modules empty.
#: - gemma (GemmaForCausalLM), gemma2 (Gemma2ForCausalLM): the same packing; embedding_modules empty ("Gemma does
#:   not apply LoRA to the embedding layer"; the output head is the tied embedding).
#: - phi3 (Phi3ForCausalLM): Hugging Face's Phi-3 has fused qkv_proj and gate_up_proj, which vLLM maps one to one
#:   (packed_modules_mapping qkv_proj <- qkv_proj, gate_up_proj <- gate_up_proj), with o_proj and down_proj;
#:   embedding_modules embed_tokens and lm_head.
#: Mixture-of-experts and multimodal models are not listed: their experts and towers differ per version.
VLLM_LORA_MODULES: dict[str, LoraModules] = {
    "llama": LoraModules(_ATTENTION_MLP, _INPUT_OUTPUT),
    "mistral": LoraModules(_ATTENTION_MLP, _INPUT_OUTPUT),
    "qwen2": LoraModules(_ATTENTION_MLP),
    "qwen3": LoraModules(_ATTENTION_MLP),
    "gemma": LoraModules(_ATTENTION_MLP),
    "gemma2": LoraModules(_ATTENTION_MLP),
    "phi3": LoraModules(("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), _INPUT_OUTPUT),
}

#: spec.lora.targetModules' `all-linear` (the spec model stores it as peft's `all_linear`).
_ALL_LINEAR = ("all-linear", "all_linear")


def serves_adapter(spec: FineTuneJobSpec, method: ResolvedMethod) -> bool:
    """Whether spec.serving serves a LoRA adapter (lora/qlora without saveMerged), so vLLM must load it."""
    return spec.serving is not None and method in ADAPTER_METHODS and not spec.output.save_merged


def target_module_problem(spec: FineTuneJobSpec, method: ResolvedMethod,
                          model_type: str | None) -> tuple[str, str] | None:
    """(field, message): why vLLM cannot load the adapter spec.serving would serve for this architecture; None when
    it can, or when no adapter is served. The message names the modules and the way out: spec.output.saveMerged."""
    if not serves_adapter(spec, method):
        return None
    merged = ("set spec.output.saveMerged: true to serve the merged model instead (vLLM then loads no LoRA), "
              "or remove spec.serving")
    modules = VLLM_LORA_MODULES.get(model_type or "")
    if modules is None:
        return "spec.serving", (
            f"spec.serving: which modules vLLM loads LoRA on is not known for model type {model_type!r} "
            f"(known: {', '.join(sorted(VLLM_LORA_MODULES))}), so the adapter may not load; {merged}")
    targets = spec.lora.target_modules
    if any(t in _ALL_LINEAR for t in targets):
        return None  # every linear layer: all of them in the table
    # peft matches a target by the module name's last part (`self_attn.q_proj` targets q_proj)
    unsupported = sorted({t for t in targets if t.rsplit(".", 1)[-1] not in modules.supported})
    if not unsupported:
        return None
    return "spec.lora.targetModules", (
        f"spec.lora.targetModules {unsupported} cannot be loaded as LoRA by vLLM for model type {model_type!r}: "
        f"vLLM loads LoRA on {', '.join(modules.supported)}; target those (or all-linear), or {merged}")
