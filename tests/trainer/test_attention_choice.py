"""The trainer's attention implementation: eager on CPU for short rows, SDPA otherwise (modeling.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from finetune_trainer import modeling
from finetune_trainer.errors import ConfigError

LIMIT = modeling.CPU_EAGER_ATTENTION_MAX_ROW


@pytest.mark.parametrize(("device", "longest", "expected"), [
    ("cpu", 1, "eager"),
    ("cpu", LIMIT, "eager"),
    ("cpu", LIMIT + 1, "sdpa"),
    ("cuda", 64, "sdpa"),
    ("cuda", 100_000, "sdpa"),
])
def test_rule(device: str, longest: int, expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(modeling.ENV_ATTENTION, raising=False)
    impl, why = modeling.attention_implementation(device, longest)
    assert impl == expected and why


@pytest.mark.parametrize("forced", ["sdpa", "eager"])
def test_environment_forces_one(forced: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(modeling.ENV_ATTENTION, forced)
    assert modeling.attention_implementation("cpu", 10)[0] == forced
    assert modeling.attention_implementation("cuda", 10)[0] == forced


def test_bad_environment_value_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(modeling.ENV_ATTENTION, "flash")
    with pytest.raises(ConfigError, match=r"FT_ATTENTION='flash'.*sdpa, eager or auto"):
        modeling.attention_implementation("cpu", 10)


def test_longest_row_of_examples_and_pairs() -> None:
    examples = [SimpleNamespace(input_ids=[1] * n) for n in (3, 9, 4)]
    assert modeling.longest_row(examples) == 9
    pairs = [SimpleNamespace(prompt_ids=[1] * 5, chosen_ids=[2] * 7, rejected_ids=[3] * 2),
             SimpleNamespace(prompt_ids=[1] * 2, chosen_ids=[2] * 1, rejected_ids=[3] * 11)]
    assert modeling.longest_row(pairs) == 13


def test_use_attention_switches_the_model_and_keeps_its_outputs(tiny_model_dir: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    monkeypatch.delenv(modeling.ENV_ATTENTION, raising=False)
    model: Any = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids, use_cache=False).logits
    assert modeling.use_attention(model, "cpu", [SimpleNamespace(input_ids=[0] * 16)]) == "eager"
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():
        after = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert modeling.use_attention(model, "cpu", [SimpleNamespace(input_ids=[0] * (LIMIT + 1))]) == "sdpa"
    assert model.config._attn_implementation == "sdpa"
