"""The model card: front matter, sections, evaluation table with the accuracy metric named."""

from __future__ import annotations

from pathlib import Path

import yaml

from finetune_operator import contract, sizing
from finetune_operator.contract import TrainerConfig
from finetune_operator.spec import EvaluationStatus, FineTuneJob, Scores
from finetune_trainer.modelcard import render_model_card

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _config(method: str) -> TrainerConfig:
    manifest = yaml.safe_load((EXAMPLES / "healthcare-lora.yaml").read_text())
    manifest["spec"]["method"] = method
    job = FineTuneJob.model_validate(manifest)
    return contract.resolve(job, sizing.plan(job.spec))


EVALUATION = EvaluationStatus(
    accuracy_metric="rougeL-f1",
    examples=50,
    base=Scores(accuracy=0.12, terminology=0.2, hallucination=0.5),
    tuned=Scores(accuracy=0.71, terminology=0.9, hallucination=0.05),
    gates_passed=False,
    failed_gates=["accuracy 0.71 < min 0.80"],
)


def _front_matter(card: str) -> dict:  # type: ignore[type-arg]
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_front_matter_and_sections() -> None:
    card = render_model_card(
        _config("qlora"),
        evaluation=EVALUATION,
        artifacts={"model": "s3://out/model/", "provenance": "s3://out/provenance.json"},
        metrics_summary={"final_loss": 0.42, "steps": 30},
    )
    meta = _front_matter(card)
    assert meta["base_model"] == "meta-llama/Llama-2-7b-hf"
    assert meta["library_name"] == "peft"
    assert "qlora" in meta["tags"] and "finetune-operator" in meta["tags"]
    for heading in ("## Method and plan", "## Data", "## Hyperparameters", "## Training", "## Evaluation",
                    "## Artifacts", "## Intended use and limitations"):
        assert f"\n{heading}\n" in card
    assert "4-bit nf4" in card
    assert "`s3://out/provenance.json`" in card
    assert "| final_loss | 0.42 |" in card


def test_evaluation_table_names_the_metric_and_the_change() -> None:
    card = render_model_card(_config("lora"), evaluation=EVALUATION, artifacts={}, metrics_summary={})
    assert "| accuracy (rougeL-f1) | 0.12 | 0.71 | +0.59 (better) |" in card
    assert "| hallucination (lower is better) | 0.5 | 0.05 | -0.45 (better) |" in card
    assert "| format compliance |" not in card  # measured by neither model: no row
    assert "- accuracy 0.71 < min 0.80" in card
    assert "50 held-out test examples" in card


def test_full_fine_tune_without_evaluation() -> None:
    card = render_model_card(_config("full"), evaluation=None, artifacts={}, metrics_summary={})
    assert _front_matter(card)["library_name"] == "transformers"
    assert "No evaluation was run" in card
    assert "LoRA rank" not in card and "## Training" not in card


def test_rendering_is_deterministic_and_escapes_tables() -> None:
    config = _config("lora")
    config.spec.lora.target_modules = ["q_proj", "v_proj"]
    first = render_model_card(config, evaluation=EVALUATION, artifacts={}, metrics_summary={"note": "a|b\nc"})
    assert first == render_model_card(config, evaluation=EVALUATION, artifacts={}, metrics_summary={"note": "a|b\nc"})
    assert "| note | a\\|b c |" in first
