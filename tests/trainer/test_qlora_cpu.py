"""QLoRA on CPU: evaluation must not leave bitsandbytes' 4-bit weights in its CPU inference layout.

bitsandbytes' Linear4bit repacks its weight for fast CPU inference on the first eval-mode forward without
gradients (on CPUs with AVX512-BF16) and never undoes it; training afterwards backpropagates through the
repacked data as if it were not. The trainer evaluates the base model before training, so it switches the
repacking off (modeling.keep_4bit_weights_unpacked). These tests hold on every CPU; the one showing the
failure mode only runs where bitsandbytes would repack.
"""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")


def _layer() -> Any:
    torch.manual_seed(0)
    return bnb.nn.Linear4bit(64, 64, bias=False, quant_type="nf4", compute_dtype=torch.float32).to("cpu")


def _evaluate(layer: Any) -> Any:
    layer.eval()
    with torch.no_grad():
        out = layer(torch.ones(2, 64))
    layer.train()
    return out


def _input_gradient(layer: Any) -> Any:
    x = torch.linspace(-1, 1, 128).reshape(2, 64).requires_grad_(True)
    (layer(x) ** 2).sum().backward()
    return x.grad


def _packed(layer: Any) -> bool:
    return bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))


def test_evaluation_leaves_weights_trainable() -> None:
    from finetune_trainer.modeling import keep_4bit_weights_unpacked

    untouched = _layer()
    expected = _input_gradient(untouched)
    layer = _layer()
    wrapper = torch.nn.Sequential(layer)
    assert keep_4bit_weights_unpacked(wrapper) == 1
    before = layer.weight.data.clone()
    _evaluate(layer)
    assert not _packed(layer)
    assert torch.equal(layer.weight.data, before)
    grad = _input_gradient(layer)
    assert grad is not None and torch.allclose(grad, expected, atol=1e-5)


def test_no_4bit_layers_is_a_no_op() -> None:
    from finetune_trainer.modeling import keep_4bit_weights_unpacked

    assert keep_4bit_weights_unpacked(torch.nn.Sequential(torch.nn.Linear(64, 64))) == 0


def test_without_it_bitsandbytes_repacks_on_this_cpu() -> None:
    """The failure mode the trainer guards against (only where bitsandbytes would repack)."""
    layer = _layer()
    if not layer.support_avx512bf16_for_cpu:
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack here")
    expected = _input_gradient(_layer())
    _evaluate(layer)
    assert _packed(layer)
    grad = _input_gradient(layer)
    assert grad is None or not torch.allclose(grad, expected, atol=1e-5)
