"""The method notebooks' steps: parameters, the one setup call, then training, evaluation and reloading a cell each.

A notebook's parameters are the recipe's settings and the method's options under the same names (``STEPS``,
``LEARNING_RATE``, ``R``, ...) plus a few of the course's own (where runs go, Drive, the full dataset); the
environment variables ``COURSE_<NAME>`` override them. Every step is the command line's: the recipe is resolved
by :func:`helpers.run.recipe.resolve_recipe`, the run folder is decided by :func:`helpers.run.folder.decide`
(``replace``: a notebook executed again trains again, an interrupted run resumes), training is
:func:`helpers.run.training.fit` and evaluation :func:`helpers.run.evaluation.evaluate_recipe`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..methods import METHODS
from ..run.record import Run, RunRecord, load_runs
from ..tasks import TASKS
from .display import LiveLossPlot, show_artifact, show_examples, show_metrics, show_predictions, tensorboard_hint
from .params import Params, check_places, method_options, params_from_env, recipe_settings, setup_parameters
from .runtime import choose_model, default_runs_dir, in_colab, interactive_frontend, is_toy

DRIVE_RUNS_DIR = "/content/drive/MyDrive/chatglm-course/runs"  # where DRIVE = True keeps the runs on Colab

# ----------------------------------------------------------------------------------------------------------
# Where the runs go, what a person sees
# ----------------------------------------------------------------------------------------------------------


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


def task_files(task: str, full: bool) -> tuple[Path | None, Path | None]:
    """(train file, test file): ``None, None`` for the bundled samples; the downloaded public dataset if ``full``."""
    if not full:
        return None, None
    from ..tasks.download import download, registry

    name = next(n for n, entry in registry().items() if entry["task"] == task)
    paths = download(name)
    return paths["train"], paths["test"]


def show(*objects: Any) -> None:
    """Display in a notebook (tables render as Markdown, figures as images); print elsewhere."""
    from .display import shell_active

    if shell_active():
        from IPython.display import display

        display(*objects)
    else:
        print(*objects, sep="\n")


def quiet_loading() -> None:
    """No "Loading weights" bars: in a saved notebook they stay frozen at their first frame."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def progress_bars() -> bool:
    """Progress bars only where a person watches: a saved, headless run would keep them frozen at their start."""
    return interactive_frontend()


def start_tensorboard(runs_dir: str | os.PathLike) -> None:
    """TensorBoard inside the notebook where a person is looking (Colab, Jupyter); otherwise print how to open it."""
    if not interactive_frontend():
        tensorboard_hint(runs_dir)
        return
    from IPython import get_ipython

    shell = get_ipython()
    shell.run_line_magic("load_ext", "tensorboard")
    shell.run_line_magic("tensorboard", f"--logdir {runs_dir}")


def loss_windows(losses: Sequence[float], share: float = 0.1) -> tuple[float, float]:
    """Mean loss over the first and over the last ``share`` of the points (at least one point each)."""
    if not losses:
        raise ValueError("no losses")
    n = max(1, round(len(losses) * share))
    return sum(losses[:n]) / n, sum(losses[-n:]) / n


# ----------------------------------------------------------------------------------------------------------
# The one setup call of the method notebooks, and their training, evaluation and reload cells
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Course:
    """What :func:`setup` prepared for a method notebook: parameters, recipe, model, data, baseline; its next steps."""

    method: str
    params: Params
    runtime: dict
    runs_dir: Path
    recipe: Any  # the run's Recipe with the parameters' method options (train() settles the applied ones)
    model: Any
    tokenizer: Any
    train_rows: list
    test_rows: list
    perplexity_before: float
    probe_ids: Any = None  # the first test row's prompt ids, and the base model's logits for it
    base_logits: Any = None
    answer_before: str = ""  # the base model's answer to the first test row
    trained_answer: tuple[str, str] | None = None  # (text, answer) of the trained model, for the reload check

    @property
    def toy(self) -> bool:
        return is_toy(self.model)

    @property
    def task(self):
        return self.recipe.task_spec()

    @property
    def model_name(self) -> str:
        return self.recipe.model

    def run_name(self, dequantized: bool = False) -> str:
        """The run's folder name: ``RUN_NAME``, else ``<method>-<task>`` (``freeze-dequantized-<task>``)."""
        given = getattr(self.params, "run_name", None)
        return given or f"{self.method}{'-dequantized' if dequantized else ''}-{self.recipe.task}"

    def train(self, setup, tensorboard: bool = True):
        """Train ``setup`` as the recipe says, with the live loss plot (and TensorBoard where a person looks)."""
        from ..run.folder import decide
        from ..run.pipeline import training_rows
        from ..run.recipe import resolve_recipe
        from ..run.training import fit
        from ..tasks import EncodedDataset

        if tensorboard:
            start_tensorboard(self.runs_dir)
        self.recipe = resolve_recipe(self.recipe.model, setup.method, self.recipe.task, method_options=setup.options,
                                     config=self.model.config, check_data=False,
                                     **{**recipe_settings(self.params), "device": self.recipe.device,
                                        "dtype": self.recipe.dtype, "train_file": self.recipe.train_file,
                                        "test_file": self.recipe.test_file})
        decision = decide(self.runs_dir / self.run_name(bool(setup.options.get("dequantize"))), self.recipe, "replace")
        record = decision.begin(self.recipe)
        dataset = EncodedDataset(self.tokenizer, self.task, training_rows(self.recipe))
        # Headless (a saved notebook) the live plot alone shows progress: one output updated in place, where a
        # text progress bar would store every redraw.
        result = fit(record, decision.checkpoint, setup, self.tokenizer, dataset, self.recipe,
                     callbacks=[LiveLossPlot(method=self.method)], progress=progress_bars())
        print(f"{result.record.global_step} steps in {result.record.train_runtime_s:.0f} s, learning rate "
              f"{self.recipe.learning_rate:g}, final loss {result.final_loss:.4f}, run folder {record.folder}")
        return result

    def logits(self, model=None):
        """``model``'s logits (default: the base model's) for the first test row's prompt, without gradients."""
        import torch

        with torch.no_grad():
            return (model or self.model)(input_ids=self.probe_ids, use_cache=False).logits

    def share(self, setup) -> None:
        """What ``setup`` trains on this model next to the same method at full size (counts and shares)."""
        from ..estimate import full_size_line

        full = full_size_line(setup.method, **setup.options)
        print(f"trainable on this model: {setup.trainable_params:,} of {setup.all_params:,} parameters "
              f"({100 * setup.trainable_params / setup.all_params:.2f} %); the same method at full size: "
              f"{full.trainable:,} of {full.all_params:,} ({100 * full.trainable / full.all_params:.2f} %)")

    def describe_loss(self, result) -> None:
        """Print the mean loss over the first and last tenth of this run's steps (and how it moved)."""
        losses = [row["loss"] for row in result.history if isinstance(row.get("loss"), (int, float))]
        first, last = loss_windows(losses)
        trend = "fell" if last < first * 0.97 else "rose" if last > first * 1.03 else "stayed about level"
        print(f"This run ({len(losses)} logged steps): mean loss {first:.3f} over the first tenth of the steps, "
              f"{last:.3f} over the last tenth: it {trend} ({(last - first) / first:+.0%}).")

    def evaluate(self, setup, run_dir) -> dict:
        """Score the test rows as the run's recipe says, with held-out perplexity before and after; finish the run's
        record and show the metrics and the first answers."""
        from ..run.evaluation import evaluate_recipe

        metrics = evaluate_recipe(setup.model, self.tokenizer, self.recipe, run_dir, self.perplexity_before,
                                  progress=progress_bars())
        self.answer(setup.model, self.test_rows[0].text)  # what the reloaded model must repeat
        RunRecord.load(run_dir).finish(metrics)
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
        from ..run.artifacts import load_finetuned
        from ..run.evaluation import generate_answers

        text, trained = self.trained_answer or (self.test_rows[0].text, None)
        show(show_artifact(run_dir))
        reloaded, _ = load_finetuned(run_dir)
        again = generate_answers(reloaded, self.tokenizer, self.task, [text], progress=False)[0]
        print(f"reloaded model's answer: {again!r}")
        if trained is not None:
            print("same answer after reloading:", again == trained)

    def answer(self, model, text: str) -> str:
        """The model's answer to ``text`` in the task's prompt layout (kept for the reload check)."""
        from ..run.evaluation import generate_answers

        answer = generate_answers(model, self.tokenizer, self.task, [text], progress=False)[0]
        self.trained_answer = (text, answer)
        return answer

    def plot_with_reference(self):
        """This task's runs so far (solid), and others' (``OTHER_RUNS``), next to the original course's curves of their
        methods (dashed)."""
        from ..plotting import plot_reference_curves

        runs = [run for run in load_runs(self.runs_dir) if run.task == self.recipe.task]
        runs += other_runs(getattr(self.params, "other_runs", None), self.recipe.task)  # OTHER_RUNS, e.g. a teacher's
        if self.recipe.task != "ie":
            print(f"The original course's curves are IE runs; yours here are {self.recipe.task}: compare shapes only.")
        return plot_reference_curves(runs)


def _print_memory_fit(course: Course) -> None:
    """On a GPU, this run's estimated peak memory (its batch, tokens and checkpointing) next to the GPU's memory."""
    gpu = course.runtime.get("gpu_memory_gib")
    if course.toy or gpu is None:
        return
    from ..estimate import estimate
    from ..run.memory import GIB

    recipe = course.recipe
    seq = recipe.max_source_length + recipe.max_target_length
    peak = estimate(recipe.model, course.method, seq=seq, batch=recipe.batch_size,
                    gradient_checkpointing=recipe.gradient_checkpointing, **recipe.method_options).total / GIB
    fits = "it fits" if peak <= gpu else "it does NOT fit: expect an out-of-memory error; use a larger GPU"
    print(f"Memory: about {peak:.1f} GiB at the peak for {course.method} (estimate: batch {recipe.batch_size} x "
          f"{seq} tokens, gradient checkpointing {'on' if recipe.gradient_checkpointing else 'off'}); this GPU has "
          f"{gpu:.1f} GiB: {fits}")


def _print_setting_lines(course: Course, defaults) -> None:
    from ..run.training import describe_training

    recipe = course.recipe
    print("Training settings of this run (helpers/run/recipe.py):\n  " + "\n  ".join(recipe.lines()))
    print(f"  {describe_training()}")
    print(f"Training: {recipe.steps} steps at learning rate {recipe.learning_rate:g} (this model's defaults for "
          f"{course.method} on {recipe.task}: {defaults.steps} steps, learning rate {defaults.learning_rate:g}; STEPS "
          "and LEARNING_RATE in the parameters cell change them)")


def setup(method: str, show_data: bool = False, **parameters: Any) -> Course:
    """Everything before a method is applied: runtime check, parameters, recipe, data, model and baseline, printed.

    ``parameters`` are the notebook's parameters cell (``model=MODEL, task=TASK, ...``); ``COURSE_<NAME>``
    environment variables win over them (:func:`params_from_env`). ``drive=True`` keeps the runs on Google Drive
    on Colab. ``show_data`` also shows the first training rows (01 explains the data; the others link there).
    Every setting is checked before the model loads.
    """
    from ..models import load_model
    from ..run.evaluation import generate_answers, heldout_perplexity
    from ..run.recipe import resolve_recipe
    from ..tasks import load_split, prompt_ids
    from .runtime import runtime_report

    quiet_loading()
    parameters = setup_parameters(method, parameters)
    runtime = runtime_report()
    params = params_from_env(**parameters)
    check_places(params, method)
    model_name, banner = choose_model(params.model)
    runs_dir = Path(drive_runs_dir(params.drive) or params.runs_dir or default_runs_dir())
    print(banner)
    print(repr(params))
    train_file, test_file = task_files(params.task, params.full_data)
    settings = {**recipe_settings(params), "train_file": train_file, "test_file": test_file}
    recipe = resolve_recipe(model_name, method, params.task, method_options=method_options(method, params), **settings)
    train_rows = load_split(recipe.task, "train", recipe.train_file)
    test_rows = load_split(recipe.task, "test", recipe.test_file, limit=recipe.eval_limit)
    if show_data:
        show(show_examples(train_rows))
    model, tokenizer = load_model(recipe.model, device=recipe.device, dtype=recipe.dtype)
    config = model.config
    print(f"Model: {config.num_layers} layers, hidden size {config.hidden_size}, vocabulary {config.vocab_size:,}, "
          f"INT{config.quantization_bit}, computing in {model.dtype}; {sum(p.numel() for p in model.parameters()):,} "
          "parameters")
    print(f"Task {recipe.task} ({recipe.task_spec().title}): {len(train_rows)} training rows, {len(test_rows)} test "
          f"rows; main metric {recipe.task_spec().main_metric}")
    perplexity = heldout_perplexity(model, tokenizer)
    probe = torch.tensor([prompt_ids(tokenizer, recipe.task_spec(), test_rows[0].text)], device=model.device)
    course = Course(method, params, runtime, runs_dir, recipe, model, tokenizer, train_rows, test_rows, perplexity,
                    probe)
    course.base_logits = course.logits()
    _print_setting_lines(course, resolve_recipe(model_name, method, recipe.task, config=config, check_data=False,
                                                device=recipe.device, dtype=recipe.dtype))
    _print_memory_fit(course)
    course.answer_before = generate_answers(model, tokenizer, course.task, [test_rows[0].text], progress=False)[0]
    print(f"Before fine-tuning: held-out perplexity {perplexity:.2f}; answer to the first test row "
          f"{course.answer_before!r} (expected {test_rows[0].targets[0]!r})")
    return course


def choose_prefix_projection(course: Course, requested: bool | None, pre_seq_len: int) -> bool:
    """P-Tuning v2's ``prefix_projection``: as requested, else on wherever the memory estimate says it fits.

    On a GPU the estimate (:func:`helpers.estimate.estimate`, batch 1 with gradient checkpointing, as the course
    trains on a small GPU) is compared with the GPU's memory; the choice and its reason are printed, and a warning
    when the projection is off: that is the configuration published at IE F1 0.0.
    """
    from ..estimate import estimate
    from ..reference import published_results
    from ..run.memory import GIB

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


# ----------------------------------------------------------------------------------------------------------
# The comparison notebook
# ----------------------------------------------------------------------------------------------------------


def find_runs(runs_dir: str | os.PathLike) -> list[Run]:
    """The finished runs in ``runs_dir``; none (rather than an error) while the folder does not exist yet."""
    return load_runs(runs_dir) if Path(runs_dir).is_dir() else []


def main_task(runs: Sequence[Run]) -> str | None:
    """The task with the most runs (ties: ie, gen, cls order)."""
    counts = {task: sum(run.task == task for run in runs) for task in TASKS}
    best = max(counts, key=lambda t: counts[t])
    return best if counts[best] else None


def quick_runs(model: str, task: str, runs_dir: str | os.PathLike, steps: int | None = None,
               eval_limit: int | None = None, methods: Sequence[str] = METHODS) -> list[Path]:
    """Train and evaluate every method briefly, as ``<method>-<task>`` runs (what the method notebooks write)."""
    from ..run.pipeline import run_recipe
    from ..run.recipe import resolve_recipe

    folders = []
    for method in methods:
        folder = Path(runs_dir) / f"{method}-{task}"
        run_recipe(resolve_recipe(model, method, task, steps=steps, eval_limit=eval_limit), folder, fresh=True)
        folders.append(folder)
    return folders


def other_runs(source: str | os.PathLike | None, task: str) -> list[Run]:
    """Runs made elsewhere, to draw next to this notebook's: a bundle (``.zip`` from ``export-runs``, e.g. a teacher's
    real-model runs) or a folder of run folders; ``[]`` for ``None``.

    Only finished runs of ``task`` are kept; each is labelled with the bundle's or folder's name (``Run.source``),
    and one line says what was loaded. A damaged bundle, or one of another task only, is a one-line error.
    """
    if source is None:
        return []
    from ..errors import UserError
    from ..run.bundle import load_bundle

    path = Path(source)
    runs = load_bundle(path, task)
    if not runs:
        raise UserError(f"{path}: no finished run in it; give a bundle made by python -m helpers export-runs, or a "
                        "folder of finished run folders (or set it to None)")
    for run in runs:
        run.source = run.source or path.name
    origins = "; ".join(dict.fromkeys(run.origin() for run in runs))
    print(f"Loaded {len(runs)} run{'s' if len(runs) != 1 else ''} of task {task} from {path.name}: {origins}")
    return runs
