"""The FineTuneJob API (`finetune.dev/v1alpha1`), defined once.

These pydantic models are the single source of truth: the CRD in `crds/` is generated from them
(`finetune_operator.crd`), the CLI and the operator validate manifests with them, and the trainer reads
its config snapshot through them. Every field carries a description (it becomes `kubectl explain`
text) and every optional field a documented default.

Field names are camelCase on the wire (`learningRate`) and snake_case in Python (`learning_rate`).
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic.alias_generators import to_camel

from finetune_operator import uris
from finetune_operator.quantity import parse_gpu_memory_gib, parse_parameters

GROUP = "finetune.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ["ftj"]
CATEGORIES = ["finetune", "ml"]

#: Longest FineTuneJob name: children append at most 11 characters ("-config", pod index "-999")
#: and Kubernetes caps pod host names and label values at 63.
MAX_NAME_LENGTH = 52
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"

Method = Literal["auto", "full", "lora", "qlora", "prefix", "prompt"]
ResolvedMethod = Literal["full", "lora", "qlora", "prefix", "prompt"]
DataFormat = Literal["auto", "instruction", "chat", "text", "preference"]
Objective = Literal["sft", "dpo"]
#: Methods DPO trains with (prefix and prompt tuning have no weights to compare against a reference).
DPO_METHODS = ("auto", "full", "lora", "qlora")
Precision = Literal["bf16", "fp16", "fp32"]

DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
#: prefix and prompt: peft's causal-LM prefix- and prompt-tuning examples (3e-2); virtual tokens need far
#: larger steps than adapters or weights.
DEFAULT_LEARNING_RATE = {"full": 2e-5, "lora": 2e-4, "qlora": 2e-4, "prefix": 3e-2, "prompt": 3e-2}
#: Methods that train virtual tokens (peft's prompt learning) in front of a frozen base.
VIRTUAL_TOKEN_METHODS = ("prefix", "prompt")
#: `method: auto` picks QLoRA below this many training examples, LoRA at or above it.
AUTO_QLORA_BELOW_EXAMPLES = 10_000
#: spec.retrieval defaults (passages per prompt, tokens per passage, RAFT's share of distractor-only examples).
DEFAULT_TOP_K = 3
DEFAULT_CHUNK_TOKENS = 128
DEFAULT_DISTRACTOR_SHARE = 0.2
#: `--max-lora-rank` values vLLM accepts (vllm/config/lora.py, `MaxLoRARanks`); spec.serving.maxRank is one of them.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
#: spec.serving.image's default: the vLLM OpenAI-compatible server of the plain Deployment (a pinned tag).
DEFAULT_VLLM_IMAGE = "vllm/vllm-openai:v0.11.0"
#: spec.evaluation.hallucinationThreshold's default: above it (without spec.retrieval) the FineTuneJob gets
#: the HallucinationHigh condition and a Warning event recommending spec.retrieval.
DEFAULT_HALLUCINATION_THRESHOLD = 0.5

_K8S_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_IMAGE = r"^[A-Za-z0-9][A-Za-z0-9._/:@-]*$"
_MODULE = r"^([A-Za-z_][A-Za-z0-9_.]*|all-linear)$"
_QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$"
_LABEL_KEY = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
_LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"


class _Model(BaseModel):
    """Base for every API object: camelCase aliases, unknown fields rejected (typos surface)."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
        frozen=False,
    )

    def wire(self) -> dict[str, Any]:
        """The object as it appears in YAML: camelCase keys, unset optionals left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def _uri_check(allowed: tuple[str, ...]) -> Any:
    def check(value: str | None) -> str | None:
        if value is None:
            return value
        uris.validate(value, allowed)
        return value

    return check


class SecretRef(_Model):
    """A Secret in the job's namespace whose keys become environment variables of the training pods."""

    name: str = Field(
        description="Name of a Secret in the FineTuneJob's namespace. Its keys are projected as environment "
        "variables with `envFrom` (for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, optionally "
        "AWS_ENDPOINT_URL and AWS_REGION; for the Hugging Face hub: HF_TOKEN). Values never appear in "
        "rendered objects, status or logs.",
        min_length=1,
        max_length=253,
        pattern=_K8S_NAME,
    )


class BaseModelSpec(_Model):
    """The pretrained model to fine-tune."""

    uri: str | None = Field(
        default=None,
        description="Where the base model lives: `hf://org/name` (Hugging Face hub), `s3://bucket/prefix/`, "
        "`pvc://claim/path` (a PersistentVolumeClaim in the job's namespace) or `file:///path` (a path "
        "inside the trainer image or local machine). The model size is read from the name when it "
        "contains one (`Llama-2-7b-hf` -> 7B). Exactly one of uri and fromJob.",
        min_length=1,
        max_length=1024,
    )
    from_job: str | None = Field(
        default=None,
        description="Start from the result of another FineTuneJob in the same namespace (a chained stage, e.g. DPO "
        "after SFT). This job waits (phase Pending, condition WaitingForBaseJob) until that job Succeeded with its "
        "gates passed, then starts from its merged weights when it saved them (or its whole model for method full), "
        "else from its base model with its adapter merged in before the new adapter is added. A failed or deleted "
        "base job fails this one naming it. Exactly one of uri and fromJob; revision does not apply.",
        max_length=MAX_NAME_LENGTH,
        pattern=NAME_PATTERN,
    )
    revision: str | None = Field(
        default=None,
        description="Git revision (branch, tag or commit) for `hf://` models. Defaults to `main`; pin a commit "
        "for reproducible runs. Ignored for other schemes.",
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$",
    )
    parameters: str | None = Field(
        default=None,
        description="Parameter count used for sizing, such as `7B`, `13B`, `70B`, `1.1B` or `350M`. Defaults to "
        "the size in the model name; without either, the operator's CPU pre-flight reads the exact count from the "
        "model's config.json and safetensors headers before planning (required when the operator runs no "
        "pre-flight). `finetune plan --inspect` does the same locally.",
        max_length=16,
    )
    secret_ref: SecretRef | None = Field(
        default=None,
        description="Credentials for reading the model (HF_TOKEN, or S3 keys). Defaults to none: public "
        "models, or the pod's service account (IRSA) for S3.",
    )

    _check_uri = field_validator("uri")(_uri_check(("hf", "s3", "pvc", "file")))

    @model_validator(mode="after")
    def _one_source(self) -> BaseModelSpec:
        if (self.uri is None) == (self.from_job is None):
            raise ValueError("spec.baseModel needs exactly one of uri (a model's location) and fromJob (another "
                             "FineTuneJob's result)" + ("; remove one" if self.uri else "; set one"))
        if self.from_job is not None and self.revision is not None:
            raise ValueError("spec.baseModel.revision applies to hf:// URIs, not to fromJob (the base job's result "
                             "is fixed when it succeeds); remove revision")
        return self

    def resolved_uri(self) -> str:
        """The model's URI; a `fromJob` spec has one only once the operator resolved the chain
        (`chain.resolve`): before that, asking is a bug."""
        if self.uri is None:
            raise ValueError(f"spec.baseModel.fromJob {self.from_job!r} is not resolved to a model URI yet")
        return self.uri

    @field_validator("parameters")
    @classmethod
    def _check_parameters(cls, value: str | None) -> str | None:
        if value is not None:
            parse_parameters(value)
        return value

    def parameters_billion(self) -> float | None:
        """Parameter count in billions: explicit `parameters` first, else the name; None when neither gives
        it (the operator's pre-flight then reads it from config.json; `sizing.plan` refuses without it)."""
        if self.parameters is not None:
            return parse_parameters(self.parameters)
        return uris.parameters_from_name(self.uri) if self.uri is not None else None


class LoraSpec(_Model):
    """LoRA adapter settings (used by `lora` and `qlora`)."""

    r: int = Field(default=16, ge=1, le=1024, description="Rank of the low-rank update matrices. Defaults to 16.")
    alpha: int = Field(
        default=32,
        ge=1,
        le=4096,
        description="Scaling numerator: the update is scaled by alpha/r. Defaults to 32.",
    )
    dropout: float = Field(
        default=0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input, in [0, 1). Defaults to 0.05."
    )
    target_modules: list[Annotated[str, Field(pattern=_MODULE, max_length=128)]] = Field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES),
        min_length=1,
        max_length=64,
        description="Module names that get adapters. Defaults to all attention projections: "
        "q_proj, k_proj, v_proj, o_proj. Use `all-linear` for every linear layer.",
    )

    @field_validator("target_modules", mode="before")
    @classmethod
    def _all_linear(cls, value: Any) -> Any:
        return ["all_linear"] if value == ["all-linear"] or value == "all-linear" else value


class QuantizationSpec(_Model):
    """bitsandbytes quantization of the frozen base weights (QLoRA only)."""

    bits: Literal[4, 8] = Field(default=4, description="Bits per base weight: 4 or 8. Defaults to 4.")
    type: Literal["nf4", "fp4"] = Field(
        default="nf4", description="4-bit data type: `nf4` (NormalFloat4) or `fp4`. Defaults to nf4."
    )
    double_quant: bool = Field(
        default=True,
        description="Quantize the quantization constants too (saves about 0.4 bits per weight). Defaults to true.",
    )
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        default="bfloat16",
        description="Data type of the matmuls on dequantized weights. Defaults to bfloat16.",
    )


class PrefixSpec(_Model):
    """Prefix tuning (peft `PrefixTuningConfig`): trainable key/value vectors prepended to every layer's
    attention. Only with `method: prefix`."""

    virtual_tokens: int = Field(
        default=20,
        ge=1,
        le=1024,
        description="Virtual tokens prepended to the keys and values of every attention layer. Each one "
        "trains 2 x layers x hidden parameters (7B: 262,144). Defaults to 20.",
    )
    projection: bool = Field(
        default=False,
        description="Train the prefix through a two-layer MLP (peft `prefix_projection`, the reparameterization "
        "of the prefix-tuning paper): often steadier training, at about 2 x layers x hidden^2 more trainable "
        "parameters (7B: about 1.1 billion, sized by the plan). The saved adapter holds only the projected "
        "prefix. Defaults to false.",
    )


class PromptSpec(_Model):
    """Prompt tuning (peft `PromptTuningConfig`): trainable embeddings prepended to the input. Only with
    `method: prompt`."""

    virtual_tokens: int = Field(
        default=20,
        ge=1,
        le=1024,
        description="Trainable embeddings prepended to every input; each trains `hidden` parameters and "
        "lengthens every sequence by one position. Defaults to 20.",
    )
    init: Literal["random", "text"] = Field(
        default="random",
        description="How the virtual tokens start: `random` (peft's random init) or `text` (the embeddings "
        "of `initText`'s tokens, repeated or cut to virtualTokens; usually trains faster). Defaults to random.",
    )
    init_text: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        description="Text whose token embeddings initialize the virtual tokens, such as a task description "
        "('Answer the clinical question concisely'). Required with `init: text`, not allowed otherwise. "
        "Defaults to none.",
    )

    @model_validator(mode="after")
    def _init_text(self) -> PromptSpec:
        if self.init == "text" and self.init_text is None:
            raise ValueError("spec.prompt.initText is required with init: text; set initText to a task "
                             "description, or use init: random")
        if self.init != "text" and self.init_text is not None:
            raise ValueError("spec.prompt.initText is only used with init: text; set init: text or remove initText")
        return self


class DatasetSpec(_Model):
    """Training (and validation) data."""

    train: str = Field(
        description="Training data: a JSON, JSONL or Parquet file or a prefix of such files, as `s3://`, "
        "`pvc://` or `file://` URI.",
        min_length=1,
        max_length=1024,
    )
    validation: str | None = Field(
        default=None,
        description="Validation data in the same form as `train`. At most one of validation and "
        "validationSplit. Defaults to none.",
        max_length=1024,
    )
    validation_split: float | None = Field(
        default=None,
        gt=0.0,
        le=0.5,
        description="Fraction of the training data held out for validation, in (0, 0.5]. At most one of "
        "validation and validationSplit. Defaults to none (no validation loss).",
    )
    format: DataFormat = Field(
        default="auto",
        description="Row format. `instruction`: instruction/input/output keys; `chat`: a `messages` list "
        "of role/content; `text`: a `text` key. `auto` detects it from the keys. Defaults to auto.",
    )
    examples: int | None = Field(
        default=None,
        ge=1,
        le=10_000_000_000,
        description="Number of training examples, when known before the data is read. `method: auto` "
        "picks QLoRA below 10,000 and LoRA otherwise. Defaults to unknown (auto then picks LoRA).",
    )
    invalid_rows: Literal["fail", "skip"] = Field(
        default="fail",
        description="What a malformed row does: `fail` stops with the first offending rows named, `skip` "
        "drops them and reports how many. Defaults to fail.",
    )
    secret_ref: SecretRef | None = Field(
        default=None,
        description="Credentials for reading the data. Defaults to the output's secretRef for S3, "
        "or the pod's service account.",
    )

    _check_train = field_validator("train", "validation")(_uri_check(("s3", "pvc", "file")))

    @model_validator(mode="after")
    def _one_validation(self) -> DatasetSpec:
        if self.validation is not None and self.validation_split is not None:
            raise ValueError(
                "set at most one of spec.dataset.validation and spec.dataset.validationSplit, not both"
            )
        return self


class RetrievalSpec(_Model):
    """Retrieval augmentation: a document corpus the trainer indexes (BM25, bm25s) and whose top-k passages
    every training and evaluation prompt carries (RAFT-style training)."""

    corpus: str = Field(
        description="The documents: a JSONL or JSON file (one document per row, its text under `text`, "
        "optional `title`), a UTF-8 text file (`.txt` or `.md`, one document per file) or a Parquet file "
        "(a `text` column), or a prefix of such files, as `s3://`, `pvc://` or `file://` URI (the schemes "
        "of spec.dataset). Their sha256 are recorded in provenance.json.",
        min_length=1,
        max_length=1024,
    )
    top_k: int = Field(
        default=DEFAULT_TOP_K,
        ge=1,
        le=32,
        description="Passages put in front of each prompt: the top-k of a BM25 search with the question "
        "(instruction and input, or the user turns). topK x chunkTokens must stay below "
        "spec.hyperparameters.maxSeqLength. Defaults to 3.",
    )
    chunk_tokens: int = Field(
        default=DEFAULT_CHUNK_TOKENS,
        ge=16,
        le=8192,
        description="Longest passage, in tokens of the base model's tokenizer: documents are cut into "
        "passages of whole sentences up to this length (a longer sentence is cut at words). Defaults to 128.",
    )
    distractor_share: float = Field(
        default=DEFAULT_DISTRACTOR_SHARE,
        ge=0.0,
        lt=1.0,
        description="Share of training examples, in [0, 1), whose prompt carries distractor passages only "
        "(topK passages drawn, seeded, from those not retrieved for the example), as in RAFT, so the model "
        "learns to answer without help from the context and to ignore context that does not help. The "
        "others carry their top-k passages. Evaluation prompts always carry their top-k. Defaults to 0.2.",
    )
    secret_ref: SecretRef | None = Field(
        default=None,
        description="Credentials for reading the corpus. Defaults to the dataset's secretRef, the output's, "
        "or the pod's service account.",
    )

    _check_corpus = field_validator("corpus")(_uri_check(("s3", "pvc", "file")))


class Hyperparameters(_Model):
    """Optimization settings. Batch sizes are per process (per GPU)."""

    epochs: float = Field(default=3, gt=0, le=1000, description="Passes over the training data. Defaults to 3.")
    max_steps: int | None = Field(
        default=None,
        ge=1,
        le=100_000_000,
        description="Stop after this many optimizer steps, overriding epochs. Defaults to none.",
    )
    learning_rate: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Peak learning rate. Defaults to 2e-4 for lora and qlora, 2e-5 for full, 3e-2 for prefix "
        "and prompt.",
    )
    batch_size: int = Field(
        default=4, ge=1, le=4096,
        description="Micro-batch per GPU. The sizing plan may lower it to fit the planned GPU (never raise it), "
        "multiplying gradientAccumulationSteps so batchSize x gradientAccumulationSteps, the examples per "
        "optimizer step on each GPU, stays as set (status.plan.rung). Defaults to 4.")
    gradient_accumulation_steps: int = Field(
        default=4, ge=1, le=4096, description="Micro-batches per optimizer step. Defaults to 4."
    )
    max_seq_length: int = Field(
        default=2048,
        ge=16,
        le=1_048_576,
        description="Longest tokenized example; longer ones are truncated. Defaults to 2048.",
    )
    packing: bool = Field(
        default=False,
        description="Pack several examples into each sequence (attention kept within each example). "
        "When false, batches are length-grouped and padded only to their own longest row. Not with methods "
        "prefix and prompt: their virtual tokens break the per-example attention. Defaults to false.",
    )
    warmup_ratio: float = Field(
        default=0.03, ge=0, le=1, description="Fraction of steps with linear warmup. Defaults to 0.03."
    )
    weight_decay: float = Field(default=0.0, ge=0, le=10, description="AdamW weight decay. Defaults to 0.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(
        default="cosine", description="Learning-rate schedule after warmup. Defaults to cosine."
    )
    seed: int = Field(default=42, ge=0, le=2**31 - 1, description="Random seed for data order, init and dropout. Defaults to 42.")
    precision: Precision = Field(
        default="bf16", description="Training precision: bf16, fp16 or fp32. Defaults to bf16."
    )
    gradient_checkpointing: bool | None = Field(
        default=None,
        description="Recompute activations in the backward pass to save memory, at about a third more compute "
        "per step. Unset: the sizing plan decides (status.plan.rung): off where the job fits the planned GPU "
        "without it, at batchSize or a smaller micro-batch with more accumulation; on only where nothing fits "
        "otherwise. true or false: as set, and the plan varies only the micro-batch. Not with method prefix "
        "(peft passes the prefix as a KV cache, which checkpointed layers drop): unset means off there.",
    )

    def learning_rate_for(self, method: ResolvedMethod) -> float:
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LEARNING_RATE[method]


class Toleration(_Model):
    """A pod toleration, as in core/v1."""

    key: str | None = Field(default=None, max_length=317, description="Taint key to tolerate. Defaults to all keys (with operator Exists).")
    operator: Literal["Exists", "Equal"] | None = Field(
        default=None, description="`Exists` or `Equal`. Defaults to Equal."
    )
    value: str | None = Field(default=None, max_length=63, description="Taint value for `Equal`. Defaults to empty.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate. Defaults to all effects."
    )
    toleration_seconds: int | None = Field(
        default=None, ge=0, description="For NoExecute: how long the pod stays bound. Defaults to forever."
    )


class ResourcesSpec(_Model):
    """Explicit resources. Unset fields come from the sizing plan (see status.plan)."""

    gpus: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description="Total GPUs across all nodes. Defaults to the sizing plan.",
    )
    gpu_memory: str | None = Field(
        default=None,
        description="Memory per GPU, such as `24Gi` or `80GB`. Defaults to the sizing plan.",
        max_length=16,
    )
    gpus_per_node: int = Field(
        default=8, ge=1, le=64, description="Most GPUs one node (one training pod) holds. Defaults to 8."
    )
    gpu_resource_name: str = Field(
        default="nvidia.com/gpu",
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$",
        max_length=253,
        description="Extended resource that requests a GPU. Defaults to nvidia.com/gpu.",
    )
    node_selector: dict[Annotated[str, Field(pattern=_LABEL_KEY, max_length=317)], Annotated[str, Field(pattern=_LABEL_VALUE, max_length=63)]] = Field(
        default_factory=dict,
        max_length=32,
        description="Node labels the training pods require. Defaults to none.",
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32, description="Taints the training pods tolerate. Defaults to none."
    )
    priority_class_name: str | None = Field(
        default=None,
        max_length=253,
        pattern=_K8S_NAME,
        description="PriorityClass of the training pods (and of the Kueue workload). Defaults to none.",
    )
    cpu: str | None = Field(
        default=None,
        max_length=16,
        pattern=_QUANTITY,
        description="CPU request per pod, a Kubernetes quantity. Defaults to 4 per GPU of the pod.",
    )
    memory: str | None = Field(
        default=None,
        max_length=16,
        pattern=_QUANTITY,
        description="Memory request per pod, a Kubernetes quantity. Defaults to 32Gi per GPU of the pod.",
    )

    @field_validator("gpu_memory")
    @classmethod
    def _check_gpu_memory(cls, value: str | None) -> str | None:
        if value is not None:
            parse_gpu_memory_gib(value)
        return value


class OutputSpec(_Model):
    """Where artifacts go."""

    uri: str = Field(
        description="Artifact prefix: `s3://bucket/prefix/` or `pvc://claim/path`. Checkpoints go under "
        "`checkpoints/`, the adapter or weights under `model/`.",
        min_length=1,
        max_length=1024,
    )
    secret_ref: SecretRef | None = Field(
        default=None,
        description="S3 credentials for writing (and by default reading data). Defaults to the pod's "
        "service account (IRSA) or the operator's configured credentials.",
    )
    save_merged: bool = Field(
        default=False,
        description="Also write the base model merged with the adapter under `merged/` (lora and qlora; "
        "prefix and prompt have nothing to merge). Defaults to false.",
    )

    _check_uri = field_validator("uri")(_uri_check(("s3", "pvc")))


class ServingSpec(_Model):
    """How the result is served: manifests written under `<output.uri>/serving/`, optionally applied."""

    base_model_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=253,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$",
        description="Name the base model is served under (vLLM's `--served-model-name`, KServe's "
        "`spec.model.name`); written as the adapter's `base_model_name_or_path`. Defaults to the base model "
        "URI's model id: `org/name` for `hf://org/name`, else the URI's last path segment.",
    )
    adapter_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$",
        description="Name clients request the adapter by (vLLM's `--lora-modules <name>=<path>`, KServe's "
        "`spec.model.lora.adapters[].name`). Defaults to the FineTuneJob's name.",
    )
    max_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] | None = Field(
        default=None,
        description="vLLM's `--max-lora-rank`: the largest adapter rank the server loads (one of 1, 8, 16, 32, "
        "64, 128, 256, 320, 512). Must be at least spec.lora.r. Defaults to the smallest of these at least "
        "spec.lora.r.",
    )
    image: str = Field(
        default=DEFAULT_VLLM_IMAGE,
        max_length=512,
        pattern=_IMAGE,
        description=f"vLLM server image of the plain Deployment (`serving/vllm.yaml`). Defaults to `{DEFAULT_VLLM_IMAGE}`.",
    )
    gpus: int = Field(default=1, ge=1, le=64, description="GPUs of each serving replica. Defaults to 1.")
    apply: bool = Field(
        default=False,
        description="Create the KServe LLMInferenceService (owned by this FineTuneJob) once the job Succeeded "
        "with every gate passed; only where the LLMInferenceService CRD is installed (else the `Serving` "
        "condition says so). Defaults to false: the manifests are written, nothing is created.",
    )


class MlflowSpec(_Model):
    """An MLflow tracking server (and its model registry) the run is logged to."""

    tracking_uri: str = Field(
        min_length=1,
        max_length=1024,
        # No `user:password@` before the host: credentials come only from secretRef (the URI is shown in the
        # status, the run's URL and error messages).
        pattern=r"^https?://[^\s/@?#]+(/[^\s?#]*)?$",
        description="The MLflow tracking server, `http(s)://host[:port][/path]`, without credentials, query or "
        "fragment (the URI appears in status, events and the run's params; credentials come from secretRef).",
    )
    experiment: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="Experiment the run is logged under (created when missing). Defaults to "
        "`<namespace>/<FineTuneJob name>`.",
    )
    registered_model: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="Registered model that a successful run (gates passed) adds a version to, tagged with its "
        "lineage (base model revision, dataset sha256, method, GPU-hours, gates, FineTuneJob namespace/name/uid). "
        "Defaults to none: nothing is registered.",
    )
    secret_ref: SecretRef | None = Field(
        default=None,
        description="Secret with the tracking server's credentials, projected as MLflow's own environment "
        "variables: MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN. Defaults to "
        "none (an unauthenticated server).",
    )


class TrackingSpec(_Model):
    """Experiment tracking. TensorBoard event files are always written under `<output.uri>/tensorboard/`."""

    mlflow: MlflowSpec | None = Field(
        default=None,
        description="Log params, per-step metrics, evaluation and artifact URIs to MLflow, and register the "
        "model on success. Tracking failures never fail training: they leave the `Tracking` condition False and "
        "a Warning event. Defaults to none.",
    )


class CheckpointSpec(_Model):
    """Checkpointing for resume."""

    every_steps: int = Field(default=500, ge=1, le=10_000_000, description="Optimizer steps between checkpoints. Defaults to 500.")
    keep: int = Field(default=3, ge=1, le=100, description="Newest complete checkpoints kept. Defaults to 3.")


GateMetric = Literal["accuracy", "terminology", "hallucination", "formatCompliance", "evalLoss", "perplexity",
                     "preferenceAccuracy", "rewardMargin"]
CHAINED_SERVING_MESSAGE = (
    "spec.serving with spec.baseModel.fromJob needs spec.output.saveMerged: true: this stage starts from the earlier "
    "stages' adapters merged into the base, so a server loading the base and this stage's adapter alone would miss "
    "them; set output.saveMerged: true (the merged model is served)")
DPO_DOMAIN_GATE_MESSAGE = (
    "spec.evaluation.gates on accuracy, terminology, hallucination, formatCompliance, evalLoss or perplexity are "
    "measured on instruction test examples, which a dpo job has only with spec.evaluation.testSet; set testSet, or "
    "gate preferenceAccuracy or rewardMargin")
#: Gate metrics measured on preference pairs (objective dpo, or spec.evaluation.preferenceTestSet).
PREFERENCE_METRICS = ("preferenceAccuracy", "rewardMargin")


class DpoSpec(_Model):
    """Direct Preference Optimization settings (spec.objective: dpo)."""

    beta: float = Field(
        default=0.1, gt=0, le=100,
        description="How far the policy may move from the reference: the implicit reward is beta x the log-probability "
        "ratio (sigmoid), and 1/(2 beta) the target margin (ipo). Defaults to 0.1.")
    loss: Literal["sigmoid", "ipo"] = Field(
        default="sigmoid",
        description="`sigmoid` (DPO: -log sigmoid of the reward margin) or `ipo` (IPO: the squared distance of the "
        "per-token log-ratio margin from 1/(2 beta)). Defaults to sigmoid.")
    reference_free: bool = Field(
        default=False,
        description="Take the reference log-probabilities as 0: the policy is only asked to prefer chosen over "
        "rejected, with no pull towards the starting model. Defaults to false.")
    precompute_reference: Literal["auto", "always", "never"] = Field(
        default="auto",
        description="Compute the reference log-probabilities of every training and validation pair once, in a pass "
        "before training, and store them with the checkpoints (a resumed run reads them). `auto`: for method full "
        "(the only way without a second copy of the weights); lora and qlora compute them each step with the "
        "adapter switched off. `always`: for every method (saves the reference forward of each step). `never`: "
        "not with method full. Defaults to auto.")

    def precomputes(self, method: str) -> bool:
        """Whether the reference is a table computed before training (else the adapter-disabled model)."""
        if self.reference_free:
            return False
        return self.precompute_reference == "always" or (self.precompute_reference == "auto" and method == "full")


class Gate(_Model):
    """A threshold the fine-tuned model must meet, or the job fails."""

    metric: GateMetric = Field(description="Evaluation score the gate checks.")
    min: float | None = Field(default=None, description="Lowest acceptable value. Defaults to none.")
    max: float | None = Field(default=None, description="Highest acceptable value. Defaults to none.")
    min_improvement: float | None = Field(
        default=None,
        gt=0,
        le=100,
        description="Least relative improvement on the base model's score, as a fraction: 0.2 means evalLoss, "
        "perplexity or hallucination (lower is better) must fall to at most 0.8 x the base's, and accuracy, "
        "terminology, formatCompliance or preferenceAccuracy must rise to at least 1.2 x the base's; rewardMargin, "
        "which can be negative, to at least base + 0.2 x |base| and above the base. Defaults to none.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> Gate:
        if self.min is None and self.max is None and self.min_improvement is None:
            raise ValueError(f"gate for {self.metric!r} needs min or max (or minImprovement)")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"gate for {self.metric!r} has min {self.min} above max {self.max}")
        return self


class EvaluationSpec(_Model):
    """Domain evaluation of the base and the fine-tuned model."""

    enabled: bool = Field(default=True, description="Run the evaluation after training. Defaults to true.")
    test_set: str | None = Field(
        default=None,
        max_length=1024,
        description="Test examples in the training format (instruction or chat rows with objective dpo, for the "
        "domain scores). Defaults to the validation data, else a held-out 5% of the training data; with objective "
        "dpo to none.",
    )
    preference_test_set: str | None = Field(
        default=None,
        max_length=1024,
        description="Held-out preference pairs (the preference format) scored for preference accuracy and reward "
        "margin, base beside fine-tuned. With objective dpo defaults to the validation pairs, else a held-out 5% of "
        "the training pairs (testSet then holds instruction examples for the domain scores, if any); with objective "
        "sft defaults to none.",
    )
    glossary: str | None = Field(
        default=None,
        max_length=1024,
        description="Domain terms, one per line (or a JSON list), used by the terminology and "
        "hallucination scores. Defaults to none (terms are then taken from the references).",
    )
    format_schema: str | None = Field(
        default=None,
        max_length=65536,
        description="JSON Schema (as JSON text) every answer must satisfy, parsed as JSON, for format "
        "compliance. Defaults to none. A string rather than an object keeps the CRD structural.",
    )
    format_regex: str | None = Field(
        default=None,
        max_length=1024,
        description="Regular expression every answer must fully match for format compliance. Defaults to none.",
    )
    max_examples: int = Field(
        default=200, ge=1, le=100_000, description="Most test examples generated and scored. Defaults to 200."
    )
    max_new_tokens: int = Field(
        default=128, ge=1, le=8192, description="Longest generated answer, in tokens. Defaults to 128."
    )
    gates: list[Gate] = Field(
        default_factory=list,
        max_length=16,
        description="Thresholds on the fine-tuned scores; a miss fails the job naming the metric. With "
        "spec.retrieval they check the scores with retrieval (the setting the model is trained for). "
        "Defaults to none.",
    )
    hallucination_threshold: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Hallucination score (0..1) above which a job without spec.retrieval gets the condition "
        "HallucinationHigh and a Warning event recommending spec.retrieval, with the measured score. Only a "
        "recommendation: gates decide failure. Defaults to 0.5.",
    )

    _check_uris = field_validator("test_set", "preference_test_set", "glossary")(_uri_check(("s3", "pvc", "file")))

    @field_validator("format_schema")
    @classmethod
    def _schema_is_json(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError as err:
                raise ValueError(f"not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
            if not isinstance(parsed, dict):
                raise ValueError("must be a JSON object (a JSON Schema)")
        return value

    def resolved_hallucination_threshold(self) -> float:
        if self.hallucination_threshold is None:
            return DEFAULT_HALLUCINATION_THRESHOLD
        return self.hallucination_threshold

    def format_schema_dict(self) -> dict[str, Any] | None:
        return json.loads(self.format_schema) if self.format_schema else None

    @field_validator("format_regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"not a valid regular expression: {err}") from None
        return value


#: `spec.pilot` bound when neither maxSteps nor dataFraction is set.
DEFAULT_PILOT_MAX_STEPS = 100
#: Methods a pilot may precede: the pilot is a LoRA run, so lora, qlora and auto (which resolves to one of
#: them) are refused: the run is already the pilot.
PILOT_METHODS = ("full", "prefix", "prompt")


class PilotSpec(_Model):
    """A short LoRA run that must pass its gates before the main (full, prefix or prompt) run is created."""

    max_steps: int | None = Field(
        default=None,
        ge=1,
        le=1_000_000,
        description="Optimizer steps of the pilot. At most one of maxSteps and dataFraction. Defaults to 100 "
        "when neither is set.",
    )
    data_fraction: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Share of one pass over the training data the pilot trains on, in (0, 1] (0.1: a tenth of "
        "an epoch). At most one of maxSteps and dataFraction. Defaults to none.",
    )
    learning_rate: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Peak learning rate of the pilot's LoRA adapter. Defaults to 2e-4 (the LoRA default), not "
        "the main run's hyperparameters.learningRate.",
    )
    gates: list[Gate] = Field(
        min_length=1,
        max_length=16,
        description="Thresholds the pilot's adapter must meet on the evaluation (spec.evaluation's test set, "
        "scored against the base model) before the main run starts, such as `{metric: evalLoss, "
        "minImprovement: 0.1}` or `{metric: accuracy, min: 0.3}`; a miss ends the FineTuneJob Failed with "
        "reason PilotGatesFailed and the pilot's scores. At least one.",
    )

    @model_validator(mode="after")
    def _one_bound(self) -> PilotSpec:
        if self.max_steps is not None and self.data_fraction is not None:
            raise ValueError("set at most one of spec.pilot.maxSteps and spec.pilot.dataFraction, not both")
        return self


class ComplianceSpec(_Model):
    """Regulatory requirements."""

    provenance_required: bool = Field(
        default=False,
        description="Record the training-data provenance (hashes, sources, config) in the output before "
        "the first training step; the run fails if it cannot. Defaults to false.",
    )


class BudgetSpec(_Model):
    """A cap on what the run may spend, in GPU-hours."""

    max_gpu_hours: float = Field(
        gt=0, le=1_000_000,
        description="The most GPU-hours the run may use: wall-clock hours of the training processes times their "
        "number (one process per GPU), over every attempt, counted up to each checkpoint. Reaching it, the "
        "trainer saves a checkpoint and stops; the job fails with BudgetExceeded and a new FineTuneJob with "
        "the same output.uri and a larger budget resumes from that checkpoint.")


class FineTuneJobSpec(_Model):
    """Desired fine-tuning run. Immutable after creation except `suspend`."""

    base_model: BaseModelSpec = Field(description="The pretrained model to fine-tune.")
    method: Method = Field(
        default="auto",
        description="`full` trains every weight; `lora` trains adapters; `qlora` trains adapters on a "
        "4-bit base; `prefix` trains key/value vectors prepended to every attention layer (prefix tuning); "
        "`prompt` trains embeddings prepended to the input (prompt tuning). `auto` picks qlora below 10,000 "
        "examples (dataset.examples), else lora. Defaults to auto.",
    )
    objective: Objective = Field(
        default="sft",
        description="What the model is trained to do: `sft` (supervised fine-tuning on instruction, chat or text "
        "data) or `dpo` (Direct Preference Optimization on preference pairs, spec.dpo; with methods full, lora and "
        "qlora). Defaults to sft.",
    )
    dpo: DpoSpec | None = Field(
        default=None,
        description="DPO settings; only with objective dpo. Defaults to beta 0.1, loss sigmoid, a reference.",
    )
    lora: LoraSpec = Field(default_factory=LoraSpec, description="Adapter settings for lora and qlora. Defaults to r=16, alpha=32.")
    quantization: QuantizationSpec | None = Field(
        default=None,
        description="Base-weight quantization; only with `method: qlora`. Defaults to 4-bit nf4 with double "
        "quantization for qlora.",
    )
    prefix: PrefixSpec | None = Field(
        default=None,
        description="Prefix-tuning settings; only with `method: prefix`. Defaults to 20 virtual tokens without "
        "projection for prefix.",
    )
    prompt: PromptSpec | None = Field(
        default=None,
        description="Prompt-tuning settings; only with `method: prompt`. Defaults to 20 randomly initialized "
        "virtual tokens for prompt.",
    )
    dataset: DatasetSpec = Field(description="Training and validation data.")
    retrieval: RetrievalSpec | None = Field(
        default=None,
        description="Retrieval augmentation (RAFT): index a document corpus and put each example's top-k "
        "passages in its prompt at training and evaluation; the evaluation then scores both models with and "
        "without retrieval. Not with dataset.format text. Defaults to none (prompts carry no passages).",
    )
    hyperparameters: Hyperparameters = Field(
        default_factory=Hyperparameters, description="Optimization settings. Defaults as documented per field."
    )
    resources: ResourcesSpec = Field(
        default_factory=ResourcesSpec,
        description="GPUs and placement. Unset fields come from the sizing plan (status.plan).",
    )
    output: OutputSpec = Field(description="Where checkpoints and artifacts go.")
    serving: ServingSpec | None = Field(
        default=None,
        description="Serving manifests (a KServe LLMInferenceService and a plain vLLM Deployment) written under "
        "`<output.uri>/serving/`, and optionally applied on success. lora, qlora and full only (vLLM cannot load "
        "prefix or prompt tuning's virtual tokens). Defaults to none.",
    )
    tracking: TrackingSpec | None = Field(
        default=None, description="Experiment tracking and model registry (MLflow). Defaults to none.")
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, description="Checkpoint cadence and retention.")
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec, description="Domain evaluation and quality gates.")
    pilot: PilotSpec | None = Field(
        default=None,
        description="Validate with a short LoRA run first (methods full, prefix and prompt only): the operator "
        "runs a bounded LoRA pilot with its own plan and Job, writing under `<output.uri>/pilot/`; only a pilot "
        "that passes pilot.gates leads to the main run. Defaults to none (no pilot).",
    )
    compliance: ComplianceSpec = Field(default_factory=ComplianceSpec, description="Provenance requirements.")
    budget: BudgetSpec | None = Field(
        default=None, description="A GPU-hours cap on the run. Defaults to none (no cap).")
    suspend: bool = Field(
        default=False,
        description="Pause the run: training pods stop after a checkpoint; unsetting resumes from the newest "
        "checkpoint. The only field that may change after creation. Defaults to false.",
    )
    active_deadline_seconds: int | None = Field(
        default=None,
        ge=1,
        le=31_536_000,
        description="Wall-clock limit for the whole run; past it the job fails with DeadlineExceeded. "
        "Defaults to none.",
    )
    backoff_limit: int = Field(
        default=3,
        ge=0,
        le=100,
        description="Failed attempts tolerated before the job fails (preemptions and evictions do not count). "
        "On a multi-node job a failed pod takes its peers down with it, so the Job's backoffLimit is this "
        "times the number of nodes. Defaults to 3.",
    )
    image: str | None = Field(
        default=None,
        max_length=512,
        pattern=_IMAGE,
        description="Trainer image. Defaults to the operator's configured trainer image.",
    )
    service_account_name: str | None = Field(
        default=None,
        max_length=253,
        pattern=_K8S_NAME,
        description="Service account of the training pods (for IRSA or workload identity). Defaults to the "
        "namespace's default service account.",
    )

    @model_validator(mode="after")
    def _cross_field(self) -> FineTuneJobSpec:
        if self.quantization is not None and self.method != "qlora":
            raise ValueError(
                f"spec.quantization is only valid with method 'qlora' (got method {self.method!r}); "
                "set method: qlora or remove quantization"
            )
        for block in VIRTUAL_TOKEN_METHODS:
            if getattr(self, block) is not None and self.method != block:
                raise ValueError(
                    f"spec.{block} is only valid with method '{block}' (got method {self.method!r}); "
                    f"set method: {block} or remove {block}"
                )
        if self.method in VIRTUAL_TOKEN_METHODS:
            self._virtual_token_limits()
        if self.pilot is not None:
            self._pilot_limits(self.pilot)
        if self.retrieval is not None:
            self._retrieval_limits(self.retrieval)
        if self.serving is not None:
            self._serving_limits(self.serving)
        self._objective_limits()
        return self

    def resolved_dpo(self) -> DpoSpec:
        return self.dpo or DpoSpec()

    def _objective_limits(self) -> None:
        """What DPO combines with (mirrored by CEL rules in crd.py)."""
        fmt = self.dataset.format
        if self.objective != "dpo":
            if self.dpo is not None:
                raise ValueError("spec.dpo is only valid with spec.objective dpo; set objective: dpo or remove dpo")
            if fmt == "preference":
                raise ValueError("spec.dataset.format preference needs spec.objective dpo (pairs have no single "
                                 "answer to train on); set objective: dpo, or give instruction, chat or text data")
        else:
            if self.method not in DPO_METHODS:
                raise ValueError(f"spec.objective dpo cannot be used with method {self.method}: virtual tokens have no "
                                 "adapter to switch off for the reference; use method lora, qlora or full")
            if fmt not in ("auto", "preference"):
                raise ValueError(f"spec.dataset.format {fmt} cannot be used with spec.objective dpo: DPO trains on "
                                 "preference pairs; set format: preference (or auto) and give pairs")
            if self.hyperparameters.packing:
                raise ValueError("spec.hyperparameters.packing cannot be used with spec.objective dpo: the two sequences "
                                 "of a pair are compared with each other and are never packed; set packing: false")
            if self.retrieval is not None:
                raise ValueError("spec.retrieval cannot be used with spec.objective dpo; train with retrieval in an sft "
                                 "stage and chain the dpo stage to it (spec.baseModel.fromJob)")
            if self.pilot is not None:
                raise ValueError("spec.pilot cannot be used with spec.objective dpo (the pilot is an sft LoRA run); "
                                 "remove pilot, or run an sft stage first and chain this job to it")
            dpo = self.resolved_dpo()
            if self.method == "full" and dpo.precompute_reference == "never" and not dpo.reference_free:
                raise ValueError("spec.dpo.precomputeReference never cannot be used with method full: the reference "
                                 "would be a second copy of the weights; set precomputeReference: auto")
        prefs = self.objective == "dpo" or self.evaluation.preference_test_set is not None
        for index, gate in enumerate(self.evaluation.gates):
            if gate.metric in PREFERENCE_METRICS and not prefs:
                raise ValueError(f"spec.evaluation.gates[{index}].metric {gate.metric} is measured on preference pairs: "
                                 "set spec.objective dpo or spec.evaluation.preferenceTestSet, or gate another metric")
            if self.objective == "dpo" and self.evaluation.test_set is None and gate.metric not in PREFERENCE_METRICS:
                raise ValueError(DPO_DOMAIN_GATE_MESSAGE)

    def _serving_limits(self, serving: ServingSpec) -> None:
        if self.base_model.from_job is not None and self.method != "full" and not self.output.save_merged:
            raise ValueError(CHAINED_SERVING_MESSAGE)
        if self.method in VIRTUAL_TOKEN_METHODS:
            raise ValueError(
                f"spec.serving cannot be used with method {self.method}: vLLM and KServe load LoRA adapters or whole "
                "models, not virtual tokens, and virtual tokens cannot be merged into the weights; use method lora "
                "or qlora, or remove serving"
            )
        largest = VLLM_MAX_LORA_RANKS[-1]
        if self.method != "full" and self.lora.r > largest:
            raise ValueError(
                f"spec.lora.r {self.lora.r} is above {largest}, the largest --max-lora-rank vLLM accepts, so no server "
                f"would load this adapter; lower lora.r to {largest} or less, or set spec.output.saveMerged: true and "
                "serve the merged model (then remove serving.maxRank)"
            )
        if serving.max_rank is not None and self.method != "full" and self.lora.r > serving.max_rank:
            raise ValueError(
                f"spec.serving.maxRank {serving.max_rank} is below spec.lora.r {self.lora.r}: vLLM refuses adapters "
                f"of a higher rank than --max-lora-rank; raise serving.maxRank to {self.resolved_max_rank(None)}, "
                "lower lora.r, or leave maxRank unset"
            )

    def served_base_model_name(self) -> str:
        """The name the base model is served under: spec.serving.baseModelName, else the base model URI's model id
        (`hf://org/name` -> `org/name`; other schemes: the URI's last path segment, `s3://b/models/llama-7b/` ->
        `llama-7b`). The saved adapter's `base_model_name_or_path` (what vLLM and KServe match adapters by)."""
        if self.serving is not None and self.serving.base_model_name:
            return self.serving.base_model_name
        uri = self.base_model.resolved_uri()
        if uri.startswith("hf://"):
            return uri.removeprefix("hf://").rstrip("/")
        return uri.rstrip("/").rsplit("/", 1)[-1] or uri

    def resolved_max_rank(self, serving: ServingSpec | None = None) -> int:
        """spec.serving.maxRank, else the smallest rank vLLM accepts that is at least spec.lora.r."""
        if serving is not None and serving.max_rank is not None:
            return serving.max_rank
        return next((r for r in VLLM_MAX_LORA_RANKS if r >= self.lora.r), VLLM_MAX_LORA_RANKS[-1])

    def _pilot_limits(self, pilot: PilotSpec) -> None:
        if self.method not in PILOT_METHODS:
            raise ValueError(
                f"spec.pilot is only valid with methods full, prefix and prompt (got method {self.method!r}): the "
                "pilot is a short LoRA run, and this run already is one (auto resolves to lora or qlora); remove "
                "pilot, or bound the run with hyperparameters.maxSteps"
            )
        if not self.evaluation.enabled:
            raise ValueError("spec.pilot.gates are checked on the evaluation; set spec.evaluation.enabled: true "
                             "or remove pilot")
        for index, gate in enumerate(pilot.gates):
            if gate.metric in PREFERENCE_METRICS:
                raise ValueError(f"spec.pilot.gates[{index}].metric {gate.metric} is measured on preference pairs, which "
                                 "the pilot (an sft LoRA run) is not scored on; gate the pilot on another metric")
            if gate.metric == "formatCompliance" and not (self.evaluation.format_schema or self.evaluation.format_regex):
                raise ValueError(
                    f"spec.pilot.gates[{index}].metric formatCompliance is only measured with "
                    "spec.evaluation.formatSchema or formatRegex; set one, or gate another metric"
                )

    def _retrieval_limits(self, retrieval: RetrievalSpec) -> None:
        if self.dataset.format == "text":
            raise ValueError(
                "spec.retrieval cannot be used with spec.dataset.format text: text rows have no question to "
                "retrieve passages for; use format instruction or chat, or remove retrieval"
            )
        budget = retrieval.top_k * retrieval.chunk_tokens
        longest = self.hyperparameters.max_seq_length
        if budget >= longest:
            raise ValueError(
                f"spec.retrieval.chunkTokens: topK x chunkTokens = {retrieval.top_k} x {retrieval.chunk_tokens} "
                f"= {budget} passage tokens leave no room for the question and answer within "
                f"spec.hyperparameters.maxSeqLength {longest}; lower retrieval.chunkTokens or retrieval.topK, "
                "or raise maxSeqLength"
            )

    def _virtual_token_limits(self) -> None:
        """What peft's prefix and prompt tuning cannot do (measured on a tiny Llama, peft 0.21)."""
        method, hp = self.method, self.hyperparameters
        if hp.packing:
            # Packed rows keep examples apart through position ids that restart at 0. Prompt tuning drops
            # position ids (peft warns and ignores them) and prefix tuning passes a KV cache, which turns
            # off transformers' packed-sequence masks: examples of one row would attend to each other.
            raise ValueError(
                f"spec.hyperparameters.packing cannot be used with method {method}: its virtual tokens break the "
                "per-example attention of packed rows (examples would attend to each other); set packing: false"
            )
        if method == "prefix":
            if hp.gradient_checkpointing is None:
                hp.gradient_checkpointing = False  # the documented default for prefix: the plan may not turn it on
            elif hp.gradient_checkpointing:
                raise ValueError(
                    "spec.hyperparameters.gradientCheckpointing cannot be used with method prefix: peft passes the "
                    "prefix to every layer as a KV cache, which checkpointed layers drop (peft refuses it); set "
                    "gradientCheckpointing: false, or use method prompt or lora"
                )
        if self.output.save_merged:
            raise ValueError(
                f"spec.output.saveMerged cannot be used with method {method}: virtual tokens are not weights "
                "and cannot be merged into the base model; set saveMerged: false (model/ holds the adapter)"
            )

    def resolved_quantization(self) -> QuantizationSpec:
        return self.quantization or QuantizationSpec()

    def resolved_prefix(self) -> PrefixSpec:
        return self.prefix or PrefixSpec()

    def resolved_prompt(self) -> PromptSpec:
        return self.prompt or PromptSpec()


class ObjectMeta(_Model):
    """The subset of metadata a FineTuneJob manifest may carry."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    name: str = Field(
        description="Name of the FineTuneJob; children are named after it.",
        max_length=MAX_NAME_LENGTH,
        pattern=NAME_PATTERN,
    )
    namespace: str = Field(default="default", max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    uid: str | None = None
    generation: int | None = None


class FineTuneJob(_Model):
    """A whole manifest: apiVersion, kind, metadata and spec (status is ignored on input)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    api_version: Literal["finetune.dev/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["FineTuneJob"]
    metadata: ObjectMeta
    spec: FineTuneJobSpec

    @field_validator("spec")
    @classmethod
    def _not_its_own_base(cls, spec: FineTuneJobSpec, info: ValidationInfo) -> FineTuneJobSpec:
        # Only the whole manifest knows its name (the CRD's root CEL rule says the same at admission).
        meta = info.data.get("metadata")
        if meta is not None and spec.base_model.from_job == meta.name:
            raise ValueError("spec.baseModel.fromJob names this FineTuneJob itself; a job cannot start from its own "
                             "result: name the earlier stage's FineTuneJob")
        return spec


# --------------------------------------------------------------------------------------------------
# Status: written by the operator only.
# --------------------------------------------------------------------------------------------------

Phase = Literal["Pending", "Queued", "Running", "Succeeded", "Failed", "Suspended"]


class ServingPlan(_Model):
    """What spec.serving will serve, decided with the plan (`finetune plan` shows it)."""

    base_model_name: str = Field(max_length=253, description="Name the base model is served under (the adapter's "
                                 "base_model_name_or_path).")
    model_uri: str = Field(max_length=1024, description="What the server loads as its model: the base model's URI, or "
                           "`<output.uri>/merged/` with saveMerged, or `<output.uri>/model/` for full fine-tuning.")
    adapter_name: str | None = Field(default=None, max_length=63, description="Name of the LoRA adapter; unset when "
                                     "the served model is a whole model (merged or full).")
    adapter_uri: str | None = Field(default=None, max_length=1024, description="Where the adapter is "
                                    "(`<output.uri>/model/`); unset when no adapter is served.")
    max_rank: int | None = Field(default=None, ge=1, description="vLLM's --max-lora-rank; unset without an adapter.")
    manifests: list[Annotated[str, Field(max_length=1024)]] = Field(
        default_factory=list, max_length=4, description="The manifests written under `<output.uri>/serving/`.")
    apply: bool = Field(default=False, description="Whether the operator creates the LLMInferenceService on success.")


class CostEstimate(_Model):
    """What the run will cost, from the pre-flight's counts and the per-GPU-class throughput table
    (`finetune_operator.cost`). An estimate: the trainer measures what is spent (status.progress.gpuHours)."""

    parameters: int = Field(ge=1, description="Exact parameter count of the base model, read from its files.")
    train_examples: int = Field(ge=0, description="Examples trained on per epoch (after validationSplit).")
    tokens: int = Field(ge=0, description="Tokens trained on per epoch (each example capped at maxSeqLength).")
    tokens_sampled: bool = Field(description="Whether the token count is extrapolated from a sample of each file.")
    steps: int = Field(ge=0, description="Optimizer steps (maxSteps, else epochs over the data at the global batch).")
    tokens_trained: int = Field(ge=0, description="Tokens processed over the whole run.")
    tokens_per_second: float = Field(ge=0, description="Assumed training throughput of the whole run, tokens per "
                                     "second (all GPUs).")
    hours: float = Field(ge=0, description="Estimated wall-clock hours of training (evaluation not included).")
    gpu_hours: float = Field(ge=0, description="Estimated GPU-hours: hours x GPUs (what spec.budget.maxGpuHours caps).")
    basis: str = Field(max_length=1024, description="How it was computed: FLOPs per token, the GPU class's assumed "
                       "peak and utilisation.")


class MemoryRung(_Model):
    """One rung of the memory ladder: how a step's examples are split in memory (the plan's choice, and each step
    of the out-of-memory ladder)."""

    micro_batch: int = Field(ge=1, description="Examples per forward pass on each GPU (spec.hyperparameters.batchSize).")
    grad_accum: int = Field(
        ge=1, description="Micro-batches accumulated per optimizer step (spec.hyperparameters.gradientAccumulationSteps).")
    gradient_checkpointing: bool = Field(description="Whether activations are recomputed in the backward pass.")

    def halved(self) -> MemoryRung | None:
        """The next smaller micro-batch, with the accumulation that keeps microBatch x gradAccum: the largest
        divisor at most half of it (8 -> 4, 6 -> 3, 5 -> 1); None at a micro-batch of 1. Both the plan
        (`sizing.choose_rung`) and the out-of-memory ladder (`contract.next_rung`) step down this way."""
        if self.micro_batch <= 1:
            return None
        smaller = next(d for d in range(self.micro_batch // 2, 0, -1) if self.micro_batch % d == 0)
        return self.model_copy(update={"micro_batch": smaller, "grad_accum": self.grad_accum * (self.micro_batch // smaller)})


class Plan(_Model):
    """The sizing decision: how many GPUs of what memory, and why."""

    method: ResolvedMethod = Field(description="The training method after resolving `auto`.")
    gpus: int = Field(ge=1, description="Total GPUs requested across all nodes.")
    gpu_memory_gib: int = Field(alias="gpuMemoryGiB", ge=1, description="Memory of each GPU, in GiB (a standard GPU class).")
    nodes: int = Field(ge=1, description="Training pods (one per node): ceil(gpus / gpusPerNode).")
    gpus_per_node: int = Field(ge=1, description="GPUs requested by each training pod.")
    estimated_memory_gib: float = Field(
        alias="estimatedMemoryGiB",
        description="GPU memory the memory model predicts for the whole run at `rung`, in GiB (all GPUs together).",
    )
    source: Literal["table", "estimate"] = Field(
        description="`table`: the model-size table; `estimate`: the memory model (sizes not in the table)."
    )
    reason: str = Field(max_length=2048, description="Which rules fired, in words.")
    rung: MemoryRung | None = Field(
        default=None,
        description="The micro-batch, gradient accumulation and gradient checkpointing the trainer starts at: the "
        "fastest that fits the planned GPU with the headroom (spec.hyperparameters.batchSize lowered, never "
        "raised, with gradientAccumulationSteps raised to keep their product; checkpointing off unless nothing "
        "fits without it, or as spec.hyperparameters.gradientCheckpointing sets it). Unset in plans made before "
        "the field existed: the trainer then starts at the spec's hyperparameters.")
    memory_per_gpu_gib: float | None = Field(
        default=None, alias="memoryPerGpuGiB",
        description="GPU memory the memory model predicts for each GPU at `rung`, in GiB (its own allowance for "
        "the CUDA context and fragmentation included).")
    headroom_gib: float | None = Field(
        default=None, alias="headroomGiB",
        description="gpuMemoryGiB minus memoryPerGpuGiB: what is left on each GPU beyond the prediction, in GiB. "
        "The plan keeps at least 5% of gpuMemoryGiB; negative where nothing fits (see warnings).")
    warnings: list[Annotated[str, Field(max_length=1024)]] = Field(
        default_factory=list, max_length=16, description="Problems with explicit resources, such as too little memory, "
        "and a job that fits the planned GPU at no rung."
    )
    serving: ServingPlan | None = Field(
        default=None, description="What spec.serving serves (model, adapter, rank, manifests); unset without it.")
    estimate: CostEstimate | None = Field(
        default=None, description="Examples, tokens, optimizer steps, duration and GPU-hours, completed from the CPU "
        "pre-flight's reading of the model and data (unset until it ran, or with the operator's pre-flight off).")


class Condition(_Model):
    """A metav1.Condition."""

    type: str = Field(max_length=316, description="Condition type, such as Valid, Planned, Running, Complete, Failed.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(max_length=1024, description="CamelCase reason for the last transition.")
    message: str = Field(default="", max_length=32768, description="Human-readable details.")
    observed_generation: int | None = Field(default=None, ge=0, description="Spec generation the condition was set for.")
    last_transition_time: str = Field(description="When the status last changed (RFC 3339).")


class Progress(_Model):
    """Training progress as reported by the trainer."""

    step: int = Field(default=0, ge=0, description="Optimizer steps done.")
    total_steps: int = Field(default=0, ge=0, description="Optimizer steps planned.")
    percent: int = Field(default=0, ge=0, le=100, description="step / totalSteps, in percent.")
    summary: str = Field(default="", max_length=64, description="Short progress text for `kubectl get`, like `45% 450/1000`.")
    epoch: float | None = Field(default=None, description="Fractional epoch.")
    loss: float | None = Field(default=None, description="Latest training loss.")
    eval_loss: float | None = Field(default=None, description="Latest validation loss (objective dpo: the DPO loss on "
                                    "the validation pairs).")
    tokens_per_second: float | None = Field(default=None, description="Training throughput, non-padding tokens per second.")
    gpu_hours: float | None = Field(
        default=None, ge=0, description="GPU-hours used so far (what spec.budget.maxGpuHours caps), as the trainer "
        "measures them.")
    eta_seconds: int | None = Field(default=None, ge=0, description="Estimated seconds until training ends.")
    updated_at: str | None = Field(default=None, description="When the trainer last reported (RFC 3339).")


class CheckpointRecord(_Model):
    """A complete checkpoint in the output location."""

    step: int = Field(ge=0, description="Optimizer step of the checkpoint.")
    uri: str = Field(max_length=1024, description="Where it is.")


class Scores(_Model):
    """Evaluation scores of one model."""

    accuracy: float | None = Field(default=None, description="Answer accuracy against the references (see accuracyMetric), 0..1.")
    terminology: float | None = Field(default=None, description="Share of the references' glossary terms the answers use, 0..1.")
    hallucination: float | None = Field(
        default=None, description="Share of domain terms and numbers in the answers supported by neither input nor reference, 0..1 (lower is better)."
    )
    format_compliance: float | None = Field(default=None, description="Share of answers meeting the format schema or regex, 0..1.")
    eval_loss: float | None = Field(default=None, description="Mean token loss on the test set (the instruction test set with objective dpo).")
    perplexity: float | None = Field(default=None, description="exp(evalLoss).")
    preference_accuracy: float | None = Field(
        default=None, ge=0, le=1,
        description="Share of held-out preference pairs with a positive implicit reward margin, 0..1: the model gives "
        "the chosen response a higher summed log-probability than the rejected one (the reward of reference-free DPO, "
        "so base and fine-tuned, and the stages of a chain, are measured on one scale).")
    reward_margin: float | None = Field(
        default=None,
        description="Mean implicit reward margin over the held-out pairs: beta x (log p(chosen) - log p(rejected)), "
        "beta from spec.dpo (0.1 by default).")
    preference_pairs: int | None = Field(default=None, ge=0, description="Held-out preference pairs scored.")


class RetrievalScores(_Model):
    """Scores of both models when every test prompt carries its top-k passages (spec.retrieval)."""

    base: Scores = Field(default_factory=Scores, description="The base model's scores with retrieval.")
    tuned: Scores = Field(default_factory=Scores, description="The fine-tuned model's scores with retrieval.")


class EvaluationStatus(_Model):
    """Scores of the base and the fine-tuned model on the test set."""

    accuracy_metric: str = Field(default="", max_length=64, description="How accuracy is computed, e.g. rougeL.")
    examples: int = Field(default=0, ge=0, description="Test examples scored.")
    base: Scores = Field(default_factory=Scores, description="The base model's scores.")
    tuned: Scores = Field(default_factory=Scores, description="The fine-tuned model's scores.")
    with_retrieval: RetrievalScores | None = Field(
        default=None,
        description="With spec.retrieval: the same test set with each prompt's top-k passages (base and tuned "
        "hold the scores without them); the passages count as context for hallucination. Unset without "
        "spec.retrieval.",
    )
    gates_passed: bool | None = Field(default=None, description="Whether every gate held; unset without gates.")
    failed_gates: list[Annotated[str, Field(max_length=256)]] = Field(default_factory=list, max_length=16, description="Gates that were missed, each naming the metric.")


class ExportCheck(_Model):
    """Checks of the exported model against the trained one, on sample prompts, at the end of training."""

    prompts: int = Field(default=0, ge=0, description="Sample prompts the logits were compared on.")
    tolerance: float | None = Field(default=None, ge=0, description="Largest max-abs logit difference accepted.")
    adapter_max_abs_diff: float | None = Field(
        default=None, ge=0, description="Max abs difference between the trained model's logits and those of the saved "
        "adapter reloaded with peft on the base (adapters only).")
    merged_max_abs_diff: float | None = Field(
        default=None, ge=0, description="Max abs difference between the adapter's logits and the merged model's "
        "(with saveMerged; both in full precision).")
    merged_check: str | None = Field(
        default=None, max_length=512, description="Where and in what precision merged/ was compared (`cpu float32`, "
        "`cuda bfloat16`), or why it was not: a merged model that fits neither the device nor the host memory left.")
    merge_peak_bytes: int | None = Field(
        default=None, ge=0, description="Peak memory the streaming merge held (bytes of tensors).")
    passed: bool | None = Field(default=None, description="Whether every difference is within the tolerance.")


class TrackingStatus(_Model):
    """Where the run is tracked (spec.tracking.mlflow)."""

    run_id: str | None = Field(default=None, max_length=128, description="MLflow run id.")
    experiment_id: str | None = Field(default=None, max_length=128, description="MLflow experiment id.")
    run_url: str | None = Field(default=None, max_length=2048, description="The run's page on the tracking server.")
    registered_model: str | None = Field(default=None, max_length=256, description="Registered model name.")
    model_version: str | None = Field(default=None, max_length=64, description="Registered model version created.")
    error: str | None = Field(default=None, max_length=2048, description="The last tracking failure (training goes on).")


class ServingStatus(_Model):
    """The LLMInferenceService the operator created (spec.serving.apply)."""

    name: str | None = Field(default=None, max_length=253, description="Name of the LLMInferenceService.")
    ready: bool | None = Field(default=None, description="Whether its Ready condition was True when the operator "
                               "last looked (it looks until it is Ready, then on later passes over the job).")
    url: str | None = Field(default=None, max_length=2048, description="Its address, once KServe reports one.")


class Adjustment(_Model):
    """A change the trainer (or the operator, across restarts) made to fit in memory.

    Every rung keeps microBatch x gradAccum, so each optimizer step trains on the same examples and the loss
    curve is that of a run started at the new rung.
    """

    step: int = Field(ge=0, description="Optimizer steps done when the out-of-memory error hit (training restarted from the "
                      "newest checkpoint, or from step 0 when there was none).")
    from_: MemoryRung = Field(alias="from", description="The rung that ran out of memory.")
    to: MemoryRung = Field(description="The rung training continued with.")
    reason: str = Field(max_length=1024, description="What happened, e.g. `CUDA out of memory` in the first steps, or "
                        "the pod OOMKilled.")
    by: Literal["trainer", "operator"] = Field(
        default="trainer", description="Who made it: the trainer in its own process, or the operator for the next pod "
        "after an OOMKilled one.")


Stage = Literal["Preflight", "Pilot", "Main"]


class PreflightStatus(_Model):
    """The CPU pre-flight (`<name>-preflight` Job): what it found before any GPU was requested."""

    phase: Phase | None = Field(default=None, description="Pending, Running, Succeeded (every check passed), Failed "
                                "or Suspended.")
    reason: str | None = Field(default=None, max_length=128, description="On failure: DataInvalid, ModelUnreadable, "
                               "OutputNotWritable, ServingUnsupported (spec.serving's adapter targets modules vLLM "
                               "does not load as LoRA for the model's architecture), or PreflightFailed (the Job "
                               "failed without a verdict).")
    message: str | None = Field(default=None, max_length=2048, description="On failure: what failed, naming the field, "
                                "file and line.")
    parameters: int | None = Field(default=None, ge=0, description="Exact parameter count of the base model.")
    architecture: str | None = Field(default=None, max_length=256, description="The model's shape in words (layers, "
                                     "hidden size, heads and KV heads, vocabulary).")
    examples: int | None = Field(default=None, ge=0, description="Valid rows of spec.dataset.train.")
    tokens: int | None = Field(default=None, ge=0, description="Tokens of spec.dataset.train with the model's "
                               "tokenizer, before truncation.")
    sampled: bool | None = Field(default=None, description="Whether the token count is extrapolated from a sample.")
    pairs: int | None = Field(default=None, ge=0, description="Preference pairs of spec.dataset.train (objective dpo).")
    tokens_per_pair: float | None = Field(default=None, ge=0, description="Mean tokens per pair: prompt, chosen and "
                                          "rejected (objective dpo).")
    length_bias: float | None = Field(default=None, description="Mean chosen minus rejected response tokens (objective "
                                      "dpo): far from 0, DPO can learn to prefer a length instead of content.")
    result: str | None = Field(default=None, max_length=1024, description="Where the full result is "
                               "(`<output.uri>/preflight.json`).")
    completion_time: str | None = Field(default=None, description="When the pre-flight finished (RFC 3339).")


class ChainStage(_Model):
    """One earlier FineTuneJob of a chain (spec.baseModel.fromJob), as it was when this job started from it."""

    name: str = Field(max_length=253, description="The FineTuneJob's name.")
    namespace: str = Field(max_length=63, description="Its namespace.")
    uid: str | None = Field(default=None, max_length=128, description="Its metadata.uid.")
    objective: str = Field(default="sft", max_length=16, description="Its spec.objective.")
    method: str = Field(max_length=16, description="Its resolved method.")
    output_uri: str = Field(max_length=1024, description="Its spec.output.uri (artifacts, provenance).")


class BaseJobStatus(_Model):
    """Where a chained job (spec.baseModel.fromJob) starts from, resolved when the base job succeeded."""

    name: str = Field(max_length=253, description="The base FineTuneJob (spec.baseModel.fromJob).")
    uid: str | None = Field(default=None, max_length=128, description="Its metadata.uid when first seen: a job "
                            "recreated under the same name is another job.")
    phase: Phase | None = Field(default=None, description="Its phase when last seen.")
    model_uri: str | None = Field(default=None, max_length=1024, description="The model this job loads: the base "
                                  "job's merged/ (or model/ for method full), else its own base model.")
    revision: str | None = Field(default=None, max_length=128, description="hf:// revision of modelUri, if any.")
    secret_ref: SecretRef | None = Field(default=None, description="The base job's spec.baseModel.secretRef when "
                                         "modelUri is the model that job started from (a gated hub model's token): "
                                         "used when this job's spec.baseModel names no Secret.")
    adapters: list[Annotated[str, Field(max_length=1024)]] = Field(
        default_factory=list, max_length=16, description="Adapters merged into modelUri, in order, before this "
        "job's method is applied (the base job's adapter last).")
    parameters: int | None = Field(default=None, ge=0, description="Parameter count of the model (from the base "
                                   "job's pre-flight or spec), for sizing.")
    chain: list[ChainStage] = Field(default_factory=list, max_length=16, description="Every earlier stage, first "
                                    "first; the base job last.")


class PilotStatus(_Model):
    """The pilot stage (spec.pilot): its own plan, progress and evaluation."""

    phase: Phase | None = Field(default=None, description="Pending, Queued, Running, Succeeded (gates passed), "
                                "Failed or Suspended.")
    plan: Plan | None = Field(default=None, description="The pilot's sizing plan (LoRA on the same base model).")
    progress: Progress | None = Field(default=None, description="The pilot's training progress.")
    evaluation: EvaluationStatus | None = Field(default=None, description="The pilot's scores beside the base "
                                                "model's, and whether pilot.gates held.")
    artifacts: dict[str, Annotated[str, Field(max_length=1024)]] = Field(
        default_factory=dict, max_length=32, description="The pilot's artifact URIs by kind, under "
        "`<output.uri>/pilot/`: model (the LoRA adapter, kept), metrics, evaluation, provenance, modelCard.")
    restarts: int = Field(default=0, ge=0, description="Pilot pod restarts (failures and preemptions).")
    start_time: str | None = Field(default=None, description="When the pilot started (RFC 3339).")
    completion_time: str | None = Field(default=None, description="When the pilot finished (RFC 3339).")


class FineTuneJobStatus(_Model):
    """Observed state, written by the operator."""

    phase: Phase | None = Field(default=None, description="Pending, Queued, Running, Succeeded, Failed or Suspended.")
    conditions: list[Condition] = Field(default_factory=list, max_length=32, description="Latest observations (metav1.Condition).")
    plan: Plan | None = Field(default=None, description="The sizing plan the workload was created from.")
    progress: Progress | None = Field(default=None, description="Training progress from the trainer.")
    checkpoints: list[CheckpointRecord] = Field(default_factory=list, max_length=100, description="Complete checkpoints, newest last.")
    artifacts: dict[str, Annotated[str, Field(max_length=1024)]] = Field(
        default_factory=dict, max_length=32, description="Artifact URIs by kind: model, merged, metrics, evaluation, provenance, modelCard, "
        "lossChart and evaluationChart (the card's pictures), tensorboard (event files), retrieval (the index of "
        "spec.retrieval), servingLLMInferenceService and servingVllm (the manifests of spec.serving)."
    )
    evaluation: EvaluationStatus | None = Field(default=None, description="Evaluation scores, base beside fine-tuned.")
    adjustments: list[Adjustment] = Field(
        default_factory=list, max_length=16,
        description="Out-of-memory adjustments (micro-batch, gradient accumulation, gradient checkpointing), oldest first, "
        "from the trainer's report and from OOMKilled pods.")
    restarts: int = Field(default=0, ge=0, description="Training pod restarts (failures and preemptions).")
    start_time: str | None = Field(default=None, description="When training started (RFC 3339).")
    completion_time: str | None = Field(default=None, description="When the job finished (RFC 3339).")
    observed_generation: int | None = Field(default=None, ge=0, description="Spec generation the status reflects.")
    stage: Stage | None = Field(default=None, description="`Preflight` while the CPU pre-flight checks the model, data "
                                "and output; with spec.pilot, `Pilot` while the pilot runs (phase is the pilot's); `Main` "
                                "once the training Job is created after either. Unset when neither runs.")
    preflight: PreflightStatus | None = Field(default=None, description="The CPU pre-flight, when the operator runs it.")
    pilot: PilotStatus | None = Field(default=None, description="The pilot stage, with spec.pilot.")
    base_job: BaseJobStatus | None = Field(default=None, description="With spec.baseModel.fromJob: the base job, and "
                                           "the model and adapters this job starts from once it succeeded.")
    export: ExportCheck | None = Field(default=None, description="The exported adapter and merged model checked "
                                       "against the trained model (logit differences on sample prompts).")
    tracking: TrackingStatus | None = Field(default=None, description="The MLflow run and registered model version "
                                            "(spec.tracking.mlflow).")
    serving: ServingStatus | None = Field(default=None, description="The LLMInferenceService created with "
                                          "spec.serving.apply, and whether it is ready.")
