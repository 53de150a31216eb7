"""`finetune plan --inspect` with local data: the pre-flight's checks run on this machine, the tiny model and
the bundled sample, and the plan the operator completes from them (`finetune_operator.local_preflight`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator import cli

NAME = "tiny-local"


def _lines(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def _job(tmp_path: Path, model: Path, train: str, **spec: Any) -> Path:
    """A manifest for the tiny model at `model` (file://, no size in its name, no baseModel.parameters)."""
    doc = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": NAME},
           "spec": {"baseModel": {"uri": f"file://{model}"}, "method": "auto", "dataset": {"train": train},
                    "output": {"uri": "s3://out/tiny/"}, **spec}}
    path = tmp_path / f"job-{len(list(tmp_path.glob('job-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _torch_count(model_dir: Path) -> int:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return sum(p.numel() for p in model.parameters())


def test_local_data_is_counted_and_the_plan_carries_the_estimate(tmp_path: Path, tiny_model_dir: Path,
                                                                healthcare_sample: Any, capsys) -> None:
    lines = _lines(healthcare_sample.train)
    job = _job(tmp_path, tiny_model_dir, f"file://{healthcare_sample.train}")

    assert cli.main(["plan", "--inspect", str(job)]) == 0
    captured = capsys.readouterr()
    table = captured.out
    assert f"{_torch_count(tiny_model_dir):,} parameters (from the safetensors headers)" in table
    assert (f"{NAME}: data: spec.dataset.train file://{healthcare_sample.train}: {lines:,} examples (instruction), "
            in table)
    assert f"{NAME}: estimate: " in table and " GPU-hours" in table
    # qlora without checkpointing (2+2): the tiny model fits its planned GPU at 4 x 4 without it (plan.rung)
    assert f"{NAME}: estimate basis: 4N FLOPs per token" in table
    assert "not counted" not in captured.err

    assert cli.main(["plan", "--inspect", str(job), "-o", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    plan, estimate = out["plan"], out["plan"]["estimate"]
    assert lines < 10_000 and plan["method"] == "qlora"
    assert f"{lines} examples < 10,000 -> qlora" in plan["reason"]
    assert estimate["trainExamples"] == lines
    assert estimate["parameters"] == out["architecture"]["parameters"]
    assert estimate["gpuHours"] > 0 and estimate["steps"] > 0
    [split] = out["preflight"]["splits"]
    assert (split["field"], split["examples"], split["sampled"]) == ("spec.dataset.train", lines, False)
    assert split["tokens"] > lines == estimate["trainExamples"]

    # the ConfigMap's snapshot carries the completed plan, estimate included
    assert cli.main(["plan", "--inspect", str(job), "-o", "yaml"]) == 0
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    snapshot = json.loads(next(d for d in docs if d["kind"] == "ConfigMap")["data"]["job.json"])
    assert snapshot["plan"]["estimate"]["trainExamples"] == lines and snapshot["method"] == "qlora"


def test_the_plan_is_the_one_the_operator_completes_from_its_preflight(tmp_path: Path, tiny_model_dir: Path,
                                                                      healthcare_sample: Any, capsys) -> None:
    """The same spec through `python -m finetune_trainer.preflight`'s `run` and the operator's
    `complete_plan` gives the plan `finetune plan --inspect` prints."""
    from finetune_operator import contract, preflight
    from finetune_operator.spec import FineTuneJob
    from finetune_trainer.preflight import run

    # inside the system temp directory, which the pod's allowed roots include
    train = tmp_path / "train.jsonl"
    shutil.copyfile(healthcare_sample.train, train)
    job = _job(tmp_path, tiny_model_dir, f"file://{train}", hyperparameters={"epochs": 2, "batchSize": 2})
    assert cli.main(["plan", "--inspect", str(job), "-o", "json"]) == 0
    printed = json.loads(capsys.readouterr().out)["plan"]

    spec = FineTuneJob.model_validate(yaml.safe_load(job.read_text()))
    config = contract.resolve(spec, preflight.placeholder_plan(spec.spec), stage="preflight")
    result, code = run(config, output_uri=str(tmp_path / "out"), cache=tmp_path / "cache")
    assert code == 0, result.error
    assert printed == preflight.complete_plan(spec.spec, result).model_dump(by_alias=True, mode="json")


def test_a_bad_row_is_reported_with_its_file_and_line(tmp_path: Path, tiny_model_dir: Path,
                                                     healthcare_sample: Any, capsys) -> None:
    rows = healthcare_sample.train.read_text(encoding="utf-8").splitlines()
    fifth = json.loads(rows[4])
    fifth["question"] = fifth.pop("instruction")
    rows[4] = json.dumps(fifth)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(rows) + "\n", encoding="utf-8")
    job = _job(tmp_path, tiny_model_dir, f"file://{bad}")

    assert cli.main(["plan", "--inspect", str(job)]) == cli.EXIT_INVALID
    captured = capsys.readouterr()
    assert captured.out == ""
    first = captured.err.splitlines()[0]
    assert first.startswith(f"{job} ({NAME}): spec.dataset.train: ")
    assert f"{bad} line 5: missing key 'instruction'" in first
    assert "error: 1 problem(s) in 1 of 1 manifest(s)" in captured.err


def test_an_estimate_above_the_budget_is_refused(tmp_path: Path, tiny_model_dir: Path, healthcare_sample: Any,
                                                 capsys) -> None:
    job = _job(tmp_path, tiny_model_dir, f"file://{healthcare_sample.train}", budget={"maxGpuHours": 1e-9})

    assert cli.main(["plan", "--inspect", str(job), "-o", "json"]) == cli.EXIT_INVALID
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"{job} ({NAME}): spec.budget.maxGpuHours: the estimated " in captured.err
    assert "exceed spec.budget.maxGpuHours 1e-09" in captured.err


def test_remote_data_leaves_the_model_only_plan_with_a_note(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    job = _job(tmp_path, tiny_model_dir, "s3://data/train.jsonl")

    assert cli.main(["plan", "--inspect", str(job), "-o", "json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["plan"]["estimate"] is None and "preflight" not in out
    assert out["plan"]["method"] == "lora"  # auto without a count: the dataset is taken as large
    assert out["architecture"]["parameters"] == _torch_count(tiny_model_dir)
    assert captured.err.strip() == (
        f"{job} ({NAME}): note: the data was not counted: s3://data/train.jsonl is not read by `finetune plan` "
        "(only file:// and pvc:// with --mount are); planned from the model alone")


def test_every_data_field_is_read_and_pvc_data_through_the_mount(tmp_path: Path, tiny_model_dir: Path,
                                                                 healthcare_sample: Any, capsys) -> None:
    mount = tmp_path / "mnt"
    (mount / "sets").mkdir(parents=True)
    shutil.copyfile(healthcare_sample.train, mount / "sets" / "train.jsonl")
    job = _job(tmp_path, tiny_model_dir, "pvc://data/sets/train.jsonl",
               dataset={"train": "pvc://data/sets/train.jsonl", "validation": f"file://{healthcare_sample.test}"},
               evaluation={"testSet": f"file://{healthcare_sample.test}"})

    assert cli.main(["plan", "--inspect", str(job)]) == 0
    captured = capsys.readouterr()
    assert f"{NAME}: estimate" not in captured.out
    assert "pvc://data/sets/train.jsonl (claim 'data' not mounted here: --mount data=PATH)" in captured.err

    assert cli.main(["plan", "--inspect", "--mount", f"data={mount}", str(job), "-o", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    splits = {s["field"]: s["examples"] for s in out["preflight"]["splits"]}
    test_lines = _lines(healthcare_sample.test)
    assert splits == {"spec.dataset.train": _lines(healthcare_sample.train),
                      "spec.dataset.validation": test_lines, "spec.evaluation.testSet": test_lines}
    assert out["plan"]["estimate"]["trainExamples"] == splits["spec.dataset.train"]


def test_a_model_directory_without_a_tokenizer_is_planned_from_the_model_alone(
        tmp_path: Path, tiny_model_dir: Path, healthcare_sample: Any, capsys) -> None:
    bare = tmp_path / "bare-model"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(tiny_model_dir / name, bare / name)
    job = _job(tmp_path, bare, f"file://{healthcare_sample.train}")

    assert cli.main(["plan", "--inspect", str(job), "-o", "json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["plan"]["estimate"] is None
    assert f"{job} ({NAME}): note: the data was not counted: spec.baseModel.uri file://{bare}: " in captured.err
    assert "no usable tokenizer" in captured.err and "planned from the model alone" in captured.err


def test_a_directory_is_counted_and_a_sampled_count_says_so(tmp_path: Path, tiny_model_dir: Path,
                                                           healthcare_sample: Any, capsys,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from finetune_trainer import preflight

    rows = healthcare_sample.train.read_text(encoding="utf-8").splitlines()
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text("\n".join(rows[:100]) + "\n", encoding="utf-8")
    (data / "b.jsonl").write_text("\n".join(rows[100:130]) + "\n", encoding="utf-8")
    job = _job(tmp_path, tiny_model_dir, f"file://{data}/")

    assert cli.main(["plan", "--inspect", str(job), "-o", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plan"]["estimate"]["trainExamples"] == 130 and not out["plan"]["estimate"]["tokensSampled"]
    monkeypatch.setattr(preflight, "SAMPLE_ROWS", 10)
    assert cli.main(["plan", "--inspect", str(job)]) == 0
    assert (f"{NAME}: data: spec.dataset.train file://{data}/: 130 examples (instruction), "
            in (table := capsys.readouterr().out))
    assert "sampled: tokens extrapolated from 20 rows" in table  # 10 of each file


def test_preference_pairs_are_counted_with_their_length_bias(tmp_path: Path, tiny_model_dir: Path,
                                                            healthcare_sample: Any, capsys) -> None:
    """objective dpo: `finetune plan --inspect` counts the training pairs and the held-out ones (the pre-flight's
    checks on both), prints the pairs, tokens per pair and length bias, and sizes the run from the memory model
    (the model-size table is for sft)."""
    train = healthcare_sample.dir / "healthcare_preference_train.jsonl"
    held_out = healthcare_sample.dir / "healthcare_preference_test.jsonl"
    job = _job(tmp_path, tiny_model_dir, f"file://{train}", objective="dpo", method="lora",
               evaluation={"preferenceTestSet": f"file://{held_out}"})

    assert cli.main(["plan", "--inspect", str(job), "-o", "json"]) == 0
    captured = capsys.readouterr()
    assert "not counted" not in captured.err
    out = json.loads(captured.out)
    splits = {s["field"]: s for s in out["preflight"]["splits"]}
    assert set(splits) == {"spec.dataset.train", "spec.evaluation.preferenceTestSet"}
    pairs = splits["spec.dataset.train"]
    assert pairs["format"] == "preference" and pairs["pairs"] == pairs["examples"] == _lines(train)
    assert splits["spec.evaluation.preferenceTestSet"]["pairs"] == _lines(held_out)
    assert pairs["tokensPerPair"] > 0 and pairs["lengthBias"] is not None
    plan = out["plan"]
    assert plan["source"] == "estimate" and "objective dpo" in plan["reason"]
    assert "rows per micro-batch" in plan["reason"]

    assert cli.main(["plan", "--inspect", str(job)]) == 0
    table = capsys.readouterr().out
    assert (f"{NAME}: data: spec.dataset.train file://{train}: {_lines(train):,} examples (preference), " in table)
    assert f"; {_lines(train):,} pairs, {pairs['tokensPerPair']:,.1f} tokens per pair, length bias " in table
