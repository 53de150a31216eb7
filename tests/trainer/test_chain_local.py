"""`finetune run A.yaml B.yaml --local`: manifests run in order as a chain (spec.baseModel.fromJob).

The two-stage test runs `make demo-dpo`'s manifests (SFT, then DPO chained to it) cut to two steps each, through
`local.main` in this process (the trainer runs as the launcher's child, as in `make demo-dpo`). The DPO stage must
start from the SFT stage's result: its provenance records the SFT stage and the SFT adapter it merged in (with the
sha256 of the adapter's files), and its starting model scores what the SFT stage's result scored (the SFT stage's
"fine-tuned" column is the DPO stage's "base" column, on the same held-out pairs and test rows). The other tests
check the refusals and the stop, which need no training.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator.contract import EXIT_CONFIG_ERROR, MARKER_NAME, REPORT_KEY
from finetune_trainer import local
from finetune_trainer.provenance import sha256_manifest, sha256_tree
from tests.trainer.train_helpers import THREADS

REPO = Path(__file__).resolve().parents[2]
SFT = REPO / "examples" / "healthcare-sft-stage.yaml"
DPO = REPO / "examples" / "healthcare-dpo-stage.yaml"
#: Two steps a stage; fp32 (the manifests say bf16, for GPUs), so that the SFT result scored with its adapter and the
#: DPO stage's start (the adapter merged into the weights) differ by float32 roundoff only.
SMALL = ["--set", "hyperparameters.maxSteps=2", "--set", "evaluation.maxExamples=4",
         "--set", "evaluation.maxNewTokens=4", "--set", "hyperparameters.precision=fp32"]


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    # See train_helpers.THREADS: the trainer subprocess inherits this.
    monkeypatch.setenv("OMP_NUM_THREADS", THREADS)


def _report(output: Path) -> dict[str, Any]:
    return json.loads((output / REPORT_KEY).read_text())  # type: ignore[no-any-return]


def test_the_dpo_stage_starts_from_the_sft_stage_result(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "out"
    code = local.main([str(SFT), str(DPO), "--local", "--demo", "--output", str(output), *SMALL])
    out = capsys.readouterr().out
    assert code == 0, out[-4000:]
    sft, dpo = output / "healthcare-sft", output / "healthcare-dpo"
    assert (sft / MARKER_NAME).is_file() and (dpo / MARKER_NAME).is_file()
    assert out.index("stage 1/2: healthcare-sft") < out.index("stage 2/2: healthcare-dpo")
    adapter = f"file://{sft / 'model'}/"
    assert f"starts from healthcare-sft's result: s3://finetune-demo-models/tiny-llama/; adapters merged in first: " \
           f"{adapter}" in out

    # Provenance of the DPO stage: the chain, and the SFT adapter it merged with the sha256 of its files.
    record = json.loads((dpo / "provenance.json").read_text())
    chain = record["chain"]
    assert [(s["name"], s["objective"], s["method"]) for s in chain["stages"]] == [("healthcare-sft", "sft", "lora")]
    assert chain["stages"][0]["outputUri"] == f"file://{sft}/"  # where the stage wrote, not its manifest's URI
    assert chain["startedFrom"]["uri"] == "s3://finetune-demo-models/tiny-llama/"
    assert chain["adaptersMerged"] == [{"uri": adapter, "sha256": sha256_manifest(sha256_tree(sft / "model"))}]
    assert record["baseModel"]["uri"] == "s3://finetune-demo-models/tiny-llama/"
    assert "chain" not in json.loads((sft / "provenance.json").read_text())  # the first stage is not chained

    # The summary table: one row per stage, base -> result, with the beta each stage's margins are scaled by.
    table = out[out.index("chain: base model -> result"):]
    rows = [line.split() for line in table.splitlines() if line.strip().startswith("healthcare-")]
    assert [row[0] for row in rows] == ["healthcare-sft", "healthcare-dpo"]
    assert all(row[2] == "->" and row[5] == "->" for row in rows), rows
    beta_sft, beta_dpo = (float(row[7].strip("()")) for row in rows)
    assert (beta_sft, beta_dpo) == (0.1, dict((p, v) for p, v, _ in local.DEMO_DPO_OVERRIDES)["dpo.beta"])

    # The DPO stage's starting model is the SFT stage's result: the same implicit rewards on the same held-out pairs
    # (margin / beta: log p(chosen) - log p(rejected); the merge and the adapter differ by float32 roundoff only),
    # and not the tiny model's own.
    first, second = _report(sft)["evaluation"], _report(dpo)["evaluation"]
    assert second["base"]["rewardMargin"] / beta_dpo == pytest.approx(first["tuned"]["rewardMargin"] / beta_sft,
                                                                      rel=1e-4, abs=1e-5)
    assert first["base"]["rewardMargin"] != pytest.approx(first["tuned"]["rewardMargin"], rel=1e-3, abs=1e-4)
    assert second["base"]["preferenceAccuracy"] == first["tuned"]["preferenceAccuracy"]
    card = (dpo / "README.md").read_text()
    assert "chained stage" in card and "healthcare-sft" in card


def _tiny_chain(tmp_path: Path, tiny_model_dir: Path, second: dict[str, Any]) -> tuple[Path, Path]:
    """Two small manifests on file:// inputs (no demo): `first`, then `second` with the given spec changes."""
    data = tmp_path / "data"
    data.mkdir(parents=True)
    shutil.copy(REPO / "trainer-image" / "finetune_trainer" / "data" / "healthcare_train.jsonl", data / "train.jsonl")
    spec: dict[str, Any] = {"baseModel": {"uri": f"file://{tiny_model_dir}", "parameters": "1M"}, "method": "lora",
                            "dataset": {"train": f"file://{data / 'missing.jsonl'}"},
                            "hyperparameters": {"maxSteps": 1, "precision": "fp32"},
                            "output": {"uri": "s3://unused/first/"}}
    paths = []
    for name, changes in (("first", {}), ("second", second)):
        doc = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name},
               "spec": {**spec, "output": {"uri": f"s3://unused/{name}/"}, **changes}}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(doc))
        paths.append(path)
    return paths[0], paths[1]


def test_a_failed_stage_stops_the_chain_naming_it(tmp_path: Path, tiny_model_dir: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    first, second = _tiny_chain(tmp_path, tiny_model_dir, {"baseModel": {"fromJob": "first"}})
    code = local.main([str(first), str(second), "--local", "--output", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == EXIT_CONFIG_ERROR, out[-4000:]  # the first stage's train file does not exist
    assert f"chain stopped: stage 1/2 first ({first}) failed (exit code 3); not run: second" in out
    assert "stage 2/2" not in out and not (tmp_path / "out" / "second").exists()


@pytest.mark.parametrize(("from_job", "order", "message"), [
    ("nowhere", "forward", "spec.baseModel.fromJob names 'nowhere', which is not the metadata.name of an earlier "
                           "manifest on the command line (earlier: first"),
    ("first", "backward", "list its manifest before this one"),
])
def test_a_from_job_naming_no_earlier_manifest_is_refused_before_anything_runs(
        tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str], from_job: str, order: str,
        message: str) -> None:
    first, second = _tiny_chain(tmp_path, tiny_model_dir, {"baseModel": {"fromJob": from_job}})
    files = [first, second] if order == "forward" else [second, first]
    code = local.main([*map(str, files), "--local", "--output", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == EXIT_CONFIG_ERROR
    assert message in captured.err and str(second) in captured.err
    assert "running locally" not in captured.out  # nothing ran


def test_stages_need_their_own_names_and_outputs(tmp_path: Path, tiny_model_dir: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    first, _ = _tiny_chain(tmp_path, tiny_model_dir, {})
    assert local.main([str(first), str(first), "--local"]) == EXIT_CONFIG_ERROR
    assert "are both named 'first'" in capsys.readouterr().err
    _, second = _tiny_chain(tmp_path / "b", tiny_model_dir, {"output": {"uri": "s3://unused/first/"}})
    assert local.main([str(first), str(second), "--local"]) == 2
    assert "two stages write to the same output" in capsys.readouterr().err


def test_chain_table_shows_base_to_result() -> None:
    from finetune_operator.spec import EvaluationStatus, Scores

    evaluation = EvaluationStatus(base=Scores(preference_accuracy=0.4, reward_margin=-0.5, hallucination=0.3),
                                  tuned=Scores(preference_accuracy=0.9, reward_margin=1.25, hallucination=0.1))
    table = local.chain_table([("sft", None, 0.1), ("dpo", evaluation, 0.5)])
    assert table.splitlines()[2].split() == ["sft", "-", "-", "-"]
    assert table.splitlines()[3].split() == ["dpo", "40.0%", "->", "90.0%", "-0.500", "->", "1.250", "(0.5)", "30.0%",
                                             "->", "10.0%"]
