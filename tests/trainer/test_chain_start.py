"""Where a chained stage starts (modeling.materialize_start): the base with the chain's adapters merged in, in order.

A stage chained to a LoRA job (spec.baseModel.fromJob; `TrainerConfig.base.adapters`) must start from exactly the
model the earlier stages produced. The reference is peft's own `merge_and_unload` of the same adapters on the same
base; the trainer's path is the streaming merge into the cache, then `modeling.load_base` on that directory as for
any base model. LoRA (fp32) must compute the reference's logits within float32 roundoff; QLoRA must quantize the
merged 16/32-bit model (so its 4-bit weights equal bitsandbytes' quantization of peft's merged model), not merge
into 4-bit weights. The adapters are random (B non-zero), on the tiny model, targeting lm_head too: on the random
tiny model that is what moves the logits, so a missed or misordered adapter shows far above the tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from finetune_operator.contract import TrainerConfig, resolve
from finetune_operator.sizing import plan
from finetune_operator.spec import BaseJobStatus, ChainStage, FineTuneJob
from finetune_trainer import modeling

TARGETS = ["q_proj", "v_proj", "down_proj", "lm_head"]


def _adapter(base_dir: Path, out: Path, seed: int, **lora: Any) -> Path:
    """A LoRA adapter saved by peft on the fp32 base, its B random (peft starts B at zero)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM", target_modules=TARGETS, **lora))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    model.save_pretrained(str(out))
    return out


def _config(base_dir: Path, adapters: list[Path], method: str = "lora") -> TrainerConfig:
    spec: dict[str, Any] = {
        "baseModel": {"uri": f"file://{base_dir}", "parameters": "1M"},
        "method": method, "dataset": {"train": "file:///tmp/unused.jsonl"},
        "hyperparameters": {"precision": "bf16" if method == "qlora" else "fp32"},
        "output": {"uri": "s3://unused/out/"},
    }
    job = FineTuneJob.model_validate({"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
                                      "metadata": {"name": "second"}, "spec": spec})
    base = BaseJobStatus(name="first", uid="u-1", phase="Succeeded", model_uri=f"file://{base_dir}",
                         adapters=[f"file://{a}" for a in adapters],
                         chain=[ChainStage(name="first", namespace="default", method="lora", output_uri="s3://o/")])
    return resolve(job, plan(job.spec)).model_copy(update={"base": base})


def _peft_merged(base_dir: Path, adapters: list[Path]) -> Any:
    """peft's merge: each adapter loaded onto the model so far and merged (merge_and_unload), in order."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    for adapter in adapters:
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return model.eval()


def _logits(model: Any, tokenizer: Any) -> Any:
    import torch

    batch = tokenizer(["The patient reports chest pain.", "Hypertension is treated with"], return_tensors="pt",
                      padding=True)
    with torch.no_grad():
        return model(**batch).logits.float()


def _load(config: TrainerConfig, start: modeling.StartingModel) -> Any:
    import torch

    precision = modeling.resolve_precision(config.spec.hyperparameters.precision, "cpu")
    model = modeling.load_base(start.path, config.method, precision, torch.device("cpu"), config)
    modeling.keep_4bit_weights_unpacked(model)
    return model.eval()


@pytest.fixture(scope="module")
def chain(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chain")
    return {"base": tiny_model_dir, "a": _adapter(tiny_model_dir, root / "adapter-a", seed=1),
            "b": _adapter(tiny_model_dir, root / "adapter-b", seed=2, use_rslora=True)}


@pytest.mark.parametrize("names", [["a"], ["a", "b"]])
def test_lora_stage_starts_from_peft_merge_and_unload(chain: dict[str, Path], tmp_path: Path,
                                                      names: list[str]) -> None:
    import torch

    adapters = [chain[n] for n in names]
    config = _config(chain["base"], adapters)
    start = modeling.materialize_start(config, tmp_path / "cache")
    assert start.path != chain["base"] and start.base_dir == chain["base"]
    tokenizer = modeling.load_tokenizer(start.path)  # the tokenizer files came along with the merged weights
    ours = _logits(_load(config, start), tokenizer)
    reference = _peft_merged(chain["base"], adapters)
    expected = _logits(reference, tokenizer)
    base = _logits(_peft_merged(chain["base"], []), tokenizer)
    scale = float(expected.abs().max())
    assert float((base - expected).abs().max()) > 100 * 4096 * torch.finfo(torch.float32).eps * scale  # adapters matter
    # float32 roundoff of logits of this scale (the merge equals peft's bit for bit: test_export.py)
    assert float((ours - expected).abs().max()) <= 64 * torch.finfo(torch.float32).eps * scale
    if len(names) == 2:  # the order matters: b merged before a is another model
        swapped = _logits(_peft_merged(chain["base"], adapters[::-1]), tokenizer)
        assert float((swapped - expected).abs().max()) > 0
    # provenance: each adapter with the sha256 of its files, in merge order
    from finetune_trainer.provenance import sha256_manifest, sha256_tree

    assert start.adapter_records() == [{"uri": f"file://{a}", "sha256": sha256_manifest(sha256_tree(a))}
                                       for a in adapters]
    assert start.base_files == sha256_tree(chain["base"])
    record = json.loads((start.path / modeling.CHAIN_RECORD).read_text())
    assert record["adapters"] == start.adapter_records()


def test_the_merge_is_cached_by_content(chain: dict[str, Path], tmp_path: Path) -> None:
    """The same base and adapters reuse the merged directory (a restarted pod, other local ranks); another adapter
    is another directory."""
    cache = tmp_path / "cache"
    first = modeling.materialize_start(_config(chain["base"], [chain["a"]]), cache)
    stamp = (first.path / "model.safetensors").stat().st_mtime_ns
    again = modeling.materialize_start(_config(chain["base"], [chain["a"]]), cache)
    assert again.path == first.path and (again.path / "model.safetensors").stat().st_mtime_ns == stamp
    other = modeling.materialize_start(_config(chain["base"], [chain["b"]]), cache)
    assert other.path != first.path
    assert sorted(p.name for p in (cache / modeling.CHAIN_CACHE).iterdir() if p.is_dir()) == sorted(
        [first.path.name, other.path.name])  # no staging directory left behind


def test_no_adapters_loads_the_base_itself(chain: dict[str, Path], tmp_path: Path) -> None:
    config = _config(chain["base"], [])
    start = modeling.materialize_start(config, tmp_path / "cache")
    assert start.path == start.base_dir == chain["base"] and start.adapter_records() == []
    unchained = config.model_copy(update={"base": None})
    assert modeling.materialize_start(unchained, tmp_path / "cache").path == chain["base"]


def test_a_qlora_stage_quantizes_the_merged_model(chain: dict[str, Path], tmp_path: Path) -> None:
    """QLoRA after a LoRA stage: the 4-bit weights are bitsandbytes' quantization of peft's merged model (the same
    bytes), so the earlier update is in the quantized model rather than rounded into 4-bit weights afterwards."""
    import torch

    config = _config(chain["base"], [chain["a"]], method="qlora")
    start = modeling.materialize_start(config, tmp_path / "cache")
    ours = _load(config, start)
    reference_dir = tmp_path / "peft-merged"
    _peft_merged(chain["base"], [chain["a"]]).save_pretrained(str(reference_dir))
    precision = modeling.resolve_precision("bf16", "cpu")
    theirs = modeling.load_base(reference_dir, "qlora", precision, torch.device("cpu"), config).eval()
    modeling.keep_4bit_weights_unpacked(theirs)
    q_ours = {n: p.data for n, p in ours.named_parameters() if p.__class__.__name__ == "Params4bit"}
    q_theirs = {n: p.data for n, p in theirs.named_parameters() if p.__class__.__name__ == "Params4bit"}
    assert q_ours and set(q_ours) == set(q_theirs)
    for name, data in q_ours.items():
        assert torch.equal(data, q_theirs[name]), name
    unmerged = modeling.load_base(chain["base"], "qlora", precision, torch.device("cpu"), config)
    name = next(n for n in q_ours if "q_proj" in n)  # an adapted matrix
    assert not torch.equal(dict(unmerged.named_parameters())[name].data, q_ours[name])  # the merge reached 4 bits
    tokenizer = modeling.load_tokenizer(start.path)
    assert torch.equal(_logits(ours, tokenizer), _logits(theirs, tokenizer))


def test_an_adapter_uri_without_an_adapter_names_the_base_job(chain: dict[str, Path], tmp_path: Path) -> None:
    from finetune_trainer.errors import ConfigError

    empty = tmp_path / "not-an-adapter"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"not-an-adapter \(status.baseJob.adapters of base job first\)"):
        modeling.materialize_start(_config(chain["base"], [empty]), tmp_path / "cache")
