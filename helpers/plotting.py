"""Compare runs: loss curves side by side, a table, and bars of cost and quality.

Figures and tables read :class:`~helpers.run.record.Run` objects (``helpers.load_runs``): the run record (what was
trained and what it cost), the loss history and, once evaluated, the test metrics. Tables and the comparison
figure show finished runs only; an unfinished or failed one is left out with a printed note.
Figures are returned, not shown, so a notebook displays one by leaving it as the last expression of a cell (or
with ``display(fig)``).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError
from .files import write_text
from .reference import load_reference_curves, reference_info
from .run.memory import MIB
from .run.record import Run, finished_runs

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

METHOD_COLORS = {"freeze": "#1f77b4", "embedding": "#ff7f0e", "ptuning_v2": "#2ca02c", "lora": "#d62728"}
OTHER_COLORS = ("#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
KEY_METRICS = {
    "ie": ("f1", "precision", "recall", "sample_f1", "char_f1"),
    "gen": ("bleu", "rouge_l", "distinct_1", "distinct_2", "duplicate_rate"),
    "cls": ("accuracy", "macro_f1", "invalid_rate", "rank_accuracy", "rank_macro_f1"),
}


# ----------------------------------------------------------------------------------------------------------
# Curves
# ----------------------------------------------------------------------------------------------------------


def smooth(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased so it starts at the first value."""
    smoothed, last, steps = [], 0.0, 0
    for value in values:
        if not math.isfinite(value):
            smoothed.append(value)
            continue
        steps += 1
        last = last * weight + (1 - weight) * value
        smoothed.append(last / (1 - weight**steps) if weight < 1 else value)
    return smoothed


def method_color(method: str, index: int = 0) -> str:
    """The fixed color of a method (another method gets one of the spare colors)."""
    return METHOD_COLORS.get(method, OTHER_COLORS[index % len(OTHER_COLORS)])


def run_labels(runs: Sequence[Run]) -> list[str]:
    """Labels for runs: the method, plus the run name where several runs share a method."""
    counts = Counter(run.method for run in runs)
    return [run.method if counts[run.method] == 1 else f"{run.method} ({run.name})" for run in runs]


def _colors(runs: Sequence[Run]) -> list[str]:
    others = list(dict.fromkeys(run.method for run in runs if run.method not in METHOD_COLORS))
    return [method_color(run.method, others.index(run.method) if run.method in others else 0) for run in runs]


def _new_figure(rows: int, cols: int, size: tuple[float, float]):
    """A figure detached from pyplot: nothing pops up or piles up, and it still displays inline in Jupyter."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False)
    plt.close(fig)
    return fig, axes


def plot_loss_curves(runs: Sequence[Run], ax: Axes | None = None, smooth_weight: float = 0.9, title: str | None = None
) -> Figure:
    """Training loss against step for every run: faint raw curve, solid smoothed curve, one color per method."""
    if ax is None:
        fig, axes = _new_figure(1, 1, (7, 4.5))
        ax = axes[0, 0]
    drawn = False
    for run, label, color in zip(runs, run_labels(runs), _colors(runs)):
        points = [(row["step"], row["loss"]) for row in run.history
                  if isinstance(row.get("loss"), (int, float)) and "step" in row]
        if not points:
            continue
        steps, losses = zip(*points)
        ax.plot(steps, losses, color=color, alpha=0.25, linewidth=1)
        ax.plot(steps, smooth(losses, smooth_weight), color=color, linewidth=2, label=label)
        drawn = True
    if drawn:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no loss history yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title or "Training loss (smoothed; raw curve faint)")
    ax.grid(alpha=0.3)
    return ax.figure


# ----------------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def comparison_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per finished run: what was trained, its main and key metrics, and what it cost (missing: None)."""
    rows = []
    for run in finished_runs(runs):
        record, metrics = run.record, run.metrics
        main = metrics.get("main_metric")
        row: dict[str, Any] = {
            "name": run.name, "method": run.method, "task": run.task, "status": record.status,
            "main_metric": main, "main_value": _number(metrics.get(main)) if main else None,
        }
        for key in KEY_METRICS.get(run.task, ()):
            if key in metrics:
                row[key] = _number(metrics[key])
        for key in ("perplexity_before", "perplexity_after"):
            if key in metrics:
                row[key] = _number(metrics[key])
        trainable, total = record.trainable_params, record.all_params
        peak = _number(record.peak_memory_bytes)
        losses = [row_["loss"] for row_ in run.history if _number(row_.get("loss")) is not None]
        final_loss = _number(record.final_loss)
        row.update(
            trainable_params=trainable,
            trainable_pct=100 * trainable / total if trainable is not None and total else None,
            peak_memory_mb=peak / MIB if peak is not None else None,
            train_runtime_s=_number(record.train_runtime_s),
            final_loss=final_loss if final_loss is not None else (float(losses[-1]) if losses else None),
        )
        rows.append(row)
    return rows


DIGITS = {"trainable_pct": 4, "peak_memory_mb": 1, "train_runtime_s": 1, "perplexity_before": 2,
          "perplexity_after": 2}


def _cell(key: str, value: Any) -> str:
    if value is None or value == "":
        return "–"
    if isinstance(value, bool) or isinstance(value, str):
        return str(value).replace("|", "\\|")
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:,.{DIGITS.get(key, 4)}f}"
    return str(value)


HEADERS = {"trainable_params": "trainable params", "trainable_pct": "trainable %", "peak_memory_mb": "peak MB",
           "train_runtime_s": "train s", "final_loss": "final loss"}


def comparison_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a compact Markdown table: method, task metrics, forgetting, and what training cost."""
    if not rows:
        return "_no runs found_\n"
    metric_keys = list(dict.fromkeys(k for row in rows for k in KEY_METRICS.get(row.get("task"), ()) if k in row))
    show_name = len({row["method"] for row in rows}) < len(rows) or any(r["name"] != r["method"] for r in rows)
    columns = ["name"] * show_name + ["method", *metric_keys, "perplexity", *HEADERS]
    lines = ["| " + " | ".join(HEADERS.get(c, c) for c in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = []
        for key in columns:
            if key == "perplexity":
                before, after = row.get("perplexity_before"), row.get("perplexity_after")
                cells.append(f"{before:.1f} → {after:.1f}" if before is not None and after is not None else "–")
            else:
                cells.append(_cell(key, row.get(key)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------
# The comparison figure
# ----------------------------------------------------------------------------------------------------------


def _short(value: float) -> str:
    """A compact bar label: 1.2B, 3.4M, 5.6k, 0.523."""
    for limit, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.3g}"


def _labels(values: Sequence[float]) -> list[str]:
    """Bar labels in one format per panel: plain integers below 10,000 (no "1k" next to "626"), else 1.2M / 3.4k."""
    largest = max((abs(v) for v in values), default=0.0)
    if largest >= 1e4:
        return [_short(v) for v in values]
    if largest >= 10:
        return [f"{v:,.0f}" for v in values]
    return [f"{v:.3g}" for v in values]


def _bars(ax: Axes, runs: Sequence[Run], values: Sequence[float | None], title: str, ylabel: str, log: bool = False
) -> None:
    """One bar per run that has a value; a note in the panel when none has."""
    kept = [(label, color, value) for label, color, value in zip(run_labels(runs), _colors(runs), values)
            if value is not None]
    ax.set_title(title)
    if not kept:
        ax.text(0.5, 0.5, "not available yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    labels, colors, heights = zip(*kept)
    bars = ax.bar(range(len(kept)), heights, color=colors)
    ax.bar_label(bars, labels=_labels(heights), fontsize=8)
    ax.set_xticks(range(len(kept)), labels, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(axis="y", alpha=0.3)


HEADLINE_METRICS = {"ie": ("f1", "char_f1"), "gen": ("rouge_l", "bleu"), "cls": ("accuracy", "rank_accuracy")}
KEY_LABELS = {"f1": "F1 (exact triples)", "char_f1": "F1 (shared characters)", "rouge_l": "ROUGE-L (characters)",
              "bleu": "BLEU (characters)", "accuracy": "accuracy (generated label)",
              "rank_accuracy": "accuracy (most probable label)", "perplexity_before": "before training",
              "perplexity_after": "after training"}


def _grouped_bars(ax: Axes, runs: Sequence[Run], keys: Sequence[str], title: str, ylabel: str, empty: str) -> None:
    """Side-by-side bars of several ``metrics.json`` keys per run (grey shades, one per key, named in words)."""
    kept = [(label, run.metrics) for label, run in zip(run_labels(runs), runs) if any(k in run.metrics for k in keys)]
    ax.set_title(title)
    if not kept:
        ax.axis("off")
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)
        return
    width = 0.8 / len(keys)
    shades = ("#9e9e9e", "#404040", "#cfcfcf")
    for index, key in enumerate(keys):
        offset = (index - (len(keys) - 1) / 2) * width
        heights = [_number(metrics.get(key)) or 0.0 for _, metrics in kept]
        bars = ax.bar([p + offset for p in range(len(kept))], heights, width, color=shades[index % 3],
                      label=KEY_LABELS.get(key, key))
        ax.bar_label(bars, labels=_labels(heights), fontsize=7)
    ax.set_xticks(range(len(kept)), [label for label, _ in kept], rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)  # scores and perplexities are never negative (an all-zero panel stays readable)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def _perplexity_panel(ax: Axes, runs: Sequence[Run]) -> None:
    _grouped_bars(ax, runs, ("perplexity_before", "perplexity_after"), "Forgetting: held-out perplexity",
                  "perplexity (lower is better)", "No forgetting check yet:\nadd perplexity_before / perplexity_after\n"
                  "(held-out text) to metrics.json")


def _memory_panel(ax: Axes, runs: Sequence[Run], rows: Sequence[dict]) -> None:
    """Peak memory per run, with the part already in use when training started drawn lighter."""
    kinds = sorted({run.record.peak_memory_kind for run in runs if run.record.peak_memory_kind})
    _bars(ax, runs, [row["peak_memory_mb"] for row in rows], "Peak memory while training (light: at start)",
          f"MiB ({', '.join(kinds)})" if kinds else "MiB")
    starts = [(i, _number(run.record.memory_at_start_bytes)) for i, run in enumerate(runs)
              if _number(run.record.peak_memory_bytes) is not None]
    for position, (_, start) in enumerate(starts):
        if start is not None:
            ax.bar(position, start / MIB, color="white", alpha=0.45, width=0.8)


def plot_comparison(runs: Sequence[Run], path: str | os.PathLike | None = None) -> Figure:
    """Six panels: loss curves, task metrics, trainable parameters, peak memory, training time, forgetting."""
    fig, axes = _new_figure(2, 3, (17, 9.5))
    runs = finished_runs(runs)
    rows = comparison_rows(runs)
    plot_loss_curves(runs, ax=axes[0, 0])
    tasks = sorted({run.task for run in runs if run.task})
    headline = tuple(dict.fromkeys(k for task in tasks for k in HEADLINE_METRICS.get(task, ())))
    _grouped_bars(axes[0, 1], runs, headline or ("accuracy",), f"Task metrics on {', '.join(tasks) or '–'}",
                  "score (higher is better)", "not evaluated yet")
    _bars(axes[0, 2], runs, [row["trainable_params"] for row in rows], "Trainable parameters", "parameters (log)",
          log=True)
    _memory_panel(axes[1, 0], runs, rows)
    _bars(axes[1, 1], runs, [row["train_runtime_s"] for row in rows], "Training time", "time (s)")
    _perplexity_panel(axes[1, 2], runs)
    fig.suptitle(f"Fine-tuning methods compared{' on ' + ', '.join(tasks) if tasks else ''}", fontsize=14)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def write_comparison(runs: Sequence[Run], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``comparison.png``, ``comparison.md`` and ``comparison.json`` (the rows) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = finished_runs(runs)
    rows = comparison_rows(runs)
    paths = {"png": out / "comparison.png", "md": out / "comparison.md", "json": out / "comparison.json"}
    plot_comparison(runs, paths["png"])
    write_text(paths["md"], comparison_markdown(rows))
    write_text(paths["json"], json.dumps(rows, ensure_ascii=False, indent=2) + "\n")
    return paths


# ----------------------------------------------------------------------------------------------------------
# The original course's curves next to the learner's
# ----------------------------------------------------------------------------------------------------------


def _learner_curves(runs: Any) -> list[tuple[str, str, list[float], list[float]]]:
    """(label, method, steps, losses) of each run: a :class:`Run` (its loss history) or a (label, steps, losses)."""
    if runs is None:
        return []
    if isinstance(runs, Run):
        runs = [runs]
    folders = [run for run in runs if isinstance(run, Run)]
    labels = iter(run_labels(folders))
    curves = []
    for run in runs:
        if isinstance(run, Run):
            points = [(row["step"], row["loss"]) for row in run.history
                      if isinstance(row.get("loss"), (int, float)) and "step" in row]
            label, method = next(labels), run.method
        else:
            label, steps, losses = run
            points, method = list(zip(steps, losses)), str(label)
        if points:
            steps, losses = zip(*points)
            curves.append((label, method, [float(s) for s in steps], [float(v) for v in losses]))
    return curves


def plot_reference_curves(runs: Any = None, methods: Sequence[str] | None = None, ax: Axes | None = None,
                          smooth_weight: float = 0.9, x: str = "fraction", title: str | None = None) -> Figure:
    """The original INT4 course's loss curves (dashed) next to your runs (solid), on the same axes.

    ``runs``: :class:`Run` objects (from :func:`load_runs`) or ``(label, steps, losses)`` tuples. ``methods``: the
    reference curves to draw (default: those of the runs' methods, or all three when none has one). The reference
    runs lasted 7,200 steps on the real model, a CPU run of the tiny model about 150, so by default
    (``x="fraction"``) every curve is drawn against the fraction of its own training, with both step counts in the
    legend; ``x="step"`` draws raw steps on a log axis instead. Different models and vocabularies: compare the
    shapes of the curves, not their levels.
    """
    if x not in ("fraction", "step"):
        raise UserError(f"x={x!r}: use 'fraction' (each run's share of its own training) or 'step' (log axis)")
    learner = _learner_curves(runs)
    if methods is None:
        methods = [m for m in dict.fromkeys(method for _, method, _, _ in learner) if m in reference_info()["curves"]]
    reference = load_reference_curves(methods or None)
    if ax is None:
        _, axes = _new_figure(1, 1, (8, 4.8))
        ax = axes[0, 0]

    def position(steps: Sequence[float]) -> list[float]:
        return [s / steps[-1] for s in steps] if x == "fraction" else list(steps)

    for method, curve in reference.items():
        color, steps = method_color(method), curve["steps"]
        ax.plot(position(steps), curve["losses"], color=color, alpha=0.12, linewidth=0.8)
        ax.plot(position(steps), smooth(curve["losses"], smooth_weight), color=color, linestyle="--", linewidth=2,
                label=f"{curve['label']}: {method}, {steps[-1]:,} steps")
    others = [method for _, method, _, _ in learner if method not in METHOD_COLORS]
    for label, method, steps, losses in learner:
        color = method_color(method, others.index(method) if method in others else 0)
        ax.plot(position(steps), losses, color=color, alpha=0.25, linewidth=1)
        ax.plot(position(steps), smooth(losses, smooth_weight), color=color, linewidth=2.5,
                label=f"your run: {label}, {steps[-1]:,.0f} steps")
    if x == "fraction":
        ax.set_xlabel("fraction of each run's training (step / its last step)")
        ax.set_xlim(0, 1)
    else:
        ax.set_xscale("log")
        ax.set_xlabel("step (log scale)")
    ax.set_ylabel("training loss")
    ax.set_title(title or "Training loss: the original course next to your run\n"
                 "(different models and vocabularies: compare the shapes, not the levels)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return ax.figure
