"""The sizing planner: a pure function from a FineTuneJob spec to a GPU plan.

Listed sizes (7B, 13B, 70B) come from the model-size table, which is a product contract:

    size   full      lora      qlora
    7B     4x24GiB   1x24GiB   1x12GiB
    13B    8x24GiB   1x48GiB   1x24GiB
    70B    16x48GiB  2x48GiB   1x48GiB

Any other size comes from the memory model below, rounded up to a standard GPU class and a GPU count.

Memory model (bytes; P = parameters, a Llama-shaped decoder with hidden size h, L = h/128 layers,
P ~ 12*L*h^2, vocabulary V = 32,000, micro-batch b, sequence length s):

- weights: P x 2 (bf16/fp16) or 4 (fp32; and full fine-tuning in fp16, which keeps fp32 weights).
  QLoRA: the non-embedding weights at `bits` + 0.127 bits of constants with double quantization (0.5
  without); embeddings and head (2*V*h) in fp32, since peft's k-bit preparation upcasts them.
- trainable state: full in bf16 trains pure bf16 (the trainer's choice, as torchtune's): bf16 gradients
  and AdamW's two bf16 moments, 2+4 = 6 bytes per parameter on top of the 2-byte weights; full in fp16 or
  fp32 keeps fp32 weights (4 bytes) with fp32 gradients and moments, 4+8 = 12. LoRA/QLoRA: adapters kept in fp32 with their
  gradients and moments, 16 bytes per adapter parameter; each targeted module adds r*(h + h*m) parameters
  per layer (m = 1 for attention projections, 8/3 for MLP projections).
  prefix/prompt: the base is frozen in the training precision like LoRA's, and the trainable state is
  tiny: fp32 virtual tokens with gradients and moments, 16 bytes per parameter. Prompt tuning trains
  n*h parameters (n virtual tokens); prefix tuning n*2*L*h (a key and a value per layer), or with
  `projection` n*h + h^2 + 2*L*h^2 (the MLP's two layers; its hidden size is h).
- activations (per GPU, not sharded): prompt tuning lengthens every sequence by its n virtual tokens;
  prefix tuning adds its n keys and values per layer (2*L*b*n*h, 16-bit) and never checkpoints (the spec
  refuses gradient checkpointing with prefix, so the default there is off). with gradient checkpointing each layer keeps its input
  (2*b*s*h bytes) and one layer at a time is recomputed and back-propagated (its activations and their
  gradients, 2 x 34*b*s*h); without it every layer keeps 34*b*s*h and the layer being back-propagated
  holds as much again in gradients (attention scores are not materialized: SDPA/flash attention). Plus
  the loss path: 16-bit logits, their fp32 upcast, fp32 log-softmax and its gradient (16*b*s*V).
  (Refitted against an H100: bench/results/gpu-h100.txt.)
- overhead per GPU: 1.5 GiB (CUDA context, communication buffers) plus 10% of the rest (fragmentation).

With N > 1 GPUs the weights and trainable state are fully sharded (FSDP), activations are not:
per_gpu(N) = (weights + state) / N + activations + overhead. Prefix and prompt tuning train data-parallel
with the frozen base replicated on every GPU (there is next to nothing to shard), so for them
per_gpu(N) = weights + state + activations + overhead whatever N. Layouts are N in 1, 2, 4, ... GPUs of a class
in 12, 16, 24, 40, 48, 80 GiB. Full fine-tuning takes the layout with the least GPU memory in total that
fits (fewer GPUs on a tie): it shards anyway, so small GPUs are as good as large ones. LoRA and QLoRA take
the fewest GPUs that fit, then the smallest class: adapters train best unsharded, and one GPU avoids
communication; prefix and prompt therefore plan one GPU, and a base that does not fit one 80 GiB GPU is
refused (use lora or qlora). `estimatedMemoryGiB` is the whole run's need on the chosen layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from finetune_operator.quantity import parse_gpu_memory_gib
from finetune_operator.spec import (
    AUTO_QLORA_BELOW_EXAMPLES,
    VIRTUAL_TOKEN_METHODS,
    FineTuneJobSpec,
    Plan,
    ResolvedMethod,
)

GIB = 1024**3
GPU_CLASSES_GIB: tuple[int, ...] = (12, 16, 24, 40, 48, 80)
MAX_GPUS = 4096
VOCAB = 32_000
OVERHEAD_FIXED_GIB = 1.5
OVERHEAD_FRACTION = 0.10

#: The model-size table: parameters (billions) -> method -> (GPUs, GiB per GPU).
TABLE: dict[int, dict[ResolvedMethod, tuple[int, int]]] = {
    7: {"full": (4, 24), "lora": (1, 24), "qlora": (1, 12)},
    13: {"full": (8, 24), "lora": (1, 48), "qlora": (1, 24)},
    70: {"full": (16, 48), "lora": (2, 48), "qlora": (1, 48)},
}

_ATTENTION = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value", "c_attn", "dense"}
_MLP = {"gate_proj", "up_proj", "down_proj", "fc1", "fc2", "c_fc", "c_proj", "w1", "w2", "w3"}


class PlanningError(ValueError):
    """A spec that cannot be planned; `field` names the spec path to fix."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class MemoryEstimate:
    """The memory model's parts, in GiB, for one configuration."""

    weights: float
    trainable_state: float
    activations: float
    trainable_parameters: float
    #: Weights and trainable state sharded over the GPUs (FSDP); False: replicated on each (prefix, prompt).
    sharded: bool = True

    def per_gpu(self, gpus: int) -> float:
        """GiB one GPU needs when the run is spread over `gpus` GPUs."""
        shard = (self.weights + self.trainable_state) / (gpus if self.sharded else 1)
        body = shard + self.activations
        return body * (1 + OVERHEAD_FRACTION) + OVERHEAD_FIXED_GIB

    def total(self, gpus: int) -> float:
        return self.per_gpu(gpus) * gpus


def shape(parameters_b: float) -> tuple[int, int]:
    """(hidden size, layers) of a Llama-shaped model of this size (hidden a multiple of 64)."""
    p = parameters_b * 1e9
    hidden = max(64, round((p * 128 / 12) ** (1 / 3) / 64) * 64)
    layers = max(1, round(p / (12 * hidden * hidden)))
    return hidden, layers


def lora_parameters(hidden: int, layers: int, r: int, targets: list[str]) -> float:
    names = set(targets)
    if "all_linear" in names:
        names = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    per_layer = 0.0
    for name in names:
        widen = 8 / 3 if name in _MLP else 1.0
        per_layer += r * (hidden + hidden * widen)
    return per_layer * layers


def virtual_token_parameters(spec: FineTuneJobSpec, method: ResolvedMethod, hidden: int, layers: int) -> float:
    """Trainable parameters of prefix or prompt tuning (peft's prompt encoders)."""
    if method == "prompt":
        return float(spec.resolved_prompt().virtual_tokens * hidden)
    prefix = spec.resolved_prefix()
    n = prefix.virtual_tokens
    if prefix.projection:
        # embedding (n x h), Linear(h, h) and Linear(h, 2*L*h), with biases
        return float(n * hidden + hidden * hidden + hidden + hidden * 2 * layers * hidden + 2 * layers * hidden)
    return float(n * 2 * layers * hidden)


def estimate_memory(spec: FineTuneJobSpec, method: ResolvedMethod,
                    architecture: tuple[int, int] | None = None) -> MemoryEstimate:
    """The memory model for a spec trained with `method` (see the module docstring).

    `architecture`: the model's real (hidden size, layers) instead of `shape`'s guess from the parameter
    count (bench/sizing_accuracy_bench.py: small models, whose embeddings `shape` does not separate)."""
    p_b = spec.base_model.parameters_billion()
    p = p_b * 1e9
    hidden, layers = architecture or shape(p_b)
    hp = spec.hyperparameters
    bytes_16 = 4 if hp.precision == "fp32" else 2
    pure_bf16 = method == "full" and hp.precision == "bf16"
    embed = min(p, 2.0 * VOCAB * hidden)

    if method == "qlora":
        q = spec.resolved_quantization()
        bits = q.bits + (0.127 if q.double_quant else 0.5)
        weights = (p - embed) * bits / 8 + embed * 4
    elif method == "full":
        weights = p * (2 if pure_bf16 else 4)
    else:
        weights = p * bytes_16

    if method == "full":
        trainable = p
        state = p * (6 if pure_bf16 else 12)
    elif method in VIRTUAL_TOKEN_METHODS:
        trainable = virtual_token_parameters(spec, method, hidden, layers)
        state = trainable * 16
    else:
        trainable = lora_parameters(hidden, layers, spec.lora.r, spec.lora.target_modules)
        state = trainable * 16

    b, s = hp.batch_size, hp.max_seq_length
    if method == "prompt":
        s += spec.resolved_prompt().virtual_tokens
    per_layer = 34.0 * b * s * hidden
    if hp.gradient_checkpointing:
        activations = layers * 2.0 * b * s * hidden + 2 * per_layer
    else:
        activations = (layers + 1) * per_layer
    activations += 16.0 * b * s * VOCAB
    if method == "prefix":
        activations += 2.0 * layers * b * spec.resolved_prefix().virtual_tokens * hidden * bytes_16

    return MemoryEstimate(
        weights=weights / GIB,
        trainable_state=state / GIB,
        activations=activations / GIB,
        trainable_parameters=trainable,
        sharded=method not in VIRTUAL_TOKEN_METHODS,
    )


def resolve_method(spec: FineTuneJobSpec) -> tuple[ResolvedMethod, str]:
    """`auto` -> qlora below 10,000 examples, else lora; explicit methods stay."""
    if spec.method != "auto":
        return spec.method, f"method {spec.method} as requested"
    examples = spec.dataset.examples
    if examples is None:
        return "lora", "method auto: dataset.examples not set, so the dataset is taken as large -> lora"
    if examples < AUTO_QLORA_BELOW_EXAMPLES:
        return "qlora", f"method auto: {examples:,} examples < {AUTO_QLORA_BELOW_EXAMPLES:,} -> qlora"
    return "lora", f"method auto: {examples:,} examples >= {AUTO_QLORA_BELOW_EXAMPLES:,} -> lora"


def _gpu_counts() -> list[int]:
    counts, n = [], 1
    while n <= MAX_GPUS:
        counts.append(n)
        n *= 2
    return counts


def _fits(mem: MemoryEstimate, gpus: int, gib: float) -> bool:
    return mem.per_gpu(gpus) <= gib


def choose_layout(mem: MemoryEstimate, method: ResolvedMethod) -> tuple[int, int] | None:
    """(GPUs, GiB per GPU) that fits: least total memory for full, fewest GPUs for adapters."""
    fitting = [(g, c) for g in _gpu_counts() for c in GPU_CLASSES_GIB if _fits(mem, g, c)]
    if not fitting:
        return None
    if method == "full":
        return min(fitting, key=lambda gc: (gc[0] * gc[1], gc[0]))
    return min(fitting, key=lambda gc: (gc[0], gc[1]))


def _split_nodes(gpus: int, per_node_max: int) -> tuple[int, int]:
    nodes = math.ceil(gpus / per_node_max)
    if gpus % nodes:
        raise PlanningError(
            "spec.resources.gpus",
            f"{gpus} GPUs cannot be split evenly over {nodes} nodes of at most {per_node_max} GPUs; "
            f"use a multiple of {nodes} or change resources.gpusPerNode",
        )
    return nodes, gpus // nodes


def _fmt(x: float) -> str:
    return f"{x:.1f}"


def plan(spec: FineTuneJobSpec) -> Plan:
    """Plan the GPUs for a spec. Pure; raises PlanningError for specs that cannot be planned."""
    method, method_reason = resolve_method(spec)
    mem = estimate_memory(spec, method)
    p_b = spec.base_model.parameters_billion()
    res = spec.resources
    warnings: list[str] = []
    size = f"{p_b:g}B"
    parts = (
        f"weights {_fmt(mem.weights)}, trainable state {_fmt(mem.trainable_state)}, "
        f"activations {_fmt(mem.activations)} GiB"
    )
    if method in VIRTUAL_TOKEN_METHODS:
        projected = method == "prefix" and spec.resolved_prefix().projection
        trained = (f"a trainable state {_fmt(mem.trainable_state)} GiB ({mem.trainable_parameters:,.0f} parameters: "
                   "the virtual tokens and their projection MLP)" if projected else
                   f"a tiny trainable state of {_fmt(mem.trainable_state * 1024)} MiB ({mem.trainable_parameters:,.0f} "
                   "virtual-token parameters)")
        parts = (
            f"{method} tuning: frozen base weights {_fmt(mem.weights)} GiB plus {trained}, activations "
            f"{_fmt(mem.activations)} GiB; the frozen base is replicated on each GPU, not sharded"
        )

    table_cell = TABLE.get(int(p_b), {}).get(method) if float(p_b).is_integer() else None
    explicit_mem = parse_gpu_memory_gib(res.gpu_memory) if res.gpu_memory else None

    if res.gpus is None and explicit_mem is None:
        if table_cell is not None:
            gpus, gib = table_cell
            source = "table"
            reason = f"{method_reason}; {size} {method} -> {gpus}x{gib}GiB from the model-size table"
            if not _fits(mem, gpus, gib):
                hp = spec.hyperparameters
                needs = f"the memory model needs {_fmt(mem.per_gpu(gpus))} GiB per GPU, more than the table's {gib}GiB"
                static = MemoryEstimate(mem.weights, mem.trainable_state, 0.0, mem.trainable_parameters)
                if _fits(static, gpus, gib):
                    advice = "lower hyperparameters.batchSize or maxSeqLength, or set spec.resources"
                    needs = f"with batchSize {hp.batch_size} x maxSeqLength {hp.max_seq_length} {needs}"
                else:
                    advice = (
                        f"its weights and optimizer state alone need {_fmt(static.per_gpu(gpus))} GiB per GPU; "
                        "set spec.resources (more GPUs) or use a smaller method"
                    )
                warnings.append(f"{needs}; {advice}")
        else:
            layout = choose_layout(mem, method)
            if layout is None and not mem.sharded:
                raise PlanningError(
                    "spec.method",
                    f"{size} with method {method} needs {_fmt(mem.per_gpu(1))} GiB on every GPU ({parts}) and "
                    f"does not fit one GPU of {GPU_CLASSES_GIB[-1]}GiB; use method lora or qlora, or lower "
                    "hyperparameters.batchSize or maxSeqLength",
                )
            if layout is None:
                advice = "lower hyperparameters.batchSize or maxSeqLength (activations are not sharded)"
                if method != "qlora":
                    advice = "use method qlora, or " + advice
                raise PlanningError(
                    "spec.baseModel.parameters",
                    f"{size} with method {method} needs {_fmt(mem.activations)} GiB of activations per GPU "
                    f"and does not fit on {MAX_GPUS} GPUs of 80GiB; {advice}",
                )
            gpus, gib = layout
            source = "estimate"
            reason = (
                f"{method_reason}; {size} is not in the model-size table, so the memory model sized it: "
                f"{parts}; {_fmt(mem.per_gpu(gpus))} GiB per GPU on {gpus} GPU(s) -> {gpus}x{gib}GiB, "
                + ("the least total GPU memory that fits" if method == "full" else "the fewest GPUs that fit")
            )
    else:
        source = "table" if table_cell is not None else "estimate"
        if res.gpus is not None and explicit_mem is not None:
            gpus, gib_f = res.gpus, explicit_mem
        elif res.gpus is not None:
            gpus = res.gpus
            fitting = [c for c in GPU_CLASSES_GIB if _fits(mem, gpus, c)]
            gib_f = float(fitting[0] if fitting else GPU_CLASSES_GIB[-1])
        else:
            assert explicit_mem is not None
            gib_f = explicit_mem
            gpus = next((n for n in _gpu_counts() if _fits(mem, n, gib_f)), MAX_GPUS)
        gib = math.ceil(gib_f)
        reason = (
            f"{method_reason}; spec.resources overrides the plan: {gpus}x{gib}GiB "
            f"(memory model: {parts}; {_fmt(mem.per_gpu(gpus))} GiB per GPU)"
        )
        if not _fits(mem, gpus, gib_f):
            warnings.append(
                f"spec.resources gives {gpus}x{gib}GiB but the memory model needs "
                f"{_fmt(mem.per_gpu(gpus))} GiB per GPU; expect out-of-memory, or raise resources.gpus or gpuMemory"
            )
        if table_cell is not None and (gpus, gib) != table_cell:
            warnings.append(
                f"the model-size table gives {table_cell[0]}x{table_cell[1]}GiB for {size} {method}; "
                f"spec.resources asks for {gpus}x{gib}GiB"
            )

    nodes, per_node = _split_nodes(gpus, res.gpus_per_node)
    return Plan(
        method=method,
        gpus=gpus,
        gpu_memory_gib=gib,
        nodes=nodes,
        gpus_per_node=per_node,
        estimated_memory_gib=round(mem.total(gpus), 1),
        source=source,
        reason=reason,
        warnings=warnings,
    )
