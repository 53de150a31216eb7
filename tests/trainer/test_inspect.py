"""The architecture read from a real model's files (finetune_operator.architecture) against torch's own count.

The models are written by finetune_trainer.tiny through transformers' save_pretrained, as any Hugging Face
checkpoint is; the reader sees only config.json and the safetensors headers.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune_operator.architecture import read_architecture


def torch_count(model_dir: Path) -> tuple[int, object]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    # parameters() yields a tied matrix once, as the count should
    return sum(p.numel() for p in model.parameters()), model.config


def test_tiny_model_parameter_count_equals_torch(tiny_model_dir: Path):
    arch = read_architecture(tiny_model_dir)
    count, config = torch_count(tiny_model_dir)
    assert arch.parameters == count
    assert arch.parameters_source == "safetensors headers"
    assert (arch.hidden_size, arch.layers, arch.vocab_size, arch.tied_embeddings) == (
        config.hidden_size, config.num_hidden_layers, config.vocab_size, False)


@pytest.mark.parametrize(("kv_heads", "tied"), [(2, True), (1, False)])
def test_gqa_and_tied_tiny_models_equal_torch(tmp_path: Path, kv_heads: int, tied: bool):
    from finetune_trainer.tiny import build_tiny_model

    model_dir = build_tiny_model(tmp_path, hidden_size=128, num_heads=4,
                                 num_kv_heads=kv_heads, tie_word_embeddings=tied, intermediate_size=192)
    arch = read_architecture(model_dir)
    count, _ = torch_count(model_dir)
    assert arch.parameters == count
    assert (arch.kv_heads, arch.tied_embeddings, arch.intermediate_size) == (kv_heads, tied, 192)
    # with the weights hidden, the config formula gives the same count
    (model_dir / "model.safetensors").rename(model_dir / "weights.bin")
    from_config = read_architecture(model_dir)
    assert (from_config.parameters, from_config.parameters_source) == (count, "config.json")
