"""What keeps the course notebooks short: runtime check, parameters, small tables, a live loss plot.

Everything here also works outside Jupyter: tables are Markdown objects whose plain ``repr`` is the Markdown
text, and the live plot only draws into a notebook when an IPython kernel is running. Notebooks call these
functions; the teaching happens in the notebooks' prose.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from transformers import TrainerCallback

from .data import IGNORE_INDEX, TASKS, Example, Task, encode_example, get_task
from .methods import METHODS, apply_method
from .models import default_dtype, is_small_model, meta_model
from .pipeline import run_method
from .plotting import METHOD_COLORS, comparison_markdown, comparison_rows, plot_comparison, smooth
from .recipe import TINY_LENGTHS, training_settings
from .runs import Run, RunRecord, read_predictions, start_over

REAL_MODEL = "THUDM/chatglm-6b-int4"
ENV_PREFIX = "COURSE_"
GIB = 1 << 30
GPUS_GIB = {"T4 (16 GB)": 15.0, "A100 (40 GB)": 39.5}  # memory a training process can use, GiB
TOY_BANNER = """\
+------------------------------------------------------------------------------------------+
|  TOY MODE: no GPU here, so this notebook uses the embedded TINY ChatGLM.                 |
|  Same architecture, special tokens and INT4 format as ChatGLM-6B, so every cell runs the |
|  same code; but the model is thousands of times smaller and far too weak for the task:   |
|  losses, metrics and answers below are toy-sized. For real results use a GPU runtime     |
|  (Colab: Runtime > Change runtime type > GPU).                                           |
+------------------------------------------------------------------------------------------+"""

# ----------------------------------------------------------------------------------------------------------
# Where we run
# ----------------------------------------------------------------------------------------------------------


def in_colab() -> bool:
    """True inside a Google Colab runtime."""
    return "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ


def interactive_frontend() -> bool:
    """True when a person is looking at the notebook (Colab, a Jupyter server); False when run headless.

    ``COURSE_TENSORBOARD=1`` or ``=0`` forces the answer; ``CI`` set means headless. Used to start servers
    (TensorBoard) only where someone can see them.
    """
    forced = os.environ.get("COURSE_TENSORBOARD", "").strip()
    if forced:
        return _parse_bool("COURSE_TENSORBOARD", forced)
    if os.environ.get("CI"):
        return False
    return in_colab() or bool(os.environ.get("JPY_SESSION_NAME"))


def repository_root() -> Path | None:
    """The course's checkout (the folder holding ``pyproject.toml`` next to ``helpers/``), if installed from one."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() else None


def default_runs_dir() -> Path:
    """``runs/notebooks`` in the checkout (else in the current folder): where every notebook writes its runs."""
    return (repository_root() or Path.cwd()) / "runs" / "notebooks"


def native_bf16() -> bool:
    """bf16 in hardware (Ampere and newer, e.g. A100); a T4 only emulates it, slowly."""
    return torch.cuda.is_available() and default_dtype("cuda") == torch.bfloat16


def runtime_info() -> dict[str, Any]:
    """Device, GPU name and memory, bf16 support, and versions, as a dict."""
    info: dict[str, Any] = {"device": "cpu", "gpu": None, "gpu_memory_gib": None, "bf16": False,
                            "cpu_cores": os.cpu_count(), "ram_gib": None, "colab": in_colab(),
                            "python": platform.python_version(), "torch": torch.__version__}
    try:
        info["ram_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1)
    except (AttributeError, ValueError, OSError):
        pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device="cuda", gpu=props.name, gpu_memory_gib=round(props.total_memory / GIB, 1),
                    bf16=native_bf16())
    return info


def runtime_report() -> dict[str, Any]:
    """Print what this runtime offers (device, GPU, memory, bf16) and return it as a dict."""
    info = runtime_info()
    where = "Google Colab" if info["colab"] else "this machine"
    if info["device"] == "cuda":
        bf16 = "yes" if info["bf16"] else "no (emulated only; the course uses fp16 here)"
        print(f"GPU on {where}: {info['gpu']}, {info['gpu_memory_gib']} GiB, bf16 in hardware: {bf16}")
    else:
        print(f"No GPU on {where}: {info['cpu_cores']} CPU cores, {info['ram_gib'] or '?'} GiB RAM")
    print(f"python {info['python']}, torch {info['torch']}")
    return info


# ----------------------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------------------

PARAMETER_TYPES: dict[str, type] = {
    "model": str, "task": str, "steps": int, "eval_limit": int, "runs_dir": str, "batch_size": int,
    "learning_rate": float, "full_data": bool, "quick_compare": bool, "layers": int, "dequantize": bool,
    "r": int, "alpha": int, "pre_seq_len": int, "prefix_projection": bool,
}
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _parse_bool(key: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE | _FALSE:
        return value in _TRUE
    raise ValueError(f"{key}={raw!r}: expected one of {', '.join(sorted(_TRUE | _FALSE))}")


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
# Model choice and training settings
# ----------------------------------------------------------------------------------------------------------


def is_toy(model: Any) -> bool:
    """Whether a model (name, folder or loaded model) is a tiny stand-in rather than ChatGLM-6B."""
    return is_small_model(model)


def choose_model(requested: str | None = None, default_gpu: str = REAL_MODEL) -> tuple[str, str]:
    """(model name, banner): ``requested`` if given, else the real model on a GPU and the tiny model without."""
    name = requested or (default_gpu if torch.cuda.is_available() else "tiny")
    if is_toy(name):
        return name, TOY_BANNER + f"\nModel: {name}"
    banner = f"Model: {name}"
    if not torch.cuda.is_available():
        banner += "  (WARNING: no GPU; the 6B model on a CPU takes hours per step; set MODEL = 'tiny')"
    return name, banner


def task_for(task: str, toy: bool) -> Task:
    """The task with token budgets that fit the model: shortened for the tiny model (its answers are short)."""
    return dataclasses.replace(get_task(task), **TINY_LENGTHS) if toy else get_task(task)


def training_options(method: str, toy: bool, steps: int | None = None, dequantized: bool = False,
                     gpu_memory_gib: float | None = None, **overrides: Any) -> dict[str, Any]:
    """Hyper-parameters for ``helpers.train``: the tiny recipe on CPU, or settings sized to the GPU.

    The same rule as the command line (:func:`helpers.recipe.training_settings`): on a GPU with under 30 GiB (T4)
    the batch shrinks to 1 with 8 accumulation steps and gradient checkpointing, so the effective batch stays 8.
    """
    memory = None
    if not toy:
        memory = gpu_memory_gib if gpu_memory_gib is not None else runtime_info()["gpu_memory_gib"]
    return training_settings(method, toy, dequantized, memory, {"max_steps": steps, **overrides})


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def prepare_run(runs_dir: str | os.PathLike, name: str, model: str, method_options: dict,
                training: dict) -> tuple[Path, bool]:
    """(run folder, resume?): continue an interrupted run of the same settings, otherwise start afresh.

    A finished run, or one with another model or settings, is replaced (its run files are removed).
    """
    run_dir = Path(runs_dir) / name
    record = RunRecord.find(run_dir)
    if record is None:
        return run_dir, False
    hyper = record.hyperparameters
    same = (record.model == str(model) and _plain(record.method_options) == _plain(method_options)
            and all(hyper.get(k) == v for k, v in _plain(training).items() if k in hyper))
    if same and record.status != "finished" and not record.trained:
        print(f"Continuing the interrupted run in {run_dir} from its last checkpoint.")
        return run_dir, True
    start_over(run_dir)
    if run_dir.is_dir() and not any(run_dir.iterdir()):
        run_dir.rmdir()
    print(f"Replacing the earlier run in {run_dir}.")
    return run_dir, False


# ----------------------------------------------------------------------------------------------------------
# Full-size numbers, computed offline on the meta device
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FullSize:
    """A method applied to the full-size model: parameter counts and the memory of weights and optimizer."""

    method: str
    options: dict
    line: str
    trainable: int
    weights_bytes: int  # INT4 matrices (packed, 1 byte per stored int8), fp16/bf16 rest, fp32 trainable
    states_bytes: int  # fp32 gradients and AdamW's two moments of the trainable parameters

    @property
    def total_gib(self) -> float:
        return (self.weights_bytes + self.states_bytes) / GIB

    def fits(self) -> dict[str, bool]:
        return {gpu: self.total_gib <= usable for gpu, usable in GPUS_GIB.items()}

    def __str__(self) -> str:
        options = ", ".join(f"{k}={v}" for k, v in self.options.items())
        fits = ", ".join(f"{gpu}: {'yes' if ok else 'no'}" for gpu, ok in self.fits().items())
        return (f"{REAL_MODEL} + {self.method}({options})\n{self.line}\n"
                f"weights {self.weights_bytes / GIB:.1f} GiB + gradients and AdamW states "
                f"{self.states_bytes / GIB:.1f} GiB = {self.total_gib:.1f} GiB before activations\n"
                f"fits (before activations): {fits}")

    __repr__ = __str__


def full_size_line(method: str, model: str = REAL_MODEL, **options: Any) -> FullSize:
    """Apply ``method`` to the full-size model on the ``meta`` device (nothing is downloaded or allocated)."""
    setup = apply_method(meta_model(model), method, **options)
    weights = 0
    for param in setup.model.parameters():
        size = 1 if param.dtype in (torch.int8, torch.uint8) else 4 if param.requires_grad else 2
        weights += param.numel() * size
    return FullSize(method, dict(setup.options), str(setup), setup.trainable_params, weights,
                    setup.trainable_params * 12)


def full_size_table(variants: Sequence[tuple[str, dict]] | None = None) -> Table:
    """The four methods (and variants) at full size, side by side, as a Markdown table."""
    variants = variants or [("freeze", {}), ("freeze", {"dequantize": True}), ("embedding", {}),
                            ("ptuning_v2", {}), ("ptuning_v2", {"prefix_projection": False}), ("lora", {})]
    lines = ["| method | options | trainable params | trainable % | weights + optimizer GiB | "
             + " | ".join(f"fits {gpu}" for gpu in GPUS_GIB) + " |", "|---" * (5 + len(GPUS_GIB)) + "|"]
    for method, options in variants:
        size = full_size_line(method, **options)
        percent = size.line.rsplit(":", 1)[1].strip()
        fits = " | ".join("yes" if ok else "no" for ok in size.fits().values())
        lines.append(f"| {method} | {', '.join(f'{k}={v}' for k, v in options.items()) or 'defaults'} | "
                     f"{size.trainable:,} | {percent} | {size.total_gib:.1f} | {fits} |")
    return Table("\n".join(lines))


# ----------------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# Training and evaluation companions
# ----------------------------------------------------------------------------------------------------------


def _shell_active() -> bool:
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
        if not _shell_active():
            return
        from IPython.display import display

        fig = self.figure()
        if self._handle is None:
            self._handle = display(fig, display_id=True)
        else:
            self._handle.update(fig)


def heldout_perplexity(model, tokenizer, limit: int | None = None) -> float:
    """Perplexity on the bundled held-out plain text: compare before and after fine-tuning to see forgetting."""
    from .evaluation import heldout_texts, perplexity

    return perplexity(model, tokenizer, heldout_texts(limit))


def save_metrics(run_dir: str | os.PathLike, metrics: Mapping[str, Any]) -> Path:
    """Write ``metrics.json`` of a run (what ``05_compare`` and ``helpers.load_runs`` read)."""
    return RunRecord.load(run_dir).write_metrics(dict(metrics))


def tensorboard_hint(logdir: str | os.PathLike) -> None:
    """Print how to open TensorBoard on ``logdir`` (used where no server should be started)."""
    print("TensorBoard is not started here (no interactive notebook frontend). To watch the runs:\n"
          f"  in a terminal:        tensorboard --logdir {logdir}\n"
          f"  in Colab or Jupyter:  %load_ext tensorboard   then   %tensorboard --logdir {logdir}")


def task_files(task: str, full: bool) -> tuple[Path | None, Path | None]:
    """(train file, test file): ``None, None`` for the bundled samples; the downloaded public dataset if ``full``."""
    if not full:
        return None, None
    from .data import download, registry

    name = next(n for n, entry in registry().items() if entry["task"] == task)
    paths = download(name)
    return paths["train"], paths["test"]


# ----------------------------------------------------------------------------------------------------------
# Comparing runs (05_compare)
# ----------------------------------------------------------------------------------------------------------


def main_task(runs: Sequence[Run]) -> str | None:
    """The task with the most runs (ties: ie, gen, cls order)."""
    counts = {task: sum(run.task == task for run in runs) for task in TASKS}
    best = max(counts, key=lambda t: counts[t])
    return best if counts[best] else None


def show_runs(runs: Sequence[Run], runs_dir: str | os.PathLike) -> Table:
    """The runs found (name, task, model, steps, status), or a clear message when there are none."""
    if not runs:
        return Table(f"**No runs found in `{runs_dir}`.** Run the method notebooks 01–04 first (each writes a "
                     "`<method>-<task>` run there), or set `QUICK_COMPARE = True` (environment: "
                     "`COURSE_QUICK_COMPARE=1`) to train all four methods briefly in this notebook. The cells "
                     "below still run; their plots and tables stay empty.")
    lines = ["| run | method | task | model | steps | status | evaluated |", "|---|---|---|---|---|---|---|"]
    for run in runs:
        model = str(run.info.get("model", "–"))
        model = Path(model).name if Path(model).is_dir() else model  # a local folder: its name is enough
        lines.append(f"| {run.name} | {run.method} | {run.task} | {model} | {run.info.get('global_step', '–')} | "
                     f"{run.info.get('status', '–')} | {'yes' if run.metrics else 'no'} |")
    return Table("\n".join(lines) + f"\n\n{len(runs)} runs in `{runs_dir}`.")


def quick_runs(model: str, task: str, runs_dir: str | os.PathLike, steps: int | None = None,
               eval_limit: int | None = None, methods: Sequence[str] = METHODS) -> list[Path]:
    """Train and evaluate every method briefly, as ``<method>-<task>`` runs (what the method notebooks write)."""
    toy = is_toy(model)
    folders = []
    for method in methods:
        folder = Path(runs_dir) / f"{method}-{task}"
        run_method(model, task, method, folder, training=training_options(method, toy, steps),
                   eval_limit=eval_limit, resume=False)
        folders.append(folder)
    return folders


class ComparisonExplorer:
    """Widgets to pick a task and methods; the comparison figure and table below them follow the choice.

    The figure and table are ordinary outputs updated in place, so an executed notebook keeps the first view
    even without a widget frontend.
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
        """Display the controls, then the figure and table for the current choice."""
        from IPython.display import display

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
