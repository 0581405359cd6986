"""What keeps the course notebooks short: parameters, the one setup call, training and evaluation in a cell each.

Runtime detection lives in :mod:`helpers.runtime` and the tables and live plot in :mod:`helpers.display`; their
names are re-exported here, so a notebook needs only ``from helpers import notebook as nb``. Everything also works
outside Jupyter: tables are Markdown objects whose plain ``repr`` is the Markdown text.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .data import TASKS, Task
from .display import (  # noqa: F401  (re-exported for the notebooks)
    LiveLossPlot,
    Table,
    _shell_active,
    layout_rows,
    show_artifact,
    show_examples,
    show_layout,
    show_metrics,
    show_predictions,
    show_runs,
    tensorboard_hint,
)
from .estimate import GPUS, NOTEBOOK_GPUS, PEAK_SETTINGS, FullSize, full_size_line  # noqa: F401  (re-exported)
from .plotting import comparison_markdown, comparison_rows, plot_comparison
from .run_policy import (  # noqa: F401  (re-exported for the notebooks)
    find_runs,
    main_task,
    quick_runs,
    replace_or_resume_run,
    task_for,
    training_options,
)
from .runs import Run, RunRecord
from .runtime import (  # noqa: F401  (re-exported for the notebooks)
    _FALSE,
    _TRUE,
    GIB,
    REAL_MODEL,
    TOY_BANNER,
    _parse_bool,
    choose_model,
    default_runs_dir,
    in_colab,
    interactive_frontend,
    is_toy,
    native_bf16,
    repository_root,
    runtime_info,
    runtime_report,
)

ENV_PREFIX = "COURSE_"
GPUS_GIB = NOTEBOOK_GPUS  # usable GiB of the GPUs the notebooks size for (helpers.estimate)

DRIVE_RUNS_DIR = "/content/drive/MyDrive/chatglm-course/runs"  # where DRIVE = True keeps the runs on Colab

# ----------------------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------------------

PARAMETER_TYPES: dict[str, type] = {
    "model": str, "task": str, "steps": int, "eval_limit": int, "runs_dir": str, "batch_size": int,
    "learning_rate": float, "full_data": bool, "quick_compare": bool, "layers": int, "dequantize": bool,
    "r": int, "alpha": int, "pre_seq_len": int, "prefix_projection": bool, "drive": bool,
}


def _convert(key: str, raw: str, kind: type) -> Any:
    if kind is bool:
        return _parse_bool(key, raw)
    if raw.strip().lower() in ("none", "all"):
        return None
    try:
        return kind(raw.strip())
    except ValueError:
        raise ValueError(f"{key}={raw!r}: expected {kind.__name__}") from None


class Params(SimpleNamespace):
    """The notebook's parameters as attributes (``P.task``); ``sources`` says where each value came from."""

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k != "sources"}

    def __repr__(self) -> str:
        sources = getattr(self, "sources", {})
        return "\n".join(f"{k:<18} = {v!r:<28} ({sources.get(k, 'notebook')})" for k, v in self.as_dict().items())


def params_from_env(environ: Mapping[str, str] | None = None, **defaults: Any) -> Params:
    """The notebook's parameters: each ``name=default`` unless the variable ``COURSE_<NAME>`` is set.

    Environment variables win over the notebook's parameters cell, so CI (or you) can shorten a run without
    editing the notebook: ``COURSE_STEPS=8 COURSE_EVAL_LIMIT=4``. Values are converted to the parameter's type;
    ``none``/``all`` give ``None``.
    """
    environ = os.environ if environ is None else environ
    values, sources = {}, {}
    for name, default in defaults.items():
        key = ENV_PREFIX + name.upper()
        raw = environ.get(key, "")
        if not raw.strip():
            values[name], sources[name] = default, "notebook"
            continue
        kind = PARAMETER_TYPES.get(name) or (type(default) if default is not None else str)
        values[name], sources[name] = _convert(key, raw, kind), key
    if values.get("task") is not None and values["task"] not in TASKS:
        raise ValueError(f"task {values['task']!r} is unknown; choose one of {', '.join(TASKS)}")
    for name in ("steps", "eval_limit", "batch_size"):
        if values.get(name) is not None and values[name] < 1:
            raise ValueError(f"{name} must be at least 1 (or None for the default), got {values[name]}")
    return Params(**values, sources=sources)


# ----------------------------------------------------------------------------------------------------------
# Full-size numbers, computed offline on the meta device
# ----------------------------------------------------------------------------------------------------------


def full_size_table(variants: Sequence[tuple[str, dict]] | None = None) -> Table:
    """The four methods (and variants) at full size, side by side, as a Markdown table."""
    variants = variants or [("freeze", {}), ("freeze", {"dequantize": True}), ("embedding", {}),
                            ("ptuning_v2", {}), ("ptuning_v2", {"prefix_projection": False}), ("lora", {})]
    lines = ["| method | options | trainable params | trainable % | weights + optimizer GiB | peak GiB | "
             + " | ".join(f"fits {gpu}" for gpu in GPUS_GIB) + " |", "|---" * (6 + len(GPUS_GIB)) + "|"]
    for method, options in variants:
        size = full_size_line(method, **options)
        percent = size.line.rsplit(":", 1)[1].strip()
        fits = " | ".join("yes" if ok else "no" for ok in size.fits().values())
        lines.append(f"| {method} | {', '.join(f'{k}={v}' for k, v in options.items()) or 'defaults'} | "
                     f"{size.trainable:,} | {percent} | {size.total_gib:.1f} | {size.peak_gib:.1f} | {fits} |")
    return Table("\n".join(lines))


# ----------------------------------------------------------------------------------------------------------
# Training and evaluation companions
# ----------------------------------------------------------------------------------------------------------


def heldout_perplexity(model, tokenizer, limit: int | None = None) -> float:
    """Perplexity on the bundled held-out plain text: compare before and after fine-tuning to see forgetting."""
    from .evaluation import heldout_texts, perplexity

    return perplexity(model, tokenizer, heldout_texts(limit))


def save_metrics(run_dir: str | os.PathLike, metrics: Mapping[str, Any]) -> Path:
    """Write ``metrics.json`` of a run (what ``05_compare`` and ``helpers.load_runs`` read)."""
    return RunRecord.load(run_dir).write_metrics(dict(metrics))


def task_files(task: str, full: bool) -> tuple[Path | None, Path | None]:
    """(train file, test file): ``None, None`` for the bundled samples; the downloaded public dataset if ``full``."""
    if not full:
        return None, None
    from .data import download, registry

    name = next(n for n, entry in registry().items() if entry["task"] == task)
    paths = download(name)
    return paths["train"], paths["test"]


# ----------------------------------------------------------------------------------------------------------
# The one setup call of the method notebooks, and their training, evaluation and reload cells
# ----------------------------------------------------------------------------------------------------------


def show(*objects: Any) -> None:
    """Display in a notebook (tables render as Markdown, figures as images); print elsewhere."""
    if _shell_active():
        from IPython.display import display

        display(*objects)
    else:
        print(*objects, sep="\n")


def quiet_loading() -> None:
    """No "Loading weights" bars: in a saved notebook they stay frozen at their first frame."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def drive_runs_dir(wanted: bool) -> str | None:
    """With ``DRIVE = True`` on Colab: mount Google Drive and return the runs folder there (else ``None``).

    Each Colab notebook runs on its own machine, so only a folder on Drive is shared by 01-05 and survives the
    runtime.
    """
    if not wanted:
        return None
    if not in_colab():
        print("DRIVE = True only applies on Colab; here the runs stay in the usual runs folder.")
        return None
    from google.colab import drive  # type: ignore[import-not-found]

    drive.mount("/content/drive")
    Path(DRIVE_RUNS_DIR).mkdir(parents=True, exist_ok=True)
    return DRIVE_RUNS_DIR


def loss_windows(losses: Sequence[float], share: float = 0.1) -> tuple[float, float]:
    """Mean loss over the first and over the last ``share`` of the points (at least one point each)."""
    if not losses:
        raise ValueError("no losses")
    n = max(1, round(len(losses) * share))
    return sum(losses[:n]) / n, sum(losses[-n:]) / n


@dataclasses.dataclass
class Course:
    """What :func:`setup` prepared for a method notebook: parameters, model, data, baseline, and its next steps."""

    method: str
    params: Params
    runtime: dict
    model_name: str
    runs_dir: Path
    model: Any
    tokenizer: Any
    toy: bool
    task: Task
    train_rows: list
    test_rows: list
    perplexity_before: float
    answer_before: str
    trained_answer: tuple[str, str] | None = None  # (text, answer) of the trained model, for the reload check

    def run_name(self, dequantized: bool = False) -> str:
        """``<method>-<task>`` (``freeze-dequantized-<task>`` for dequantized Freeze): the run's folder name."""
        return f"{self.method}{'-dequantized' if dequantized else ''}-{self.params.task}"

    def train(self, setup, dequantized: bool = False, tensorboard: bool = True):
        """Train ``setup`` with the live loss plot (and TensorBoard in a notebook a person looks at)."""
        from .augment import with_generated_rows
        from .data import EncodedDataset
        from .training import train

        if tensorboard:
            start_tensorboard(self.runs_dir)
        training = training_options(self.method, self.toy, self.params.steps, dequantized=dequantized,
                                    task=self.params.task, learning_rate=self.params.learning_rate)
        run_dir, resume = replace_or_resume_run(self.runs_dir, self.run_name(dequantized), self.model_name,
                                                setup.options, training)
        options = dict(training)
        rows = with_generated_rows(self.params.task, self.train_rows, options.pop("generated_rows", 0),
                                   options.get("seed", 42))
        if len(rows) > len(self.train_rows):
            print(f"Training rows: the {len(self.train_rows)} of the train file and {len(rows) - len(self.train_rows)} "
                  "recombined from their triples (helpers/augment.py)")
        dataset = EncodedDataset(self.tokenizer, self.task, rows)
        with text_progress_bars():
            result = train(setup, self.tokenizer, dataset, run_dir, task=self.params.task, resume=resume,
                           callbacks=[LiveLossPlot(method=self.method)], **options)
        print(f"{result.info['global_step']} steps in {result.info['train_runtime_s']:.0f} s, learning rate "
              f"{training['learning_rate']:g}, final loss {result.final_loss:.4f}, run folder {run_dir}")
        return result

    def describe_loss(self, result) -> None:
        """Print the mean loss over the first and last tenth of this run's steps (and how it moved)."""
        losses = [row["loss"] for row in result.history if isinstance(row.get("loss"), (int, float))]
        first, last = loss_windows(losses)
        trend = "fell" if last < first * 0.97 else "rose" if last > first * 1.03 else "stayed about level"
        print(f"This run ({len(losses)} logged steps): mean loss {first:.3f} over the first tenth of the steps, "
              f"{last:.3f} over the last tenth: it {trend} ({(last - first) / first:+.0%}).")

    def evaluate(self, setup, run_dir) -> dict:
        """Score the test rows, add held-out perplexity before and after, save ``metrics.json``, show both tables."""
        from .evaluation import evaluate

        metrics = evaluate(setup.model, self.tokenizer, self.task, self.test_rows, out_dir=run_dir,
                           progress=progress_bars())
        self.answer(setup.model, self.test_rows[0].text)  # what the reloaded model must repeat
        metrics.update(perplexity_before=self.perplexity_before,
                       perplexity_after=heldout_perplexity(setup.model, self.tokenizer))
        save_metrics(run_dir, metrics)
        show(show_metrics(metrics), show_predictions(run_dir))
        return metrics

    def describe_results(self, metrics: Mapping[str, Any]) -> None:
        """This run's results in words, every number read from ``metrics``."""
        main = metrics["main_metric"]
        before, after = metrics["perplexity_before"], metrics["perplexity_after"]
        change = "rose" if after > before * 1.01 else "fell" if after < before * 0.99 else "stayed about the same"
        print(f"This run: {main} = {metrics[main]:.4f} on {metrics.get('n', len(self.test_rows))} test rows; "
              f"held-out perplexity {before:.1f} before training, {after:.1f} after (it {change}).")

    def reload_and_check(self, run_dir) -> None:
        """Load the base model with the saved artifact on top and check it answers exactly as the trained model."""
        from .evaluation import generate_answers
        from .training import load_finetuned

        text, trained = self.trained_answer or (self.test_rows[0].text, None)
        show(show_artifact(run_dir))
        reloaded, _ = load_finetuned(run_dir)
        again = generate_answers(reloaded, self.tokenizer, self.task, [text], progress=False)[0]
        print(f"reloaded model's answer: {again!r}")
        if trained is not None:
            print("same answer after reloading:", again == trained)

    def answer(self, model, text: str) -> str:
        """The model's answer to ``text`` in the task's prompt layout (kept for the reload check)."""
        from .evaluation import generate_answers

        answer = generate_answers(model, self.tokenizer, self.task, [text], progress=False)[0]
        self.trained_answer = (text, answer)
        return answer

    def plot_with_reference(self):
        """This task's runs so far (solid) next to the original course's curves of their methods (dashed)."""
        from .plotting import plot_reference_curves
        from .runs import load_runs

        runs = [run for run in load_runs(self.runs_dir) if run.task == self.params.task]
        if self.params.task != "ie":
            print(f"The original course's curves are IE runs; yours here are {self.params.task}: compare shapes only.")
        return plot_reference_curves(runs)


def progress_bars() -> bool:
    """Progress bars only where a person watches: a saved, headless run would keep them frozen at their start."""
    return interactive_frontend()


@contextlib.contextmanager
def text_progress_bars():
    """Run headless, the Trainer's bar is drawn as text, not as a widget.

    A widget bar saved without a frontend keeps only its first frame ("0%|") as text; a text bar's saved output
    ends with its last state. Where a person is watching, nothing changes.
    """
    if interactive_frontend():
        yield
        return
    import transformers.trainer_callback as callbacks
    from tqdm import std

    widget_tqdm, callbacks.tqdm = callbacks.tqdm, std.tqdm
    try:
        yield
    finally:
        callbacks.tqdm = widget_tqdm


def start_tensorboard(runs_dir: str | os.PathLike) -> None:
    """TensorBoard inside the notebook where a person is looking (Colab, Jupyter); otherwise print how to open it."""
    if not interactive_frontend():
        tensorboard_hint(runs_dir)
        return
    from IPython import get_ipython

    shell = get_ipython()
    shell.run_line_magic("load_ext", "tensorboard")
    shell.run_line_magic("tensorboard", f"--logdir {runs_dir}")


def setup(method: str, show_data: bool = False, **parameters: Any) -> Course:
    """Everything before a method is applied: runtime check, parameters, data, model and baseline, printed.

    ``parameters`` are the notebook's parameters cell (``model=MODEL, task=TASK, ...``); ``COURSE_<NAME>``
    environment variables win over them (:func:`params_from_env`). ``drive=True`` keeps the runs on Google Drive
    on Colab. ``show_data`` also shows the first training rows (01 explains the data; the others link there).
    """
    from .data import load_split
    from .models import load_model

    quiet_loading()
    runtime = runtime_report()
    params = params_from_env(**parameters)
    model_name, banner = choose_model(params.model)
    runs_dir = Path(drive_runs_dir(getattr(params, "drive", False)) or params.runs_dir or default_runs_dir())
    print(banner)
    print(repr(params))
    train_file, test_file = task_files(params.task, params.full_data)
    train_rows = load_split(params.task, "train", train_file)
    test_rows = load_split(params.task, "test", test_file, limit=params.eval_limit)
    if show_data:
        show(show_examples(train_rows))
    model, tokenizer = load_model(model_name)
    toy = is_toy(model)
    config = model.config
    print(f"Model: {config.num_layers} layers, hidden size {config.hidden_size}, vocabulary {config.vocab_size:,}, "
          f"INT{config.quantization_bit}, computing in {model.dtype}; {sum(p.numel() for p in model.parameters()):,} "
          "parameters")
    task = task_for(params.task, toy)
    print(f"Task {params.task} ({task.title}): {len(train_rows)} training rows, {len(test_rows)} test rows; "
          f"main metric {main_metric(params.task)}")
    chosen = training_options(method, toy, params.steps, task=params.task, learning_rate=params.learning_rate)
    default = training_options(method, toy, task=params.task)
    print(f"Training: {chosen['max_steps']} steps at learning rate {chosen['learning_rate']:g} (this model's "
          f"defaults for {method} on {params.task}: {default['max_steps']} steps, learning rate "
          f"{default['learning_rate']:g}; STEPS and LEARNING_RATE in the parameters cell change them)")
    from .evaluation import generate_answers

    perplexity = heldout_perplexity(model, tokenizer)
    answer = generate_answers(model, tokenizer, task, [test_rows[0].text], progress=False)[0]
    print(f"Before fine-tuning: held-out perplexity {perplexity:.2f}; answer to the first test row {answer!r} "
          f"(expected {test_rows[0].targets[0]!r})")
    return Course(method, params, runtime, model_name, runs_dir, model, tokenizer, toy, task, train_rows, test_rows,
                  perplexity, answer)


def choose_prefix_projection(course: Course, requested: bool | None, pre_seq_len: int) -> bool:
    """P-Tuning v2's ``prefix_projection``: as requested, else on wherever the memory estimate says it fits.

    On a GPU the estimate (:func:`helpers.estimate.estimate`, batch 1 with gradient checkpointing, as the course
    trains on a small GPU) is compared with the GPU's memory; the choice and its reason are printed, and a warning
    when the projection is off: that is the configuration published at IE F1 0.0.
    """
    from .estimate import estimate
    from .plotting import published_results

    if requested is not None:
        chosen, reason = requested, "set by PREFIX_PROJECTION"
    elif course.toy or course.runtime.get("gpu_memory_gib") is None:
        chosen, reason = True, "the tiny model: its prefix encoder is small with or without the projection"
    else:
        seq = course.task.max_source_length + course.task.max_target_length + 3
        peak = estimate(course.model_name, "ptuning_v2", seq=seq, batch=1, gradient_checkpointing=True,
                        pre_seq_len=pre_seq_len, prefix_projection=True).total / GIB
        gpu = course.runtime["gpu_memory_gib"]
        chosen = peak <= gpu
        reason = (f"with the projection and gradient checkpointing the estimated peak is {peak:.1f} GiB for "
                  f"{seq} tokens; this GPU has {gpu:.1f} GiB, so it {'fits' if chosen else 'does not fit'}")
    print(f"prefix_projection = {chosen}: {reason}.")
    if not chosen:
        row = next(r for r in published_results()["rows"]
                   if r["course_method"] == "ptuning_v2" and not r["options"]["prefix_projection"])
        print(f"WARNING: without the projection this is the configuration published at IE F1 {row['ie_f1']} "
              f"({published_results()['repository']}, '{row['method']}'). Use a larger GPU to keep it.")
    return chosen


def main_metric(task: str) -> str:
    """The metric a task is ranked by (``f1``, ``rouge_l``, ``accuracy``)."""
    from .evaluation import MAIN_METRIC

    return MAIN_METRIC[task]



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
