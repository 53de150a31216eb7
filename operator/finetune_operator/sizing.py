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
- activations (per GPU, not sharded; t = b*s positions, x = 2 bytes per element in a 16-bit run, 4 in fp32):
  prompt tuning lengthens every sequence by its n virtual tokens; prefix tuning adds its n keys and values
  per layer (2*L*b*n*h, 16-bit) and never checkpoints (the spec refuses gradient checkpointing with prefix).
  One layer stores S = t*x/2*(24*h + 4*(kv - h) + 8*I) bytes: the two RMSNorms' float32 upcasts and 16-bit
  outputs (12h), the queries and keys after RoPE, the values, the attention output and o_proj's input (10h:
  SDPA/flash attention, no scores), the MLP's gate, up, SiLU and product (8*I), 2h of the rest (measured on
  CPU 2026-12-07: 45.75*t*h at I = 2.69h in pure bf16, against 45.5 here); GQA stores its narrower keys and
  values (4 bytes per unit of key/value width below h). In a 16-bit run (not in fp32, where autocast is off and
  the casts return their input), LoRA adds 2 bytes per position and unit of each adapted module's input width
  (the 16-bit copy of its input that autocast feeds each adapter), QLoRA 14 more per unit of h (k-bit preparation upcasts the embeddings and norms, so the residual stream and the
  norms' outputs are float32, 2 x 2 bytes more, and each 4-bit projection they feed, q, k, v, gate and up,
  casts its input to the compute dtype separately, 5 x 2). With gradient checkpointing each layer keeps its
  input (t*h*x; float32 under QLoRA) and one layer at a time is recomputed and back-propagated
  (S + t*I*x, the gradient of its widest activation, plus with adapters the float32 gradients of their
  inputs, 4 bytes per unit of input width, and with QLoRA the float32 residual stream's gradient, t*h*4,
  and one projection's weight dequantized to 16-bit, 2*h*I); without it every layer keeps S and the
  backward adds as much. The loss (sft with full, lora, qlora: the trainer's fused loss, no vocabulary-wide
  logits; `loss_path`):
  a chunk of at most 256 MiB of logits and their gradient (measured 2026-12-07: the peak holds one), the final norm
  and the head's input and its gradient (t*h*(4x + 4); float32 under QLoRA), and a 16-bit copy of a
  float32 head (qlora); full fine-tuning also holds the head's gradient from the loss on (twice with more
  than one chunk: the running sum and the chunk's product). Without the fused loss (prefix, prompt, dpo):
  16-bit logits, their fp32 upcast, fp32 log-softmax and its gradient (16*t*V).
  The peak is the larger of two moments (`MemoryEstimate.body`): the start of the backward (every stored
  activation and the larger of the loss and the last layer's backward, before any gradient but the head's)
  and its end (every gradient, the first layer's backward or AdamW's step temporaries: on CUDA torch's
  foreach implementation, one moment-sized temporary, sharded; on CPU two of the largest parameter). Full
  fine-tuning peaks at the end with checkpointing and at the start without; adapters always at the start.
  Measured on CPU: bench/results/sizing-accuracy-*-2core-20261207.txt (0.1B, full/LoRA/QLoRA, bf16 and fp32).
- overhead per GPU (`MemoryEstimate.per_gpu`): 1.5 GiB fixed, plus 41% of what each step allocates and
  frees (activations, gradients, optimizer temporaries; weights and AdamW moments are allocated once): the
  caching allocator's reserve. Fitted to the one GPU run (bench/results/gpu-h100.txt, H100, torch 2.11,
  2026-11-24, the trainer before its fused loss) and not re-verified since (no GPU was lent): memory outside
  the allocator (CUDA context, cuBLAS workspace) was 0.75 GiB in every row, leaving 0.75 GiB for
  communication buffers on several GPUs; max_memory_reserved - max_memory_allocated was 6% to 41% of the
  allocated peak less the weights over its five default-allocator rows (41%: QLoRA 7B at 4 x 512). With
  the measured allocated peaks in place of the model's tensors, this overhead covers every row's footprint
  (max_memory_reserved + memory outside the allocator); the old 10% of everything under-sized the run by
  20-22%.

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
refused (use lora or qlora). Layouts are chosen at the requested micro-batch with gradient checkpointing on
(unless set off), and may fill the GPU; an estimated layout on which no rung (below) keeps the headroom is
passed over for the next.

The rung (`choose_rung`): on the chosen layout, the trainer starts at the first of `rung_candidates` whose
per_gpu leaves `HEADROOM_FRACTION` of the GPU free: batchSize without checkpointing, smaller micro-batches
without it (`MemoryRung.halved`, gradient accumulation multiplied so batchSize x accumulation stays), then
the same with checkpointing on; with gradientCheckpointing set, only the micro-batch varies. Where none fits,
the last (least memory) with a warning. `estimatedMemoryGiB`, `memoryPerGpuGiB` and `headroomGiB` are the
run's need at that rung.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from finetune_operator.architecture import Architecture
from finetune_operator.contract import checkpointing_allowed, describe
from finetune_operator.quantity import parse_gpu_memory_gib
from finetune_operator.spec import (
    AUTO_QLORA_BELOW_EXAMPLES,
    VIRTUAL_TOKEN_METHODS,
    FineTuneJobSpec,
    MemoryRung,
    Plan,
    ResolvedMethod,
)

GIB = 1024**3
GPU_CLASSES_GIB: tuple[int, ...] = (12, 16, 24, 40, 48, 80)
MAX_GPUS = 4096
VOCAB = 32_000
OVERHEAD_FIXED_GIB = 1.5
OVERHEAD_FRACTION = 0.41
#: The trainer's fused loss chunk (finetune_trainer.fused_loss.CHUNK_BYTES; a trainer test checks they agree).
FUSED_LOSS_CHUNK_BYTES = 256 << 20
#: One decoder layer's stored activations per position, in 16-bit bytes per unit of hidden size, beside the
#: MLP's 8 x I and the key/value correction (module docstring): measured on CPU 2026-12-07.
LAYER_STORED_16BIT = 24.0
#: LoRA: bytes per position and unit of an adapted module's input width, 16-bit run (module docstring).
ADAPTER_STORED_16BIT = 2.0
#: QLoRA, per position and unit of hidden size (16-bit run): k-bit preparation upcasts the norms and the
#: embeddings, so the residual stream and the norms' outputs are float32 (2 x 2 bytes more), and each 4-bit
#: projection they feed (q, k, v, gate, up) casts its input to the compute dtype separately (5 x 2 bytes).
QLORA_EXTRA_16BIT = 14.0
#: GPU memory the plan leaves free beyond the memory model's prediction (whose overhead term already counts the
#: CUDA context and fragmentation): a rung, or an estimated layout, fits when per_gpu <= GiB x (1 - this). The
#: prediction's error on a real GPU (bench/sizing_accuracy_bench.py) must stay within it, or the plan's first
#: steps end in the out-of-memory ladder.
HEADROOM_FRACTION = 0.05
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
    #: The gradients' share of trainable_state: they exist from the backward on (zeroed to None after each
    #: step), so they are not held at the activations' peak at the start of the backward (`per_gpu`).
    gradients: float = 0.0
    #: The working memory held alongside every gradient at the end of the backward (the first layer's), not
    #: sharded (`body`).
    late_activations: float = 0.0
    #: AdamW's temporaries in its step, alongside every gradient; sharded with the state (`body`).
    optimizer_temporaries: float = 0.0

    def body(self, gpus: int) -> float:
        """GiB of tensors one GPU holds at the peak (no CUDA context, no allocator reserve): weights and
        optimizer state, plus the larger of two moments: the start of the backward (every stored activation
        and the loss; the gradients not made yet) and its end or the optimizer step (every gradient)."""
        n = gpus if self.sharded else 1
        shard = (self.weights + self.trainable_state - self.gradients) / n
        late = self.gradients / n + max(self.late_activations, self.optimizer_temporaries / n)
        return shard + max(self.activations, late) + self.reference

    def per_gpu(self, gpus: int) -> float:
        """GiB one GPU needs when the run is spread over `gpus` GPUs: `body`, plus the caching allocator's
        reserve on what each step allocates and frees (OVERHEAD_FRACTION of all but the weights and optimizer
        moments, which are allocated once), plus the CUDA context and communication buffers
        (OVERHEAD_FIXED_GIB)."""
        body = self.body(gpus)
        static = (self.weights + self.trainable_state - self.gradients) / (gpus if self.sharded else 1)
        return body + (body - static) * OVERHEAD_FRACTION + OVERHEAD_FIXED_GIB

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


def adapter_inputs(hidden: int, targets: list[str], dims: Dims) -> float:
    """Summed input widths of the modules LoRA adapts in one layer: each adapter keeps its own copy of its
    module's input (peft casts it to the adapter's fp32, drops it out and autocast casts it back)."""
    names = set(targets)
    if "all_linear" in names:
        names = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    inputs = {"o_proj": dims.q_dim, "down_proj": dims.intermediate}
    return float(sum(inputs.get(name, hidden) for name in names))


def loss_path(spec: FineTuneJobSpec, method: ResolvedMethod, t: float, hidden: int, vocab: int, x: float) -> float:
    """Bytes the loss holds at its peak for `t` positions. sft with lora, qlora or full computes it fused
    (the trainer's `fused_loss`, the default on accelerators): a chunk of FUSED_LOSS_CHUNK_BYTES of logits
    and their gradient (float32 logits, 16-bit logits and gradient; less when t rows are less), the
    final norm's output and float32 upcast and the gathered head input and its gradient (4 x-byte copies of
    t x hidden), and a 16-bit copy of a float32 head (qlora: k-bit preparation upcasts it). Everything else
    (prefix and prompt tuning: transformers' loss on every position; dpo: log-probabilities of every label)
    holds vocabulary-wide logits: 16-bit logits, their fp32 upcast, fp32 log-softmax and its gradient."""
    if spec.objective == "dpo" or method in VIRTUAL_TOKEN_METHODS:
        return 16.0 * t * vocab
    # a chunk holds float32 logits and 16-bit logits and gradient (4 + 2x per element), never more than all t rows
    chunk = min(FUSED_LOSS_CHUNK_BYTES, t * vocab * (4 + 2 * x))
    head_copy = 2.0 * vocab * hidden if method == "qlora" and x == 2 else 0.0
    stream = 4.0 if method == "qlora" else x  # qlora's residual stream and final norm are float32
    return chunk + t * hidden * (4 * stream + 4) + head_copy


def optimizer_temporaries(method: ResolvedMethod, trainable: float, dims: Dims, pure_bf16: bool,
                          device: str) -> float:
    """Bytes torch's AdamW (the trainer's, torch's default implementation) allocates in its step beyond its
    state: on CUDA the foreach implementation, whose sqrt of the second moments is one temporary of the
    moments' size for the whole group; on CPU the for-loop one, two temporaries (the square root and the
    denominator) of one parameter at a time, the largest of which is the embeddings (full fine-tuning)."""
    size = 2 if pure_bf16 else 4
    if device == "cuda":
        return trainable * size
    largest = max(dims.vocab * dims.hidden, dims.hidden * dims.intermediate) if method == "full" else 0.0
    return 2.0 * largest * size


def estimate_memory(spec: FineTuneJobSpec, method: ResolvedMethod,
                    architecture: Architecture | None = None, device: str = "cuda",
                    rung: MemoryRung | None = None) -> MemoryEstimate:
    """The memory model for a spec trained with `method` (see the module docstring).

    `architecture`: the model's real shape and exact parameter count (read from its files) instead of
    `shape`'s guess from the spec's parameter count. `device`: "cuda" (every plan) or "cpu" (the trainer's
    CPU runs, which bench/sizing_accuracy_bench.py measures): only AdamW's step temporaries differ. `rung`: the
    micro-batch and gradient checkpointing to count instead of the spec's (what `contract.at_rung` would set; the
    plan tries many rungs, and copying the spec for each cost a quarter of its time)."""
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
    micro_batch = rung.micro_batch if rung is not None else hp.batch_size
    checkpointing = rung.gradient_checkpointing if rung is not None else hp.gradient_checkpointing
    b, s = micro_batch * (2 if spec.objective == "dpo" else 1), hp.max_seq_length
    if method == "prompt":
        s += spec.resolved_prompt().virtual_tokens
    t = float(b * s)  # token positions of a micro-batch
    x = 2.0 if bytes_16 == 2 else 4.0  # bytes of an activation element: 16-bit under autocast / pure bf16, else fp32
    # One layer's stored activations (module docstring): norms, attention, MLP, in x-byte elements (the norms'
    # float32 upcasts are already fp32 in an fp32 run: counted at 2x like the rest, a slight over-estimate).
    per_layer = t * x / 2 * (LAYER_STORED_16BIT * hidden + 4 * (dims.kv_dim - hidden) + 8 * dims.intermediate)
    # The adapters' 16-bit input copies and QLoRA's casts to the compute dtype exist only in a 16-bit run: in fp32
    # autocast is off and the casts return their input (measured fp32 rows were 5.7% and 15.5-16.0% over with them).
    if method in ("lora", "qlora") and x == 2:
        per_layer += ADAPTER_STORED_16BIT * t * adapter_inputs(hidden, spec.lora.target_modules, dims)
    if method == "qlora" and x == 2:
        per_layer += QLORA_EXTRA_16BIT * t * hidden
    # One layer's backward (after its recompute, with checkpointing): the gradient of its widest activation
    backward_transient = t * x * dims.intermediate
    if method in ("lora", "qlora"):  # and the float32 gradients of the adapters' inputs (peft's upcast copies)
        backward_transient += t * 4 * adapter_inputs(hidden, spec.lora.target_modules, dims)
    if method == "qlora":  # the float32 residual stream's gradient, a 4-bit projection dequantized to 16-bit
        backward_transient += t * hidden * 4 + 2.0 * hidden * dims.intermediate
    # full: the fused loss makes the head's gradient in its forward, a running sum and each chunk's product
    chunks = math.ceil(t * vocab * (4 + 2 * x) / FUSED_LOSS_CHUNK_BYTES)
    head_gradient = (vocab * hidden * (2 if pure_bf16 else 4) * min(2, chunks)) if method == "full" else 0.0
    loss = loss_path(spec, method, t, hidden, vocab, x) + head_gradient
    if checkpointing:
        stored = layers * t * hidden * (4 if method == "qlora" else x)  # each layer's input (qlora: fp32 residual)
        working = per_layer + backward_transient  # one layer recomputed, then back-propagated
    else:
        stored = layers * per_layer
        working = backward_transient
    activations = stored + max(loss, working)
    if method == "prefix":
        activations += 2.0 * layers * b * spec.resolved_prefix().virtual_tokens * hidden * bytes_16
    # Alongside every gradient: the first layer's backward (its own input still stored) or AdamW's step
    late = working + (stored / layers if layers else 0.0)  # the first layer's backward, its input still held
    gradients = trainable * (2 if pure_bf16 else 4)
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
        gradients=gradients / GIB,
        late_activations=late / GIB,
        optimizer_temporaries=optimizer_temporaries(method, trainable, dims, pure_bf16, device) / GIB,
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


def usable_gib(gib: float) -> float:
    """What the plan lets the memory model's prediction use of a GPU of `gib`: all but the headroom."""
    return gib * (1 - HEADROOM_FRACTION)


def _fits(mem: MemoryEstimate, gpus: int, gib: float) -> bool:
    """Whether `mem` fits `gpus` GPUs of `gib`, all of it: how layouts are chosen (at the requested rung, which
    asks for more memory than the rungs below it; the rung then keeps the headroom)."""
    return mem.per_gpu(gpus) <= gib


def _fits_with_headroom(mem: MemoryEstimate, gpus: int, gib: float) -> bool:
    """Whether `mem` fits `gpus` GPUs of `gib` with the headroom (`HEADROOM_FRACTION`): how rungs are chosen."""
    return mem.per_gpu(gpus) <= usable_gib(gib)


def requested_rung(spec: FineTuneJobSpec, method: ResolvedMethod) -> MemoryRung:
    """The rung layouts are chosen at: batchSize x gradientAccumulationSteps as set, gradient checkpointing as
    set, or on where unset (the plan decides) and the method allows it: the least memory at the requested
    micro-batch, so a layout is never larger than the job needs."""
    hp = spec.hyperparameters
    checkpointing = hp.gradient_checkpointing
    if checkpointing is None:
        checkpointing = checkpointing_allowed(method)
    return MemoryRung(micro_batch=hp.batch_size, grad_accum=hp.gradient_accumulation_steps,
                      gradient_checkpointing=checkpointing)


def rung_candidates(spec: FineTuneJobSpec, method: ResolvedMethod) -> list[MemoryRung]:
    """The rungs the plan tries, fastest first. gradientCheckpointing unset: off at batchSize, then each smaller
    micro-batch (`MemoryRung.halved`) off, down to 1; then on, from batchSize down. Recomputing costs about a third
    more compute on every step, while a smaller micro-batch with more accumulation trains the same examples per
    optimizer step at a lower but, at sequence lengths like the default 2048, still large arithmetic intensity.
    Set explicitly (or prefix, where unset means off): only the micro-batch varies."""
    hp = spec.hyperparameters
    settings = [hp.gradient_checkpointing] if hp.gradient_checkpointing is not None else (
        [False, True] if checkpointing_allowed(method) else [False])
    rungs: list[MemoryRung] = []
    for checkpointing in settings:
        rung: MemoryRung | None = MemoryRung(micro_batch=hp.batch_size, grad_accum=hp.gradient_accumulation_steps,
                                             gradient_checkpointing=checkpointing)
        while rung is not None:
            rungs.append(rung)
            rung = rung.halved()
    return rungs


@dataclass(frozen=True)
class RungChoice:
    """The plan's rung on a layout: the first of `rung_candidates` that fits with the headroom, or, where none
    does, the last (the least memory) with `fits` False."""

    rung: MemoryRung
    memory: MemoryEstimate
    per_gpu: float
    fits: bool


def choose_rung(spec: FineTuneJobSpec, method: ResolvedMethod, gpus: int, gib: float,
                architecture: Architecture | None = None,
                estimates: dict[int, MemoryEstimate] | None = None) -> RungChoice:
    """The fastest rung of `rung_candidates` at which `spec` trained with `method` fits `gpus` GPUs of `gib` with
    the headroom (`HEADROOM_FRACTION`). Pure: the memory model of the spec at each rung. `estimates`: a cache of
    the rungs' estimates (by candidate index) shared by the layouts one plan tries (they do not depend on it)."""
    choice: RungChoice | None = None
    known = estimates if estimates is not None else {}
    for k, rung in enumerate(rung_candidates(spec, method)):
        if k not in known:
            known[k] = estimate_memory(spec, method, architecture, rung=rung)
        mem = known[k]
        choice = RungChoice(rung, mem, mem.per_gpu(gpus), _fits_with_headroom(mem, gpus, gib))
        if choice.fits:
            return choice
    assert choice is not None  # every spec has its requested rung
    return choice


def rung_words(choice: RungChoice, spec: FineTuneJobSpec, gib: float) -> str:
    """The plan's rung in words for its reason: the rung, the memory per GPU, the headroom, what changed."""
    hp, rung = spec.hyperparameters, choice.rung
    free = gib - choice.per_gpu
    words = (f"starts at {describe(rung)}: {_fmt(choice.per_gpu)} of {gib:g} GiB per GPU, {_fmt(free)} GiB "
             f"({free / gib:.0%}) headroom")
    if not choice.fits:
        return words + f", less than the {HEADROOM_FRACTION:.0%} kept free at every rung"
    changes = []
    if rung.micro_batch != hp.batch_size:
        changes.append(f"batchSize {hp.batch_size} lowered to {rung.micro_batch} with {rung.grad_accum} accumulation "
                       f"steps, keeping {hp.batch_size * hp.gradient_accumulation_steps} examples per optimizer step "
                       "on each GPU")
    if hp.gradient_checkpointing is None:
        changes.append("gradient checkpointing " + (
            "on: no micro-batch fits without it" if rung.gradient_checkpointing else
            "off: it fits without, which saves the recompute (about a third more compute per step)"))
    return words + (f" ({'; '.join(changes)})" if changes else "")


def fitting_layouts(mem: MemoryEstimate, method: ResolvedMethod) -> list[tuple[int, int]]:
    """Every (GPUs, GiB per GPU) that `mem` fits, best first: least total memory for full, fewest GPUs for
    adapters."""
    fitting = []
    for g in _gpu_counts():
        need = mem.per_gpu(g)  # once per count (`_fits` for every class)
        fitting += [(g, c) for c in GPU_CLASSES_GIB if need <= c]
    if method == "full":
        return sorted(fitting, key=lambda gc: (gc[0] * gc[1], gc[0]))
    return sorted(fitting, key=lambda gc: (gc[0], gc[1]))


def choose_layout(mem: MemoryEstimate, method: ResolvedMethod) -> tuple[int, int] | None:
    """(GPUs, GiB per GPU) that fits: least total memory for full, fewest GPUs for adapters."""
    layouts = fitting_layouts(mem, method)
    return layouts[0] if layouts else None


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


def _parts(spec: FineTuneJobSpec, method: ResolvedMethod, mem: MemoryEstimate) -> str:
    """The memory model's parts in words for a plan's reason."""
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
    else:
        parts = (f"weights {_fmt(mem.weights)}, trainable state {_fmt(mem.trainable_state)}, "
                 f"activations {_fmt(mem.activations)} GiB")
    if spec.objective == "dpo":
        parts += f"; {_dpo_words(spec, method, mem)}"
    return parts


def _fitting_class(spec: FineTuneJobSpec, method: ResolvedMethod, mem: MemoryEstimate, gpus: int,
                   architecture: Architecture | None) -> int:
    """spec.resources.gpus without gpuMemory: the smallest class that fits at the requested rung and at some rung
    with the headroom, else the largest."""
    return next((c for c in GPU_CLASSES_GIB
                 if _fits(mem, gpus, c) and choose_rung(spec, method, gpus, c, architecture).fits), GPU_CLASSES_GIB[-1])


def _fitting_count(spec: FineTuneJobSpec, method: ResolvedMethod, mem: MemoryEstimate, gib: float,
                   architecture: Architecture | None) -> int:
    """spec.resources.gpuMemory without gpus: the fewest GPUs that fit at the requested rung and at some rung with
    the headroom, else the most."""
    return next((n for n in _gpu_counts()
                 if _fits(mem, n, gib) and choose_rung(spec, method, n, gib, architecture).fits), MAX_GPUS)


def plan(spec: FineTuneJobSpec, architecture: Architecture | None = None) -> Plan:
    """Plan the GPUs for a spec, and the rung the trainer starts at on them. Pure; raises PlanningError for specs
    that cannot be planned.

    `architecture` (read from the model's files by `finetune plan --inspect`) refines the memory model; the
    model-size table still decides the spec's nominal 7B, 13B and 70B sizes. The layout comes first (the table's
    cell, else the memory model at the requested rung, `requested_rung`), then the fastest rung that fits it
    with the headroom (`choose_rung`); a warning only where none does."""
    method, method_reason = resolve_method(spec)
    p_b = nominal_billions(spec, architecture)
    if spec.base_model.uri is None:
        # a chained stage before the operator resolved it (chain.apply sets the URI and the base job's count)
        method_reason += (f"; spec.baseModel.fromJob {spec.base_model.from_job}: sized from spec.baseModel.parameters "
                          "until that job succeeded")
    asked = requested_rung(spec, method)
    mem = estimate_memory(spec, method, architecture, rung=asked)
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
    parts = _parts(spec, method, mem)
    dpo = spec.objective == "dpo"
    # The model-size table is the contract for sft: a dpo run (twice the rows, a reference) is always estimated.
    table_cell = TABLE.get(int(p_b), {}).get(method) if float(p_b).is_integer() and not dpo else None
    explicit_mem = parse_gpu_memory_gib(res.gpu_memory) if res.gpu_memory else None

    if res.gpus is None and explicit_mem is None:
        if table_cell is not None:
            gpus, gib = table_cell
            gib_f = float(gib)
            source = "table"
            reason = f"{method_reason}; {size} {method} -> {gpus}x{gib}GiB from the model-size table"
            choice = choose_rung(spec, method, gpus, gib_f, architecture)
            if not choice.fits:
                warnings.append(_table_warning(spec, method, choice, gpus, gib))
        else:
            layouts = fitting_layouts(mem, method)
            lowered_for_layout = False
            if not layouts:
                # Nothing holds the requested rung: the least-memory rung may fit (the plan lowers the micro-batch,
                # and turns checkpointing on where it may, before it refuses).
                lowest = rung_candidates(spec, method)[-1]
                mem = estimate_memory(spec, method, architecture, rung=lowest)
                layouts, asked, lowered_for_layout = fitting_layouts(mem, method), lowest, True
                parts = _parts(spec, method, mem)
            layout = layouts[0] if layouts else None
            if layout is None and not mem.sharded:
                raise PlanningError(
                    "spec.method",
                    f"{size} with method {method} needs {_fmt(mem.per_gpu(1))} GiB on every GPU even at "
                    f"{describe(asked)} ({parts}), and does not fit one GPU of {GPU_CLASSES_GIB[-1]}GiB; use method "
                    "lora or qlora, or lower hyperparameters.maxSeqLength",
                )
            if layout is None:
                advice = "lower hyperparameters.maxSeqLength (activations are not sharded)"
                if method != "qlora":
                    advice = "use method qlora, or " + advice
                raise PlanningError(
                    "spec.baseModel.parameters",
                    f"{size} with method {method} needs {_fmt(mem.activations)} GiB of activations per GPU even at "
                    f"{describe(asked)}, and does not fit on {MAX_GPUS} GPUs of 80GiB; {advice}",
                )
            # The best layout where some rung fits with the headroom (nearly always the first: a smaller micro-batch
            # frees more than the headroom), else the first, with a warning.
            estimates: dict[int, MemoryEstimate] = {}
            choices = ((g, c, choose_rung(spec, method, g, c, architecture, estimates)) for g, c in layouts)
            first = None
            for gpus, gib, choice in choices:
                first = first or (gpus, gib, choice)
                if choice.fits:
                    break
            else:
                assert first is not None
                gpus, gib, choice = first
                warnings.append(
                    f"the memory model needs {_fmt(choice.per_gpu)} GiB per GPU on {gpus}x{gib}GiB even at "
                    f"{describe(choice.rung)}, more than its {HEADROOM_FRACTION:.0%} headroom allows; expect "
                    "out-of-memory, or set spec.resources")
            gib_f = float(gib)
            source = "estimate"
            sized_by = "the memory model sized it"
            if architecture is not None:
                sized_by += f" with the architecture read from {_short_path(architecture.path)}/config.json" + (
                    " and the safetensors headers" if architecture.parameters_source == "safetensors headers" else "")
                sized_by += f" ({shape_words(architecture)})"
            why = (f"objective dpo with {size} {method}: the model-size table is for sft, so {sized_by}" if dpo else
                   f"{size} {method} is not in the model-size table, so {sized_by}")
            reason = (
                f"{method_reason}; {why}: at {describe(asked)}, "
                f"{parts}; {_fmt(mem.per_gpu(gpus))} GiB per GPU on {gpus} GPU(s) -> {gpus}x{gib}GiB, "
                + ("the least total GPU memory that fits" if method == "full" else "the fewest GPUs that fit")
            )
            if lowered_for_layout:
                reason += f" (at batchSize {spec.hyperparameters.batch_size} none does)"
            if (gpus, gib) != layouts[0]:
                best_g, best_c = layouts[0]
                reason += (f" with a rung that keeps {HEADROOM_FRACTION:.0%} of it free ({best_g}x{best_c}GiB holds "
                           f"{_fmt(mem.per_gpu(best_g))} GiB per GPU, but no rung keeps that headroom there)")
    else:
        source = "table" if table_cell is not None else "estimate"
        if res.gpus is not None and explicit_mem is not None:
            gpus, gib_f = res.gpus, explicit_mem
        elif res.gpus is not None:
            gpus = res.gpus
            gib_f = float(_fitting_class(spec, method, mem, gpus, architecture))
        else:
            assert explicit_mem is not None
            gib_f = explicit_mem
            gpus = _fitting_count(spec, method, mem, gib_f, architecture)
        gib = math.ceil(gib_f)
        choice = choose_rung(spec, method, gpus, gib_f, architecture)
        reason = (
            f"{method_reason}; spec.resources overrides the plan: {gpus}x{gib}GiB "
            f"(memory model at the starting rung: {_parts(spec, method, choice.memory)})"
        )
        if not choice.fits:
            warnings.append(
                f"spec.resources gives {gpus}x{gib}GiB but the memory model needs {_fmt(choice.per_gpu)} GiB per GPU "
                f"even at {describe(choice.rung)}, its least-memory rung, and keeps {HEADROOM_FRACTION:.0%} of each GPU "
                "free; expect out-of-memory, or raise resources.gpus or gpuMemory"
            )
        if table_cell is not None and (gpus, gib) != table_cell:
            warnings.append(
                f"the model-size table gives {table_cell[0]}x{table_cell[1]}GiB for {size} {method}; "
                f"spec.resources asks for {gpus}x{gib}GiB"
            )
    reason += f"; {rung_words(choice, spec, gib_f)}"

    nodes, per_node = _split_nodes(gpus, res.gpus_per_node)
    return Plan(
        method=method,
        gpus=gpus,
        gpu_memory_gib=gib,
        nodes=nodes,
        gpus_per_node=per_node,
        estimated_memory_gib=round(choice.memory.total(gpus), 1),
        source=source,
        reason=reason,
        rung=choice.rung,
        memory_per_gpu_gib=round(choice.per_gpu, 1),
        headroom_gib=round(gib_f - choice.per_gpu, 1),
        warnings=warnings,
    )


def _table_warning(spec: FineTuneJobSpec, method: ResolvedMethod, choice: RungChoice, gpus: int, gib: int) -> str:
    """Why no rung fits the table's cell, and what to change."""
    hp, mem = spec.hyperparameters, choice.memory
    needs = (f"the memory model needs {_fmt(choice.per_gpu)} GiB per GPU even at {describe(choice.rung)}, more than "
             f"the table's {gib}GiB less its {HEADROOM_FRACTION:.0%} headroom")
    static = MemoryEstimate(mem.weights, mem.trainable_state, 0.0, mem.trainable_parameters, sharded=mem.sharded)
    if _fits(static, gpus, gib):
        unset = (hp.gradient_checkpointing is False and checkpointing_allowed(method))
        advice = ("lower hyperparameters.maxSeqLength" + (", unset (or set true) gradientCheckpointing" if unset else "")
                  + ", or set spec.resources")
        return f"with maxSeqLength {hp.max_seq_length} {needs}; {advice}"
    return (f"{needs}; its weights and optimizer state alone need {_fmt(static.per_gpu(gpus))} GiB per GPU; "
            "set spec.resources (more GPUs) or use a smaller method")
