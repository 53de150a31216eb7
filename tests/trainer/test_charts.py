"""The model card's pictures (finetune_trainer/charts.py): parsing metrics.jsonl, what the figures show
(labels, titles, legends, checked on the Figure before it is saved), the PNG files, and the card's links.
No training: synthetic metrics and scores."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from matplotlib.image import imread

from finetune_operator import contract, sizing
from finetune_operator.contract import TrainerConfig
from finetune_operator.spec import EvaluationStatus, FineTuneJob, RetrievalScores, Scores
from finetune_trainer import charts
from finetune_trainer.storage import Store

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
EVALUATION = EvaluationStatus(
    accuracy_metric="rougeL-f1", examples=50,
    base=Scores(accuracy=0.12, terminology=0.2, hallucination=0.5, eval_loss=6.1),
    tuned=Scores(accuracy=0.71, terminology=0.9, hallucination=0.05, eval_loss=1.2),
)


def _metrics(steps: int, *, eval_every: int = 0, start: float = 6.0) -> str:
    lines = [json.dumps({"step": s, "epoch": s / steps, "loss": start / s, "learning_rate": 1e-3, "tokens": 100})
             for s in range(1, steps + 1)]
    if eval_every:
        lines += [json.dumps({"step": s, "eval_loss": start / s + 0.1}) for s in range(eval_every, steps + 1, eval_every)]
    return "\n".join(lines) + "\n"


def _legend(fig: Any) -> list[str]:
    (ax,) = fig.axes
    return [text.get_text() for text in ax.get_legend().get_texts()]


@pytest.mark.parametrize(("text", "train", "evals"), [
    ("", [], []),
    ('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 2, "eval_loss": 1.7}\n',
     [(1, 2.0), (2, 1.5)], [(2, 1.7)]),
    # a step logged again (the OOM ladder restarts steps): the last record wins; order of lines does not matter
    ('{"step": 2, "loss": 9.0}\n{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n', [(1, 2.0), (2, 1.5)], []),
    # not JSON, not an object, no int step, non-finite or non-numeric losses: skipped
    ('oops\n[1, 2]\n{"step": "3", "loss": 1.0}\n{"step": 4, "loss": NaN}\n{"step": 5, "loss": Infinity}\n'
     '{"step": 6, "loss": true}\n{"step": 7, "loss": null, "eval_loss": 0.5}\n', [], [(7, 0.5)]),
])
def test_parse_metrics(text: str, train: list[tuple[int, float]], evals: list[tuple[int, float]]) -> None:
    series = charts.parse_metrics(text)
    assert (series.train, series.eval) == (train, evals)
    assert bool(series) == bool(train or evals)


@pytest.mark.parametrize(("values", "window", "expected"), [
    ([1.0, 2.0, 3.0, 4.0, 5.0], 3, [1.5, 2.0, 3.0, 4.0, 4.5]),
    ([4.0], 5, [4.0]),
    ([2.0, 4.0], 1, [2.0, 4.0]),
])
def test_moving_average_is_centred(values: list[float], window: int, expected: list[float]) -> None:
    assert charts.moving_average(values, window) == pytest.approx(expected)


def test_loss_figure_labels_and_legend() -> None:
    fig = charts.loss_figure(charts.parse_metrics(_metrics(200, eval_every=50)), title="job: loss")
    assert fig is not None
    (ax,) = fig.axes
    assert ax.get_xlabel() == "optimizer step" and ax.get_ylabel() == "mean token loss"
    assert fig.get_suptitle() == "job: loss"
    assert _legend(fig) == ["train loss (10-step average)", "eval loss (validation, at checkpoints)"]
    assert ax.get_xlim()[0] == 0


def test_loss_figure_with_the_pilot() -> None:
    fig = charts.loss_figure(charts.parse_metrics(_metrics(200, eval_every=50)),
                             charts.parse_metrics(_metrics(30, eval_every=30, start=7.0)))
    assert fig is not None
    assert _legend(fig) == ["pilot train loss (5-step average)", "pilot eval loss (validation, at checkpoints)",
                            "fine-tune train loss (10-step average)", "fine-tune eval loss (validation, at checkpoints)"]
    (ax,) = fig.axes
    pilot_lines = [line for line in ax.get_lines() if str(line.get_label()).startswith("pilot")]
    assert pilot_lines and all(line.get_linestyle() == "--" for line in pilot_lines)


def test_loss_figure_without_eval_loss_and_with_a_single_step() -> None:
    fig = charts.loss_figure(charts.parse_metrics('{"step": 1, "loss": 5.0}\n'))
    assert fig is not None
    assert _legend(fig) == ["train loss"]
    (ax,) = fig.axes
    left, right = ax.get_xlim()
    assert left == 0 and right >= 2  # the point is not on the edge of a degenerate range
    assert ax.get_lines()[0].get_marker() == "o"  # one point: a marker, as a line of one point is invisible
    assert charts.loss_figure(charts.LossSeries()) is None
    assert charts.loss_figure(charts.LossSeries(), charts.LossSeries()) is None


def _ticks(fig: Any) -> list[str]:
    (ax,) = fig.axes
    return [tick.get_text() for tick in ax.get_xticklabels()]


def test_evaluation_figure_base_vs_fine_tuned() -> None:
    fig = charts.evaluation_figure(EVALUATION, title="job: base vs fine-tuned")
    assert fig is not None
    (ax,) = fig.axes
    assert fig.get_suptitle() == "job: base vs fine-tuned (50 test examples)"
    assert ax.get_ylabel() == "score (0..1)" and ax.get_ylim()[0] == 0
    # format compliance was measured for neither model: no group of bars for it
    assert _ticks(fig) == ["accuracy\n(rougeL-f1)", "terminology", "hallucination\n(lower is better)"]
    assert _legend(fig) == ["base", "fine-tuned"]
    values = [text.get_text() for text in ax.texts]
    assert values == ["0.12", "0.20", "0.50", "0.71", "0.90", "0.05"]  # the score over each bar


def test_evaluation_figure_with_retrieval_and_a_missing_score() -> None:
    evaluation = EvaluationStatus(
        examples=4,
        base=Scores(accuracy=0.1, format_compliance=0.5), tuned=Scores(accuracy=0.6),
        with_retrieval=RetrievalScores(base=Scores(accuracy=0.3), tuned=Scores(accuracy=0.8, format_compliance=1.0)))
    fig = charts.evaluation_figure(evaluation)
    assert fig is not None
    assert _legend(fig) == ["base", "fine-tuned", "base + retrieval", "fine-tuned + retrieval"]
    assert _ticks(fig) == ["accuracy", "format\ncompliance"]
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.texts] == ["0.10", "0.50", "0.60", "n/a", "0.30", "n/a", "0.80", "1.00"]


@pytest.mark.parametrize("evaluation", [
    None,
    # evaluation.enabled: false measures the test loss and perplexity only, which are not 0..1 scores
    EvaluationStatus(examples=10, base=Scores(eval_loss=3.0, perplexity=20.1), tuned=Scores(eval_loss=1.0)),
])
def test_no_evaluation_chart_without_scores(evaluation: EvaluationStatus | None) -> None:
    assert charts.evaluation_figure(evaluation) is None


def test_write_charts_writes_readable_pngs(tmp_path: Path) -> None:
    written = charts.write_charts(tmp_path, metrics=_metrics(120, eval_every=40), evaluation=EVALUATION, name="job",
                                  pilot_metrics=_metrics(20, eval_every=20))
    assert written == {"lossChart": "loss.png", "evaluationChart": "evaluation.png"}
    for name in written.values():
        pixels = imread(tmp_path / name)
        assert pixels.shape == (495, 880, 4)  # 8 x 4.5 in at 110 dpi
        assert pixels.std() > 0.05  # something is drawn
        assert (tmp_path / name).stat().st_size < 150_000


def test_write_charts_without_evaluation_or_metrics(tmp_path: Path) -> None:
    assert charts.write_charts(tmp_path, metrics=_metrics(3), evaluation=None, name="job") == {"lossChart": "loss.png"}
    assert not (tmp_path / "evaluation.png").exists()
    assert charts.write_charts(tmp_path / "b", metrics="", evaluation=EVALUATION, name="job") == {}  # no dir: no file


def test_a_chart_that_cannot_be_written_is_left_out_with_a_warning(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=charts.__name__):
        written = charts.write_charts(tmp_path / "missing", metrics=_metrics(3), evaluation=EVALUATION, name="job")
    assert written == {}
    assert "the model card goes without loss.png" in caplog.text


def _run(output: Path, *, pilot: bool, stage: str | None = None) -> Any:
    """What charts needs of a Run: the spec's pilot, the config's stage and name, the output's store."""
    return SimpleNamespace(spec=SimpleNamespace(pilot=object() if pilot else None),
                           config=SimpleNamespace(stage=stage, name="job"), store=Store.for_uri(str(output)))


def test_pilot_metrics_are_read_from_the_pilot_output(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from finetune_operator import pilot

    output = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger=charts.__name__):
        assert charts.pilot_metrics(_run(output, pilot=True)) is None  # the pilot wrote nothing (yet)
    assert "pilot/metrics.jsonl" in caplog.text
    pilot_dir = Path(pilot.output_uri(str(output)))
    pilot_dir.mkdir(parents=True)
    (pilot_dir / "metrics.jsonl").write_text(_metrics(4))
    assert charts.pilot_metrics(_run(output, pilot=True)) == _metrics(4)
    assert charts.pilot_metrics(_run(output, pilot=False)) is None
    # the pilot run draws only its own curve (its spec has no pilot; the stage says so as well)
    assert charts.pilot_metrics(_run(pilot_dir, pilot=True, stage="pilot")) is None


def _config() -> TrainerConfig:
    job = FineTuneJob.model_validate(yaml.safe_load((EXAMPLES / "healthcare-lora.yaml").read_text()))
    return contract.resolve(job, sizing.plan(job.spec))


def test_the_card_embeds_the_charts_by_relative_links() -> None:
    from finetune_trainer.modelcard import render_model_card

    artifacts = {"lossChart": "s3://out/job/loss.png", "evaluationChart": "s3://out/job/evaluation.png"}
    card = render_model_card(_config(), evaluation=EVALUATION, artifacts=artifacts, metrics_summary={})
    training = card.index("\n## Training\n")
    loss = card.index("![Loss curve: training loss per step and eval loss at checkpoints](loss.png)")
    evaluation = card.index("![Evaluation: base vs fine-tuned scores](evaluation.png)")
    assert training < loss < card.index("\n## Evaluation\n") < evaluation < card.index("\n## Artifacts\n")
    bare = render_model_card(_config(), evaluation=EVALUATION, artifacts={}, metrics_summary={})
    assert "![" not in bare
