"""The comparison figure's bar panels (:func:`helpers.plotting.plot_comparison`), each saying what it draws.

Every panel reads the rows of :func:`helpers.plotting.comparison_rows` (one per finished run, with its ``label``) and
one color per row, so the figure, ``comparison.md`` and ``comparison.json`` show the same numbers:

* task metrics and trainable parameters: plain bars;
* memory: the course's estimate for the full-size model on a GPU next to what was measured, in the unit the axis
  names; a CPU run's measurement is this process's resident memory (RSS), which says little about a GPU;
* time: seconds per training step, since methods may train different numbers of steps;
* forgetting: held-out perplexity after training relative to the base model, on a log axis, so a run that made it a
  million times worse and one that improved it by 6 % both stay readable.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .plotting import people_number, perplexity_change

if TYPE_CHECKING:
    from matplotlib.axes import Axes

Row = dict[str, Any]
HEADLINE_METRICS = {"ie": ("f1", "char_f1"), "gen": ("rouge_l", "bleu"), "cls": ("accuracy", "rank_accuracy")}
KEY_LABELS = {"f1": "F1 (exact triples)", "char_f1": "F1 (shared characters)", "rouge_l": "ROUGE-L (characters)",
              "bleu": "BLEU (characters)", "accuracy": "accuracy (generated label)",
              "rank_accuracy": "accuracy (most probable label)"}
SHADES = ("#9e9e9e", "#404040", "#cfcfcf")
MEASURED = {"rss": "this CPU process (RSS)", "cuda": "GPU peak"}
FULL_SIZE = "full-size model on a GPU, estimated\n(batch 1 × 512 tokens, gradient checkpointing)"
NICE_RATIOS = (0.1, 0.2, 0.5, 0.8, 0.9, 1, 1.1, 1.25, 1.5, 2, 3, 5, 10)  # ticks of an axis under a power of ten
SMALLEST_SHARE = 0.03  # a forgetting bar shorter than this share of the axis is drawn this tall, hatched


# ----------------------------------------------------------------------------------------------------------
# Bars
# ----------------------------------------------------------------------------------------------------------


def _short(value: float) -> str:
    """A compact bar label: 1.2B, 3.4M, 5.6k, 0.523."""
    for limit, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.3g}"


def _labels(values: Sequence[float | None]) -> list[str]:
    """Bar labels in one format per panel: plain integers below 10,000 (no "1k" next to "626"), else 1.2M / 3.4k;
    a missing value reads "–"."""
    largest = max((abs(v) for v in values if v is not None), default=0.0)
    if largest >= 1e4:
        return ["–" if v is None else _short(v) for v in values]
    if largest >= 10:
        return ["–" if v is None else f"{v:,.0f}" for v in values]
    return ["–" if v is None else f"{v:.3g}" for v in values]


def _ticks(ax: Axes, labels: Sequence[str]) -> None:
    """Run labels under the bars, wrapped (a run made elsewhere names its model and hardware) and slanted."""
    ax.set_xticks(range(len(labels)), [textwrap.fill(label, 26) for label in labels], rotation=20, ha="right",
                  fontsize=10 if len(labels) <= 4 else 8)


def _label_size(count: int) -> int:
    return 8 if count <= 4 else 7


def _empty(ax: Axes, text: str) -> None:
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)


def _bars(ax: Axes, rows: Sequence[Row], colors: Sequence[str], values: Sequence[float | None], title: str,
          ylabel: str, texts: Sequence[str] | None = None, log: bool = False) -> None:
    """One bar per row that has a value, labelled with ``texts`` (default: the values); a note when none has."""
    texts = texts if texts is not None else _labels(values)
    kept = [(row["label"], color, value, text) for row, color, value, text in zip(rows, colors, values, texts)
            if value is not None]
    ax.set_title(title, fontsize=10)
    if not kept:
        _empty(ax, "not available yet")
        return
    labels, bar_colors, heights, bar_texts = zip(*kept)
    bars = ax.bar(range(len(kept)), heights, color=bar_colors)
    ax.bar_label(bars, labels=bar_texts, fontsize=_label_size(len(kept)), padding=2)
    _ticks(ax, labels)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.margins(y=0.2)
    ax.grid(axis="y", alpha=0.3)


def _grouped_bars(ax: Axes, labels: Sequence[str], series: dict[str, list[float | None]], title: str, ylabel: str,
                  texts: dict[str, list[str]] | None = None) -> None:
    """Side-by-side bars of several named series per run (grey shades, one per series, named in the legend); a
    missing value is an empty slot labelled "–"."""
    ax.set_title(title, fontsize=10)
    width, tallest = 0.8 / len(series), 0.0
    for index, (name, values) in enumerate(series.items()):
        offset = (index - (len(series) - 1) / 2) * width
        bars = ax.bar([p + offset for p in range(len(labels))], [v or 0.0 for v in values], width,
                      color=SHADES[index % len(SHADES)], label=name)
        ax.bar_label(bars, labels=(texts or {}).get(name) or _labels(values), fontsize=7, padding=2)
        tallest = max([tallest, *(v for v in values if v is not None)])
    _ticks(ax, labels)
    ax.set_ylabel(ylabel)
    # Never negative (scores, memory); room above the bars for the legend, and an all-zero panel stays readable.
    ax.set_ylim(0, 1.35 * tallest or 1.0)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(axis="y", alpha=0.3)


# ----------------------------------------------------------------------------------------------------------
# Task metrics, trainable parameters
# ----------------------------------------------------------------------------------------------------------


def metrics_panel(ax: Axes, rows: Sequence[Row], colors: Sequence[str]) -> None:
    """The headline metrics of the runs' tasks, side by side per evaluated run."""
    tasks = sorted({row["task"] for row in rows if row["task"]})
    keys = tuple(dict.fromkeys(k for task in tasks for k in HEADLINE_METRICS.get(task, ()))) or ("accuracy",)
    kept = [row for row in rows if any(row.get(key) is not None for key in keys)]
    title = f"Task metrics on {', '.join(tasks) or '–'}"
    if not kept:
        ax.set_title(title, fontsize=10)
        _empty(ax, "not evaluated yet")
        return
    series = {KEY_LABELS.get(key, key): [row.get(key) for row in kept] for key in keys}
    _grouped_bars(ax, [row["label"] for row in kept], series, title, "score (higher is better)")


def parameters_panel(ax: Axes, rows: Sequence[Row], colors: Sequence[str]) -> None:
    """Trainable parameters of each run, on a log axis (they span orders of magnitude)."""
    _bars(ax, rows, colors, [row["trainable_params"] for row in rows], "Trainable parameters (this run's model)",
          "parameters (log scale)", log=True)


# ----------------------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------------------


def memory_panel(ax: Axes, rows: Sequence[Row], colors: Sequence[str]) -> None:
    """Memory, saying what each number is: on GPU runs the measured peak next to the full-size estimate (GiB); on CPU
    runs the full-size estimate as bars, the measured RSS of this process (MiB) in the labels."""
    kinds = {row.get("peak_memory_kind") for row in rows if row.get("peak_memory_mb") is not None}
    if kinds == {"cuda"}:
        _gpu_memory(ax, rows)
    elif any(row.get("full_size_peak_gib") is not None for row in rows):
        _estimated_memory(ax, rows, colors, kinds)
    else:
        _measured_memory(ax, rows, colors, kinds)


def _measured(row: Row) -> str:
    """A row's measured peak in its own unit: ``RSS 690 MiB (515 at start)`` or ``GPU peak 7.9 GiB``."""
    mib, start = row.get("peak_memory_mb"), row.get("memory_at_start_mb")
    if mib is None:
        return "not measured"
    if row.get("peak_memory_kind") == "cuda":
        return f"GPU peak\n{mib / 1024:.1f} GiB"
    at_start = f"\n({start:,.0f} at start)" if start is not None else ""
    return f"{'RSS' if row.get('peak_memory_kind') == 'rss' else 'measured'} {mib:,.0f} MiB{at_start}"


def _gpu_memory(ax: Axes, rows: Sequence[Row]) -> None:
    measured = [row["peak_memory_mb"] / 1024 if row.get("peak_memory_mb") is not None else None for row in rows]
    estimated = [row.get("full_size_peak_gib") for row in rows]
    series = {"measured GPU peak (this run's settings)": measured,
              "full-size estimate (batch 1 × 512 tokens, checkpointing)": estimated}
    texts = {name: [f"{v:.1f}" if v is not None else "–" for v in values] for name, values in series.items()}
    _grouped_bars(ax, [row["label"] for row in rows], series,
                  "GPU memory, GiB: measured peak next to the full-size estimate", "GiB (GPU)", texts)


def _estimated_memory(ax: Axes, rows: Sequence[Row], colors: Sequence[str], kinds: set) -> None:
    estimates = [row.get("full_size_peak_gib") for row in rows]
    texts = [(f"{gib:.1f} GiB" if gib is not None else "no estimate") + "\n" + _measured(row)
             for row, gib in zip(rows, estimates)]
    what = "this CPU process (RSS), MiB" if kinds <= {"rss"} else "CPU process RSS in MiB, GPU peak in GiB"
    _bars(ax, rows, colors, [gib if gib is not None else 0.0 for gib in estimates],
          f"Memory: bars = full-size model on a GPU (estimate, GiB);\nlabels also give what was measured: {what}",
          "GiB, " + FULL_SIZE, texts=texts)
    ax.yaxis.label.set_fontsize(8)
    ax.margins(y=0.35)  # room for the three-line labels


def _measured_memory(ax: Axes, rows: Sequence[Row], colors: Sequence[str], kinds: set) -> None:
    """No full-size estimate for any run: the measured peak in MiB, the part in use at the start drawn lighter."""
    what = " and ".join(MEASURED.get(kind, "measured peak") for kind in sorted(kinds, key=str)) or "measured peak"
    values = [row.get("peak_memory_mb") for row in rows]
    _bars(ax, rows, colors, values, f"Peak memory while training: {what}\n(light: already in use at the start)",
          f"{what}, MiB")
    starts = [row.get("memory_at_start_mb") for row, value in zip(rows, values) if value is not None]
    for position, start in enumerate(starts):
        if start is not None:
            ax.bar(position, start, color="white", alpha=0.45, width=0.8)


# ----------------------------------------------------------------------------------------------------------
# Time
# ----------------------------------------------------------------------------------------------------------


def _time_label(row: Row, rows_each: bool) -> str:
    """``1.19 s/step`` over ``357 s, 300 steps`` (and the rows per step when runs differ in it)."""
    if row.get("seconds_per_step") is None:
        return ""
    text = f"{row['seconds_per_step']:.3g} s/step\n{row['train_runtime_s']:,.0f} s, {row['timed_steps']:,} steps"
    return text if rows_each or row.get("rows_per_step") is None else f"{text}\n{row['rows_per_step']} rows/step"


def time_panel(ax: Axes, rows: Sequence[Row], colors: Sequence[str]) -> None:
    """Seconds per training step (runs may train different numbers of steps), the total and steps in the labels."""
    timed = [row for row in rows if row.get("seconds_per_step") is not None]
    sizes = {row.get("rows_per_step") for row in timed}
    same = len(sizes) == 1 and None not in sizes
    each = f", {sizes.pop()} rows each" if same else ""
    _bars(ax, rows, colors, [row.get("seconds_per_step") for row in rows],
          f"Training time per step{each}\n(labels: total seconds and steps trained)", "seconds per training step",
          texts=[_time_label(row, same) for row in rows])


# ----------------------------------------------------------------------------------------------------------
# Forgetting
# ----------------------------------------------------------------------------------------------------------


def _ratio(row: Row) -> float | None:
    before, after = row.get("perplexity_before"), row.get("perplexity_after")
    if before is None or after is None or not (before > 0 and after > 0) or not math.isfinite(after / before):
        return None
    return after / before


def _log_limits(ratios: Sequence[float]) -> tuple[float, float]:
    """The axis limits, as powers of ten: every ratio and ×1, with room for the labels beyond the bars."""
    low, high = min(0.0, *map(math.log10, ratios)), max(0.0, *map(math.log10, ratios))
    pad = max(0.12 * (high - low), 0.05)
    return low - pad, high + pad


def _drawn_end(ratio: float, least: float) -> float:
    """Where a bar from ×1 ends, as a power of ten: at the ratio, or ``least`` away from ×1 when that is closer."""
    power = math.log10(ratio)
    return power if abs(power) >= least else math.copysign(least, power if power else 1.0)


def forgetting_panel(ax: Axes, rows: Sequence[Row], colors: Sequence[str]) -> None:
    """Held-out perplexity after training relative to the base model: bars from ×1 on a log axis, labelled in words."""
    kept = [(row, color, _ratio(row)) for row, color in zip(rows, colors) if _ratio(row) is not None]
    befores = {round(row["perplexity_before"], 6) for row, _, _ in kept}
    base = f"base model {people_number(befores.pop())}; " if len(befores) == 1 else ""
    ax.set_title(f"Forgetting: held-out perplexity after training relative\nto the base model ({base}higher = more "
                 "forgetting)", fontsize=10)
    if not kept:
        _empty(ax, "No forgetting check yet:\nadd perplexity_before / perplexity_after\n"
                   "(held-out text) to metrics.json")
        return
    bottom, top = _log_limits([ratio for _, _, ratio in kept])
    least = SMALLEST_SHARE * (top - bottom)
    hatched = False
    for position, (row, color, ratio) in enumerate(kept):
        end = 10 ** _drawn_end(ratio, least)
        small = not math.isclose(end, ratio)
        hatched |= small
        ax.bar(position, end - 1, bottom=1, color=color, hatch="////" if small else None, edgecolor="white",
               linewidth=0)
        ax.annotate(perplexity_change(row["perplexity_before"], row["perplexity_after"]), (position, end),
                    xytext=(0, 3 if end >= 1 else -3), textcoords="offset points", ha="center",
                    va="bottom" if end >= 1 else "top", fontsize=_label_size(len(kept)))
    _ratio_axis(ax, bottom, top, [row["label"] for row, _, _ in kept], hatched)


def _ratio_axis(ax: Axes, bottom: float, top: float, labels: Sequence[str], hatched: bool) -> None:
    """A log axis of ratios labelled ×0.1, ×1, ×10 ... ×1 million, the ×1 line, and a legend for hatched bars."""
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_yscale("log")
    ax.set_ylim(10**bottom, 10**top)
    if top - bottom < 1:  # less than a power of ten: ticks at round ratios (×0.9, ×1.1, ×1.5), none of the minor ones
        ax.set_yticks([ratio for ratio in NICE_RATIOS if 10**bottom <= ratio <= 10**top])
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: "×" + people_number(value)))
    ax.yaxis.set_minor_formatter(NullFormatter())
    line = ax.axhline(1, color="black", linewidth=1, label="×1: no change from the base model")
    handles = [line] + [Patch(facecolor="#9e9e9e", hatch="////", edgecolor="white",
                              label="too small to see at this scale:\ndrawn taller, the label is exact")] * hatched
    ax.legend(handles=handles, fontsize=7, loc="best")
    _ticks(ax, labels)
    ax.set_ylabel("perplexity after ÷ before (log scale)")
    ax.grid(axis="y", alpha=0.3)
