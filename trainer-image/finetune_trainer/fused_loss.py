"""Fused output projection and cross-entropy over the supervised positions, without vocabulary-wide logits.

The logits of a causal LM (positions x vocabulary) are the largest activation of a large-vocabulary model:
at 4 x 2048 tokens and a 128k vocabulary, 1 GiB in bf16, 2 GiB again as the float32 copy the loss takes,
and as much once more for their gradient. `fused_linear_cross_entropy` computes the summed cross-entropy
of `sum_i scale_i * x_i @ w_i.T (+ bias)` against `targets` a chunk of rows at a time (at most
`CHUNK_BYTES` of logits and their gradient live at once) and computes the gradients of the inputs during
the forward pass, as Liger's fused linear cross-entropy does on GPU (Liger's kernels are Triton only; this
is the same algorithm in plain torch, so it runs, and is tested, on CPU). The same three matrix products
as the unfused loss (logits, gradient of the hidden states, gradient of the weight when it trains), so no
recompute; what it keeps for backward is the gradients themselves: the hidden states' (rows x hidden) and,
when the weight trains, the weight's (one weight's size, the gradient autograd would hold anyway).

Numerics follow transformers' causal-LM loss: each chunk's logits are computed in the compute dtype (the
autocast dtype under autocast, as `nn.Linear` would), then upcast to float32 for log-sum-exp and the
softmax; the softmax minus one-hot is cast back to the compute dtype for the two gradient products.

The training forward uses it through `computing_loss`: while the wrapped model (DDP, FSDP2, peft, and
accelerate's autocast wrapper all unchanged) runs its ordinary forward, the causal LM's output head returns
the summed loss in place of logits. The head runs inside the root module's forward, so FSDP2 has its
parameters unsharded, and its hooks see the loss as the forward's output. Only model types whose causal-LM
forward is exactly `logits = lm_head(hidden_states[:, logits_to_keep])` (no softcapping or logit scaling
after the head) are accepted (`SUPPORTED_MODEL_TYPES`); `unsupported` says why anything else is not.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import MethodType
from typing import Any

IGNORE_INDEX = -100
#: Bytes of one chunk's logits and their gradient (float32 logits/softmax plus compute-dtype logits and
#: gradient): the rows of a chunk are this over (vocabulary x bytes per element), at least one. 256 MiB is
#: 256 rows of a 128k vocabulary in bf16 (products wide enough for a GPU's matrix units, as Liger's chunks of
#: about the hidden states' size), and one chunk for the tiny models' 2,048 (CPU: no per-chunk overhead).
CHUNK_BYTES = 256 << 20

#: Model types whose causal-LM forward projects with the output head and applies nothing after it
#: (read in transformers 5.24's modeling files: Gemma 2/3 softcap, Cohere and Granite scale the logits).
SUPPORTED_MODEL_TYPES = frozenset({
    "gemma", "gpt_neox", "llama", "mistral", "mixtral", "olmo2", "phi", "phi3", "qwen2", "qwen2_moe", "qwen3",
    "qwen3_moe", "smollm3", "starcoder2",
})


def chunk_rows(vocab: int, compute_itemsize: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk: float32 logits (softmax in place) plus compute-dtype logits and gradient per element."""
    return max(1, chunk_bytes // (vocab * (4 + 2 * compute_itemsize)))


def _compute_dtype(tensors: Sequence[Any]) -> Any:
    """The dtype `nn.Linear` would compute in: the autocast dtype under autocast, else the inputs' promotion."""
    import torch

    device_type = tensors[0].device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _function() -> Any:
    import torch

    class FusedLinearCrossEntropy(torch.autograd.Function):
        """Summed cross-entropy of `sum_i scale_i * x_i @ w_i.T + bias`; gradients computed in forward."""

        @staticmethod
        def forward(ctx: Any, targets: Any, bias: Any, ignore_index: int | None, chunk_bytes: int,
                    scales: tuple[float, ...], grad_enabled: bool, *tensors: Any) -> Any:
            xs, ws = tensors[0::2], tensors[1::2]
            # needs_input_grad says requires_grad even under no_grad (evaluation): no gradients there.
            need = [n and grad_enabled for n in ctx.needs_input_grad]
            need_bias = bias is not None and need[1]
            need_x = [need[6 + 2 * i] for i in range(len(xs))]
            need_w = [need[7 + 2 * i] for i in range(len(ws))]
            any_grad = need_bias or any(need_x) or any(need_w)
            dtype = _compute_dtype([*xs, *ws] + ([bias] if bias is not None else []))
            n, vocab = targets.shape[0], ws[0].shape[0]
            device = targets.device
            with torch.autocast(device.type, enabled=False):  # dtypes are chosen here, as autocast would
                wc = [w.to(dtype) for w in ws]
                bc = bias.to(dtype) if bias is not None else None
                gx: list[Any] = [torch.empty(x.shape, dtype=x.dtype, device=device) if nx else None
                      for x, nx in zip(xs, need_x, strict=True)]
                gw: list[Any] = [None] * len(ws)  # the first chunk's product, then sums (no zero fill)
                gb = torch.zeros(vocab, dtype=torch.float32, device=device) if need_bias else None
                total = torch.zeros((), dtype=torch.float32, device=device)
                step = chunk_rows(vocab, dtype.itemsize, chunk_bytes)
                for start in range(0, n, step):
                    end = min(n, start + step)
                    chunk = [x[start:end].to(dtype) for x in xs]
                    logits: Any = None
                    for xc, w, scale in zip(chunk, wc, scales, strict=True):
                        part = xc @ w.t()
                        if logits is None:
                            logits = part if scale == 1.0 else part.mul_(scale)
                        else:  # in place: one (rows x vocabulary) buffer whatever the number of terms
                            logits.add_(part, alpha=scale)
                        del part
                    if bc is not None:
                        logits = logits + bc
                    z = logits.float()  # as transformers' loss: float32 logits
                    del logits
                    t = targets[start:end]
                    valid = None if ignore_index is None else t != ignore_index
                    safe = t if valid is None else torch.where(valid, t, torch.zeros_like(t))
                    picked = z.gather(1, safe[:, None]).squeeze(1)
                    top = z.amax(dim=-1, keepdim=True)
                    e = z.sub_(top).exp_()  # in place, one exp for both the log-sum-exp and the softmax
                    sums = e.sum(dim=-1)
                    lse = top.squeeze(1) + sums.log()
                    losses = lse - picked
                    total += (losses if valid is None else torch.where(valid, losses, torch.zeros_like(lse))).sum()
                    if not any_grad:
                        continue
                    # d(sum loss)/d logits = softmax - onehot on valid rows, 0 on ignored ones.
                    g = e.div_(sums[:, None])
                    g[torch.arange(end - start, device=device), safe] -= 1.0
                    if valid is not None:
                        g.mul_(valid[:, None])
                    if gb is not None:
                        gb += g.sum(0)
                    gc = g.to(dtype)
                    del g, e, z
                    for i, (xc, w, scale) in enumerate(zip(chunk, wc, scales, strict=True)):
                        # The scale on the products (rows x k, vocabulary x k: small for a LoRA factor), not
                        # on the (rows x vocabulary) gradient.
                        if gx[i] is not None:
                            product = gc @ w
                            gx[i][start:end] = product if scale == 1.0 else product.mul_(scale)
                        if need_w[i]:
                            product = (gc.t() @ xc).to(ws[i].dtype)
                            if scale != 1.0:
                                product.mul_(scale)
                            gw[i] = product if gw[i] is None else gw[i].add_(product)
            gw = [torch.zeros_like(w) if nw and g is None else g for w, nw, g in zip(ws, need_w, gw, strict=True)]
            ctx.grads = (gb.to(bias.dtype) if gb is not None else None, gx, gw)
            return total

        @staticmethod
        def backward(ctx: Any, grad_out: Any) -> Any:
            if ctx.grads is None:
                raise RuntimeError("fused_linear_cross_entropy's gradients were computed in its forward pass and "
                                   "handed out by its first backward: a second backward needs a new forward")
            gb, gx, gw = ctx.grads
            ctx.grads = None  # the graph's output (the loss) may outlive backward: do not keep a weight's gradient

            def scaled(g: Any) -> Any:  # in place: these tensors are this function's own, used once
                return None if g is None else g.mul_(grad_out)

            flat = []
            for x_grad, w_grad in zip(gx, gw, strict=True):
                flat += [scaled(x_grad), scaled(w_grad)]
            return (None, scaled(gb), None, None, None, None, *flat)

    return FusedLinearCrossEntropy


_FUNCTION: Any = None


def fused_linear_cross_entropy(terms: Sequence[tuple[Any, Any, float]], targets: Any, bias: Any = None, *,
                               ignore_index: int | None = IGNORE_INDEX, chunk_bytes: int = CHUNK_BYTES) -> Any:
    """The summed (float32) cross-entropy of logits `sum(scale * x @ w.T for x, w, scale in terms) + bias`
    against `targets` (rows whose target is `ignore_index` count nothing), never holding more than one
    chunk of `chunk_bytes` of logits. Every `x` has the rows of `targets`; every `w` the vocabulary rows.
    `ignore_index=None`: the caller passes supervised rows only, and the masking passes are skipped."""
    global _FUNCTION
    if _FUNCTION is None:
        _FUNCTION = _function()
    if not terms:
        raise ValueError("fused_linear_cross_entropy needs at least one (x, w, scale) term")
    rows, vocab = targets.shape[0], terms[0][1].shape[0]
    for x, w, _ in terms:
        if x.dim() != 2 or w.dim() != 2 or x.shape[0] != rows or w.shape[0] != vocab or x.shape[1] != w.shape[1]:
            raise ValueError(f"term shapes x {tuple(x.shape)}, w {tuple(w.shape)} do not fit {rows} target rows "
                             f"and a vocabulary of {vocab}: x must be (rows, k) and w (vocabulary, k)")
    flat: list[Any] = []
    for x, w, _ in terms:
        flat += [x, w]
    import torch

    return _FUNCTION.apply(targets, bias, ignore_index, chunk_bytes, tuple(float(s) for _, _, s in terms),
                           torch.is_grad_enabled(), *flat)


# ------------------------------------------------------------------------------------------------
# The output head of a (wrapped) causal LM computing the loss inside the model's forward
# ------------------------------------------------------------------------------------------------


def causal_lm(model: Any) -> Any:
    """The transformers causal LM inside DDP / torch.compile / peft wrappers (FSDP2 shards in place)."""
    from accelerate.utils import extract_model_from_parallel

    inner = extract_model_from_parallel(model, keep_fp32_wrapper=True)
    get_base = getattr(inner, "get_base_model", None)  # peft: PeftModel -> LoraModel -> the causal LM
    return get_base() if callable(get_base) else inner


def _plain_linear(module: Any) -> bool:
    """An nn.Linear computing `x @ W.T + b` with a floating-point weight (FSDP2's subclass included; not a
    quantized subclass, which overrides forward)."""
    import torch

    return (isinstance(module, torch.nn.Linear) and type(module).forward is torch.nn.Linear.forward
            and module.weight.dtype.is_floating_point and not hasattr(module.weight, "quant_state"))


def unsupported(model: Any) -> str | None:
    """Why the fused loss cannot compute this model's loss (None: it can)."""
    lm = causal_lm(model)
    model_type = getattr(getattr(lm, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} is not one whose logits are the output head's alone"
    head = lm.get_output_embeddings()
    if _plain_linear(head):
        return None
    base = getattr(head, "base_layer", None)
    if base is None or not _plain_linear(base):
        return f"output head {type(head).__name__} is not a Linear layer or a LoRA layer on one"
    if getattr(head, "disable_adapters", False) or getattr(head, "merged", False):
        return None  # the base layer alone computes
    for name in head.active_adapters:
        if name not in head.lora_A:
            continue
        if name in getattr(head, "lora_variant", {}):
            return f"output head's adapter {name!r} is a LoRA variant (DoRA or another), not plain LoRA"
        a, b = head.lora_A[name], head.lora_B[name]
        if not (_plain_linear(a) and _plain_linear(b)) or a.bias is not None or b.bias is not None:
            return f"output head's adapter {name!r} has biases or non-Linear factors"
    return None


def _terms(head: Any, hidden: Any, rows: Any, cols: Any) -> tuple[list[tuple[Any, Any, float]], Any]:
    """The (x, w, scale) terms and bias of the head's output at positions (rows, cols) of `hidden`.

    A LoRA head's dropout is applied to all of `hidden` before the positions are picked, as the head's own
    forward would: the same random masks as the unfused selective path, so training draws the same numbers."""
    base = getattr(head, "base_layer", None)
    if base is None:
        return [(hidden[rows, cols], head.weight, 1.0)], head.bias
    terms = [(hidden[rows, cols], base.weight, 1.0)]
    if not (head.disable_adapters or head.merged):
        for name in head.active_adapters:
            if name not in head.lora_A:
                continue
            a, b = head.lora_A[name], head.lora_B[name]
            x = head._cast_input_dtype(hidden, a.weight.dtype)
            terms.append((a(head.lora_dropout[name](x))[rows, cols], b.weight, float(head.scaling[name])))
    return terms, base.bias


@contextmanager
def computing_loss(model: Any, rows: Any, cols: Any, targets: Any,
                   chunk_bytes: int = CHUNK_BYTES) -> Iterator[None]:
    """While inside, the output head of `model`'s causal LM returns the summed cross-entropy (float32 scalar)
    of its outputs at positions (rows[k], cols[k]) of its input against targets[k] (all supervised), in
    place of logits.

    The head's input is the hidden states the causal LM keeps (`logits_to_keep`), batch x kept positions x
    hidden; `cols` index the kept positions. The model's forward then returns the loss as `.logits`.
    The head's forward is an instance attribute only while inside (nothing stays on the model)."""
    head = causal_lm(model).get_output_embeddings()
    missing = object()
    previous = head.__dict__.get("forward", missing)

    def forward(self: Any, hidden: Any, *args: Any, **kwargs: Any) -> Any:
        terms, bias = _terms(self, hidden, rows, cols)
        return fused_linear_cross_entropy(terms, targets, bias, ignore_index=None, chunk_bytes=chunk_bytes)

    head.forward = MethodType(forward, head)
    try:
        yield
    finally:
        if previous is missing:
            del head.forward
        else:
            head.forward = previous
