"""Compare runs: loss curves side by side, a table, and bars of cost and quality.

Figures and tables read :class:`~helpers.run.record.Run` objects (``helpers.load_runs``): the run record (what was
trained and what it cost), the loss history and, once evaluated, the test metrics. Tables and the comparison
figure show finished runs only; an unfinished or failed one is left out with a printed note. Numbers are written
for people (:func:`people_number`, :func:`perplexity_change`), so the notebooks can print the same words.
Figures are returned, not shown, so a notebook displays one by leaving it as the last expression of a cell (or
with ``display(fig)``). The comparison figure's bar panels live in :mod:`helpers.plotting_panels`.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError
from .files import write_text
from .methods import METHODS
from .reference import load_reference_curves, reference_info
from .run.memory import MIB
from .run.record import Run, RunRecord, finished_runs, load_runs

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

METHOD_COLORS = {"freeze": "#1f77b4", "embedding": "#ff7f0e", "ptuning_v2": "#2ca02c", "lora": "#d62728"}
OTHER_COLORS = ("#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
OTHERS_LINESTYLE = "-."  # loss curves of runs made elsewhere (a bundle), next to the learner's solid ones
KEY_METRICS = {
    "ie": ("f1", "precision", "recall", "sample_f1", "char_f1"),
    "gen": ("bleu", "rouge_l", "distinct_1", "distinct_2", "duplicate_rate"),
    "cls": ("accuracy", "macro_f1", "invalid_rate", "rank_accuracy", "rank_macro_f1"),
}
MINUS = "\u2212"  # the typographic minus sign: "−6 %"


# ----------------------------------------------------------------------------------------------------------
# Numbers for people
# ----------------------------------------------------------------------------------------------------------


def people_number(value: float) -> str:
    """A number as people write it: 0.943, 21.5, 3,693, 45,264, 1.78 million, 6.58 billion."""
    if math.isnan(value):
        return "not a number"
    if math.isinf(value):
        return "∞" if value > 0 else MINUS + "∞"
    size = abs(value)
    if size >= 1e15:
        return f"{value:.3g}".replace("-", MINUS)
    for limit, word in ((1e12, "trillion"), (1e9, "billion"), (1e6, "million")):
        if size >= limit * 0.9995:  # 999,999 reads "1 million", not "1e+03 thousand"
            return f"{value / limit:.3g} {word}".replace("-", MINUS)
    text = f"{value:,.0f}" if size >= 999.5 else f"{value:.3g}"
    return text.replace("-", MINUS)


def perplexity_change(before: float, after: float) -> str:
    """How far a perplexity moved, in words: "+53 %", "−6 %", "×12.3", "×1.78 million" ("–" when undefined).

    A rise to twice the value or more reads as a multiple ("×1.78 million", not "+178048899.3 %"); a fall below a
    hundredth as a division ("÷250"); anything else as a percentage, whole below 1 % only when it is exactly 0.
    """
    if not (math.isfinite(before) and before > 0) or math.isnan(after) or after < 0:
        return "–"
    if math.isinf(after):
        return "×∞"
    ratio = after / before
    if ratio >= 2:
        return "×" + people_number(ratio)
    if 0 < ratio < 0.01:
        return "÷" + people_number(1 / ratio)
    percent = (ratio - 1) * 100
    text = f"{abs(percent):.{0 if abs(percent) >= 1 else 1}f}"
    if float(text) == 0:
        return "±0 %"
    return f"{'+' if percent > 0 else MINUS}{text} %"


# ----------------------------------------------------------------------------------------------------------
# Labels and colors
# ----------------------------------------------------------------------------------------------------------


def as_runs(runs: Run | Sequence[Run] | str | os.PathLike) -> list[Run]:
    """Runs as the figures take them: a list of :class:`Run`, one run, or where to load them from
    (:func:`~helpers.run.record.load_runs`: a run folder, a folder of runs, a bundle)."""
    if isinstance(runs, (str, os.PathLike)):
        return load_runs(runs)
    runs = [runs] if isinstance(runs, Run) else list(runs) if isinstance(runs, Iterable) else [runs]
    wrong = next((run for run in runs if not isinstance(run, Run)), None)
    if wrong is not None:
        raise UserError(f"runs must be Run objects (helpers.load_runs(\"runs\")) or a folder to load them from; got "
                        f"{type(wrong).__name__} {wrong!r:.60}")
    return runs


def method_color(method: str, index: int = 0) -> str:
    """The fixed color of a method (another method gets one of the spare colors)."""
    return METHOD_COLORS.get(method, OTHER_COLORS[index % len(OTHER_COLORS)])


def _colors(methods: Sequence[str]) -> list[str]:
    """One color per entry: the method's own, or a spare one shared by every run of that other method."""
    others = list(dict.fromkeys(method for method in methods if method not in METHOD_COLORS))
    return [method_color(method, others.index(method) if method in others else 0) for method in methods]


def model_short_name(model: str | None) -> str:
    """The model as a label names it: ``chatglm-6b-int4`` for ``THUDM/chatglm-6b-int4`` or a folder of that name."""
    return Path(model.rstrip("/\\")).name if model else "model not recorded"


def run_label(run: Run) -> str:
    """A run's label before telling apart runs that share it: the method; for a run made elsewhere (a bundle) the
    method with the model and the hardware it was measured on, ``lora (chatglm-6b-int4, NVIDIA A100-SXM4-40GB)``."""
    if run.source is None:
        return run.method
    return f"{run.method} ({model_short_name(run.record.model)}, {run.record.hardware or 'hardware not recorded'})"


def run_labels(runs: Sequence[Run]) -> list[str]:
    """Labels for runs (:func:`run_label`), plus the run name where several runs would share one."""
    labels = [run_label(run) for run in runs]
    counts = Counter(labels)
    return [label if counts[label] == 1 else f"{label} ({run.name})" if run.source is None else f"{label}: {run.name}"
            for run, label in zip(runs, labels)]


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


def _new_figure(rows: int, cols: int, size: tuple[float, float]):
    """A figure detached from pyplot: nothing pops up or piles up, and it still displays inline in Jupyter."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False)
    plt.close(fig)
    return fig, axes


def _loss_points(run: Run) -> list[tuple[float, float]]:
    return [(row["step"], row["loss"]) for row in run.history
            if isinstance(row.get("loss"), (int, float)) and "step" in row]


def plot_loss_curves(runs: Sequence[Run], ax: Axes | None = None, smooth_weight: float = 0.9, title: str | None = None
) -> Figure:
    """Training loss against step for every run: faint raw curve, smoothed curve, one color per method (runs made
    elsewhere dash-dotted)."""
    runs = as_runs(runs)
    if ax is None:
        fig, axes = _new_figure(1, 1, (7, 4.5))
        ax = axes[0, 0]
    drawn = False
    for run, label, color in zip(runs, run_labels(runs), _colors([run.method for run in runs])):
        points = _loss_points(run)
        if not points:
            continue
        steps, losses = zip(*points)
        style = "-" if run.source is None else OTHERS_LINESTYLE
        ax.plot(steps, losses, color=color, alpha=0.25, linewidth=1, linestyle=style)
        ax.plot(steps, smooth(losses, smooth_weight), color=color, linewidth=2, label=label, linestyle=style)
        drawn = True
    if drawn:
        ax.legend(fontsize=8)
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


def _timed_steps(record: RunRecord) -> int | None:
    """The steps ``train_runtime_s`` covers: those of the last training call (after a resume, only the rest)."""
    if record.global_step is None:
        return None
    return record.global_step - (record.resumed_from_step or 0)


def step_seconds(record: RunRecord) -> float | None:
    """Seconds per training step of one run (``None`` without a training time or steps)."""
    runtime, steps = _number(record.train_runtime_s), _timed_steps(record)
    return runtime / steps if runtime is not None and steps and steps > 0 else None


def seconds_per_step(runs: Sequence[Run]) -> dict[str, float | None]:
    """Each run's seconds per training step, by run name: the time that compares when step counts differ."""
    return {run.name: step_seconds(run.record) for run in runs}


@functools.lru_cache(maxsize=64)
def _full_size_peak(method: str, options: str) -> float | None:
    from .estimate import full_size_line

    try:
        return full_size_line(method, **json.loads(options)).peak_gib
    except (UserError, TypeError, ValueError):
        return None


def full_size_peak_gib(run: Run) -> float | None:
    """The estimated peak GPU memory, GiB, of the run's method and options on the full-size model (batch 1 x 512
    tokens, gradient checkpointing: :func:`helpers.estimate.full_size_line`); ``None`` for another method or options
    the estimate refuses."""
    if run.method not in METHODS:
        return None
    return _full_size_peak(run.method, json.dumps(run.record.method_options, sort_keys=True, default=str))


def _rows_per_step(record: RunRecord) -> int | None:
    batch, accumulation = record.setting("batch_size"), record.setting("grad_accum") or 1
    return batch * accumulation * (record.world_size or 1) if isinstance(batch, int) else None


def _costs(run: Run) -> dict[str, Any]:
    """What training cost, as ``comparison.json`` keeps it (new keys go at the end: older readers keep working)."""
    record = run.record
    trainable, total = record.trainable_params, record.all_params
    peak, start = _number(record.peak_memory_bytes), _number(record.memory_at_start_bytes)
    losses = [row["loss"] for row in run.history if _number(row.get("loss")) is not None]
    final_loss = _number(record.final_loss)
    return {
        "trainable_params": trainable,
        "trainable_pct": 100 * trainable / total if trainable is not None and total else None,
        "peak_memory_mb": peak / MIB if peak is not None else None,  # MiB, of the kind below
        "train_runtime_s": _number(record.train_runtime_s),
        "final_loss": final_loss if final_loss is not None else (float(losses[-1]) if losses else None),
        "peak_memory_kind": record.peak_memory_kind,  # "rss": this CPU process; "cuda": the GPU allocator
        "memory_at_start_mb": start / MIB if start is not None else None,
        "full_size_peak_gib": full_size_peak_gib(run),
        "global_step": record.global_step,
        "timed_steps": _timed_steps(record),
        "seconds_per_step": step_seconds(record),
        "rows_per_step": _rows_per_step(record),
    }


def comparison_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per finished run: what was trained, its main and key metrics, what it cost, its label in the figures
    and, for a run made elsewhere, the bundle it came from (``source``); missing values are None."""
    runs = finished_runs(as_runs(runs))
    rows = []
    for run, label in zip(runs, run_labels(runs)):
        metrics = run.metrics
        main = metrics.get("main_metric")
        row: dict[str, Any] = {
            "name": run.name, "method": run.method, "task": run.task, "status": run.record.status,
            "main_metric": main, "main_value": _number(metrics.get(main)) if main else None,
        }
        for key in (*KEY_METRICS.get(run.task, ()), "perplexity_before", "perplexity_after"):
            if key in metrics:
                row[key] = _number(metrics[key])
        row.update(_costs(run), label=label, source=run.source)
        rows.append(row)
    return rows


DIGITS = {"trainable_pct": 4, "peak_memory_mb": 0, "train_runtime_s": 1, "seconds_per_step": 3,
          "full_size_peak_gib": 1}
HEADERS = {"trainable_params": "trainable params", "trainable_pct": "trainable %", "peak_memory_mb": "peak MB",
           "train_runtime_s": "train s", "seconds_per_step": "s / step", "full_size_peak_gib": "full-size GiB (est.)",
           "final_loss": "final loss"}
MEMORY_KINDS = {"rss": "CPU process RSS", "cuda": "GPU"}


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


def perplexity_cell(row: dict[str, Any]) -> str:
    """Held-out perplexity before → after, with the change in words: ``3,693 → 5,634 (+53 %)``."""
    before, after = row.get("perplexity_before"), row.get("perplexity_after")
    if before is None or after is None:
        return "–"
    return f"{people_number(before)} → {people_number(after)} ({perplexity_change(before, after)})"


def _row_cell(row: dict[str, Any], key: str) -> str:
    if key == "perplexity":
        return perplexity_cell(row)
    if key == "method" and row.get("source"):  # made elsewhere: say on which model and hardware
        return _cell(key, row.get("label"))
    if key == "peak_memory_mb" and row.get(key) is not None and row.get("peak_memory_kind") in MEMORY_KINDS:
        return f"{_cell(key, row[key])} ({MEMORY_KINDS[row['peak_memory_kind']]})"
    return _cell(key, row.get(key))


def comparison_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a compact Markdown table: method, task metrics, forgetting, and what training cost (the measured
    peak in MiB with what was measured; the full-size GPU estimate in GiB)."""
    if not rows:
        return "_no runs found_\n"
    metric_keys = list(dict.fromkeys(k for row in rows for k in KEY_METRICS.get(row.get("task"), ()) if k in row))
    show_name = len({row["method"] for row in rows}) < len(rows) or any(r["name"] != r["method"] for r in rows)
    columns = ["name"] * show_name + ["method", *metric_keys, "perplexity", *HEADERS]
    lines = ["| " + " | ".join(HEADERS.get(c, c) for c in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_row_cell(row, key) for key in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------
# The comparison figure
# ----------------------------------------------------------------------------------------------------------


def plot_comparison(runs: Sequence[Run], path: str | os.PathLike | None = None) -> Figure:
    """Six panels: loss curves, task metrics, trainable parameters, memory (the full-size estimate next to what was
    measured), seconds per training step, and forgetting (held-out perplexity relative to the base model)."""
    from . import plotting_panels as panels

    fig, axes = _new_figure(2, 3, (18, 10.5))
    runs = finished_runs(as_runs(runs))
    rows = comparison_rows(runs)
    colors = _colors([row["method"] for row in rows])
    plot_loss_curves(runs, ax=axes[0, 0])
    panels.metrics_panel(axes[0, 1], rows, colors)
    panels.parameters_panel(axes[0, 2], rows, colors)
    panels.memory_panel(axes[1, 0], rows, colors)
    panels.time_panel(axes[1, 1], rows, colors)
    panels.forgetting_panel(axes[1, 2], rows, colors)
    tasks = sorted({row["task"] for row in rows if row["task"]})
    fig.suptitle(f"Fine-tuning methods compared{' on ' + ', '.join(tasks) if tasks else ''}", fontsize=14)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def write_comparison(runs: Sequence[Run], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``comparison.png``, ``comparison.md`` and ``comparison.json`` (the rows) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = finished_runs(as_runs(runs))
    rows = comparison_rows(runs)
    paths = {"png": out / "comparison.png", "md": out / "comparison.md", "json": out / "comparison.json"}
    plot_comparison(runs, paths["png"])
    write_text(paths["md"], comparison_markdown(rows))
    write_text(paths["json"], json.dumps(rows, ensure_ascii=False, indent=2) + "\n")
    return paths


# ----------------------------------------------------------------------------------------------------------
# The original course's curves next to the learner's
# ----------------------------------------------------------------------------------------------------------


def _learner_curves(runs: Any) -> list[tuple[str, str, list[float], list[float], bool]]:
    """(label, method, steps, losses, yours) of each run: a :class:`Run` (its loss history; a run from a bundle is
    not yours) or a (label, steps, losses) tuple (yours)."""
    if runs is None:
        return []
    if isinstance(runs, (Run, str, os.PathLike)):
        runs = as_runs(runs)
    labels = iter(run_labels([run for run in runs if isinstance(run, Run)]))
    curves = []
    for run in runs:
        if isinstance(run, Run):
            points, label, method, yours = _loss_points(run), next(labels), run.method, run.source is None
        else:
            label, steps, losses = run
            points, method, yours = list(zip(steps, losses)), str(label), True
        if points:
            steps, losses = zip(*points)
            curves.append((label, method, [float(s) for s in steps], [float(v) for v in losses], yours))
    return curves


def plot_reference_curves(runs: Any = None, methods: Sequence[str] | None = None, ax: Axes | None = None,
                          smooth_weight: float = 0.9, x: str = "fraction", title: str | None = None) -> Figure:
    """The original INT4 course's loss curves (dashed) next to your runs (solid), on the same axes.

    ``runs``: :class:`Run` objects (from :func:`load_runs`) or ``(label, steps, losses)`` tuples; runs from a bundle
    (made elsewhere) are drawn dash-dotted and labelled with their model and hardware. ``methods``: the reference
    curves to draw (default: those of the runs' methods, or all three when none has one). The reference runs lasted
    7,200 steps on the real model, a CPU run of the tiny model about 150, so by default (``x="fraction"``) every
    curve is drawn against the fraction of its own training, with both step counts in the legend; ``x="step"``
    draws raw steps on a log axis instead. Different models and vocabularies: compare the shapes of the curves, not
    their levels.
    """
    if x not in ("fraction", "step"):
        raise UserError(f"x={x!r}: use 'fraction' (each run's share of its own training) or 'step' (log axis)")
    learner = _learner_curves(runs)
    if methods is None:
        methods = [m for m in dict.fromkeys(curve[1] for curve in learner) if m in reference_info()["curves"]]
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
    for (label, _, steps, losses, yours), color in zip(learner, _colors([curve[1] for curve in learner])):
        style = "-" if yours else OTHERS_LINESTYLE
        ax.plot(position(steps), losses, color=color, alpha=0.25, linewidth=1, linestyle=style)
        ax.plot(position(steps), smooth(losses, smooth_weight), color=color, linewidth=2.5, linestyle=style,
                label=f"{'your run: ' if yours else ''}{label}, {steps[-1]:,.0f} steps")
    _reference_axes(ax, x, title)
    return ax.figure


def _reference_axes(ax: Axes, x: str, title: str | None) -> None:
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
