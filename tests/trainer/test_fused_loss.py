"""The fused output projection + cross-entropy (`fused_loss`) equals the unfused loss, value and gradients.

Against `F.cross_entropy` on the full logits (the operator itself), then through `objectives.sft.step_loss`
on the tiny model (fused against the selective path and transformers' loss on every position) for LoRA,
full fine-tuning and tied embeddings, and through DDP. Tolerances: float32 results agree to float noise
(the fused loss sums chunk by chunk and scales the gradients after the products rather than before);
under bf16 autocast both sides compute bf16 logits, and the stated tolerance is what bf16 rounding of the
gradient products in another order allows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

HEAD = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def _reference(x: Any, w: Any, targets: Any, bias: Any = None) -> Any:
    import torch.nn.functional as F

    logits = x @ w.t() if bias is None else x @ w.t() + bias
    return F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum")


def _inputs(n: int = 37, hidden: int = 64, vocab: int = 512, frozen: bool = False, bias: bool = False,
            ignored: int = 5) -> tuple[Any, Any, Any, Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, hidden, generator=g).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * 0.3).requires_grad_(not frozen)
    b = (torch.randn(vocab, generator=g) * 0.1).requires_grad_() if bias else None
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[torch.randperm(n, generator=g)[:ignored]] = -100
    return x, w, b, targets


def _grads(loss: Any, *tensors: Any) -> list[Any]:
    import torch

    return list(torch.autograd.grad(loss, [t for t in tensors if t is not None and t.requires_grad]))


@pytest.mark.parametrize("rows", [1, 5, 36, 37, 1000])  # one row; N % chunk != 0; N - 1; exactly N; one chunk
def test_loss_and_gradients_equal_cross_entropy_in_fp32(rows: int) -> None:
    import torch

    from finetune_trainer.fused_loss import chunk_rows, fused_linear_cross_entropy

    x, w, _, targets = _inputs()
    chunk_bytes = rows * 512 * 12  # float32 compute: 12 bytes per logit (fused_loss.chunk_rows)
    assert chunk_rows(512, 4, chunk_bytes) == rows
    fused = fused_linear_cross_entropy([(x, w, 1.0)], targets, chunk_bytes=chunk_bytes)
    reference = _reference(x, w, targets)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, reference, rtol=1e-6, atol=1e-5)
    for got, want in zip(_grads(fused, x, w), _grads(reference, x, w), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_ignored_rows_count_nothing_and_get_no_gradient() -> None:
    import torch

    from finetune_trainer.fused_loss import fused_linear_cross_entropy

    x, w, _, targets = _inputs(ignored=0)
    targets[::2] = -100
    fused = fused_linear_cross_entropy([(x, w, 1.0)], targets, chunk_bytes=7 * 512 * 12)
    kept = targets != -100
    torch.testing.assert_close(fused, _reference(x[kept], w, targets[kept]), rtol=1e-6, atol=1e-5)
    gx, gw = _grads(fused, x, w)
    assert gx[~kept].abs().max() == 0 and gx[kept].abs().min() > 0
    torch.testing.assert_close(gw, _grads(_reference(x, w, targets), w)[0], rtol=1e-5, atol=1e-6)
    # Every row ignored, and no rows at all: a zero loss with zero gradients.
    for t, xs in ((torch.full_like(targets, -100), x), (targets[:0], x[:0])):
        empty = fused_linear_cross_entropy([(xs, w, 1.0)], t)
        assert float(empty.detach()) == 0.0
        assert all(float(g.abs().sum()) == 0.0 for g in _grads(empty, xs, w))


def test_frozen_weight_gets_no_gradient_and_bias_does() -> None:
    import torch

    from finetune_trainer.fused_loss import fused_linear_cross_entropy

    x, w, b, targets = _inputs(frozen=True, bias=True)
    fused = fused_linear_cross_entropy([(x, w, 1.0)], targets, b, chunk_bytes=8 * 512 * 12)
    reference = _reference(x, w, targets, b)
    torch.testing.assert_close(fused, reference, rtol=1e-6, atol=1e-5)
    got, want = _grads(fused, x, w, b), _grads(reference, x, w, b)
    assert len(got) == 2  # x and the bias: the frozen weight is not asked for (and gets none in backward)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    fused = fused_linear_cross_entropy([(x, w, 1.0)], targets, b)
    fused.backward()
    assert w.grad is None and x.grad is not None


def test_several_scaled_terms_are_a_lora_head() -> None:
    """logits = x @ W.T + s * u @ B.T: the shape of a LoRA output head."""
    import torch

    from finetune_trainer.fused_loss import fused_linear_cross_entropy

    x, w, _, targets = _inputs(frozen=True)
    g = torch.Generator().manual_seed(1)
    u = torch.randn(x.shape[0], 8, generator=g).requires_grad_()
    b = (torch.randn(w.shape[0], 8, generator=g) * 0.1).requires_grad_()
    fused = fused_linear_cross_entropy([(x, w, 1.0), (u, b, 2.0)], targets, chunk_bytes=6 * 512 * 12)
    import torch.nn.functional as F

    reference = F.cross_entropy(x @ w.t() + (u @ b.t()) * 2.0, targets, reduction="sum")
    torch.testing.assert_close(fused, reference, rtol=1e-6, atol=1e-5)
    for got, want in zip(_grads(fused, x, u, b), _grads(reference, x, u, b), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_matches_the_unfused_bf16_loss() -> None:
    """Both sides under bf16 autocast (bf16 logits upcast to float32 for the loss). Stated tolerance: the
    loss to 1e-4 relative (the same bf16 logits, summed in another order), gradients to 1% of their largest
    element (the softmax minus one-hot is rounded to bf16 before the products on both sides, but the
    products' bf16 outputs round in a different order and chunking)."""
    import torch

    from finetune_trainer.fused_loss import fused_linear_cross_entropy

    x, w, _, targets = _inputs(n=96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = fused_linear_cross_entropy([(x, w, 1.0)], targets, chunk_bytes=20 * 512 * 8)
        reference = _reference(x, w, targets)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=0)
    fused_grads = _grads(fused, x, w)
    for got, want in zip(fused_grads, _grads(reference, x, w), strict=True):
        assert got.dtype == want.dtype == torch.float32  # the parameters' dtype, as autocast gives
        assert float((got - want).abs().max()) <= 1e-2 * float(want.abs().max())
    exact = _grads(_reference(x, w, targets), x, w)  # and both stay near the float32 gradients
    for got, want in zip(fused_grads, exact, strict=True):
        assert float((got - want).abs().max()) <= 3e-2 * float(want.abs().max())


def test_never_materialises_vocabulary_wide_logits_for_all_rows() -> None:
    """The largest (rows, vocabulary) tensor any operation produces is one chunk's, in forward and backward."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from finetune_trainer.fused_loss import fused_linear_cross_entropy

    vocab, rows = 512, 16

    class Largest(TorchDispatchMode):
        most = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple | list) else (out,):
                # New (rows, vocabulary) storage only: views such as the weight's transpose allocate nothing.
                if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[-1] == vocab and not func.is_view:
                    Largest.most = max(Largest.most, t.shape[0])
            return out

    x, w, _, targets = _inputs(n=300, hidden=64, vocab=vocab)
    with Largest():
        fused_linear_cross_entropy([(x, w, 1.0)], targets, chunk_bytes=rows * vocab * 12).backward()
    assert 0 < Largest.most <= rows
    with Largest():  # the probe sees the unfused logits (so the bound above is not vacuous)
        _reference(x, w, targets).backward()
    assert Largest.most == 300


def test_no_gradient_products_under_no_grad() -> None:
    """Evaluation (no_grad) computes the logits products only: one per chunk, where training adds the
    hidden states' and the weight's gradient products."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from finetune_trainer.fused_loss import fused_linear_cross_entropy

    class Products(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            self.count += func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
            return func(*args, **(kwargs or {}))

    x, w, _, targets = _inputs()
    chunk_bytes = 10 * 512 * 12  # 4 chunks of 37 rows
    with torch.no_grad(), Products() as evaluating:
        no_grad = fused_linear_cross_entropy([(x, w, 1.0)], targets, chunk_bytes=chunk_bytes)
    with Products() as training:
        with_grad = fused_linear_cross_entropy([(x, w, 1.0)], targets, chunk_bytes=chunk_bytes)
    assert (evaluating.count, training.count) == (4, 12)
    assert no_grad.grad_fn is None and float(no_grad) == pytest.approx(float(with_grad.detach()), rel=1e-6)


def test_mismatched_shapes_are_named() -> None:
    from finetune_trainer.fused_loss import fused_linear_cross_entropy

    x, w, _, targets = _inputs()
    with pytest.raises(ValueError, match=r"x \(36, 64\), w \(512, 64\) do not fit 37 target rows"):
        fused_linear_cross_entropy([(x[:36], w, 1.0)], targets)


# ------------------------------------------------------------------------------------------------
# Through step_loss on the tiny model
# ------------------------------------------------------------------------------------------------


def _batch(model_dir: Path, sample: Any, count: int = 4) -> Any:
    from transformers import AutoTokenizer

    from finetune_trainer import dataset as ds

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in sample.train.read_text().splitlines()[:2 * count]]
    encoded = [e for e in (ds.encode(r, "instruction", tokenizer, 128) for r in rows) if e is not None]
    return ds.collate(encoded[:count], tokenizer.pad_token_id or 0)


def _model(model_dir: Path, method: str, dropout: float = 0.0) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if method == "lora":
        import torch
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=HEAD,
                                                 init_lora_weights=False))
    model.train()
    return model


def _step(model: Any, batch: Any, selective: bool, fused: bool, seed: int = 0,
          autocast: bool = False) -> tuple[float, dict[str, Any]]:
    import torch

    from finetune_trainer.objectives.sft import step_loss

    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = step_loss(model, batch, "cpu", torch.tensor(37.0), selective, fused)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a: tuple[float, dict[str, Any]], b: tuple[float, dict[str, Any]], rel: float = 1e-6,
                 grad_rel: float = 2e-6) -> None:
    """Losses within `rel`; each parameter's gradient within `grad_rel` of its largest element (float32:
    the gradients of the first layers sum many products, so element-wise tolerances near zero are noise)."""
    assert a[0] == pytest.approx(b[0], rel=rel)
    assert a[1].keys() == b[1].keys() and a[1]
    for name, grad in a[1].items():
        scale = float(grad.abs().max())
        assert float((b[1][name] - grad).abs().max()) <= grad_rel * scale + 1e-12, name


@pytest.mark.parametrize("method", ["full", "lora"])
def test_step_loss_fused_equals_unfused_on_the_tiny_model(method: str, tiny_model_dir: Path,
                                                          healthcare_sample: Any) -> None:
    from finetune_trainer import dataset as ds
    from finetune_trainer.fused_loss import unsupported

    batch = _batch(tiny_model_dir, healthcare_sample)
    model = _model(tiny_model_dir, method)
    assert unsupported(model) is None
    everything, selective, fused = (_step(model, batch, s, f) for s, f in ((False, False), (True, False), (True, True)))
    kept = (batch["labels"][:, 1:] != ds.IGNORE_INDEX)
    assert kept.any(dim=0).float().mean() > kept.float().mean()  # exact positions are fewer than columns
    _assert_same(everything, fused)
    _assert_same(selective, fused)
    if method == "full":
        assert "lm_head.weight" in fused[1]
    else:
        assert "base_model.model.lm_head.lora_B.default.weight" in fused[1]


def test_lora_dropout_draws_the_same_masks_fused_and_unfused(tiny_model_dir: Path, healthcare_sample: Any) -> None:
    """The fused head applies a LoRA head's dropout to the same kept columns as the selective path, so the
    same seed gives the same loss (training draws the same random numbers with either path)."""
    batch = _batch(tiny_model_dir, healthcare_sample)
    model = _model(tiny_model_dir, "lora", dropout=0.3)
    selective, fused = _step(model, batch, True, False, seed=3), _step(model, batch, True, True, seed=3)
    _assert_same(selective, fused)
    assert _step(model, batch, True, True, seed=4)[0] != pytest.approx(fused[0], rel=1e-4)  # dropout is on


def test_bf16_autocast_step_loss(tiny_model_dir: Path, healthcare_sample: Any) -> None:
    """The tiny model's LoRA step under bf16 autocast: fused and selective within the bf16 tolerance of
    test_bf16_autocast_matches_the_unfused_bf16_loss (loss 1e-4 relative, gradients 2% of their largest)."""
    batch = _batch(tiny_model_dir, healthcare_sample)
    model = _model(tiny_model_dir, "lora")
    selective, fused = _step(model, batch, True, False, autocast=True), _step(model, batch, True, True, autocast=True)
    _assert_same(selective, fused, rel=1e-4, grad_rel=2e-2)


def test_tied_embeddings_get_both_gradients(tmp_path: Path, healthcare_sample: Any) -> None:
    from finetune_trainer.tiny import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "tied", tie_word_embeddings=True)
    batch = _batch(model_dir, healthcare_sample)
    model = _model(model_dir, "full")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    selective, fused = _step(model, batch, True, False), _step(model, batch, True, True)
    _assert_same(selective, fused)
    assert "model.embed_tokens.weight" in fused[1]


def test_unsupported_models_take_the_selective_path(tiny_model_dir: Path, healthcare_sample: Any,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A model type that changes logits after the head (Gemma 2's softcapping) is refused, with the reason,
    and step_loss computes the selective loss instead of a wrong one."""
    from finetune_trainer import fused_loss

    batch = _batch(tiny_model_dir, healthcare_sample)
    model = _model(tiny_model_dir, "full")
    monkeypatch.setattr(model.config, "model_type", "gemma2")
    assert "model type 'gemma2'" in (fused_loss.unsupported(model) or "")

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the fused loss was used on an unsupported model")

    monkeypatch.setattr(fused_loss, "computing_loss", fail)
    _assert_same(_step(model, batch, True, False), _step(model, batch, True, True))


def test_head_forward_is_restored_after_the_step(tiny_model_dir: Path, healthcare_sample: Any) -> None:
    """Nothing stays on the model: after a fused step the head computes logits again (evaluation, generation)."""
    import torch

    model = _model(tiny_model_dir, "lora")
    _step(model, _batch(tiny_model_dir, healthcare_sample), True, True)
    head = model.get_base_model().lm_head
    assert "forward" not in head.__dict__
    assert head(torch.zeros(1, 2, 64)).shape == (1, 2, 512)


def _one_process_group() -> Any:
    """A one-process gloo group on a free port (what DDP and FSDP2 need to wrap a model)."""
    import os
    import socket

    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=0, world_size=1)
    return dist


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_fused_through_ddp_and_fsdp2(wrapper: str, tiny_model_dir: Path, healthcare_sample: Any) -> None:
    """The head's loss is computed inside the wrapped model's forward: DDP's gradient hooks see it, and under
    FSDP2 (`fully_shard` per decoder layer and at the root, as accelerate's FSDP2 plugin wraps) the head's
    weight is the unsharded parameter there (outside forward it is a sharded DTensor). One-process gloo group;
    the gradients equal the unwrapped model's unfused ones."""
    import torch

    batch = _batch(tiny_model_dir, healthcare_sample)
    plain = _step(_model(tiny_model_dir, "full"), batch, True, False)
    dist = _one_process_group()
    try:
        model = _model(tiny_model_dir, "full")
        if wrapper == "ddp":
            model = torch.nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard

            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
        loss, grads = _step(model, batch, True, True)
        grads = {k.removeprefix("module."): g.full_tensor() if hasattr(g, "full_tensor") else g
                 for k, g in grads.items()}
    finally:
        dist.destroy_process_group()
    _assert_same(plain, (loss, grads))


def test_evaluation_loss_is_the_same_through_the_fused_loss(tiny_model_dir: Path, healthcare_sample: Any) -> None:
    """`mean_loss` (the eval loss) with the method's selective flag: the fused and selective sums equal
    transformers' loss on every position, and under no_grad the fused loss computes no gradients."""
    import torch
    from transformers import AutoTokenizer

    from finetune_trainer import dataset as ds
    from finetune_trainer import fused_loss
    from finetune_trainer.objectives.sft import mean_loss

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [json.loads(line) for line in healthcare_sample.train.read_text().splitlines()[:12]]
    items = [e for e in (ds.encode(r, "instruction", tokenizer, 128) for r in rows) if e is not None]
    model = _model(tiny_model_dir, "lora", dropout=0.3)  # eval mode inside mean_loss: dropout off
    computed: list[bool] = []
    real = fused_loss.fused_linear_cross_entropy

    def spy(terms: Any, *args: Any, **kwargs: Any) -> Any:
        computed.append(torch.is_grad_enabled())
        return real(terms, *args, **kwargs)

    every = mean_loss(model, items, 4, tokenizer.pad_token_id, "cpu")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fused_loss, "fused_linear_cross_entropy", spy)
        fused = mean_loss(model, items, 4, tokenizer.pad_token_id, "cpu", selective=True, fused=True)
    selective = mean_loss(model, items, 4, tokenizer.pad_token_id, "cpu", selective=True, fused=False)
    assert computed and not any(computed)
    assert model.training  # restored
    assert fused == pytest.approx(every, rel=1e-6) and selective == pytest.approx(every, rel=1e-6)


@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs a CUDA device")
def test_on_cuda_equal_and_smaller(tiny_model_dir: Path, healthcare_sample: Any) -> None:
    """On a GPU (run where one is lent: `pytest tests/trainer/test_fused_loss.py -k cuda`): the tiny model's
    LoRA step under bf16 autocast equals the selective one within the bf16 tolerance above, and at a Llama-3
    vocabulary (128,256; hidden 2,048; 4 x 2,048 positions, two thirds supervised) the fused head and loss
    peak (torch.cuda.max_memory_allocated over forward and backward) is under a quarter of the selective one."""
    import torch
    import torch.nn.functional as F

    from finetune_trainer.fused_loss import fused_linear_cross_entropy
    from finetune_trainer.objectives.sft import step_loss

    batch = _batch(tiny_model_dir, healthcare_sample)
    model = _model(tiny_model_dir, "lora").cuda()
    results = []
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step_loss(model, batch, "cuda", torch.tensor(37.0, device="cuda"), True, fused)
        loss.backward()
        results.append((float(loss.detach()), {n: p.grad.float().cpu() for n, p in model.named_parameters()
                                                if p.grad is not None}))
    _assert_same(results[0], results[1], rel=1e-4, grad_rel=2e-2)

    rows, hidden, vocab = 4 * 2048, 2048, 128256
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(rows, hidden, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
    w = torch.randn(vocab, hidden, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
    targets = torch.randint(0, vocab, (rows,), device="cuda", generator=g)
    targets[rows * 2 // 3:] = -100
    peaks = []
    for fused in (False, True):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        if fused:
            keep = targets != -100
            loss = fused_linear_cross_entropy([(h[keep], w, 1.0)], targets[keep], ignore_index=None)
        else:
            loss = F.cross_entropy((h @ w.t()).float(), targets, ignore_index=-100, reduction="sum")
        loss.backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        h.grad = None
        del loss
    print(f"logits path peak on {torch.cuda.get_device_name()}: selective {peaks[0] / 2**20:.0f} MiB, "
          f"fused {peaks[1] / 2**20:.0f} MiB")
    assert peaks[1] < peaks[0] / 4
