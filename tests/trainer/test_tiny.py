"""The tiny Llama: deterministic, loads through the Auto classes, generates, and loads in 4-bit."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from finetune_trainer.tiny import build_tiny_model


def _hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_same_arguments_give_identical_files(tiny_model_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_model(tmp_path / "again")
    assert _hashes(again) == _hashes(tiny_model_dir)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(_hashes(again))


def test_seed_changes_weights_only(tiny_model_dir: Path, tmp_path: Path) -> None:
    other = _hashes(build_tiny_model(tmp_path / "seed1", seed=1))
    base = _hashes(tiny_model_dir)
    assert other["model.safetensors"] != base["model.safetensors"]
    assert other["tokenizer.json"] == base["tokenizer.json"]


def test_corpus_shapes_the_tokenizer(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    corpus = ["zebra quartz zebra quartz"] * 50
    custom = AutoTokenizer.from_pretrained(build_tiny_model(tmp_path / "custom", corpus=corpus))
    default = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(custom.tokenize(" zebra quartz")) < len(default.tokenize(" zebra quartz"))
    assert len(default.tokenize(" metformin hyperkalemia")) < len(custom.tokenize(" metformin hyperkalemia"))


@pytest.mark.parametrize("field", ["hidden_size", "intermediate_size", "vocab_size"])
def test_widths_must_be_multiples_of_64(field: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"{field}=96 must be a positive multiple of 64"):
        build_tiny_model(tmp_path, **{field: 96})  # type: ignore[arg-type]


def test_loads_with_auto_classes_and_generates(tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = model.config
    assert config.model_type == "llama"
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (64, 2, 512)
    assert len(tokenizer) <= config.vocab_size
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    assert tokenizer.pad_token_id == config.pad_token_id and tokenizer.eos_token_id == config.eos_token_id

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the usual adult dose of metformin?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert prompt.startswith("<s><|user|>\n") and prompt.endswith("<|assistant|>\n")
    encoded = tokenizer(prompt, return_tensors="pt")
    # byte-level BPE round-trips text exactly
    assert tokenizer.decode(encoded.input_ids[0]) == prompt
    with torch.no_grad():
        out = model.generate(**encoded, max_new_tokens=6, do_sample=False)
        again = model.generate(**encoded, max_new_tokens=6, do_sample=False)
    assert out.shape[1] > encoded.input_ids.shape[1]
    assert torch.equal(out, again)


def test_loads_in_4bit_and_generates(tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=quant, device_map="cpu")
    import bitsandbytes as bnb

    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, padding_side="left")
    batch = tokenizer(["<s><|user|>\nhi\n<|assistant|>\n", "<s>ICD-10-CM code"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
        out = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert logits.shape == (2, batch.input_ids.shape[1], 512)
    assert torch.isfinite(logits).all()
    assert out.shape[0] == 2 and out.shape[1] > batch.input_ids.shape[1]
