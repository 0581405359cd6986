"""What a notebook shows: Markdown tables (plain text outside Jupyter), a live loss plot, the TensorBoard hint.

Tables are :class:`Table` objects whose ``repr`` is the Markdown text, so the same calls work in a console; the
live plot only draws when an IPython kernel is running.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..estimate import NOTEBOOK_GPUS, full_size_line
from ..plotting import METHOD_COLORS, comparison_markdown, comparison_rows, plot_comparison, smooth
from ..run.record import Run, read_predictions
from ..tasks import IGNORE_INDEX, TASKS, Example, Task, encode_example
from .runtime import interactive_frontend


@dataclasses.dataclass
class Table:
    """Markdown that a notebook renders as a table and a console prints as text."""

    text: str

    def _repr_markdown_(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return self.text


def _cell(value: Any, limit: int | None = None) -> str:
    text = str(value)
    if limit and len(text) > limit:
        text = text[:limit] + "…"
    return text.replace("|", "\\|").replace("\n", "<br>") or "∅"


def show_examples(examples: Sequence[Example], n: int = 3, width: int = 80) -> Table:
    """The first ``n`` rows of a split: input text (shortened to ``width`` characters) and expected answers."""
    lines = ["| # | text | answer |", "|---|---|---|"]
    for index, example in enumerate(examples[:n]):
        answers = "<br>or: ".join(_cell(t) for t in example.targets)
        lines.append(f"| {index} | {_cell(example.text, width)} | {answers} |")
    return Table("\n".join(lines) + f"\n\n{len(examples)} rows in this split.")


def layout_rows(tokenizer, task: Task, example: Example, **lengths: int) -> list[dict[str, Any]]:
    """Every position of one encoded training row: token, id, label, and its role in the layout."""
    row = encode_example(tokenizer, task, example, **lengths)
    ids, labels = row["input_ids"], row["labels"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    prompt = len(tokenizer.tokenize(task.prompt))
    gmask = ids.index(tokenizer.gmask_token_id)
    rows = []
    for position, (token, token_id, label) in enumerate(zip(tokens, ids, labels)):
        if position == gmask:
            role = "[gMASK]"
        elif position == gmask + 1:
            role = "<sop>"
        elif position == len(ids) - 1:
            role = "<eop>"
        else:
            role = "prompt" if position < prompt else "text" if position < gmask else "answer"
        rows.append({"position": position, "token": token, "id": token_id, "label": label, "role": role,
                     "scored": label != IGNORE_INDEX})
    return rows


def _shown_positions(rows: list[dict], head: int = 3, answer: int = 8) -> list[int]:
    """Positions worth showing: the start, the end of the text, the special tokens and the answer's ends."""
    gmask = next(r["position"] for r in rows if r["role"] == "[gMASK]")
    last = len(rows) - 1
    keep = set(range(min(head, gmask))) | set(range(max(gmask - 3, 0), gmask + 2))
    keep |= set(range(gmask + 2, min(gmask + 2 + answer, last))) | {last - 1, last}
    return sorted(p for p in keep if 0 <= p <= last)


def show_layout(tokenizer, task: Task, example: Example, full: bool = False, **lengths: int) -> Table:
    """One training row as ChatGLM sees it: tokens, ids, labels (-100 = not scored) and roles.

    Long rows are shortened around the interesting positions unless ``full``.
    """
    rows = layout_rows(tokenizer, task, example, **lengths)
    gmask = next(r["position"] for r in rows if r["role"] == "[gMASK]")
    answer = sum(r["role"] == "answer" for r in rows)
    summary = (f"**{len(rows)} tokens**: {gmask} of prompt and text (label -100: never scored), `[gMASK]` at "
               f"{gmask}, `<sop>` at {gmask + 1}, {answer} answer tokens, `<eop>` at {len(rows) - 1}. The labels "
               f"that are not -100 ({sum(r['scored'] for r in rows)} of them) are what the loss scores; "
               "inside the model position *i* predicts the label at *i + 1*.")
    lines = [summary, "", "| position | token | id | label | role |", "|---|---|---|---|---|"]
    previous = -1
    for position in range(len(rows)) if full else _shown_positions(rows):
        if position > previous + 1:
            lines.append(f"| … | ({position - previous - 1} more) | | | |")
        r = rows[position]
        label = "-100" if not r["scored"] else str(r["label"])
        lines.append(f"| {position} | `{_cell(r['token'])}` | {r['id']} | {label} | {r['role']} |")
        previous = position
    return Table("\n".join(lines))


def show_metrics(metrics: Mapping[str, Any]) -> Table:
    """The evaluation metrics as a two-column table, the task's main metric first and in bold."""
    main = metrics.get("main_metric")
    skip = {"task", "main_metric"}
    keys = ([main] if main in metrics else []) + [k for k in metrics if k not in skip and k != main]
    lines = ["| metric | value |", "|---|---|"]
    for key in keys:
        value = metrics[key]
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"| **{key}** (main) | **{text}** |" if key == main else f"| {key} | {text} |")
    return Table("\n".join(lines))


def show_predictions(run_dir: str | os.PathLike, n: int = 3, width: int = 60) -> Table:
    """The first ``n`` test answers of a run next to their references (from ``predictions.jsonl``)."""
    lines = ["| text | model's answer | reference |", "|---|---|---|"]
    for row in read_predictions(run_dir, limit=n):
        lines.append(f"| {_cell(row['text'], width)} | {_cell(row['prediction'], width)} | "
                     f"{_cell(row['references'][0], width)} |")
    return Table("\n".join(lines))


def show_artifact(run_dir: str | os.PathLike) -> Table:
    """The files of a run's ``artifact/`` folder and their sizes: all a method needs on top of the base model."""
    folder = Path(run_dir) / "artifact"
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    lines = ["| file | size |", "|---|---|"] + [f"| {p.relative_to(folder)} | {p.stat().st_size / 1024:,.1f} KiB |"
                                                for p in files]
    total = sum(p.stat().st_size for p in files)
    return Table("\n".join(lines) + f"\n\n{len(files)} files, {total / 2**20:,.2f} MiB in {folder.name}/.")


def shell_active() -> bool:
    try:
        from IPython.core.interactiveshell import InteractiveShell
    except ImportError:
        return False
    return InteractiveShell.initialized()


class LiveLossPlot(TrainerCallback):
    """Redraws the training loss in place every ``every`` logged steps (pass to ``helpers.train(callbacks=...)``).

    In a notebook the figure is one output that updates; elsewhere nothing is shown and :meth:`figure` still
    draws the curve so far.
    """

    def __init__(self, every: int = 5, method: str | None = None, smooth_weight: float = 0.9) -> None:
        self.every, self.method, self.smooth_weight = max(1, every), method, smooth_weight
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.max_steps = 0
        self._handle = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.max_steps = state.max_steps or args.max_steps
        self._show()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        self.steps.append(state.global_step)
        self.losses.append(float(logs["loss"]))
        if len(self.losses) % self.every == 0:
            self._show()

    def on_train_end(self, args, state, control, **kwargs):
        self._show()

    def figure(self):
        """The curve so far: raw loss faint, smoothed loss solid."""
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.8))
        plt.close(fig)
        color = METHOD_COLORS.get(self.method or "", "#1f77b4")
        if self.losses:
            ax.plot(self.steps, self.losses, color=color, alpha=0.3, linewidth=1, label="loss")
            ax.plot(self.steps, smooth(self.losses, self.smooth_weight), color=color, linewidth=2, label="smoothed")
            ax.legend(loc="upper right")
        if self.max_steps:
            ax.set_xlim(0, self.max_steps)
        step = self.steps[-1] if self.steps else 0
        last = f", loss {self.losses[-1]:.4f}" if self.losses else ""
        ax.set_title(f"{self.method or 'training'}: step {step}/{self.max_steps or '?'}{last}")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        return fig

    def _show(self) -> None:
        if not shell_active():
            return
        from IPython.display import display

        fig = self.figure()
        if self._handle is None:
            self._handle = display(fig, display_id=True)
        else:
            self._handle.update(fig)


def tensorboard_hint(logdir: str | os.PathLike) -> None:
    """Print how to open TensorBoard on ``logdir`` (used where no server should be started)."""
    print("TensorBoard is not started here (no interactive notebook frontend). To watch the runs:\n"
          f"  in a terminal:        tensorboard --logdir {logdir}\n"
          f"  in Colab or Jupyter:  %load_ext tensorboard   then   %tensorboard --logdir {logdir}")


def show_runs(runs: Sequence[Run], runs_dir: str | os.PathLike) -> Table:
    """The runs found (name, task, model, steps, status), or a clear message when there are none."""
    if not runs:
        return Table(f"**No runs found in `{runs_dir}`.** Run the method notebooks 01–04 first (each writes a "
                     "`<method>-<task>` run there), or set `QUICK_COMPARE = True` (environment: "
                     "`COURSE_QUICK_COMPARE=1`) to train all four methods briefly in this notebook. The cells "
                     "below still run; their plots and tables stay empty.")
    lines = ["| run | method | task | model | steps | status | evaluated |", "|---|---|---|---|---|---|---|"]
    for run in runs:
        model = str(run.record.model or "–")
        model = Path(model).name if Path(model).is_dir() else model  # a local folder: its name is enough
        step = run.record.global_step if run.record.global_step is not None else "–"
        lines.append(f"| {run.name} | {run.method} | {run.task} | {model} | {step} | {run.status} | "
                     f"{'yes' if run.metrics else 'no'} |")
    return Table("\n".join(lines) + f"\n\n{len(runs)} runs in `{runs_dir}`.")


def full_size_table(variants: Sequence[tuple[str, dict]] | None = None) -> Table:
    """The four methods (and variants) at full size, side by side, as a Markdown table."""
    variants = variants or [("freeze", {}), ("freeze", {"dequantize": True}), ("embedding", {}),
                            ("ptuning_v2", {}), ("ptuning_v2", {"prefix_projection": False}), ("lora", {})]
    lines = ["| method | options | trainable params | trainable % | weights + optimizer GiB | peak GiB | "
             + " | ".join(f"fits {gpu}" for gpu in NOTEBOOK_GPUS) + " |", "|---" * (6 + len(NOTEBOOK_GPUS)) + "|"]
    for method, options in variants:
        size = full_size_line(method, **options)
        percent = size.line.rsplit(":", 1)[1].strip()
        fits = " | ".join("yes" if ok else "no" for ok in size.fits().values())
        lines.append(f"| {method} | {', '.join(f'{k}={v}' for k, v in options.items()) or 'defaults'} | "
                     f"{size.trainable:,} | {percent} | {size.total_gib:.1f} | {size.peak_gib:.1f} | {fits} |")
    return Table("\n".join(lines))



class ComparisonExplorer:
    """Widgets to pick a task and methods; the comparison figure and table below them follow the choice.

    The figure and table are ordinary outputs updated in place; without an interactive frontend only they are
    shown.
    """

    def __init__(self, runs: Sequence[Run], task: str | None = None) -> None:
        import ipywidgets as widgets

        self.runs = list(runs)
        tasks = [t for t in TASKS if any(run.task == t for run in self.runs)] or list(TASKS)
        methods = list(dict.fromkeys(run.method for run in self.runs))
        self.task = widgets.Dropdown(options=tasks, value=task if task in tasks else tasks[0], description="task")
        self.methods = widgets.SelectMultiple(options=methods, value=tuple(methods), description="methods",
                                              rows=max(2, len(methods)))
        self.task.observe(self.update, names="value")
        self.methods.observe(self.update, names="value")
        self.controls = widgets.HBox([self.task, self.methods])
        self._figure = self._table = None

    def selected(self) -> list[Run]:
        return [run for run in self.runs if run.task == self.task.value and run.method in self.methods.value]

    def views(self):
        runs = self.selected()
        return plot_comparison(runs), Table(comparison_markdown(comparison_rows(runs)))

    def show(self) -> None:
        """Display the controls, then the figure and table for the current choice.

        Run headless (papermill, the tests) there is nobody to use the controls, and a saved notebook would keep
        only their text repr (``HBox(children=...``), so only the figure and table are shown there.
        """
        from IPython.display import display

        if interactive_frontend():
            display(self.controls)
        figure, table = self.views()
        self._figure = display(figure, display_id=True)
        self._table = display(table, display_id=True)

    def update(self, change=None) -> None:
        """Redraw the figure and table (called by the widgets; call it yourself after changing ``runs``)."""
        figure, table = self.views()
        if self._figure is not None:
            self._figure.update(figure)
            self._table.update(table)


def share_table(runs: Sequence[Run]) -> Table:
    """Each run's trainable share of its model next to the same method's at full size (Freeze with the course's 5 of
    28 layers): on a small model the shares are not the real ones, one reason a toy ranks methods differently."""
    lines = ["| run | trainable here | share here | trainable at full size | share at full size |",
             "|---|---|---|---|---|"]
    for run in runs:
        record = run.record
        if not record.trainable_params or not record.all_params:
            continue
        try:
            options = {k: v for k, v in record.method_options.items() if k != "layers"}  # Freeze: the course's 5
            full = full_size_line(run.method, **options)
        except Exception:  # noqa: BLE001 - a method or options the full-size model does not take: no column
            full = None
        here = f"{record.trainable_params:,} | {_percent(record.trainable_params / record.all_params)}"
        there = f"{full.trainable:,} | {_percent(full.trainable / full.all_params)}" if full else "– | –"
        lines.append(f"| {run.name} | {here} | {there} |")
    return Table("\n".join(lines))


def _percent(share: float) -> str:
    """A share as a percentage with two significant digits at least: 35 %, 1.6 %, 0.0024 %."""
    return f"{100 * share:.2g} %" if share < 0.1 else f"{100 * share:.0f} %"


def _ranked(items: list[tuple[str, float]], larger_first: bool = True) -> str:
    """``a 0.139 > b 0.072 = c 0.072``: the order and where values tie."""
    ordered = sorted(items, key=lambda item: -item[1] if larger_first else item[1])
    text = f"{ordered[0][0]} {ordered[0][1]:.3f}"
    for (_, previous), (name, value) in zip(ordered, ordered[1:]):
        sign = "=" if round(previous, 3) == round(value, 3) else ">" if larger_first else "<"
        text += f" {sign} {name} {value:.3f}"
    return text


def rankings(runs: Sequence[Run]) -> list[str]:
    """Lines ranking the runs by their task's main metric and by their final training loss, and the published
    full-size IE ranking with its source, so a reader sees where the toy agrees with the real model and where not."""
    from ..reference import published_results

    evaluated = [run for run in runs if run.metrics.get("main_metric") in run.metrics]
    lines = []
    if evaluated:
        main = evaluated[0].metrics["main_metric"]
        lines.append(f"your runs by {main}: " + _ranked([(run.name, run.metrics[main]) for run in evaluated]))
    with_loss = [run for run in runs if run.record.final_loss is not None]
    if with_loss:
        lines.append("your runs by final training loss (lowest first): "
                     + _ranked([(run.name, run.record.final_loss) for run in with_loss], larger_first=False))
    table = published_results()
    rows = sorted(table["rows"], key=lambda row: -row["ie_f1"])
    lines.append(f"published, ChatGLM-6B fp16, IE F1 ({table['repository']}, {table['ie_test_rows']} test rows): "
                 + " > ".join(f"{row['method']} {row['ie_f1']}" for row in rows))
    return lines
