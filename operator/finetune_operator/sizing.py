"""The sizing planner: a pure function from a FineTuneJob spec to a GPU plan.

Listed sizes (7B, 13B, 70B) of objective sft come from the model-size table, which is a product contract:

    size   full      lora      qlora
    7B     4x24GiB   1x24GiB   1x12GiB
    13B    8x24GiB   1x48GiB   1x24GiB
    70B    16x48GiB  2x48GiB   1x48GiB

Any other size, and every objective dpo run, comes from the memory model below, rounded up to a standard GPU
class and a GPU count. A chained stage (spec.baseModel.fromJob) is sized from spec.baseModel.parameters, which
`chain.apply` fills in from the base job once it succeeded; before that, without it, planning raises
`BaseJobUnresolved`.

Memory model (bytes; P = parameters, a Llama-shaped decoder with hidden size h, L = h/128 layers,
P ~ 12*L*h^2, vocabulary V = 32,000, micro-batch b, sequence length s). When the model's architecture is
known (`finetune_operator.architecture`, read from its config.json and safetensors headers by `finetune plan
--inspect`), its exact P, h, L, vocabulary V, MLP width I, key/value width (GQA: KV heads x head dim) and
tied embeddings replace that guess; otherwise I = 8/3 h, the key/value width is h (multi-head) and the head
is untied:

- weights: P x 2 (bf16/fp16) or 4 (fp32; and full fine-tuning in fp16, which keeps fp32 weights).
  QLoRA: the non-embedding weights at `bits` + 0.127 bits of constants with double quantization (0.5
  without); embeddings and head (2*V*h, or V*h when tied) in fp32, since peft's k-bit preparation upcasts
  them.
- trainable state: full in bf16 trains pure bf16 (the trainer's choice, as torchtune's): bf16 gradients
  and AdamW's two bf16 moments, 2+4 = 6 bytes per parameter on top of the 2-byte weights; full in fp16 or
  fp32 keeps fp32 weights (4 bytes) with fp32 gradients and moments, 4+8 = 12. LoRA/QLoRA: adapters kept in fp32 with their
  gradients and moments, 16 bytes per adapter parameter; each targeted module adds r*(in + out) parameters
  per layer: q_proj h -> heads*head_dim, k_proj and v_proj h -> the key/value width, o_proj back to h, MLP
  projections h <-> I, other modules h -> h.
  prefix/prompt: the base is frozen in the training precision like LoRA's, and the trainable state is
  tiny: fp32 virtual tokens with gradients and moments, 16 bytes per parameter. Prompt tuning trains
  n*h parameters (n virtual tokens); prefix tuning n*2*L*h (a key and a value per layer), or with
  `projection` n*h + h^2 + 2*L*h^2 (the MLP's two layers; its hidden size is h).
- activations (per GPU, not sharded): prompt tuning lengthens every sequence by its n virtual tokens;
  prefix tuning adds its n keys and values per layer (2*L*b*n*h, 16-bit) and never checkpoints (the spec
  refuses gradient checkpointing with prefix, so the default there is off). A layer's activations are
  A = b*s*(34*h + 4*(kv - h) + 8*(I - 8/3 h)): the refitted 34*b*s*h of the default shape, less the 16-bit
  keys and values GQA does not compute (2 tensors x 2 bytes per unit of key/value width below h), plus
  the 16-bit gate, up, activation and product tensors of a wider or narrower MLP (4 x 2 bytes per unit of
  I above 8/3 h). With gradient checkpointing each layer keeps its input (2*b*s*h bytes) and one layer at
  a time is recomputed and back-propagated (its activations and their gradients, 2 x A); without it every
  layer keeps A and the layer being back-propagated holds as much again in gradients (attention scores
  are not materialized: SDPA/flash attention). Plus the loss path: 16-bit logits, their fp32 upcast, fp32
  log-softmax and its gradient (16*b*s*V).
  (Refitted against an H100: bench/results/gpu-h100.txt.)
- overhead per GPU: 1.5 GiB (CUDA context, communication buffers) plus 10% of the rest (fragmentation).

Objective dpo (`objectives/dpo.py` in the trainer): the model-size table is the contract for `sft` only; a dpo
plan always comes from the memory model (source `estimate`, the reason says so). Each example is a pair, and
one forward runs its two sequences (prompt + chosen, prompt + rejected) as rows of one batch: the activations
and the loss path above are those of 2*b rows. The reference costs no second copy of the weights:

- lora/qlora (unless precomputed): the same model with its adapter switched off, run under no_grad after the
  policy's forward while the policy's activations are held: one layer's activations of the 2*b rows at a
  time (A of 2*b rows, nothing stored) plus its logits path, 16-bit logits and their fp32 upcast
  (6*2b*s*V);
- full (precomputeReference auto or always, or always with lora/qlora): the reference log-probabilities are
  computed in a no_grad pass before training, which needs less than a training step, into a table of two
  fp32 numbers per pair held on the CPU: nothing on the GPU during training;
- referenceFree: no reference at all.

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

from finetune_operator.architecture import Architecture
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
#: How far a nominal size may be from an inspected model's count before the plan warns (7B names 6.74B
#: and 7.24B models; Gemma-7B's 8.5B is 22% above its name and warned about).
NOMINAL_TOLERANCE = 0.15

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


class BaseJobUnresolved(PlanningError):
    """A chained stage (spec.baseModel.fromJob) without spec.baseModel.parameters, before its base job
    succeeded: the model it starts from, and so its size, is not known yet. The operator plans once it resolved
    the chain (`chain.apply` sets the URI and the base job's parameter count)."""

    def __init__(self, from_job: str):
        super().__init__(
            "spec.baseModel.fromJob",
            f"the model size is not known before FineTuneJob {from_job!r} succeeded (this stage starts from its "
            "result, and the operator plans it then); set spec.baseModel.parameters, e.g. '7B', to plan it now")
        self.from_job = from_job


class SizeUnknown(PlanningError):
    """Neither spec.baseModel.parameters nor the model's name gives its size, and no architecture was read:
    the operator's pre-flight (or `finetune plan --inspect`) reads it from the model's files."""

    def __init__(self, uri: str):
        super().__init__(
            "spec.baseModel.parameters",
            f"the model size cannot be read from uri {uri!r}; set spec.baseModel.parameters, e.g. '7B'")


def nominal_billions(spec: FineTuneJobSpec, architecture: Architecture | None = None) -> float:
    """The size planning uses, in billions: the spec's (parameters, else the name), else the architecture's
    exact count. Raises `SizeUnknown` without either."""
    p_b = spec.base_model.parameters_billion()
    if p_b is not None:
        return p_b
    if architecture is not None:
        return architecture.parameters / 1e9
    if spec.base_model.uri is None and spec.base_model.from_job is not None:
        raise BaseJobUnresolved(spec.base_model.from_job)
    raise SizeUnknown(spec.base_model.resolved_uri())


@dataclass(frozen=True)
class MemoryEstimate:
    """The memory model's parts, in GiB, for one configuration."""

    weights: float
    trainable_state: float
    activations: float
    trainable_parameters: float
    #: Weights and trainable state sharded over the GPUs (FSDP); False: replicated on each (prefix, prompt).
    sharded: bool = True
    #: Objective dpo: the reference's share per GPU (the adapter-disabled forward's working set; 0 when
    #: precomputed before training or reference-free). Not sharded, like activations.
    reference: float = 0.0
    #: Rows of a micro-batch: batchSize, or 2 x batchSize for dpo (a chosen and a rejected sequence per pair).
    rows: int = 0

    def per_gpu(self, gpus: int) -> float:
        """GiB one GPU needs when the run is spread over `gpus` GPUs."""
        shard = (self.weights + self.trainable_state) / (gpus if self.sharded else 1)
        body = shard + self.activations + self.reference
        return body * (1 + OVERHEAD_FRACTION) + OVERHEAD_FIXED_GIB

    def total(self, gpus: int) -> float:
        return self.per_gpu(gpus) * gpus


def shape(parameters_b: float) -> tuple[int, int]:
    """(hidden size, layers) of a Llama-shaped model of this size (hidden a multiple of 64)."""
    p = parameters_b * 1e9
    hidden = max(64, round((p * 128 / 12) ** (1 / 3) / 64) * 64)
    layers = max(1, round(p / (12 * hidden * hidden)))
    return hidden, layers


@dataclass(frozen=True)
class Dims:
    """The model dimensions the memory model uses: a real architecture's, or the guess from a size."""

    parameters: float
    hidden: int
    layers: int
    #: MLP width I (8/3 h, unrounded, when guessed)
    intermediate: float
    vocab: int
    #: query width (heads x head dim) and key/value width (KV heads x head dim; < q_dim with GQA)
    q_dim: int
    kv_dim: int
    tied: bool

    @classmethod
    def guess(cls, parameters_b: float) -> Dims:
        """A Llama of `shape`'s guess: multi-head attention, MLP 8/3 h, 32,000 tokens, untied head."""
        hidden, layers = shape(parameters_b)
        return cls(parameters_b * 1e9, hidden, layers, hidden * 8 / 3, VOCAB, hidden, hidden, False)

    @classmethod
    def of(cls, arch: Architecture) -> Dims:
        return cls(float(arch.parameters), arch.hidden_size, arch.layers, float(arch.intermediate_size),
                   arch.vocab_size, arch.q_dim, arch.kv_dim, arch.tied_embeddings)


def lora_parameters(hidden: int, layers: int, r: int, targets: list[str], dims: Dims | None = None) -> float:
    """Adapter parameters of rank `r` on `targets` (with `dims`: the real projection widths)."""
    names = set(targets)
    if "all_linear" in names:
        names = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    q_dim, kv_dim, inter = (dims.q_dim, dims.kv_dim, dims.intermediate) if dims else (hidden, hidden, hidden * 8 / 3)
    # (in + out) of each projection; GQA narrows k and v, the MLP's width is I
    widths = {"q_proj": hidden + q_dim, "k_proj": hidden + kv_dim, "v_proj": hidden + kv_dim, "o_proj": q_dim + hidden}
    per_layer = 0.0
    for name in names:
        per_layer += r * widths.get(name, hidden + (inter if name in _MLP else hidden))
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
                    architecture: Architecture | None = None) -> MemoryEstimate:
    """The memory model for a spec trained with `method` (see the module docstring).

    `architecture`: the model's real shape and exact parameter count (read from its files) instead of
    `shape`'s guess from the spec's parameter count."""
    dims = Dims.of(architecture) if architecture else Dims.guess(nominal_billions(spec))
    p, hidden, layers, vocab = dims.parameters, dims.hidden, dims.layers, dims.vocab
    hp = spec.hyperparameters
    bytes_16 = 4 if hp.precision == "fp32" else 2
    pure_bf16 = method == "full" and hp.precision == "bf16"
    embed = min(p, (1.0 if dims.tied else 2.0) * vocab * hidden)

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
        trainable = lora_parameters(hidden, layers, spec.lora.r, spec.lora.target_modules, dims)
        state = trainable * 16

    # dpo: a micro-batch of b pairs is one forward of 2b rows (the chosen sequences, then the rejected ones)
    b, s = hp.batch_size * (2 if spec.objective == "dpo" else 1), hp.max_seq_length
    if method == "prompt":
        s += spec.resolved_prompt().virtual_tokens
    per_layer = b * s * (34.0 * hidden + 4 * (dims.kv_dim - hidden) + 8 * (dims.intermediate - hidden * 8 / 3))
    if hp.gradient_checkpointing:
        activations = layers * 2.0 * b * s * hidden + 2 * per_layer
    else:
        activations = (layers + 1) * per_layer
    activations += 16.0 * b * s * vocab
    if method == "prefix":
        activations += 2.0 * layers * b * spec.resolved_prefix().virtual_tokens * hidden * bytes_16
    reference = 0.0
    if reference_kind(spec, method) == "adapter":
        # under no_grad, while the policy's activations are held: one layer at a time, and its logits path
        reference = per_layer + 6.0 * b * s * vocab

    return MemoryEstimate(
        weights=weights / GIB,
        trainable_state=state / GIB,
        activations=activations / GIB,
        trainable_parameters=trainable,
        sharded=method not in VIRTUAL_TOKEN_METHODS,
        reference=reference / GIB,
        rows=b,
    )


def reference_kind(spec: FineTuneJobSpec, method: ResolvedMethod) -> str | None:
    """How a dpo run gets its reference log-probabilities with `method`: `adapter` (the adapter switched off,
    each step), `precomputed` (a pass before training), `none` (referenceFree); None for sft."""
    if spec.objective != "dpo":
        return None
    dpo = spec.resolved_dpo()
    if dpo.reference_free:
        return "none"
    return "precomputed" if dpo.precomputes(method) else "adapter"


def _dpo_words(spec: FineTuneJobSpec, method: ResolvedMethod, mem: MemoryEstimate) -> str:
    """What the memory model counted for objective dpo, for a plan's reason."""
    rows = f"{mem.rows} rows per micro-batch (batchSize {spec.hyperparameters.batch_size} pairs x chosen and rejected)"
    kind = reference_kind(spec, method)
    if kind == "adapter":
        ref = (f"reference {_fmt(mem.reference)} GiB (the base with the adapter switched off, under no_grad: one "
               "layer's activations and its logits at a time; no second copy of the weights)")
    elif kind == "precomputed":
        ref = ("reference 0 GiB on the GPU (its log-probabilities computed in a pass before training, which needs "
               "less than a training step, into a table of 2 numbers per pair on the CPU; no second copy of the "
               "weights)")
    else:
        ref = "no reference (referenceFree)"
    return f"{rows}; {ref}"


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


def _short_path(path: str) -> str:
    """A model path for a plan's reason or warning (capped at 2,048 and 1,024 characters): its last 200."""
    return path if len(path) <= 200 else "..." + path[-200:]


def shape_words(arch: Architecture) -> str:
    """The architecture in a few words for a plan's reason."""
    kv = f"{arch.kv_heads} of {arch.attention_heads} KV heads" if arch.kv_heads != arch.attention_heads else "MHA"
    return (f"hidden {arch.hidden_size}, {arch.layers} layers, MLP {arch.intermediate_size}, {kv}, vocabulary "
            f"{arch.vocab_size:,}, {'tied' if arch.tied_embeddings else 'untied'} embeddings")


def plan(spec: FineTuneJobSpec, architecture: Architecture | None = None) -> Plan:
    """Plan the GPUs for a spec. Pure; raises PlanningError for specs that cannot be planned.

    `architecture` (read from the model's files by `finetune plan --inspect`) refines the memory model; the
    model-size table still decides the spec's nominal 7B, 13B and 70B sizes."""
    method, method_reason = resolve_method(spec)
    p_b = nominal_billions(spec, architecture)
    if spec.base_model.uri is None:
        # a chained stage before the operator resolved it (chain.apply sets the URI and the base job's count)
        method_reason += (f"; spec.baseModel.fromJob {spec.base_model.from_job}: sized from spec.baseModel.parameters "
                          "until that job succeeded")
    mem = estimate_memory(spec, method, architecture)
    res = spec.resources
    warnings: list[str] = []
    size = f"{p_b:g}B"
    if architecture is not None:
        size = f"{size} ({architecture.parameters:,} parameters)"
        off = p_b * 1e9 / architecture.parameters - 1
        if abs(off) > NOMINAL_TOLERANCE:
            # The nominal size picks the table cell; one far from the files' count picks the wrong cell.
            warnings.append(
                f"the spec's size {p_b:g}B (baseModel.parameters or the model name) is {abs(off):.0%} "
                f"{'above' if off > 0 else 'below'} the {architecture.parameters:,} parameters in "
                f"{_short_path(architecture.path)}; fix spec.baseModel.parameters")
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

    dpo = spec.objective == "dpo"
    if dpo:
        parts += f"; {_dpo_words(spec, method, mem)}"
    # The model-size table is the contract for sft: a dpo run (twice the rows, a reference) is always estimated.
    table_cell = TABLE.get(int(p_b), {}).get(method) if float(p_b).is_integer() and not dpo else None
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
            sized_by = "the memory model sized it"
            if architecture is not None:
                sized_by += f" with the architecture read from {_short_path(architecture.path)}/config.json" + (
                    " and the safetensors headers" if architecture.parameters_source == "safetensors headers" else "")
                sized_by += f" ({shape_words(architecture)})"
            why = (f"objective dpo with {size} {method}: the model-size table is for sft, so {sized_by}" if dpo else
                   f"{size} {method} is not in the model-size table, so {sized_by}")
            reason = (
                f"{method_reason}; {why}: "
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
