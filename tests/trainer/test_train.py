"""Full, LoRA and QLoRA train the tiny model in-process; artifacts land in S3 and the adapter reloads.

Golden losses: the mean training loss of the last two of 6 optimizer steps, measured once with these
exact settings (seed 7, tiny model seed 0, the bundled sample) and pinned with an absolute tolerance of
2e-3. Runs are deterministic on one machine (bit-identical losses); the tolerance covers other CPUs,
whose vector units can order floating-point reductions differently. A change in data order, masking,
loss normalization, optimizer or schedule moves these numbers by far more than that.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator.contract import EXIT_GATES_FAILED, MARKER_NAME, REPORT_KEY
from tests.trainer import train_helpers as th

GOLDEN_TOLERANCE = 2e-3
#: The tiny model is randomly initialized: with its output head and final norm frozen, the logits cannot
#: grow past about +-1.3 and adapters on the decoder alone barely move the loss, so the adapter tests
#: also adapt lm_head (a target module like any other).
HEAD = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
#: method -> (spec overrides, golden final loss). Re-pinned when length grouping moved inside each optimizer
#: step (dataset.batch_plan): the steps now hold other examples, so their training losses differ.
#: QLoRA again when the trainer stopped bitsandbytes repacking 4-bit weights for CPU inference at the base
#: evaluation (modeling.keep_4bit_weights_unpacked): its later training steps had wrong gradients.
#: LoRA and QLoRA again when training computed logits only at supervised positions (`train.step_loss`): the
#: same loss and gradients (test_selective_logits_give_the_same_loss_and_gradients), but LoRA's dropout on
#: lm_head's input now draws masks for the kept positions only, so every later mask differs.
#: QLoRA trains in bf16, so its golden depends most on the CPU's kernels: pinned on a CPU with AVX512-BF16;
#: with a CPU without it emulated here (bitsandbytes' has_avx512bf16 answering False, torch's bf16 matmuls
#: outside oneDNN, ATEN_CPU_CAPABILITY=avx2) the tail loss was 5.311941, 7e-4 from it; full and LoRA (fp32)
#: were 0 and 9e-5 away.
#: QLoRA again (5.303158 -> 5.304137) when the trainer's CPU runs took the fused loss (`fused_loss`: the same loss
#: summed in another order, bf16) and eager attention for short rows (`modeling.attention_implementation`); full
#: and LoRA (fp32) did not move. With ATEN_CPU_CAPABILITY=avx2 then: 5.304431, 3e-4 away (2026-12-07).
METHODS: dict[str, tuple[dict[str, Any], float]] = {
    "full": ({"method": "full", "hyperparameters": {"learningRate": 2e-3}}, 5.813086),
    "lora": ({"method": "lora", "hyperparameters": {"learningRate": 1e-2}, "lora": {"targetModules": HEAD}}, 5.312821),
    "qlora": ({"method": "qlora", "hyperparameters": {"learningRate": 1e-2, "precision": "bf16"},
               "lora": {"targetModules": HEAD}, "output": {"saveMerged": True}}, 5.304137),
}


@pytest.fixture(scope="module")
def staged(s3: Any, tiny_model_dir: Path, healthcare_sample: Any) -> th.Staged:
    return th.stage_in_new_bucket(s3, "train", tiny_model_dir, healthcare_sample)




@pytest.mark.parametrize("method", list(METHODS))
def test_method_trains_and_loss_falls(method: str, s3_env: Any, staged: th.Staged, tmp_path: Path) -> None:
    overrides, golden = METHODS[method]
    config = th.make_config(staged, overrides)
    outcome = th.run_in_process(config)
    store = th.store(config.spec.output.uri)
    losses = th.losses(store.read_bytes("metrics.jsonl").decode())
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    first, tail = (losses[1] + losses[2]) / 2, th.tail_loss(losses)
    assert tail < first - 0.05, losses
    evaluation = outcome.evaluation
    assert evaluation.tuned.eval_loss < evaluation.base.eval_loss
    print(f"{method}: golden tail loss {tail:.6f}")
    assert tail == pytest.approx(golden, abs=GOLDEN_TOLERANCE)
    assert store.is_complete("")
    if method == "qlora":
        _check_merged(store, staged, tmp_path)


def _check_merged(store: Any, staged: th.Staged, tmp: Path) -> None:
    """merged/ is a plain 16-bit model (no peft, no 4-bit) whose outputs differ from the base's."""
    import torch
    from transformers import AutoModelForCausalLM

    from finetune_trainer.storage import Store

    merged_dir = store.download_prefix("merged", tmp / "merged")
    base_dir = Store.for_uri(staged.model_uri).download_prefix("", tmp / "base")
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir))
    base = AutoModelForCausalLM.from_pretrained(str(base_dir))
    assert not any("lora" in name for name, _ in merged.named_parameters())
    ids = torch.tensor([[1, 40, 41, 42]])
    with torch.no_grad():
        assert (merged(ids).logits - base(ids).logits).abs().max() > 1e-3


def test_lora_artifacts_reload_and_generate(s3_env: Any, staged: th.Staged, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from finetune_trainer import train

    seen: dict[str, bool] = {}
    original = train.Run._train

    def spy(self: Any, per_rank: int, total: int) -> Any:
        # compliance.provenanceRequired: provenance.json is in the output before the first step
        seen["provenance_before_training"] = self.store.exists("provenance.json")
        return original(self, per_rank, total)

    monkeypatch.setattr(train.Run, "_train", spy)
    config = th.make_config(staged, {"compliance": {"provenanceRequired": True}, "hyperparameters": {"packing": True},
                                     "serving": {"adapterName": "tiny"}})
    outcome = th.run_in_process(config)
    assert seen == {"provenance_before_training": True}
    store = th.store(config.spec.output.uri)
    keys = set(store.list(""))
    for key in ("model/adapter_model.safetensors", "model/adapter_config.json", "model/tokenizer.json",
                "metrics.jsonl", "evaluation.json", "provenance.json", "README.md", REPORT_KEY, MARKER_NAME):
        assert key in keys, key
    manifest = store.read_json(MARKER_NAME)
    assert {f["path"] for f in manifest["files"]} >= {"model/adapter_model.safetensors", "provenance.json",
                                                       "evaluation.json", "metrics.jsonl", "README.md"}
    report = store.read_json(REPORT_KEY)
    assert report["phase"] == "complete" and report["artifacts"]["model"].endswith("/model/")
    assert report["evaluation"]["base"]["evalLoss"] > report["evaluation"]["tuned"]["evalLoss"]
    assert json.loads(store.read_bytes("evaluation.json")) == report["evaluation"]
    provenance = store.read_json("provenance.json")
    assert staged.train_uri in json.dumps(provenance)
    metrics = [json.loads(line) for line in store.read_bytes("metrics.jsonl").decode().splitlines()]
    assert all(m["tokens_per_second"] > 0 and m["tokens"] > 0 for m in metrics if "loss" in m)
    assert outcome.artifacts["model"] == report["artifacts"]["model"]
    # The card's pictures (finetune_trainer/charts.py), next to it and linked relatively.
    assert report["artifacts"]["lossChart"] == store.child("loss.png")
    assert report["artifacts"]["evaluationChart"] == store.child("evaluation.png")
    card = store.read_bytes("README.md").decode()
    assert "](loss.png)" in card and "](evaluation.png)" in card
    # spec.serving: the manifests beside the model, named in the report (finetune_operator.serving)
    assert report["artifacts"]["servingLLMInferenceService"] == store.child("serving/llminferenceservice.yaml")
    assert report["artifacts"]["servingVllm"] == store.child("serving/vllm.yaml")
    llmisvc = yaml.safe_load(store.read_bytes("serving/llminferenceservice.yaml"))
    assert llmisvc["spec"]["model"]["lora"] == {"adapters": [{"name": "tiny", "uri": report["artifacts"]["model"]}],
                                                "maxRank": 16}
    assert "serving/vllm.yaml" in {f["path"] for f in manifest["files"]}

    # The adapter reloads with peft on the base model and generates.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_trainer.storage import Store

    adapter_dir = store.download_prefix("model", tmp_path / "adapter")
    base_dir = Store.for_uri(staged.model_uri).download_prefix("", tmp_path / "base")
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)), str(adapter_dir))
    prompt = tokenizer("### Instruction:\nWhat is the usual adult dose of this medication?\n\n", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
        with model.disable_adapter():
            base_logits = model(**prompt).logits
        tuned_logits = model(**prompt).logits
    assert out.shape[1] > prompt["input_ids"].shape[1]
    assert (tuned_logits - base_logits).abs().max() > 1e-3  # the trained adapter was saved, not zeros


def test_missed_gate_fails_the_run_naming_the_metric(s3_env: Any, staged: th.Staged) -> None:
    config = th.make_config(staged, {"hyperparameters": {"maxSteps": 2},
                                     "evaluation": {"gates": [{"metric": "evalLoss", "max": 0.01}]}})
    assert th.exit_code_in_process(config) == EXIT_GATES_FAILED
    store = th.store(config.spec.output.uri)
    report = store.read_json(REPORT_KEY)
    assert report["phase"] == "failed" and report["error"]["reason"] == "GatesFailed"
    assert "evalLoss" in report["error"]["message"]
    assert report["evaluation"]["gatesPassed"] is False
    assert store.exists("model/adapter_model.safetensors") and not store.exists(MARKER_NAME)


def test_precision_fallbacks() -> None:
    import torch

    from finetune_trainer.modeling import resolve_precision

    fp16_cpu = resolve_precision("fp16", "cpu")
    assert (fp16_cpu.mixed, fp16_cpu.base_dtype) == ("no", torch.float32)
    assert fp16_cpu.warning is not None and "fp32" in fp16_cpu.warning
    bf16_cpu = resolve_precision("bf16", "cpu")
    assert (bf16_cpu.mixed, bf16_cpu.base_dtype, bf16_cpu.warning) == ("bf16", torch.bfloat16, None)
    assert resolve_precision("fp32", "cpu").mixed == "no"


def test_full_fine_tuning_in_bf16_is_pure_bf16(tiny_model_dir: Path) -> None:
    """The model-size table's 7B full = 4x24GB needs bf16 weights, gradients and optimizer states."""
    import torch

    from finetune_trainer.modeling import full_weights_dtype, load_base, resolve_precision

    assert full_weights_dtype(resolve_precision("bf16", "cpu")) == torch.bfloat16
    assert full_weights_dtype(resolve_precision("fp32", "cpu")) == torch.float32
    assert full_weights_dtype(resolve_precision("fp16", "cuda")) == torch.float32  # fp16 needs fp32 masters
    precision = resolve_precision("bf16", "cpu")
    model = load_base(tiny_model_dir, "full", precision, torch.device("cpu"), None)  # type: ignore[arg-type]
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("method", ["full", "lora"])
def test_selective_logits_give_the_same_loss_and_gradients(method: str, tiny_model_dir: Path,
                                                          healthcare_sample: Any) -> None:
    """`train.step_loss` with logits only at supervised positions equals transformers' loss on all of them:
    the same value and the same gradients (LoRA dropout off: its masks would differ in shape, not in law)."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_trainer import dataset as ds
    from finetune_trainer import train

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [json.loads(line) for line in healthcare_sample.train.read_text().splitlines()[:8]]
    encoded = [e for e in (ds.encode(r, "instruction", tokenizer, 128) for r in rows) if e is not None]
    batch = ds.collate(encoded[:4], tokenizer.pad_token_id or 0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=HEAD,
                                                 init_lora_weights=False))
    model.train()
    results = []
    for selective in (False, True):
        model.zero_grad(set_to_none=True)
        loss = train.step_loss(model, batch, "cpu", torch.tensor(37.0), selective, fused=False)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((float(loss), grads))
    (full_loss, full_grads), (sel_loss, sel_grads) = results
    kept = (batch["labels"][:, 1:] != ds.IGNORE_INDEX).any(dim=0).float().mean()
    assert kept < 0.9  # the batch has prompt positions to skip
    assert sel_loss == pytest.approx(full_loss, rel=1e-6)
    assert full_grads.keys() == sel_grads.keys() and full_grads
    for name, grad in full_grads.items():
        torch.testing.assert_close(sel_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
