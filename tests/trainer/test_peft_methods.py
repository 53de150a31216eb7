"""Prefix tuning and prompt tuning (peft prompt learning) on the tiny model, end to end: they train with the
loss falling to a pinned golden loss, a preempted run resumes to the uninterrupted run's losses, the adapter
in model/ reloads with peft and generates, and the model card says how. Also the measured reasons behind
the spec's refusals (packing, gradient checkpointing with prefix), so a peft or transformers upgrade that
lifts them shows here.

Golden losses: the mean training loss of the last two of 6 optimizer steps (test_train.py's settings:
seed 7, tiny model seed 0, the bundled sample), pinned with test_train.py's absolute tolerance of 2e-3.
Resume: per-step losses equal the uninterrupted run's within test_resume.py's 1e-4.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import pytest

from finetune_operator.contract import MARKER_NAME, REPORT_KEY
from finetune_operator.spec import ResolvedMethod
from finetune_trainer.methods import virtual
from tests.trainer import train_helpers as th

GOLDEN_TOLERANCE = 2e-3
RESUME_TOLERANCE = 1e-4
#: method -> (spec overrides, golden tail loss, least fall of the training loss). Both at the default
#: learning rate for virtual tokens (3e-2). Prefix with projection (its MLP is what a checkpoint must carry
#: beyond the saved adapter to resume exactly); prompt initialized from text.
#: The falls are small: the random tiny model predicts nearly uniformly (loss about ln 512 = 6.24) and its
#: frozen output head caps the logits (test_train.py adapts lm_head for that reason); virtual tokens in
#: front of a frozen model can only steer it a little. Measured: prefix 6.237 -> 6.174 in 6 steps, prompt
#: 6.242 -> 6.211; the base's loss differs by about 0.01 between these batches.
METHODS: dict[str, tuple[dict[str, Any], float, float]] = {
    "prefix": ({"method": "prefix", "prefix": {"virtualTokens": 8, "projection": True},
                "hyperparameters": {"learningRate": 3e-2}}, 6.173559, 0.05),
    "prompt": ({"method": "prompt", "prompt": {"virtualTokens": 8, "init": "text",
                                               "initText": "Answer the clinical question"},
                # checkpointing set: the plan would leave it off for the tiny model, and prompt tuning must train with it
                "hyperparameters": {"learningRate": 3e-2, "gradientCheckpointing": True}}, 6.210515, 0.02),
}


@pytest.fixture(scope="module")
def staged(s3: Any, tiny_model_dir: Path, healthcare_sample: Any) -> th.Staged:
    return th.stage_in_new_bucket(s3, "peft", tiny_model_dir, healthcare_sample)




def test_every_resolved_method_has_one_recipe() -> None:
    from finetune_trainer import methods

    assert set(methods.REGISTRY) == set(typing.get_args(ResolvedMethod))
    assert {m for m, r in methods.REGISTRY.items() if not r.mergeable and r.adapter} == {"prefix", "prompt"}


@pytest.mark.parametrize("method", list(METHODS))
def test_method_trains_and_the_adapter_reloads_and_generates(method: str, s3_env: Any, staged: th.Staged,
                                                             tmp_path: Path) -> None:
    overrides, golden, fall = METHODS[method]
    config = th.make_config(staged, overrides)
    assert config.gradient_checkpointing() is (method == "prompt")  # prefix: off by default
    outcome = th.run_in_process(config)
    store = th.store(config.spec.output.uri)
    losses = th.losses(store.read_bytes("metrics.jsonl").decode())
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    first, tail = (losses[1] + losses[2]) / 2, th.tail_loss(losses)
    assert tail < first - fall, losses
    evaluation = outcome.evaluation
    assert evaluation.tuned.eval_loss < evaluation.base.eval_loss
    print(f"{method}: golden tail loss {tail:.6f}; eval loss base {evaluation.base.eval_loss:.6f} "
          f"tuned {evaluation.tuned.eval_loss:.6f}")
    assert tail == pytest.approx(golden, abs=GOLDEN_TOLERANCE)
    assert store.is_complete("")
    keys = set(store.list(""))
    for key in ("model/adapter_model.safetensors", "model/adapter_config.json", "model/tokenizer.json",
                "checkpoints/step-6/model/prompt_encoder.safetensors", "README.md", MARKER_NAME):
        assert key in keys, key
    assert not any(k.startswith("merged/") for k in keys)

    # The base evaluation saw the base: the virtual tokens were switched off (random ones change the output).
    base_loss = _base_eval_loss(staged, tmp_path, config)
    assert evaluation.base.eval_loss == pytest.approx(base_loss, abs=1e-5)

    card = store.read_bytes("README.md").decode()
    assert "library_name: peft" in card and f"with {method} tuning by" in card
    assert "PeftModel.from_pretrained(base" in card and "cannot be merged" in card

    # model/ reloads with peft on the base model (inference form) and generates; the trained tokens count.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_trainer.storage import Store

    adapter_dir = store.download_prefix("model", tmp_path / "adapter")
    base_dir = Store.for_uri(staged.model_uri).download_prefix("", tmp_path / "base")
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)), str(adapter_dir))
    model.eval()
    prompt = tokenizer("### Instruction:\nWhat is the usual adult dose of this medication?\n\n### Response:\n",
                       return_tensors="pt")
    with torch.no_grad():
        out = virtual.generate(model, **prompt, max_new_tokens=8)
        tuned_logits = model(**prompt).logits
        with model.disable_adapter():
            base_logits = model(**prompt).logits
    length = prompt["input_ids"].shape[1]
    assert length < out.shape[1] <= length + 8
    assert torch.equal(out, _greedy_by_forward_passes(model, prompt["input_ids"], 8)[:, :out.shape[1]])
    if out.shape[1] < length + 8:
        assert out[0, -1].item() == tokenizer.eos_token_id  # stopped at the end of the answer
    assert (tuned_logits[:, -1] - base_logits[:, -1]).abs().max() > 1e-3


def _greedy_by_forward_passes(model: Any, ids: Any, steps: int) -> Any:
    """Greedy decoding the slow, obviously right way: peft's training forward over the whole text each step."""
    import torch

    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def _base_eval_loss(staged: th.Staged, tmp: Path, config: Any) -> float:
    """The test set's mean token loss under the plain base model, as the trainer computes it."""
    import torch
    from transformers import AutoModelForCausalLM

    from finetune_trainer import modeling
    from finetune_trainer.inputs import load_inputs
    from finetune_trainer.storage import Store
    from finetune_trainer.train import mean_loss

    base_dir = Store.for_uri(staged.model_uri).download_prefix("", tmp / "plain-base")
    tokenizer = modeling.load_tokenizer(base_dir)
    inputs = load_inputs(config, tokenizer, tmp / "cache")
    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    loss = mean_loss(model, inputs.test, config.spec.hyperparameters.batch_size, tokenizer.pad_token_id,
                     torch.device("cpu"))
    assert loss is not None
    return loss


RESUME_SPEC: dict[str, Any] = {"hyperparameters": {"maxSteps": 8}, "checkpoint": {"everySteps": 3, "keep": 3},
                               "evaluation": {"enabled": False}}


@pytest.mark.parametrize("method", list(METHODS))
def test_preempted_run_resumes_to_the_uninterrupted_losses(method: str, s3_env: Any, staged: th.Staged,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from finetune_trainer import train

    spec = th._merge(METHODS[method][0], RESUME_SPEC)
    reference_config = th.make_config(staged, spec)
    th.run_in_process(reference_config)
    reference = th.losses(th.store(reference_config.spec.output.uri).read_bytes("metrics.jsonl").decode())
    assert sorted(reference) == list(range(1, 9))

    config = th.make_config(staged, spec)
    with monkeypatch.context() as patch:
        # SIGTERM as the loop sees it, after step 4: checkpoint, then Preempted (exit 143 in a pod).
        patch.setattr(train.Run, "_stop_agreed", lambda self, flag: self.state.step >= 4)
        with pytest.raises(train.Preempted):
            th.run_in_process(config)
    store = th.store(config.spec.output.uri)
    assert store.is_complete("checkpoints/step-4") and not store.exists(MARKER_NAME)
    outcome = th.run_in_process(config)
    assert outcome.resumed_from == 4 and outcome.state.step == 8
    resumed = th.losses(store.read_bytes("metrics.jsonl").decode())
    assert sorted(resumed) == sorted(reference)
    for step, loss in reference.items():
        assert resumed[step] == pytest.approx(loss, abs=RESUME_TOLERANCE), f"step {step}"


# ------------------------------------------------------------------------------------------------
# Why the spec refuses some combinations (peft 0.21, transformers 5): measured, not assumed.
# ------------------------------------------------------------------------------------------------


def _peft_config(method: str) -> Any:
    from peft import PrefixTuningConfig, PromptTuningConfig

    if method == "prefix":
        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)


@pytest.mark.parametrize("method", list(METHODS))
def test_virtual_tokens_break_packed_rows(method: str, tiny_model_dir: Path) -> None:
    """A packed row keeps its examples apart by position ids that restart at 0 (dataset.collate). With
    virtual tokens the second example no longer computes as it does alone: spec refuses packing."""
    import warnings

    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    first, second = [1, 40, 41, 42], [1, 50, 51, 52, 53]
    packed = torch.tensor([first + second])
    positions = torch.tensor([list(range(len(first))) + list(range(len(second)))])
    alone = torch.tensor([second])
    offset = 4 if method == "prompt" else 0  # prompt tuning prepends its tokens to the output too

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    base.config.use_cache = False  # as modeling.load_base: a KV cache turns the packed-row masks off too
    with torch.no_grad():
        plain = (base(input_ids=packed, position_ids=positions).logits[0, len(first):]
                 - base(input_ids=alone).logits[0]).abs().max()
    assert plain < 1e-4  # the base keeps packed examples apart

    torch.manual_seed(0)
    model = get_peft_model(base, _peft_config(method)).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mixed = (model(input_ids=packed, position_ids=positions).logits[0, offset + len(first):]
                 - model(input_ids=alone).logits[0, offset:]).abs().max()
    assert mixed > 1e-2, f"{method} with packing now keeps examples apart: the spec's refusal can be lifted"


@pytest.mark.parametrize("method", list(METHODS))
def test_own_generate_decodes_as_forward_passes_do_and_peft_generate_does_not(method: str,
                                                                               tiny_model_dir: Path) -> None:
    """virtual.generate (which the evaluation uses) equals greedy decoding by full forward passes, alone and in
    a left-padded batch, and is the base's generation under as_base; peft's own generate does not (peft 0.21.2
    with transformers 5.24: a prefix is ignored, prompt tokens are re-inserted at each step). When this last
    assertion fails, peft has been fixed and the model card's warning can go."""
    import warnings

    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    base.config.use_cache = False
    torch.manual_seed(0)
    model = virtual.use_own_generate(get_peft_model(base, _peft_config(method))).eval()
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.mul_(20)  # random tokens that matter
    texts = ["### Instruction:\nWhat\n\n### Response:\n",
             "### Instruction:\nWhat is the usual adult dose of this medication?\n\n### Response:\n"]
    config = GenerationConfig(max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    singles = []
    for text in texts:
        one = tokenizer([text], return_tensors="pt")
        out = model.generate(**one, generation_config=config)
        assert torch.equal(out, _greedy_by_forward_passes(model, one["input_ids"], 10)), text
        singles.append(out[0, -10:])
    batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
    batched = model.generate(**batch, generation_config=config)
    assert all(torch.equal(batched[i, -10:], singles[i]) for i in range(len(texts)))
    with virtual.as_base(model):
        off = model.generate(**batch, generation_config=config)
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).generate(**batch, generation_config=config)
    assert torch.equal(off, plain)
    one = tokenizer([texts[1]], return_tensors="pt")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_out = type(model).generate(model, **one, generation_config=config)  # peft's own
    assert not torch.equal(peft_out, _greedy_by_forward_passes(model, one["input_ids"], 10))


def test_peft_refuses_prefix_tuning_with_gradient_checkpointing(tiny_model_dir: Path) -> None:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(ValueError, match="gradient checkpointing"):
        get_peft_model(model, _peft_config("prefix"))


@pytest.mark.parametrize("method", list(METHODS))
def test_two_machines_train_it_data_parallel(method: str, s3_env: dict[str, str], staged: th.Staged,
                                             tmp_path: Path) -> None:
    """Several nodes: DDP over a c10d rendezvous (FSDP is only for `full`), as test_distributed.py does for
    LoRA; every process's virtual tokens get the same averaged gradients and the checkpoint resumes them."""
    spec = th._merge(METHODS[method][0], {"hyperparameters": {"maxSteps": 4}, "checkpoint": {"everySteps": 2},
                                          "evaluation": {"maxExamples": 2}})
    config = th.make_config(staged, spec)
    procs, _ = th.launch_machines(config, tmp_path, s3_env)
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out.decode(errors="replace")[-4000:]
    store = th.store(config.spec.output.uri)
    report = store.read_json(REPORT_KEY)
    assert report["phase"] == "complete" and report["worldSize"] == 2
    assert store.read_json("checkpoints/step-4/trainer_state.json")["world_size"] == 2
    assert "checkpoints/step-4/model/prompt_encoder.safetensors" in set(store.list("checkpoints/step-4/"))
    assert sorted(th.losses(store.read_bytes("metrics.jsonl").decode())) == [1, 2, 3, 4]
    assert store.is_complete("") and store.exists("model/adapter_model.safetensors")
