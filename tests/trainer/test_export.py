"""Serving-ready exports (finetune_trainer/export.py, merge.py): the adapter names the served base, the saved
adapter reloads to the trained model's logits, merged/ (a streaming merge, tensor by tensor) computes as the
adapter does for LoRA and QLoRA, and equals peft's `merge_and_unload` tensor by tensor.

The merge tests build random adapters on the tiny model (no training); the run tests train LoRA (fp32) and
QLoRA (bf16, 4-bit base, on the CPU) for 3 steps once per module and read what they wrote. The adapters
target lm_head too: on the random tiny model that is what moves the logits (test_train.py), so the checks
compare models that differ from the base by far more than the tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from finetune_operator.contract import EXIT_CONFIG_ERROR, REPORT_KEY
from finetune_trainer import export, merge
from finetune_trainer.errors import MergeUnsupported
from tests.trainer import train_helpers as th

HEAD = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
RUN_SPEC: dict[str, Any] = {"hyperparameters": {"maxSteps": 3, "learningRate": 1e-2}, "checkpoint": {"everySteps": 3},
                            "lora": {"targetModules": HEAD}, "output": {"saveMerged": True}}
#: method -> spec overrides. QLoRA in bf16 as test_train.py trains it; its adapter names a served base.
RUNS: dict[str, dict[str, Any]] = {
    "lora": {"method": "lora"},
    "qlora": {"method": "qlora", "hyperparameters": {"precision": "bf16"},
              "serving": {"baseModelName": "tiny-org/tiny-llama"}},
}


# --- pure parts ------------------------------------------------------------------------------------


def test_streamed_files_read_back_as_safetensors(tmp_path: Path) -> None:
    """merge.py writes the safetensors format itself (header first, then one tensor at a time): what the
    library reads back is what was written, for the dtypes a model holds and a scalar."""
    import torch
    from safetensors import safe_open

    tensors = {"a.weight": torch.randn(3, 5, dtype=torch.bfloat16), "b.bias": torch.arange(7, dtype=torch.float32),
               "c": torch.tensor(2.5, dtype=torch.float16), "d.mask": torch.tensor([True, False, True])}
    names = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16", torch.bool: "BOOL"}
    infos = [merge.TensorInfo(k, names[t.dtype], tuple(t.shape), t.numel() * t.element_size()) for k, t in tensors.items()]
    path = tmp_path / "x.safetensors"
    with open(path, "wb") as out:
        out.write(merge.header_bytes(infos))
        for info in infos:
            merge._write_tensor(out, info, tensors[info.name])
    assert merge.read_header(path) == infos
    with safe_open(str(path), framework="pt") as fh:
        assert fh.metadata() == {"format": "pt"}
        for name, tensor in tensors.items():
            assert torch.equal(fh.get_tensor(name), tensor), name


@pytest.mark.parametrize(("dtypes", "scale", "expected"), [
    (["float32"], 0.5, 2.0**-12),  # the scale floors at 1
    (["float32", "bfloat16"], 20.0, 2.0**-4 * 20),  # the coarsest dtype decides
    (["float16", "float32"], 2.0, 2.0**-7 * 2),
])
def test_tolerance(dtypes: list[str], scale: float, expected: float) -> None:
    assert export.tolerance(dtypes, scale) == pytest.approx(expected)


# --- the streaming merge against peft ------------------------------------------------------------------


def _random_adapter(base_dir: Path, out: Path, dtype: Any, **lora: Any) -> Path:
    """A LoRA adapter with random B (peft starts B at zero) saved by peft, on the base loaded in `dtype`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype),
                           LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM", **lora))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    model.save_pretrained(str(out))
    return out


@pytest.mark.parametrize(("dtype_name", "max_shard_size", "lora"), [
    # fp32 base saved in several shards; the embeddings adapted too (peft then stores their base weights)
    ("float32", "100KB", {"target_modules": ["q_proj", "v_proj", "down_proj", "lm_head", "embed_tokens"]}),
    # bf16 base in one file; rank-stabilized scaling
    ("bfloat16", None, {"target_modules": HEAD, "use_rslora": True}),
])
def test_streaming_merge_equals_peft_merge_and_unload(tiny_model_dir: Path, tmp_path: Path, dtype_name: str,
                                                     max_shard_size: str | None, lora: dict[str, Any]) -> None:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, dtype_name)
    base_dir = tmp_path / "base"
    AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=dtype).save_pretrained(
        str(base_dir), **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    adapter = _random_adapter(base_dir, tmp_path / "adapter", dtype, **lora)
    base_shards = merge.base_files(base_dir)
    assert (len(base_shards) > 1) == (max_shard_size is not None)

    merged = merge.merge_adapter(base_dir, adapter, tmp_path / "merged")
    ours: dict[str, Any] = {}
    for name in merged.files:
        ours.update(load_file(str(tmp_path / "merged" / name)))
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype),
                                          str(adapter)).merge_and_unload().state_dict()
    assert set(ours) == set(reference)
    for name, tensor in reference.items():
        assert ours[name].dtype == tensor.dtype, name
        assert torch.equal(ours[name], tensor), (name, float((ours[name].float() - tensor.float()).abs().max()))
    assert len(merged.merged) == sum(1 for n in reference if n.endswith(".weight") and any(
        f"{t}." in n for t in lora["target_modules"]))

    # Written as transformers writes a (sharded) model, and loaded by it with the right dtype.
    assert len(merged.files) == len(base_shards)
    if len(base_shards) > 1:
        index = json.loads((tmp_path / "merged" / merge.INDEX_FILE).read_text())
        assert set(index["weight_map"]) == set(reference) and set(index["weight_map"].values()) == set(merged.files)
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["dtype"] == dtype_name and config["use_cache"] is True
    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).dtype == dtype
    # Held at once: one tensor, or one merged weight with its fp32 update, A and B; never the model (on the tiny
    # model lm_head's merge alone is a third to a half of it; bench/merge_memory_bench.py measures a larger one).
    total = sum(t.nbytes for t in reference.values())
    assert 0 < merged.peak_bytes <= merged.bound_bytes < total, (merged.peak_bytes, merged.bound_bytes, total)


def _tied_base(tiny_model_dir: Path, out: Path) -> Path:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(str(out))
    return out


@pytest.mark.parametrize(("case", "message"), [
    ("dora", "DoRA, which rescales"),
    ("tied-head", "ties to the input embeddings"),
    ("unknown-tensor", "is not a LoRA A/B matrix"),
    ("no-safetensors", "has no safetensors weights"),
])
def test_merge_refuses_what_it_cannot_merge_exactly(case: str, message: str, tiny_model_dir: Path,
                                                    tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    base_dir = tiny_model_dir
    if case == "dora":
        adapter = _random_adapter(base_dir, tmp_path / "adapter", torch.float32, target_modules=["q_proj"],
                                  use_dora=True)
    elif case == "tied-head":
        base_dir = _tied_base(tiny_model_dir, tmp_path / "tied")
        adapter = _random_adapter(base_dir, tmp_path / "adapter", torch.float32, target_modules=["lm_head"])
    else:
        adapter = _random_adapter(base_dir, tmp_path / "adapter", torch.float32, target_modules=["q_proj"])
    if case == "unknown-tensor":  # e.g. another tuner's vector saved next to the LoRA pairs
        tensors = load_file(str(adapter / merge.ADAPTER_WEIGHTS))
        tensors["base_model.model.model.layers.0.self_attn.q_proj.ia3_l"] = torch.ones(64)
        save_file(tensors, str(adapter / merge.ADAPTER_WEIGHTS))
    if case == "no-safetensors":
        base_dir = tmp_path / "bin"
        base_dir.mkdir()
        (base_dir / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    with pytest.raises(MergeUnsupported, match="MergeUnsupported") as err:
        merge.merge_adapter(base_dir, adapter, tmp_path / "merged")
    assert message in str(err.value) and "saveMerged" in str(err.value)
    assert not any((tmp_path / "merged").glob("*.safetensors"))


# --- trained runs ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def staged(s3: Any, tiny_model_dir: Path, healthcare_sample: Any) -> th.Staged:
    return th.stage_in_new_bucket(s3, "export", tiny_model_dir, healthcare_sample)


@pytest.fixture(scope="module")
def runs(s3: Any, staged: th.Staged) -> dict[str, Any]:
    """LoRA and QLoRA trained once for the module: method -> (config, outcome)."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in s3.env().items():
            patch.setenv(name, value)
        out = {}
        for method, overrides in RUNS.items():
            config = th.make_config(staged, th._merge(RUN_SPEC, overrides), name=f"export-{method}")
            out[method] = (config, th.run_in_process(config))
        return out


@pytest.mark.slow
@pytest.mark.parametrize("method", list(RUNS))
def test_adapter_names_the_served_base_and_reproduces_the_trained_logits(method: str, runs: dict[str, Any],
                                                                         s3_env: Any) -> None:
    config, _ = runs[method]
    store = th.store(config.spec.output.uri)
    assert store.is_complete("")
    adapter_config = json.loads(store.read_bytes("model/adapter_config.json"))
    assert adapter_config["base_model_name_or_path"] == config.spec.served_base_model_name()
    assert adapter_config["base_model_name_or_path"] == ("tiny-org/tiny-llama" if method == "qlora" else "model")
    assert adapter_config["r"] == config.spec.lora.r and adapter_config["target_modules"] == sorted(HEAD)

    report = store.read_json(REPORT_KEY)
    check = report["export"]
    print(f"{method}: export check {check}")
    assert check["prompts"] == export.PROMPTS and check["passed"] is True
    assert 0 <= check["adapterMaxAbsDiff"] <= check["tolerance"]
    assert 0 <= check["mergedMaxAbsDiff"] <= check["tolerance"]
    assert check["mergedCheck"] == "cpu float32"  # full precision: no GPU here, and the host has room
    assert check["mergePeakBytes"] > 0
    card = store.read_bytes("README.md").decode()
    assert "## Export checks" in card and f"{check['mergedMaxAbsDiff']:.3g}" in card


@pytest.mark.slow
@pytest.mark.parametrize("method", list(RUNS))
def test_merged_logits_equal_the_adapter_logits(method: str, runs: dict[str, Any], staged: th.Staged,
                                                s3_env: Any, tmp_path: Path) -> None:
    """Read back from the output: merged/ in fp32 against the adapter on the 16-bit base in fp32 (QLoRA's
    merge goes into the 16-bit base, not its 4-bit training copy), within the recorded tolerance, while both
    differ from the base by far more (the adapter changes the model)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune_trainer.storage import Store

    config, _ = runs[method]
    store = th.store(config.spec.output.uri)
    tolerance = store.read_json(REPORT_KEY)["export"]["tolerance"]
    merged_dir = store.download_prefix("merged", tmp_path / "merged")
    adapter_dir = store.download_prefix("model", tmp_path / "adapter")
    base_dir = Store.for_uri(staged.model_uri).download_prefix("", tmp_path / "base")
    assert not any("lora" in key or "4bit" in key for key in json.dumps(
        json.loads((merged_dir / "config.json").read_text())))
    prompts = [[1, 40, 41, 42, 43, 44], [1, 7, 300, 12]]
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    base_logits = export.logits(base, prompts, "cpu")
    adapter_logits = export.logits(PeftModel.from_pretrained(base, str(adapter_dir)), prompts, "cpu")
    merged_logits = export.logits(AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32),
                                  prompts, "cpu")
    assert export.max_abs_diff(merged_logits, adapter_logits) <= tolerance
    assert export.max_abs_diff(merged_logits, base_logits) > 5 * tolerance


@pytest.mark.slow
def test_an_export_that_does_not_reproduce_the_model_fails_without_the_marker(
        s3_env: Any, staged: th.Staged, monkeypatch: pytest.MonkeyPatch) -> None:
    """A saved adapter whose scaling is wrong (lora_alpha doubled after saving, as a broken export would
    write it): the reload check catches it, the output gets no marker, the report says why."""
    original = export.finish_adapter_config

    def broken(model_dir: Path, served_name: str) -> dict[str, Any]:
        config = original(model_dir, served_name)
        config["lora_alpha"] *= 2
        (model_dir / "adapter_config.json").write_text(json.dumps(config))
        return config

    monkeypatch.setattr(export, "finish_adapter_config", broken)
    config = th.make_config(staged, th._merge(RUN_SPEC, {"output": {"saveMerged": False}}), name="export-broken")
    assert th.exit_code_in_process(config) == EXIT_CONFIG_ERROR
    store = th.store(config.spec.output.uri)
    assert not store.is_complete("") and store.exists("model/adapter_model.safetensors")
    report = store.read_json(REPORT_KEY)
    assert report["phase"] == "failed" and report["error"]["reason"] == "ExportCheckFailed"
    check = report["export"]
    assert check["passed"] is False and check["adapterMaxAbsDiff"] > check["tolerance"]
    assert f"{check['adapterMaxAbsDiff']:.3g}" in report["error"]["message"]
    assert f"tolerance {check['tolerance']:.3g}" in report["error"]["message"]
