"""QLoRA on CPU: evaluation must not leave bitsandbytes' 4-bit weights in its CPU inference layout.

bitsandbytes' Linear4bit repacks its weight for fast CPU inference on the first eval-mode forward without
gradients and never undoes it; training afterwards backpropagates through the repacked data as if it were
not. The trainer evaluates the base model before training, so it switches the repacking off
(modeling.keep_4bit_weights_unpacked).

Which CPUs repack is the library's own condition, not a guess about the CPU. In bitsandbytes 0.50
(`nn/modules.py`, `Linear4bit`), `__init__` sets `self.support_avx512bf16_for_cpu = has_avx512bf16()` (the
native library's `has_avx512bf16_cpu()`, False where the symbol or the call fails), and `forward` repacks when
the input is on the CPU, that attribute is true, the layer is in eval mode and the input needs no gradient.
So on a CPU without AVX512-BF16 the switch exists but is already off: the guard touches nothing there, and
the tests check instead that evaluation still leaves training's gradients intact.

Every test runs twice: on this CPU as it is (`this-cpu`), and with bitsandbytes' probe answering "no
AVX512-BF16" (`no-avx512bf16`, `has_avx512bf16` patched where `Linear4bit.__init__` reads it). That flag is
the only thing the 4-bit training path takes from the probe: the other use, registering the CPU kernel for
packed weights (`backends/cpu/ops.py`), only matters once a weight is packed. On a CPU with AVX512-BF16 the
two parameters cover both branches; on one without, both run the non-repacking branch.
"""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")

#: The attribute Linear4bit.forward checks before repacking (and keep_4bit_weights_unpacked clears).
SWITCH = "support_avx512bf16_for_cpu"


@pytest.fixture(params=["this-cpu", "no-avx512bf16"])
def cpu_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """`no-avx512bf16`: layers built in this test see bitsandbytes' probe answer False."""
    if request.param == "no-avx512bf16":
        import bitsandbytes.nn.modules as modules

        monkeypatch.setattr(modules, "has_avx512bf16", lambda: False)
    return str(request.param)


def _layer() -> Any:
    torch.manual_seed(0)
    return bnb.nn.Linear4bit(64, 64, bias=False, quant_type="nf4", compute_dtype=torch.float32).to("cpu")


def _would_repack(layer: Any, cpu_path: str) -> bool:
    """bitsandbytes' own answer for this layer (see the module docstring)."""
    assert hasattr(layer, SWITCH), (
        f"bitsandbytes {bnb.__version__} has no Linear4bit.{SWITCH}: the repacking switch moved, and "
        "modeling.keep_4bit_weights_unpacked no longer turns it off; read Linear4bit.forward again")
    repacks = bool(getattr(layer, SWITCH))
    if cpu_path == "no-avx512bf16":
        assert not repacks
    else:
        from bitsandbytes.functional import has_avx512bf16

        assert repacks == bool(has_avx512bf16())
    return repacks


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


def test_evaluation_leaves_weights_trainable(cpu_path: str) -> None:
    from finetune_trainer.modeling import keep_4bit_weights_unpacked

    expected = _input_gradient(_layer())  # a layer never evaluated
    layer = _layer()
    repacks = _would_repack(layer, cpu_path)
    wrapper = torch.nn.Sequential(layer, torch.nn.Linear(64, 64))
    # Where bitsandbytes would repack, the guard turns the switch off on the one 4-bit layer; where it would
    # not, the switch is already off and the guard reports that it touched nothing.
    assert keep_4bit_weights_unpacked(wrapper) == (1 if repacks else 0)
    assert getattr(layer, SWITCH) is False
    before = layer.weight.data.clone()
    out = _evaluate(layer)
    assert torch.isfinite(out).all()
    assert not _packed(layer)
    assert torch.equal(layer.weight.data, before)
    grad = _input_gradient(layer)
    assert grad is not None and torch.allclose(grad, expected, atol=1e-5)


def test_no_4bit_layers_is_a_no_op() -> None:
    from finetune_trainer.modeling import keep_4bit_weights_unpacked

    assert keep_4bit_weights_unpacked(torch.nn.Sequential(torch.nn.Linear(64, 64))) == 0


def test_without_the_guard(cpu_path: str) -> None:
    """What the trainer guards against. Where bitsandbytes repacks, evaluation packs the weight and the
    gradients afterwards are wrong; where it does not, evaluation leaves the weight and the gradients alone
    (so the guard being a no-op there loses nothing)."""
    layer = _layer()
    repacks = _would_repack(layer, cpu_path)
    expected = _input_gradient(_layer())
    before = layer.weight.data.clone()
    _evaluate(layer)
    grad = _input_gradient(layer)
    if repacks:
        assert _packed(layer)
        assert grad is None or not torch.allclose(grad, expected, atol=1e-5)
    else:
        assert not _packed(layer)
        assert torch.equal(layer.weight.data, before)
        assert grad is not None and torch.allclose(grad, expected, atol=1e-5)
