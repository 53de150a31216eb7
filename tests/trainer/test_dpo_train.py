"""DPO through the real trainer (`train.Run`): the tiny model, the bundled preference pairs, a local S3 server.

Golden losses: the training loss of the first optimizer steps of each method, recorded from these runs
(seed 7, tiny model seed 0, healthcare_preference_train.jsonl) and pinned with an absolute tolerance of
2e-3 (as test_train.py: other CPUs may order float reductions differently). Cross-check: at step 1 the policy
is its reference (LoRA's adapter starts at zero; full's reference is the starting weights, precomputed),
so every pair's log-ratio margin is 0 and the loss is exactly log(2) = 0.693147 for sigmoid and
(1 / (2 beta))^2 for ipo (25 at beta 0.1): asserted below before the golden values, which pin the steps after
it (the data order, the loss normalization over the step's pairs and the optimizer).
"""

from __future__ import annotations

import json
import math
import secrets
from pathlib import Path
from typing import Any

import pytest

from finetune_operator.contract import MARKER_NAME
from tests.trainer import train_helpers as th
from tests.trainer.test_train import HEAD

GOLDEN_TOLERANCE = 2e-3
DATA = Path(__file__).resolve().parents[2] / "trainer-image" / "finetune_trainer" / "data"

#: A short DPO run: 4 steps of 2 x 2 pairs, a checkpoint every 2 steps (with the DPO loss on 5% of the pairs
#: held out as validation), the demo's test pairs for the preference metrics, no generation (no instruction
#: test set).
DPO_SPEC: dict[str, Any] = {
    "objective": "dpo",
    "dataset": {"format": "preference", "validationSplit": 0.05},
    "hyperparameters": {"maxSteps": 4, "batchSize": 2, "gradientAccumulationSteps": 2},
    "checkpoint": {"everySteps": 2, "keep": 3},
    "evaluation": {"testSet": None, "glossary": None},
}
METHODS: dict[str, dict[str, Any]] = {
    "lora": {"method": "lora", "hyperparameters": {"learningRate": 1e-2}, "lora": {"targetModules": HEAD}},
    "qlora": {"method": "qlora", "hyperparameters": {"learningRate": 1e-2, "precision": "bf16"},
              "lora": {"targetModules": HEAD}},
    "full": {"method": "full", "hyperparameters": {"learningRate": 2e-3}},
    "lora-ipo": {"method": "lora", "hyperparameters": {"learningRate": 1e-2}, "lora": {"targetModules": HEAD},
                 "dpo": {"loss": "ipo"}},
}


@pytest.fixture(scope="module")
def staged(s3: Any, tiny_model_dir: Path, healthcare_sample: Any) -> th.Staged:
    staged = th.stage_in_new_bucket(s3, "dpo", tiny_model_dir, healthcare_sample)
    client = s3.client()
    for name in ("healthcare_preference_train.jsonl", "healthcare_preference_test.jsonl"):
        client.upload_file(str(DATA / name), staged.bucket, f"data/{name}")
    return staged


def dpo_config(staged: th.Staged, extra: dict[str, Any] | None = None, *, held_out: bool = True) -> Any:
    spec = th._merge(DPO_SPEC, {"dataset": {"train": f"s3://{staged.bucket}/data/healthcare_preference_train.jsonl"}})
    if held_out:
        spec["evaluation"]["preferenceTestSet"] = f"s3://{staged.bucket}/data/healthcare_preference_test.jsonl"
    # make_config points evaluation at the instruction sample; DPO_SPEC clears it (no generated answers).
    return th.make_config(staged, th._merge(spec, extra or {}))


def metrics(store: Any) -> list[dict[str, Any]]:
    return [json.loads(line) for line in store.read_bytes("metrics.jsonl").decode().splitlines()]


def first_step_loss(spec: dict[str, Any]) -> float:
    """The loss at policy == reference: log(2) for sigmoid, (1 / (2 beta))^2 for ipo."""
    dpo = spec.get("dpo") or {}
    if dpo.get("loss") == "ipo":
        return (1 / (2 * dpo.get("beta", 0.1))) ** 2
    return math.log(2)


def losses_of(store: Any) -> dict[int, float]:
    return th.losses(store.read_bytes("metrics.jsonl").decode())


#: method -> golden losses of steps 2..4 (step 1 is log 2 by construction, asserted on its own).
#: Recorded from these runs on a CPU with AVX512-BF16 (qlora trains in bf16: the most CPU-dependent).
GOLDEN: dict[str, list[float]] = {"lora": [0.668091, 0.593313, 0.625095], "qlora": [0.669506, 0.597941, 0.628464],
                                  "full": [0.65266, 0.605944, 0.615975], "lora-ipo": [24.87442, 24.369688, 24.514189]}


@pytest.mark.parametrize("method", list(METHODS))
def test_dpo_trains_with_golden_losses(method: str, s3_env: Any, staged: th.Staged, capsys: Any) -> None:
    config = dpo_config(staged, METHODS[method])
    outcome = th.run_in_process(config)
    store = th.store(config.spec.output.uri)
    records = metrics(store)
    losses = losses_of(store)
    assert sorted(losses) == [1, 2, 3, 4]
    # Policy == reference at step 1: every margin is 0, the loss is log(2) (up to padding-dependent float
    # rounding of the precomputed reference for full: the table was computed in other batches).
    assert losses[1] == pytest.approx(first_step_loss(METHODS[method]), abs=1e-5)
    steps = [r for r in records if "loss" in r]
    assert all({"preference_accuracy", "reward_margin", "reward_chosen", "logps_chosen"} <= set(r) for r in steps)
    assert steps[0]["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all({"eval_preference_accuracy", "eval_reward_margin"} <= set(r) for r in evals)
    evaluation = outcome.evaluation
    for scores in (evaluation.base, evaluation.tuned):
        assert scores.preference_pairs == 50 and 0 <= scores.preference_accuracy <= 1
        assert scores.reward_margin is not None and scores.accuracy is None
    assert store.is_complete("")
    card = store.read_bytes("README.md").decode()
    loss = (METHODS[method].get("dpo") or {}).get("loss", "sigmoid")
    assert "preference accuracy (held-out pairs)" in card and "| objective | dpo |" in card
    assert f"| DPO loss / beta | {loss} / 0.1 |" in card
    assert json.loads(store.read_bytes("evaluation.json"))["tuned"]["preferenceAccuracy"] == \
        evaluation.tuned.preference_accuracy
    with capsys.disabled():
        print(f"\n{method}: losses {[round(losses[s], 6) for s in sorted(losses)]}; held-out preference "
              f"accuracy {evaluation.base.preference_accuracy:.3f} -> {evaluation.tuned.preference_accuracy:.3f}, "
              f"margin {evaluation.base.reward_margin:.4f} -> {evaluation.tuned.reward_margin:.4f}")
    assert [losses[s] for s in (2, 3, 4)] == pytest.approx(GOLDEN[method], abs=GOLDEN_TOLERANCE)


def _weights(store: Any, tmp: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    local = store.download_prefix("model", tmp)
    tensors: dict[str, Any] = {}
    for path in sorted(local.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    assert tensors
    return tensors


#: Steps 1-2 before the interruption, 3-4 after: bit-identical on one machine; the tolerance is test_peft_methods'.
RESUME_TOLERANCE = 1e-4


@pytest.mark.parametrize("method", ["full", "lora"])
def test_interrupted_dpo_run_resumes_to_the_uninterrupted_one(method: str, s3_env: Any, staged: th.Staged,
                                                              monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """full: the reference table is computed once, before the first step, stored in every checkpoint and read
    back on resume (precompute_reference is not called again); lora: the reference is the adapter-off model."""
    from finetune_trainer import train
    from finetune_trainer.objectives import dpo

    calls: list[int] = []
    original = dpo.precompute_reference

    def counting(model: Any, pairs: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(len(pairs))
        return original(model, pairs, *args, **kwargs)

    monkeypatch.setattr(dpo, "precompute_reference", counting)
    spec = th._merge(METHODS[method], {"evaluation": {"enabled": False}})
    uninterrupted = dpo_config(staged, spec, held_out=False)
    th.run_in_process(uninterrupted)
    precomputed = 1 if method == "full" else 0
    assert len(calls) == precomputed
    if method == "full":  # every training pair and every validation pair (5% of 199), once
        assert calls == [199]

    config = dpo_config(staged, spec, held_out=False)
    with monkeypatch.context() as patch:
        # SIGTERM as the loop sees it, after step 2: checkpoint, then Preempted (exit 143 in a pod).
        patch.setattr(train.Run, "_stop_agreed", lambda self, flag: self.state.step >= 2)
        with pytest.raises(train.Preempted):
            th.run_in_process(config)
    store = th.store(config.spec.output.uri)
    assert store.is_complete("checkpoints/step-2") and not store.exists(MARKER_NAME)
    assert store.exists(f"checkpoints/step-2/{dpo.REFERENCE_FILE}") == (method == "full")
    assert len(calls) == 2 * precomputed

    outcome = th.run_in_process(config)
    assert outcome.resumed_from == 2 and outcome.state.step == 4
    assert len(calls) == 2 * precomputed, "the resumed run recomputed the reference instead of loading it"
    expected, resumed = losses_of(th.store(uninterrupted.spec.output.uri)), losses_of(store)
    assert sorted(resumed) == sorted(expected) == [1, 2, 3, 4]
    for step, loss in expected.items():
        assert resumed[step] == pytest.approx(loss, abs=RESUME_TOLERANCE), f"step {step}"
    a, b = _weights(th.store(uninterrupted.spec.output.uri), tmp_path / "a"), _weights(store, tmp_path / "b")
    assert sorted(a) == sorted(b)
    for name in a:
        assert (a[name].float() - b[name].float()).abs().max() <= 1e-6, name


def test_resume_refuses_a_checkpoint_without_the_stored_reference(s3: Any, s3_env: Any, staged: th.Staged,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Recomputing the reference from trained weights would silently change the objective: refused, named."""
    from finetune_trainer import train
    from finetune_trainer.objectives import dpo

    spec = th._merge(METHODS["full"], {"evaluation": {"enabled": False}, "hyperparameters": {"maxSteps": 2},
                                       "checkpoint": {"everySteps": 1}})
    config = dpo_config(staged, spec, held_out=False)
    with monkeypatch.context() as patch:
        patch.setattr(train.Run, "_stop_agreed", lambda self, flag: self.state.step >= 1)
        with pytest.raises(train.Preempted):
            th.run_in_process(config)
    bucket, _, prefix = config.spec.output.uri[len("s3://"):].partition("/")
    s3.client().delete_object(Bucket=bucket, Key=f"{prefix}checkpoints/step-1/{dpo.REFERENCE_FILE}")
    from finetune_trainer.errors import DataError

    with pytest.raises(DataError, match=f"step-1 has no {dpo.REFERENCE_FILE}"):
        th.run_in_process(config)


def test_lora_dpo_raises_held_out_preference_accuracy(s3_env: Any, staged: th.Staged, capsys: Any) -> None:
    """The demo's claim, on its data: a short LoRA DPO run (100 steps of 8 pairs, about 4 epochs of the 199
    pairs) makes the model prefer the grounded answers of pairs it never trained on
    (healthcare_preference_test.jsonl) more often than the base does, with a higher mean margin.

    Seen on the 2-core machine: accuracy 0.52 -> 0.60, margin -0.395 -> +0.030. The tiny model is random, so it
    knows no facts: the training pairs are learned (their batch accuracy reaches 1.0) far better than they
    generalize; shorter runs moved held-out accuracy by one or two pairs of 50 (20 steps at 1e-2: 0.52 ->
    0.52; 75 steps at 3e-3: 0.52 -> 0.56) while the margin rose in all of them. After an SFT stage (the demo's
    chain) the model has the facts to prefer."""
    spec = th._merge(METHODS["lora"], {
        "hyperparameters": {"maxSteps": 100, "batchSize": 8, "gradientAccumulationSteps": 1, "learningRate": 5e-3},
        "checkpoint": {"everySteps": 100}, "dataset": {"validationSplit": None}})
    config = dpo_config(staged, spec)
    evaluation = th.run_in_process(config).evaluation
    base, tuned = evaluation.base, evaluation.tuned
    with capsys.disabled():
        print(f"\nLoRA DPO, 100 steps: held-out preference accuracy {base.preference_accuracy:.3f} -> "
              f"{tuned.preference_accuracy:.3f}, reward margin {base.reward_margin:.4f} -> {tuned.reward_margin:.4f} "
              f"({tuned.preference_pairs} pairs)")
    assert tuned.preference_pairs == base.preference_pairs == 50
    assert tuned.preference_accuracy > base.preference_accuracy
    assert tuned.reward_margin > base.reward_margin + 0.2


def _bad_pairs(s3: Any, staged: th.Staged) -> str:
    """Two good pairs, then (line 3) a pair whose answers are the same text."""
    good = {"prompt": "Define fever.", "chosen": "A raised body temperature.", "rejected": "A low body temperature."}
    bad = {"prompt": "Define cough.", "chosen": "A reflex that clears the airways.",
           "rejected": " A reflex that clears the airways. "}
    body = "\n".join(json.dumps(row) for row in (good, good, bad)) + "\n"
    key = f"data/bad-pairs-{secrets.token_hex(3)}.jsonl"
    s3.client().put_object(Bucket=staged.bucket, Key=key, Body=body.encode())
    return f"s3://{staged.bucket}/{key}"


def test_a_bad_pair_fails_the_run_naming_its_line(s3: Any, s3_env: Any, staged: th.Staged) -> None:
    from finetune_operator.contract import EXIT_CONFIG_ERROR, REPORT_KEY

    uri = _bad_pairs(s3, staged)
    config = dpo_config(staged, th._merge(METHODS["lora"], {"dataset": {"train": uri, "validationSplit": None}}),
                        held_out=False)
    assert th.exit_code_in_process(config) == EXIT_CONFIG_ERROR
    error = th.store(config.spec.output.uri).read_json(REPORT_KEY)["error"]
    assert f"{uri} line 3" in error["message"] and "'chosen' and 'rejected' are the same text" in error["message"]


def test_preflight_counts_pairs_and_refuses_a_bad_pair(s3: Any, s3_env: Any, staged: th.Staged,
                                                       tmp_path: Path) -> None:
    from finetune_trainer import modeling, preference_data, preflight
    from finetune_trainer.dataset import read_file

    config = dpo_config(staged, METHODS["lora"])
    result, code = preflight.run(config, cache=tmp_path / "cache")
    assert code == 0, result.error
    splits = {s.field: s for s in result.splits}
    assert set(splits) == {"spec.dataset.train", "spec.evaluation.preferenceTestSet"}
    train = splits["spec.dataset.train"]
    # Against the pairs tokenized here (every row: fewer than the sampling threshold)
    tokenizer = modeling.load_tokenizer(staged_model(staged, tmp_path))
    rows, _ = read_file(DATA / "healthcare_preference_train.jsonl", "train")
    stats = preference_data.pair_stats(preference_data.tokenize_pair(r.data, "instruction", tokenizer) for r in rows)
    assert (train.format, train.pairs, train.examples) == ("preference", 199, 199)
    assert train.tokens == stats.tokens and train.tokens_per_pair == pytest.approx(stats.tokens_per_pair, abs=1e-3)
    assert train.length_bias == pytest.approx(stats.length_bias, abs=1e-3)
    assert splits["spec.evaluation.preferenceTestSet"].pairs == 50

    uri = _bad_pairs(s3, staged)
    config = dpo_config(staged, th._merge(METHODS["lora"], {"dataset": {"train": uri}}), held_out=False)
    result, code = preflight.run(config, cache=tmp_path / "cache")
    assert code != 0 and result.error is not None and result.error.reason == "DataInvalid"
    assert f"{uri} line 3" in result.error.message and "same text" in result.error.message


def staged_model(staged: th.Staged, tmp: Path) -> Path:
    from finetune_trainer.storage import Store

    return Store.for_uri(staged.model_uri).download_prefix("", tmp / "model")


def test_dpo_inputs_take_validation_and_held_out_pairs_by_the_rules(s3_env: Any, staged: th.Staged,
                                                                    tiny_model_dir: Path, tmp_path: Path) -> None:
    """Validation: dataset.validation, else validationSplit, else none. Held-out pairs: preferenceTestSet, else
    the validation pairs, else 5% of the training pairs held out of training. sft + preferenceTestSet: pairs too."""
    from finetune_trainer import modeling
    from finetune_trainer.inputs import load_inputs

    tokenizer = modeling.load_tokenizer(tiny_model_dir)
    total = 199

    def inputs(config: Any) -> Any:
        return load_inputs(config, tokenizer, tmp_path / "cache")

    given = inputs(dpo_config(staged))  # validationSplit 0.05 and the test pairs
    assert (len(given.train), len(given.validation), len(given.preference_test)) == (total - 10, 10, 50)
    assert given.objective == "dpo" and given.stats().train_examples == total - 10 and given.test == []

    from_validation = inputs(dpo_config(staged, held_out=False))
    assert from_validation.preference_test == from_validation.validation and len(from_validation.validation) == 10

    held = inputs(dpo_config(staged, {"dataset": {"validationSplit": None}}, held_out=False))
    assert (len(held.train), len(held.validation), len(held.preference_test)) == (total - 10, 0, 10)
    assert not set(map(id, held.preference_test)) & set(map(id, held.train))
    trained = {(tuple(p.prompt_ids), tuple(p.chosen_ids)) for p in held.train}
    assert not any((tuple(p.prompt_ids), tuple(p.chosen_ids)) in trained for p in held.preference_test)

    with_test_set = inputs(dpo_config(staged, {"evaluation": {"testSet": staged.test_uri}}))
    # evaluation.maxExamples rows; their token loss counts those with an answer token within maxSeqLength
    assert len(with_test_set.eval_items) == 4 and 0 < len(with_test_set.test) <= 4
    assert len(with_test_set.preference_test) == 50

    sft = inputs(th.make_config(staged, {"evaluation": {
        "preferenceTestSet": f"s3://{staged.bucket}/data/healthcare_preference_test.jsonl"}}))
    assert sft.objective == "sft" and len(sft.preference_test) == 50 and len(sft.eval_items) == 4


def test_two_processes_train_dpo_as_one_does(s3_env: dict[str, str], staged: th.Staged, tmp_path: Path) -> None:
    """Full DPO with its precomputed reference on two CPU processes (DDP, gloo) against one process with
    twice the accumulation: each optimizer step holds the same 8 pairs (dataset.batch_plan's windows, sharded),
    so with the step's pairs all-reduced as the loss's weight, and the metrics summed over ranks, the losses and
    the logged preference metrics agree."""
    from finetune_operator.contract import REPORT_KEY

    spec = th._merge(METHODS["full"], {"evaluation": {"enabled": False}, "dataset": {"validationSplit": None}})
    two = dpo_config(staged, spec, held_out=False)
    env = th.trainer_env(two, tmp_path, s3_env, FT_NUM_MACHINES="1", FT_PROCS_PER_MACHINE="2")
    proc = th.launch(env)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out.decode(errors="replace")[-4000:]
    store = th.store(two.spec.output.uri)
    assert store.read_json(REPORT_KEY)["worldSize"] == 2
    assert store.exists(f"checkpoints/step-4/{'reference_logps.safetensors'}")

    one = dpo_config(staged, th._merge(spec, {"hyperparameters": {"gradientAccumulationSteps": 4}}), held_out=False)
    th.run_in_process(one)
    expected = [r for r in metrics(th.store(one.spec.output.uri)) if "loss" in r]
    got = [r for r in metrics(store) if "loss" in r]
    assert [r["step"] for r in got] == [r["step"] for r in expected] == [1, 2, 3, 4]
    for a, b in zip(got, expected, strict=True):
        for key in ("loss", "reward_margin", "reward_chosen", "logps_chosen"):
            assert a[key] == pytest.approx(b[key], abs=1e-4, rel=1e-5), (a["step"], key)
        # Not at step 1: policy == reference there, so every margin is 0 up to the float rounding of the
        # micro-batch's padding (the table was computed in other batches), and its sign is noise.
        if a["step"] > 1:
            assert a["preference_accuracy"] == pytest.approx(b["preference_accuracy"], abs=1e-6), a["step"]
