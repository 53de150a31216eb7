"""The DPO objective (`finetune_trainer.objectives.dpo`) against TRL 1.16's `DPOTrainer`, the benchmark peer.

TRL is driven through its public API: a `DPOTrainer` built from `DPOConfig` on a tiny `datasets.Dataset` of
text pairs (TRL tokenizes them and adds the EOS), its own collator (`trainer.data_collator`) builds the batch,
`trainer.compute_loss` computes the loss, `trainer.log` publishes the batch's metrics (`logps/chosen`,
`logps/rejected`, `rewards/margins`, `rewards/accuracies`: means over the batch; per pair from one-pair
batches) and `trainer.compute_ref_log_probs` the reference's per-pair log-probabilities. Our side takes TRL's
token ids as `PairEncoded` (after checking they are what tokenizing the prompt and the response + EOS apart
gives) and computes with the same model object, so the two differ only in how they compute.

Tolerances: the losses agree within 1e-5 (relative above 1: ipo's loss is about 25 at beta 0.1). A
log-probability is a float32 sum of about 40 token log-probabilities (-180 to -260 here) on both sides,
computed in a different order (TRL's chunked online logsumexp, our gather - logsumexp of `logits_to_keep`);
one float32 ulp there is 1.5e-5, so they are compared within 1e-5 plus 2 float32 epsilons of their size
(`_logp_close`). Measured on the 2-core CI machine (the test prints it; `pytest -rP -k equal_trl`): loss
differences of at most 1.0e-6 (sigmoid) and 7.6e-6 (ipo, loss 25.006: 4 ulps), log-probabilities, policy and
reference, at most 3.05e-5 (2 ulps).

Methods: LoRA (peft on the tiny model, B set non-zero so policy and reference differ; reference = adapter
off on both sides), QLoRA (the same on a 4-bit nf4 base on the CPU; TRL casts the adapter to bf16 for
quantized bases, it is cast back to float32 as our qlora method keeps it) and full (TRL with a separate
reference model, a copy; ours with the reference log-probabilities precomputed before the policy moved).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")

from finetune_trainer import dataset as ds  # noqa: E402
from finetune_trainer.errors import ConfigError, DataError  # noqa: E402
from finetune_trainer.objectives import dpo  # noqa: E402

PAIRS = 4
BETA = 0.1
LOSS_TOLERANCE = 1e-5
LORA_KWARGS = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear",
               "task_type": "CAUSAL_LM"}


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def texts(healthcare_sample: Any) -> dict[str, list[str]]:
    """Four instruction rows as text pairs: chosen the reference answer, rejected the next row's answer (a
    fluent answer to another question)."""
    with open(healthcare_sample.train, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()][:PAIRS]
    return {"prompt": [ds.instruction_prompt(r) for r in rows],
            "chosen": [r["output"] for r in rows],
            "rejected": [rows[(i + 1) % PAIRS]["output"] for i in range(PAIRS)]}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def _load(tiny_model_dir: Path, quantized: bool = False) -> Any:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if not quantized:
        return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.uint8)
    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), quantization_config=quantization,
                                                device_map={"": "cpu"}, dtype=torch.float32)


def _trainer(model: Any, tokenizer: Any, texts: dict[str, list[str]], loss: str, out: Path,
             peft: bool = False, ref_model: Any = None) -> Any:
    from datasets import Dataset
    from peft import LoraConfig

    args = trl.DPOConfig(output_dir=str(out), report_to="none", use_cpu=True, bf16=False,
                         gradient_checkpointing=False, per_device_train_batch_size=PAIRS, loss_type=[loss],
                         beta=BETA, seed=0)
    return trl.DPOTrainer(model=model, args=args, train_dataset=Dataset.from_dict(texts), processing_class=tokenizer,
                          ref_model=ref_model, peft_config=LoraConfig(**LORA_KWARGS) if peft else None)


def _pairs(trainer: Any, tokenizer: Any, texts: dict[str, list[str]]) -> list[dpo.PairEncoded]:
    """TRL's token ids as our pairs, checked to be the separate tokenizations of prompt and response + EOS
    (what the preference encoder produces), so both sides see the same tokens."""
    pairs = []
    for i in range(PAIRS):
        row = trainer.train_dataset[i]
        pair = dpo.PairEncoded(row["prompt_ids"], row["chosen_ids"], row["rejected_ids"])
        ids = [tokenizer(texts[key][i], add_special_tokens=False)["input_ids"] for key in ("prompt", "chosen",
                                                                                            "rejected")]
        eos = [tokenizer.eos_token_id]
        assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) == (ids[0], ids[1] + eos, ids[2] + eos), i
        pairs.append(pair)
    return pairs


def _trl_step(trainer: Any, examples: list[dict[str, Any]]) -> dict[str, float]:
    """TRL's loss and logged batch metrics on the batch its collator builds from `examples`."""
    batch = trainer.data_collator(examples)
    loss = trainer.compute_loss(trainer.model, batch)
    trainer.log({})
    return {**trainer.state.log_history[-1], "loss": float(loss)}


def _logp_close(ours: Any, theirs: Any) -> float:
    """Max |ours - theirs|, asserted within 1e-5 + 2 float32 ulps of the values (see the module docstring)."""
    ours_t, theirs_t = torch.as_tensor(ours, dtype=torch.float64), torch.as_tensor(theirs, dtype=torch.float64)
    diff = (ours_t - theirs_t).abs()
    bound = 1e-5 + 2 * torch.finfo(torch.float32).eps * theirs_t.abs()
    assert bool((diff <= bound).all()), f"log-probs differ by {diff.tolist()} (bound {bound.tolist()})"
    return float(diff.max())


def _ulps(ours: Any, theirs: Any) -> float:
    """Max |ours - theirs| in float32 ulps of theirs (for the printed report)."""
    theirs_t = torch.as_tensor(theirs, dtype=torch.float32).reshape(-1)
    spacing = torch.nextafter(theirs_t.abs(), torch.tensor(float("inf"))) - theirs_t.abs()
    diff = (torch.as_tensor(ours, dtype=torch.float64).reshape(-1) - theirs_t.double()).abs()
    return float((diff / spacing.double()).max())


def _loss_bound(value: float) -> float:
    """1e-5, relative above 1 (ipo's loss is about 1 / (2 beta) squared = 25 at beta 0.1, and it amplifies the
    log-probabilities' float32 rounding by 2 |delta - 1 / (2 beta)| / tokens; measured: up to 7.6e-6)."""
    return LOSS_TOLERANCE * max(1.0, abs(value))


def _perturb(model: Any, names: str | None, seed: int) -> None:
    """Seeded noise on the parameters whose name contains `names` (all when None): the policy moves away
    from its reference as training would move it."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if (names is None or names in name) and param.is_floating_point():
                param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * 0.05)


def _setup(method: str, loss: str, tiny_model_dir: Path, tokenizer: Any, texts: dict[str, list[str]],
           out: Path) -> tuple[Any, Any, dpo.Reference, list[dpo.PairEncoded]]:
    """(TRL trainer, the policy both sides use, our reference, the pairs) for `method`."""
    from finetune_trainer.methods.qlora import keep_4bit_weights_unpacked

    if method == "full":
        policy = _load(tiny_model_dir)
        reference = _load(tiny_model_dir)
        trainer = _trainer(policy, tokenizer, texts, loss, out, ref_model=reference)
        pairs = _pairs(trainer, tokenizer, texts)
        # Ours: the reference log-probabilities computed once before training, from the policy itself.
        table = dpo.precompute_reference(trainer.model, pairs, 3, tokenizer.pad_token_id, "cpu")
        _perturb(trainer.model, None, seed=1)
        return trainer, trainer.model, dpo.PrecomputedReference(table), pairs
    trainer = _trainer(_load(tiny_model_dir, quantized=method == "qlora"), tokenizer, texts, loss, out, peft=True)
    model = trainer.model
    if method == "qlora":
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()  # TRL's bf16 cast undone: our qlora keeps adapters in fp32
        keep_4bit_weights_unpacked(model)
    _perturb(model, "lora_B", seed=1)
    return trainer, model, dpo.AdapterReference(), _pairs(trainer, tokenizer, texts)


# ------------------------------------------------------------------------------------------------
# Equality with TRL
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_loss_and_logps_equal_trl(method: str, loss: str, tiny_model_dir: Path, tokenizer: Any,
                                  texts: dict[str, list[str]], tmp_path: Path) -> None:
    trainer, model, reference, pairs = _setup(method, loss, tiny_model_dir, tokenizer, texts, tmp_path)
    examples = [trainer.train_dataset[i] for i in range(PAIRS)]
    model.train()  # both sides in training mode (TRL turned dropout off; the objective does too)
    objective = dpo.DpoObjective(dpo.DpoSettings(beta=BETA, loss=loss), reference)
    objective.prepare(model)

    # The same batch: our layout is TRL's (chosen rows, then rejected), labels where its completion mask is.
    ours = dpo.collate_pairs(pairs, tokenizer.pad_token_id)
    theirs = trainer.data_collator(examples)
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    assert torch.equal(ours["labels"] != dpo.IGNORE_INDEX, theirs["completion_mask"].bool())

    trl_batch = _trl_step(trainer, examples)
    step = objective.loss(model, ours, "cpu", len(pairs))
    loss_diff = abs(float(step.loss) - trl_batch["loss"])
    assert loss_diff <= _loss_bound(trl_batch["loss"]), (float(step.loss), trl_batch["loss"])
    assert step.loss.requires_grad

    # Per-pair policy log-probabilities (one-pair TRL batches) and reference log-probabilities.
    policy = dpo.pair_logps(model, ours, "cpu")
    trl_pairs = [_trl_step(trainer, [example]) for example in examples]
    logp_diff = max(_logp_close(policy.chosen, [m["logps/chosen"] for m in trl_pairs]),
                    _logp_close(policy.rejected, [m["logps/rejected"] for m in trl_pairs]),
                    _logp_close(policy.chosen.mean(), trl_batch["logps/chosen"]),
                    _logp_close(policy.rejected.mean(), trl_batch["logps/rejected"]))
    ref_chosen, ref_rejected = reference.logps(model, ours, "cpu")
    ref_model = trainer.ref_model if trainer.ref_model is not None else model
    trl_ref_chosen, trl_ref_rejected = trainer.compute_ref_log_probs(ref_model, theirs)
    ref_diff = max(_logp_close(ref_chosen, trl_ref_chosen), _logp_close(ref_rejected, trl_ref_rejected))
    assert not torch.allclose(policy.chosen, ref_chosen), "policy and reference must differ for a real test"

    # Rewards: the margin and accuracy TRL logs for the batch, from the objective's sums and from evaluate.
    assert float(step.metrics["reward_margin"]) / PAIRS == pytest.approx(trl_batch["rewards/margins"], abs=1e-5)
    assert float(step.metrics["preference_accuracy"]) / PAIRS == trl_batch["rewards/accuracies"]
    assert float(step.metrics["logps_chosen"]) / PAIRS == pytest.approx(trl_batch["logps/chosen"], rel=1e-6)
    evaluation = dpo.evaluate_pairs(model, pairs, reference, objective.settings, 3, tokenizer.pad_token_id, "cpu")
    assert evaluation.margin == pytest.approx(trl_batch["rewards/margins"], abs=1e-5)
    assert evaluation.accuracy == trl_batch["rewards/accuracies"]
    assert abs(evaluation.loss - trl_batch["loss"]) <= _loss_bound(trl_batch["loss"])
    ulps = max(_ulps(policy.chosen, [m["logps/chosen"] for m in trl_pairs]),
               _ulps(policy.rejected, [m["logps/rejected"] for m in trl_pairs]),
               _ulps(ref_chosen, trl_ref_chosen), _ulps(ref_rejected, trl_ref_rejected))
    print(f"{method}/{loss}: loss {trl_batch['loss']:.6g} |diff| {loss_diff:.3g}; max |logp diff| {logp_diff:.3g} "
          f"(policy), {ref_diff:.3g} (reference), at most {ulps:.0f} float32 ulps")


# Two AdamW steps (lr 1e-2, no clipping) of LoRA and QLoRA on the tiny model with the sigmoid loss on the four
# pairs in one batch: the loss before each step and after the second. Obtained by this module (the test prints
# them: `pytest -rP -k golden`) and cross-checked in the same test against TRL taking the same two steps from
# the same adapter. Before the first step the adapter is zero (B = 0): the policy is its reference, loss ln 2.
GOLDEN_TWO_STEPS = {"lora": (math.log(2), 0.598854, 0.415044), "qlora": (math.log(2), 0.598960, 0.493407)}


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_golden_two_steps_sigmoid(method: str, tiny_model_dir: Path, tokenizer: Any, texts: dict[str, list[str]],
                                  tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    from finetune_trainer.methods.qlora import keep_4bit_weights_unpacked

    quantized = method == "qlora"
    trainer = _trainer(_load(tiny_model_dir, quantized), tokenizer, texts, "sigmoid", tmp_path, peft=True)
    pairs = _pairs(trainer, tokenizer, texts)
    examples = [trainer.train_dataset[i] for i in range(PAIRS)]
    ours = get_peft_model(_load(tiny_model_dir, quantized), LoraConfig(**LORA_KWARGS))
    with torch.no_grad():  # the same initial adapter (A random, B zero) on both sides, in float32
        theirs_params = dict(trainer.model.named_parameters())
        for name, param in ours.named_parameters():
            if param.requires_grad:
                theirs_params[name].data = theirs_params[name].data.float()  # undo TRL's bf16 cast (qlora)
                param.copy_(theirs_params[name])
    for model in (ours, trainer.model):
        keep_4bit_weights_unpacked(model)
    objective = dpo.DpoObjective(dpo.DpoSettings(beta=BETA), dpo.AdapterReference())
    objective.prepare(ours)

    def run(model: Any, loss_of: Any) -> list[float]:
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for _ in range(2):
            loss = loss_of(model)
            losses.append(float(loss))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss_of(model)))
        return losses

    batch = dpo.collate_pairs(pairs, tokenizer.pad_token_id)
    our_losses = run(ours, lambda m: objective.loss(m, batch, "cpu", PAIRS).loss)
    trl_losses = run(trainer.model, lambda m: trainer.compute_loss(m, trainer.data_collator(examples)))
    print(f"{method}: our losses {our_losses}, TRL {trl_losses}")
    assert our_losses == pytest.approx(trl_losses, abs=LOSS_TOLERANCE)
    assert our_losses == pytest.approx(GOLDEN_TWO_STEPS[method], abs=LOSS_TOLERANCE)
    assert our_losses[2] < our_losses[0]


# ------------------------------------------------------------------------------------------------
# Pieces on hand-made numbers and the stored reference
# ------------------------------------------------------------------------------------------------


def test_collate_layout_matches_trl_collator() -> None:
    """TRL's own docstring example: chosen rows then rejected rows, right-padded; labels on responses only."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    examples = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
                {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11]}]
    theirs = DataCollatorForPreference(pad_token_id=0)(examples)
    ours = dpo.collate_pairs([dpo.PairEncoded(**e) for e in examples], pad_id=0, pair_ids=[5, 9])
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    assert ours["labels"].tolist() == [[-100, -100, -100, 4, 5], [-100, -100, 9, -100, -100],
                                       [-100, -100, -100, 6, -100], [-100, -100, 10, 11, -100]]
    assert ours["position_ids"].tolist() == [[0, 1, 2, 3, 4]] * 4
    assert ours["pair_ids"].tolist() == [5, 9]
    assert ours["num_tokens"] == 5 + 3 + 4 + 4
    assert dpo.pair_length(dpo.PairEncoded(**examples[0])) == 5


def test_losses_and_metrics_on_hand_made_numbers() -> None:
    """sigmoid, ipo (per-token averages) and reference-free against the formulas in plain `math`."""
    policy = dpo.PairLogps(chosen=torch.tensor([-10.0, -20.0]), rejected=torch.tensor([-12.0, -18.0]),
                           chosen_tokens=torch.tensor([4, 5]), rejected_tokens=torch.tensor([2, 6]))
    ref_chosen, ref_rejected = torch.tensor([-11.0, -19.0]), torch.tensor([-11.5, -19.0])

    def logsigmoid(x: float) -> float:
        return -math.log1p(math.exp(-x))

    sigmoid = dpo.dpo_losses(policy, ref_chosen, ref_rejected, dpo.DpoSettings(beta=0.5))
    # pair 0: (-10 + 11) - (-12 + 11.5) = 1.5; pair 1: (-20 + 19) - (-18 + 19) = -2
    assert sigmoid.tolist() == pytest.approx([-logsigmoid(0.75), -logsigmoid(-1.0)], abs=1e-6)
    ipo = dpo.dpo_losses(policy, ref_chosen, ref_rejected, dpo.DpoSettings(beta=0.5, loss="ipo"))
    assert ipo.tolist() == pytest.approx([(1 / 4 - (-0.5) / 2 - 1) ** 2, (-1 / 5 - 1 / 6 - 1) ** 2], abs=1e-6)
    zero = dpo.ZeroReference().logps(None, {"pair_ids": torch.tensor([0, 1])}, "cpu")
    free = dpo.dpo_losses(policy, *zero, dpo.DpoSettings(beta=0.5, reference_free=True))
    assert free.tolist() == pytest.approx([-logsigmoid(0.5 * 2), -logsigmoid(0.5 * -2)], abs=1e-6)

    # Rewards: beta * (policy - reference); accuracy counts strictly positive margins (a tie is wrong).
    chosen = dpo.implicit_rewards(policy.chosen, ref_chosen, 0.5)
    assert chosen.tolist() == [0.5, -0.5]
    assert dpo.preference_metrics([1.0, 0.2, -0.5, 0.3], [0.5, 0.2, 0.1, -0.1]) == pytest.approx((0.5, 0.075))
    assert dpo.preference_metrics([], []) == (0.0, 0.0)
    correct, margin = dpo.preference_sums(torch.tensor([1.0, 0.2, -0.5]), torch.tensor([0.5, 0.2, 0.1]))
    assert (float(correct), float(margin)) == pytest.approx((1.0, -0.1))


def test_settings_refuse_bad_values() -> None:
    with pytest.raises(ConfigError, match=r"spec\.dpo\.beta"):
        dpo.DpoSettings(beta=0)
    with pytest.raises(ConfigError, match=r"spec\.dpo\.loss.*sigmoid, ipo"):
        dpo.DpoSettings(loss="hinge")  # type: ignore[arg-type]


def test_adapter_reference_is_the_untrained_policy(tiny_model_dir: Path, tokenizer: Any,
                                                   texts: dict[str, list[str]]) -> None:
    """With B = 0 the policy computes as the base: every margin is 0, accuracy 0 (ties), loss ln 2; with the
    adapter moved, the reference still is the base (the adapter is off only inside the reference pass)."""
    from peft import LoraConfig, get_peft_model

    base = _load(tiny_model_dir)
    pairs = [dpo.PairEncoded(tokenizer(p, add_special_tokens=False)["input_ids"],
                             tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id],
                             tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
             for p, c, r in zip(texts["prompt"], texts["chosen"], texts["rejected"], strict=True)]
    base_table = dpo.precompute_reference(base, pairs, 2, tokenizer.pad_token_id, "cpu")
    model = get_peft_model(base, LoraConfig(**LORA_KWARGS))
    settings = dpo.DpoSettings()
    before = dpo.evaluate_pairs(model, pairs, dpo.AdapterReference(), settings, 4, tokenizer.pad_token_id, "cpu")
    assert (before.accuracy, before.margin) == (0.0, 0.0)
    assert before.loss == pytest.approx(math.log(2), abs=1e-7)
    _perturb(model, "lora_B", seed=3)
    batch = dpo.collate_pairs(pairs, tokenizer.pad_token_id)
    chosen, rejected = dpo.AdapterReference().logps(model, batch, "cpu")
    torch.testing.assert_close(torch.stack([chosen, rejected], dim=1), base_table, rtol=0, atol=1e-5)
    after = dpo.evaluate_pairs(model, pairs, dpo.AdapterReference(), settings, 4, tokenizer.pad_token_id, "cpu")
    assert after.margin != 0.0
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)  # adapter back on


def test_precomputed_reference_round_trip(tiny_model_dir: Path, tokenizer: Any, tmp_path: Path) -> None:
    """Stored with the checkpoint and read on resume: the same table bit for bit, the same loss, refused for
    other pairs (naming the file and the field). Batch size does not change the table (padding is ignored)."""
    model = _load(tiny_model_dir).train()
    ids = tokenizer("Enoxaparin usual adult dose is 40 mg", add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    pairs = [dpo.PairEncoded(ids[:3 + i], [*ids[3 + i:], eos], [ids[0], eos]) for i in range(5)]
    table = dpo.precompute_reference(model, pairs, 2, tokenizer.pad_token_id, "cpu")
    assert table.shape == (5, 2) and table.dtype == torch.float32
    torch.testing.assert_close(dpo.precompute_reference(model, pairs, 5, tokenizer.pad_token_id, "cpu"), table,
                               rtol=0, atol=1e-5)
    assert model.training  # the pass restores the mode it found

    fingerprint = dpo.pairs_fingerprint(pairs)
    path = dpo.save_reference(tmp_path / "ckpt" / dpo.REFERENCE_FILE, table, fingerprint)
    loaded = dpo.load_reference(path, fingerprint)
    assert torch.equal(loaded, table)

    batch = dpo.collate_pairs([pairs[i] for i in (4, 1)], tokenizer.pad_token_id, pair_ids=[4, 1])
    settings = dpo.DpoSettings()
    first = dpo.DpoObjective(settings, dpo.PrecomputedReference(table)).loss(model, batch, "cpu", 2)
    resumed = dpo.DpoObjective(settings, dpo.PrecomputedReference(loaded)).loss(model, batch, "cpu", 2)
    assert float(first.loss.detach()) == float(resumed.loss.detach())
    assert float(first.loss.detach()) == pytest.approx(math.log(2), abs=1e-6)  # the model is its own reference here

    other = dpo.pairs_fingerprint([*pairs[:4], dpo.PairEncoded(ids[:2], ids[2:], [eos])])
    assert other != fingerprint
    with pytest.raises(DataError, match=rf"{dpo.REFERENCE_FILE}: field fingerprint .* does not match"):
        dpo.load_reference(path, other)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match=r"bad\.safetensors: cannot read"):
        dpo.load_reference(tmp_path / "bad.safetensors", fingerprint)


def test_registry() -> None:
    from finetune_trainer import objectives

    assert objectives.get("dpo") is dpo.DpoObjective
    assert objectives.get("sft").packable and not objectives.get("dpo").packable
    with pytest.raises(ValueError, match="no training objective 'kto'; known: sft, dpo"):
        objectives.get("kto")


def test_precomputed_reference_reads_by_pair_id() -> None:
    """A batch's reference rows are the table's rows of its pair ids (the plan's indices), in batch order."""
    reference = dpo.PrecomputedReference(torch.tensor([[-1.0, -2.0], [-3.0, -4.0]]))
    chosen, rejected = reference.logps(None, {"pair_ids": torch.tensor([1, 0])}, "cpu")
    assert chosen.tolist() == [-3.0, -1.0] and rejected.tolist() == [-4.0, -2.0]
    with pytest.raises(ValueError, match=r"\(pairs, 2\)"):
        dpo.PrecomputedReference(torch.zeros(3))
