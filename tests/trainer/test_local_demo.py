"""`finetune run FILE --local`: the demo end to end (what `make demo` runs), local output, --set."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from finetune_operator.contract import EXIT_CONFIG_ERROR, MARKER_NAME, REPORT_KEY
from finetune_trainer import local
from tests.trainer.train_helpers import THREADS

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "examples" / "healthcare-lora.yaml"


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    # See train_helpers.THREADS: the trainer subprocess inherits this.
    monkeypatch.setenv("OMP_NUM_THREADS", THREADS)


def _row(output: str, label: str) -> tuple[float, float]:
    match = re.search(rf"^\s+{re.escape(label)}\s+([-\d.]+)%?\s+([-\d.]+)%?\s*$", output, re.MULTILINE)
    assert match, f"no {label!r} row in:\n{output}"
    return float(match.group(1)), float(match.group(2))


def _card_files(output: str) -> dict[str, Path]:
    """The model card and chart paths `finetune run` prints at the end."""
    return {what: Path(path) for what, path in re.findall(
        r"^  (model card|loss curve|evaluation chart): +(\S+)$", output, re.MULTILINE)}


def test_demo_trains_the_tiny_stand_in_and_shows_a_gain(capsys: pytest.CaptureFixture[str]) -> None:
    code = local.main([str(MANIFEST), "--local", "--demo"])
    out = capsys.readouterr().out
    assert code == 0, out[-4000:]
    assert "stands in for hf://meta-llama/Llama-2-7b-hf" in out
    assert "plan on a cluster: method lora, 1x24GiB GPU (table)" in out
    assert "uploaded healthcare_train.jsonl     -> s3://healthcare-data/instructions/train.jsonl" in out
    for artifact in ("model/  (", "metrics.jsonl", "evaluation.json", "provenance.json", "README.md", MARKER_NAME):
        assert f"s3://finetune-artifacts/healthcare-assistant/{artifact}" in out, artifact
    base_acc, tuned_acc = _row(out, "accuracy (rougeL-f1)")
    base_loss, tuned_loss = _row(out, "eval loss")
    assert tuned_acc > base_acc + 10  # percentage points
    assert tuned_loss < base_loss - 1.0
    base_hall, tuned_hall = _row(out, "hallucination (lower is better)")
    assert tuned_hall < base_hall
    # The card and its pictures, copied out of the demo's S3 server (gone by now) beside each other.
    card = _card_files(out)
    assert set(card) == {"model card", "loss curve", "evaluation chart"}
    assert all(path.is_file() and path.parent == card["model card"].parent for path in card.values())
    text = card["model card"].read_text()
    assert "](loss.png)" in text and "](evaluation.png)" in text


def test_demo_to_a_local_directory_with_overrides(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "out"
    code = local.main([str(MANIFEST), "--local", "--demo", "--output", str(output),
                       "--set", "hyperparameters.maxSteps=2", "--set", "evaluation.maxExamples=2",
                       "--set", "spec.hyperparameters.epochs=1"])
    out = capsys.readouterr().out
    assert code == 0, out[-4000:]
    assert "override: spec.hyperparameters.maxSteps = 2" in out
    assert "spec.hyperparameters.epochs = 6" not in out  # --set wins over the demo's own override
    assert (output / MARKER_NAME).is_file() and (output / "model" / "adapter_model.safetensors").is_file()
    report = json.loads((output / REPORT_KEY).read_text())
    assert report["phase"] == "complete" and report["step"] == 2 and report["totalSteps"] == 2
    assert _card_files(out) == {"model card": output / "README.md", "loss curve": output / "loss.png",
                                "evaluation chart": output / "evaluation.png"}  # in the output directory itself


def test_invalid_override_names_the_field(capsys: pytest.CaptureFixture[str]) -> None:
    code = local.main([str(MANIFEST), "--local", "--set", "hyperparameters.learningRate=-1"])
    err = capsys.readouterr().err
    assert code == EXIT_CONFIG_ERROR
    assert "spec.hyperparameters.learningRate" in err


def test_local_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    assert local.main([str(MANIFEST)]) == 2
    assert "--local" in capsys.readouterr().err


def test_override_parsing() -> None:
    assert local.parse_override("hyperparameters.learningRate=0.002") == ("hyperparameters.learningRate", 0.002)
    assert local.parse_override("lora.targetModules=[q_proj, v_proj]") == ("lora.targetModules", ["q_proj", "v_proj"])
    doc: dict[str, object] = {"spec": {"hyperparameters": {"epochs": 3}}}
    assert local.set_path(doc, "hyperparameters.epochs", 1) == "spec.hyperparameters.epochs"
    assert doc == {"spec": {"hyperparameters": {"epochs": 1}}}
    with pytest.raises(local.UsageError, match="PATH=VALUE"):
        local.parse_override("epochs")


PILOT_MANIFEST = REPO / "examples" / "healthcare-full-pilot.yaml"
SMALL = ["--set", "hyperparameters.maxSteps=2", "--set", "evaluation.maxExamples=2"]


def test_a_passing_pilot_then_the_main_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Both stages, as the operator runs them: the LoRA pilot under <output>/pilot/, its gate, then the full run."""
    output = tmp_path / "out"
    code = local.main([str(PILOT_MANIFEST), "--local", "--demo", "--output", str(output), *SMALL,
                       "--set", "pilot.maxSteps=6", "--set", "pilot.gates=[{metric: evalLoss, minImprovement: 0.02}]"])
    out = capsys.readouterr().out
    assert code == 0, out[-4000:]
    assert out.index("stage 1/2: LoRA pilot (6 steps") < out.index("the pilot passed pilot.gates") < out.index(
        "stage 2/2: the main run")
    pilot = json.loads((output / "pilot" / REPORT_KEY).read_text())
    assert pilot["phase"] == "complete" and pilot["step"] == 6 and pilot["evaluation"]["gatesPassed"] is True
    assert (output / "pilot" / "model" / "adapter_model.safetensors").is_file()  # the pilot's adapter is kept
    main = json.loads((output / REPORT_KEY).read_text())
    assert main["phase"] == "complete" and main["step"] == 2
    assert (output / MARKER_NAME).is_file() and (output / "model" / "model.safetensors").is_file()  # full weights
    assert (output / "pilot" / "loss.png").is_file() and (output / "loss.png").is_file()  # each stage's own card


def test_a_pilot_that_misses_its_gates_stops_before_the_main_run(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "out"
    code = local.main([str(PILOT_MANIFEST), "--local", "--demo", "--output", str(output), *SMALL,
                       "--set", "pilot.maxSteps=1", "--set", "pilot.gates=[{metric: accuracy, min: 0.99}]"])
    out = capsys.readouterr().out
    assert code == 4, out[-4000:]
    assert "PilotGatesFailed" in out and "accuracy" in out and "stage 2/2" not in out
    assert (output / "pilot" / "model" / "adapter_model.safetensors").is_file()
    assert not (output / REPORT_KEY).exists() and not (output / "model").exists()  # the main run never started


def test_rag_demo_uploads_the_corpus_and_shows_both_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`make demo-rag` (examples/healthcare-rag.yaml), cut to 2 steps: the corpus goes to spec.retrieval.corpus,
    the index is an artifact, and the table has the with-retrieval columns (the figures are in the README)."""
    output = tmp_path / "out"
    code = local.main([str(REPO / "examples" / "healthcare-rag.yaml"), "--local", "--demo", "--output", str(output),
                       "--set", "hyperparameters.maxSteps=2", "--set", "evaluation.maxExamples=2",
                       "--set", "evaluation.maxNewTokens=4"])
    out = capsys.readouterr().out
    assert code == 0, out[-4000:]
    assert "uploaded healthcare_corpus.jsonl    -> s3://healthcare-data/corpus/healthcare_corpus.jsonl" in out
    assert (output / "retrieval" / "retriever.json").is_file() and (output / MARKER_NAME).is_file()
    header = next(line for line in out.splitlines() if line.strip().startswith("metric"))
    assert header.split() == ["metric", "base", "fine-tuned", "base+RAG", "tuned+RAG"]
    row = next(line for line in out.splitlines() if line.strip().startswith("hallucination (lower is better)"))
    assert len(row.split()) == 4 + 4  # the label's four words and four values


def test_hallucination_advice_follows_the_threshold_and_retrieval() -> None:
    from finetune_operator.spec import EvaluationStatus, FineTuneJob, Scores

    doc = local.load_manifest(MANIFEST)
    spec = FineTuneJob.model_validate(doc).spec
    high = EvaluationStatus(base=Scores(hallucination=0.94), tuned=Scores(hallucination=0.83))
    advice = local.hallucination_advice(spec, high)
    assert advice is not None and "83.0%" in advice and "50.0%" in advice and "make demo-rag" in advice
    assert local.hallucination_advice(spec, EvaluationStatus(tuned=Scores(hallucination=0.4))) is None
    assert local.hallucination_advice(spec.model_copy(update={"evaluation": spec.evaluation.model_copy(
        update={"hallucination_threshold": 0.9})}), high) is None
    rag = FineTuneJob.model_validate(local.load_manifest(REPO / "examples" / "healthcare-rag.yaml")).spec
    assert local.hallucination_advice(rag, high) is None
