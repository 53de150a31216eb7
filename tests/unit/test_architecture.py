"""Table tests of finetune_operator.architecture: configs and safetensors headers of different shapes.

Every model here is written by the test: a config.json, and where the case needs weights, safetensors files
whose header lists the tensors. Large ones are sparse files (header, then a hole up to the size the header
promises), which also shows the reader never reads tensor bytes.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest

from finetune_operator.architecture import ArchitectureError, config_parameters, read_architecture

LLAMA2_7B = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 11008,
             "vocab_size": 32000, "num_attention_heads": 32, "num_key_value_heads": 32,
             "tie_word_embeddings": False, "torch_dtype": "float16"}
LLAMA3_8B = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336,
             "vocab_size": 128256, "num_attention_heads": 32, "num_key_value_heads": 8,
             "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
#: A small tied-embedding GQA model (Llama-3.2-1B's shape).
SMALL_TIED = {"model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 16, "intermediate_size": 8192,
              "vocab_size": 128256, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
              "tie_word_embeddings": True, "dtype": "bfloat16"}


def llama_tensors(config: dict[str, Any]) -> dict[str, list[int]]:
    """Tensor name -> shape of a Llama checkpoint of this config, as transformers saves it."""
    h, inter, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads", heads)
    hd = config.get("head_dim") or h // heads
    shapes = {"model.embed_tokens.weight": [v, h], "model.norm.weight": [h]}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": [heads * hd, h], p + "self_attn.k_proj.weight": [kv * hd, h],
                   p + "self_attn.v_proj.weight": [kv * hd, h], p + "self_attn.o_proj.weight": [h, heads * hd],
                   p + "mlp.gate_proj.weight": [inter, h], p + "mlp.up_proj.weight": [inter, h],
                   p + "mlp.down_proj.weight": [h, inter], p + "input_layernorm.weight": [h],
                   p + "post_attention_layernorm.weight": [h]}
    if not config.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = [v, h]
    return shapes


def write_safetensors(path: Path, shapes: dict[str, list[int]], dtype: str = "BF16") -> int:
    """A safetensors file with these tensors (2 bytes each element), its data a sparse hole; returns the count."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        size = math.prod(shape) * 2
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + offset)  # sparse: no tensor bytes are written, or read
    return sum(math.prod(s) for s in shapes.values())


def model_dir(tmp_path: Path, config: dict[str, Any], weights: bool = True) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(config))
    if weights:
        write_safetensors(tmp_path / "model.safetensors", llama_tensors(config))
    return tmp_path


# (config, exact parameters, layers, hidden, MLP, vocabulary, heads, KV heads, tied, dtype)
SHAPES = [
    pytest.param(LLAMA2_7B, 6_738_415_616, 32, 4096, 11008, 32000, 32, 32, False, "float16", id="llama2-7b-mha"),
    pytest.param(LLAMA3_8B, 8_030_261_248, 32, 4096, 14336, 128256, 32, 8, False, "bfloat16", id="llama3-8b-gqa"),
    pytest.param(SMALL_TIED, 1_235_814_400, 16, 2048, 8192, 128256, 32, 8, True, "bfloat16", id="small-tied"),
]


@pytest.mark.parametrize(("config", "parameters", "layers", "hidden", "mlp", "vocab", "heads", "kv", "tied", "dtype"),
                         SHAPES)
@pytest.mark.parametrize("weights", [True, False], ids=["safetensors", "config-only"])
def test_architecture_of_known_shapes(tmp_path, config, parameters, layers, hidden, mlp, vocab, heads, kv, tied,
                                      dtype, weights):
    arch = read_architecture(model_dir(tmp_path, config, weights))
    assert arch.parameters == parameters  # the published counts of these models
    assert arch.parameters_source == ("safetensors headers" if weights else "config.json")
    assert (arch.layers, arch.hidden_size, arch.intermediate_size, arch.vocab_size) == (layers, hidden, mlp, vocab)
    assert (arch.attention_heads, arch.kv_heads, arch.tied_embeddings, arch.dtype) == (heads, kv, tied, dtype)
    assert arch.kv_dim == kv * arch.head_dim and arch.q_dim == heads * arch.head_dim
    assert f"{parameters:,} parameters" in arch.describe()


def test_sharded_index_sums_every_shard(tmp_path):
    shapes = llama_tensors(LLAMA3_8B)
    names = list(shapes)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    total = 0
    for file, part in halves.items():
        total += write_safetensors(tmp_path / file, {n: shapes[n] for n in part})
    weight_map = {n: f for f, part in halves.items() for n in part}
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total * 2}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in LLAMA3_8B.items() if k != "torch_dtype"}))
    arch = read_architecture(tmp_path)
    assert arch.parameters == total == 8_030_261_248
    assert arch.parameters_source == "safetensors headers"
    assert arch.dtype == "bfloat16"  # from the headers, the config names none


def test_index_without_its_shards_counts_from_the_config(tmp_path):
    model_dir(tmp_path, LLAMA3_8B, weights=False)
    weight_map = {n: "model-00001-of-00004.safetensors" for n in llama_tensors(LLAMA3_8B)}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    arch = read_architecture(tmp_path)
    assert (arch.parameters, arch.parameters_source) == (8_030_261_248, "config.json")


def test_the_tensors_decide_when_they_differ_from_the_config_formula(tmp_path):
    shapes = llama_tensors(LLAMA2_7B)
    shapes["model.layers.0.self_attn.q_proj.bias"] = [4096]  # a bias the Llama formula does not count
    (tmp_path / "config.json").write_text(json.dumps(LLAMA2_7B))
    write_safetensors(tmp_path / "model.safetensors", shapes)
    assert read_architecture(tmp_path).parameters == 6_738_415_616 + 4096


def test_tie_is_read_from_the_tensors_when_the_config_does_not_say(tmp_path):
    config = {k: v for k, v in SMALL_TIED.items() if k != "tie_word_embeddings"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    write_safetensors(tmp_path / "model.safetensors", llama_tensors(SMALL_TIED))  # no lm_head.weight
    assert read_architecture(tmp_path).tied_embeddings is True


def test_nested_text_config_and_gpt2_names(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava", "torch_dtype": "float16",
                                                      "text_config": LLAMA2_7B | {"torch_dtype": None}}))
    arch = read_architecture(tmp_path)
    assert (arch.parameters, arch.dtype) == (6_738_415_616, "float16")
    gpt2 = {"n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": 3072, "vocab_size": 50257}
    (tmp_path / "config.json").write_text(json.dumps(gpt2))
    arch = read_architecture(tmp_path)
    assert (arch.hidden_size, arch.layers, arch.attention_heads, arch.intermediate_size) == (768, 12, 12, 3072)


def test_config_formula_counts_biases():
    plain = config_parameters(layers=2, hidden=64, intermediate=128, vocab=100, q_dim=64, kv_dim=32, tied=False)
    biased = config_parameters(layers=2, hidden=64, intermediate=128, vocab=100, q_dim=64, kv_dim=32, tied=False,
                               attention_bias=True, mlp_bias=True)
    assert biased - plain == 2 * ((64 + 2 * 32 + 64) + (2 * 128 + 64))


BROKEN = [
    ("config-missing", None, "config.json: no such file"),
    ("config-not-json", "{hidden", "config.json: not valid JSON"),
    ("no-hidden", {k: v for k, v in LLAMA2_7B.items() if k != "hidden_size"}, "field 'hidden_size' is missing"),
    ("no-vocab", {k: v for k, v in LLAMA2_7B.items() if k != "vocab_size"}, "field 'vocab_size' is missing"),
    ("negative-layers", LLAMA2_7B | {"num_hidden_layers": -1}, "field 'num_hidden_layers' must be a positive"),
    ("kv-not-dividing", LLAMA2_7B | {"num_key_value_heads": 5}, "field 'num_key_value_heads' (5) must divide"),
    ("tie-not-bool", LLAMA2_7B | {"tie_word_embeddings": "yes"}, "field 'tie_word_embeddings' must be true or false"),
]


@pytest.mark.parametrize(("config", "expected"), [pytest.param(c, e, id=i) for i, c, e in BROKEN])
def test_broken_configs_name_the_file_and_field(tmp_path, config, expected):
    if isinstance(config, dict):
        (tmp_path / "config.json").write_text(json.dumps(config))
    elif isinstance(config, str):
        (tmp_path / "config.json").write_text(config)
    with pytest.raises(ArchitectureError, match=r"config\.json") as err:
        read_architecture(tmp_path)
    assert expected in str(err.value)


def test_broken_safetensors_name_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA2_7B))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\x01\x02")
    with pytest.raises(ArchitectureError, match=r"model\.safetensors: shorter than the 8-byte header length"):
        read_architecture(tmp_path)
    weights.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(ArchitectureError, match="does not fit the file"):
        read_architecture(tmp_path)
    weights.write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(ArchitectureError, match="header is not valid JSON"):
        read_architecture(tmp_path)
    write_safetensors(weights, {"model.embed_tokens.weight": [32000, 4096]})
    with open(weights, "r+b") as fh:  # cut the file short: a partial download
        fh.truncate(weights.stat().st_size - 1)
    with pytest.raises(ArchitectureError, match="truncated download"):
        read_architecture(tmp_path)


def test_index_and_shards_that_disagree(tmp_path):
    model_dir(tmp_path, SMALL_TIED, weights=False)
    write_safetensors(tmp_path / "a.safetensors", {"model.norm.weight": [2048]})
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"model.norm.weight": "a.safetensors", "lm_head.weight": "b.safetensors"}}))
    with pytest.raises(ArchitectureError, match=r"shard 'b\.safetensors' named in 'weight_map' is not in"):
        read_architecture(tmp_path)
    index.write_text(json.dumps({"weight_map": {"model.norm.weight": "a.safetensors", "x.weight": "a.safetensors"}}))
    with pytest.raises(ArchitectureError, match=r"tensor 'x\.weight' is mapped to 'a\.safetensors'"):
        read_architecture(tmp_path)
    index.write_text(json.dumps({"weight_map": {"model.norm.weight": "../a.safetensors"}}))
    with pytest.raises(ArchitectureError, match="field 'weight_map'"):
        read_architecture(tmp_path)


def test_not_a_directory(tmp_path):
    with pytest.raises(ArchitectureError, match="not a directory"):
        read_architecture(tmp_path / "absent")
