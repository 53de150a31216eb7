"""The model card's pictures: the loss curve and the before/after evaluation chart (PNG, matplotlib).

    loss.png         training loss per optimizer step (faint) with its moving average, the validation loss
                     at checkpoints; with spec.pilot the LoRA pilot's curves too (dashed, from
                     `<output.uri>/pilot/metrics.jsonl`), on the same step axis
    evaluation.png   base vs fine-tuned on the 0..1 scores (accuracy, terminology, hallucination, format
                     compliance when measured); with spec.retrieval the with-retrieval scores beside them

Both are written next to README.md, which links them relatively (`![Loss curve](loss.png)`), so the links
work on the Hugging Face hub and in a downloaded copy alike.

matplotlib's object API only (`Figure` + `FigureCanvasAgg`): pyplot keeps global state and picks a GUI
backend from the environment, neither of which a trainer process (or a test) wants. matplotlib is imported
inside the functions that draw, so `modelcard` and the parsing here stay cheap to import.

A picture is an extra: `write_charts` logs a warning and leaves a chart out rather than fail the artifacts.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from finetune_operator.spec import EvaluationStatus
    from finetune_trainer.runtypes import RunContext as Run

log = logging.getLogger(__name__)

LOSS_FILE = "loss.png"
EVALUATION_FILE = "evaluation.png"
#: Artifact kinds (status.artifacts keys) of the two files.
LOSS_KIND = "lossChart"
EVALUATION_KIND = "evaluationChart"

#: 8 x 4.5 inches at 110 dpi: 880 x 495 px, legible on the hub's card column without zooming, 30-60 kB.
_SIZE = (8.0, 4.5)
_DPI = 110
_FONT = {"title": 13, "label": 11, "tick": 10, "legend": 9.5, "value": 9.5}
#: The trainer's and the pilot's colours (train, eval); the pilot's lines are dashed as well, for print.
_TRAIN, _EVAL = "#1f77b4", "#d62728"
_PILOT_TRAIN, _PILOT_EVAL = "#7f7f7f", "#ff7f0e"
#: Bars: base grey, fine-tuned blue; with retrieval the same hues, hatched.
_BASE, _TUNED = "#9e9e9e", "#1f77b4"

#: (Scores field, tick label) of the 0..1 scores; the eval loss and perplexity are not on that scale (the
#: loss curve shows the loss).
_SCORES = (
    ("accuracy", "accuracy"),
    ("terminology", "terminology"),
    ("hallucination", "hallucination\n(lower is better)"),
    ("format_compliance", "format\ncompliance"),
)


@dataclass
class LossSeries:
    """(step, loss) points of one run's metrics.jsonl, ascending by step."""

    train: list[tuple[int, float]] = field(default_factory=list)
    eval: list[tuple[int, float]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.train or self.eval)


def parse_metrics(text: str) -> LossSeries:
    """The losses of a metrics.jsonl (format: artifacts.py): `loss` on step lines, `eval_loss` on checkpoint
    lines. The last record of a step wins (a run that stepped down the OOM ladder logs steps again); lines
    that are not JSON objects and non-finite losses are skipped, as a picture is no place to fail."""
    train: dict[int, float] = {}
    evals: dict[int, float] = {}
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            continue
        for key, into in (("loss", train), ("eval_loss", evals)):
            value = record.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                into[record["step"]] = float(value)
    return LossSeries(sorted(train.items()), sorted(evals.items()))


def moving_average(values: list[float], window: int) -> list[float]:
    """Centred mean over `window` values (fewer at the ends): unlike a trailing mean it does not lag behind
    a falling loss, so the average lies on the faint per-step line it summarises."""
    half = window // 2
    sums = [0.0]
    for value in values:
        sums.append(sums[-1] + value)
    out = []
    for i in range(len(values)):
        lo, hi = max(i - half, 0), min(i + half + 1, len(values))
        out.append((sums[hi] - sums[lo]) / (hi - lo))
    return out


def _new_figure() -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=_SIZE, dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _plot_run(ax: Any, series: LossSeries, who: str, colours: tuple[str, str], style: str) -> None:
    train_colour, eval_colour = colours
    if series.train:
        steps, losses = zip(*series.train, strict=True)
        # Per-step loss is noisy: with many steps it is drawn faint under its moving average.
        window = max(len(losses) // 20, 5)
        if len(losses) >= 2 * window:
            ax.plot(steps, losses, color=train_colour, linestyle=style, linewidth=0.8, alpha=0.3)
            ax.plot(steps, moving_average(list(losses), window), color=train_colour, linestyle=style,
                    linewidth=2, label=f"{who} train loss ({window}-step average)")
        else:
            ax.plot(steps, losses, color=train_colour, linestyle=style, linewidth=1.8,
                    marker="o" if len(losses) <= 20 else None, markersize=4, label=f"{who} train loss")
    if series.eval:
        steps, losses = zip(*series.eval, strict=True)
        ax.plot(steps, losses, color=eval_colour, linestyle=style, linewidth=1.8, marker="s", markersize=6,
                label=f"{who} eval loss (validation, at checkpoints)")


def loss_figure(main: LossSeries, pilot: LossSeries | None = None, *, title: str = "Loss") -> Figure | None:
    """The loss curve of `main` (and of its pilot), or None when neither logged a loss."""
    if not main and not pilot:
        return None
    from matplotlib.ticker import MaxNLocator

    fig = _new_figure()
    ax = fig.add_subplot()
    if pilot:
        _plot_run(ax, pilot, "pilot", (_PILOT_TRAIN, _PILOT_EVAL), "--")
    _plot_run(ax, main, "fine-tune" if pilot else "", (_TRAIN, _EVAL), "-")
    for line in ax.get_lines():  # "" when there is no pilot to tell apart
        line.set_label(str(line.get_label()).strip())
    fig.suptitle(title, fontsize=_FONT["title"])
    ax.set_xlabel("optimizer step", fontsize=_FONT["label"])
    ax.set_ylabel("mean token loss", fontsize=_FONT["label"])
    ax.tick_params(labelsize=_FONT["tick"])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))  # whole steps, round ticks
    # From step 0, and never a degenerate range (a single step would sit on the right edge).
    last = max(step for series in (main, pilot) if series for step, _ in series.train + series.eval)
    ax.set_xlim(0, max(ax.get_xlim()[1], last + 1))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=_FONT["legend"], loc="upper right", framealpha=0.9)
    return fig


def _bars(evaluation: EvaluationStatus) -> tuple[list[str], list[tuple[str, list[float | None], str, str]]]:
    """Tick labels of the measured 0..1 scores and the bar groups (legend label, values, colour, hatch)."""
    groups = [("base", evaluation.base, _BASE, ""), ("fine-tuned", evaluation.tuned, _TUNED, "")]
    if evaluation.with_retrieval is not None:
        groups += [("base + retrieval", evaluation.with_retrieval.base, _BASE, "//"),
                   ("fine-tuned + retrieval", evaluation.with_retrieval.tuned, _TUNED, "//")]

    def measured(value: float | None) -> bool:
        return value is not None and math.isfinite(value)

    fields = [(name, label) for name, label in _SCORES
              if any(measured(getattr(scores, name)) for _, scores, _, _ in groups)]
    if evaluation.accuracy_metric:
        fields = [(n, f"accuracy\n({evaluation.accuracy_metric})" if n == "accuracy" else label)
                  for n, label in fields]
    rows = [(legend, [getattr(scores, name) if measured(getattr(scores, name)) else None for name, _ in fields],
             colour, hatch) for legend, scores, colour, hatch in groups]
    return [label for _, label in fields], rows


def evaluation_figure(evaluation: EvaluationStatus | None, *, title: str = "Evaluation") -> Figure | None:
    """Grouped bars, base beside fine-tuned (and with retrieval), per 0..1 score; None without evaluation or
    without any such score."""
    if evaluation is None:
        return None
    labels, rows = _bars(evaluation)
    if not labels:
        return None
    fig = _new_figure()
    ax = fig.add_subplot()
    width = 0.8 / len(rows)
    for i, (legend, values, colour, hatch) in enumerate(rows):
        xs = [x + (i - (len(rows) - 1) / 2) * width for x in range(len(labels))]
        bars = ax.bar(xs, [v or 0.0 for v in values], width, label=legend, color=colour, hatch=hatch,
                      edgecolor="white" if not hatch else "black", linewidth=0.6)
        # The value over each bar ("n/a" where that model was not scored on the metric).
        texts = ["n/a" if v is None else f"{v:.2f}" for v in values]
        ax.bar_label(bars, texts, padding=2, fontsize=_FONT["value"])
    ax.set_xticks(range(len(labels)), labels, fontsize=_FONT["label"])
    ax.set_ylabel("score (0..1)", fontsize=_FONT["label"])
    ax.set_ylim(0, 1.12)  # room for the value labels over a bar at 1.0
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.tick_params(axis="y", labelsize=_FONT["tick"])
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    examples = f" ({evaluation.examples} test examples)" if evaluation.examples else ""
    fig.suptitle(f"{title}{examples}", fontsize=_FONT["title"])
    # Above the bars, not over them: a score of 1.0 reaches the top of the axes.
    ax.legend(fontsize=_FONT["legend"], loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=len(rows),
              frameon=False)
    return fig


def save_png(fig: Figure, path: Path) -> Path:
    # No "Software" entry: the same data renders the same bytes whatever the matplotlib patch version.
    fig.savefig(path, format="png", dpi=_DPI, metadata={"Software": None})
    return path


def write_charts(stage: Path, *, metrics: str, evaluation: EvaluationStatus | None, name: str,
                 pilot_metrics: str | None = None) -> dict[str, str]:
    """Draw loss.png and evaluation.png into `stage` from metrics.jsonl text (the pilot's too when given)
    and the evaluation; returns {kind: file name} of those written."""
    written: dict[str, str] = {}
    pilot = parse_metrics(pilot_metrics) if pilot_metrics is not None else None
    drawings = (
        (LOSS_KIND, LOSS_FILE,
         lambda: loss_figure(parse_metrics(metrics), pilot, title=f"{name}: training and eval loss")),
        (EVALUATION_KIND, EVALUATION_FILE,
         lambda: evaluation_figure(evaluation, title=f"{name}: base vs fine-tuned")),
    )
    for kind, file_name, draw in drawings:
        try:
            fig = draw()
            if fig is None:
                continue
            save_png(fig, stage / file_name)
        except Exception as err:  # a picture must not fail the artifacts (module docstring)
            log.warning("the model card goes without %s: drawing it failed: %s", file_name, err)
            continue
        written[kind] = file_name
    return written


def pilot_metrics_key() -> str:
    """The pilot's metrics.jsonl, relative to the main run's output (`finetune_operator.pilot.output_uri`)."""
    from finetune_operator import pilot

    return pilot.OUTPUT_DIR + "metrics.jsonl"


def pilot_metrics(run: Run) -> str | None:
    """The pilot's metrics.jsonl text for the main run of a job with spec.pilot (read through the run's
    storage: the pilot wrote it under `<output.uri>/pilot/`); None for the pilot itself, a job without one,
    or when it cannot be read (logged: the main curve alone is still worth drawing)."""
    if run.spec.pilot is None or run.config.stage == "pilot":
        return None
    key = pilot_metrics_key()
    try:
        return run.store.read_bytes(key).decode("utf-8", errors="replace")
    except Exception as err:
        log.warning("the loss curve goes without the pilot's: reading %s failed: %s", run.store.child(key), err)
        return None


def write_for_run(run: Run, stage: Path, evaluation: EvaluationStatus | None) -> dict[str, str]:
    """`write_charts` for a run staging its artifacts in `stage` (artifacts.py): its own metrics.jsonl, already
    copied there, and its pilot's (`pilot_metrics`)."""
    metrics_path = stage / "metrics.jsonl"
    metrics = metrics_path.read_text(encoding="utf-8") if metrics_path.is_file() else ""
    name = f"{run.config.name} (LoRA pilot)" if run.config.stage == "pilot" else run.config.name
    return write_charts(stage, metrics=metrics, evaluation=evaluation, name=name, pilot_metrics=pilot_metrics(run))
