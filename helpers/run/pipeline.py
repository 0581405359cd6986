"""The one run path: recipe → what the folder holds → load → apply the method → train → evaluate → record.

:func:`run_recipe` is what ``python -m helpers train``, ``compare`` (once per method), ``helpers.compare`` and
``bench`` go through; the notebooks take the same steps one cell at a time (:mod:`helpers.course.notebook`). What a
folder that already holds a run means is decided in one place (:func:`helpers.run.folder.decide`): a finished run
is not trained again (``reevaluate`` evaluates it again into a new ``eval-<time>/`` subfolder), an interrupted one
resumes from its last complete checkpoint, one of another recipe is refused unless ``fresh`` starts over.

:func:`compare` runs every method on one task and writes ``comparison.png``, ``comparison.md`` and
``comparison.json`` next to the run folders.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import set_seed

from ..errors import UserError
from ..files import write_json
from ..methods import METHODS, apply_method
from ..models import load_model
from ..tasks import EncodedDataset, load_split
from ..tasks.augment import with_generated_rows
from .artifacts import attach_artifact, load_finetuned
from .evaluation import evaluate_recipe, heldout_perplexity
from .folder import Decision, check_out_folder, decide, evaluation_folder
from .recipe import EVALUATION_SETTINGS, Recipe, resolve_recipe, stored_settings
from .record import ARTIFACT, RunRecord, is_main_process, load_runs
from .training import fit


def _release(*objects) -> None:
    del objects
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def training_rows(recipe: Recipe) -> list:
    """The rows a recipe trains on: its train file, plus the generated IE rows it asks for."""
    rows = load_split(recipe.task, "train", recipe.train_file)
    return with_generated_rows(recipe.task, rows, recipe.generated_rows, recipe.seed)


def run_recipe(recipe: Recipe, out_dir: str | Path, fresh: bool = False, reevaluate: bool = False,
               perplexity_before: float | None = None, decision: Decision | None = None) -> dict:
    """Train and evaluate one recipe into ``out_dir``; returns its metrics (also in ``out_dir/metrics.json``).

    ``decision`` is the folder's decision when the caller already made it (``compare`` decides for every method
    before the first trains); ``perplexity_before`` the base model's held-out perplexity when already measured.
    """
    decision = decision or decide(out_dir, recipe, "fresh" if fresh else "keep")
    if decision.action == "done":
        if reevaluate:
            return reevaluate_run(decision.record, recipe)
        print(f"{decision.record.summary()}. Already finished: not training again; its stored metrics follow "
              "(--reevaluate evaluates it again into a subfolder, --fresh trains it again).")
        return decision.record.metrics()
    set_seed(recipe.seed)
    record = decision.begin(recipe)
    try:
        return _train_and_evaluate(decision, record, recipe, perplexity_before)
    except KeyboardInterrupt:
        current = RunRecord.load(record.folder)  # training may have marked it already
        if current.status != "failed":
            current.mark_failed("interrupted (KeyboardInterrupt); run the same command again to resume")
        raise
    except Exception as error:
        RunRecord.load(record.folder).mark_failed(error)
        raise


def _train_and_evaluate(decision: Decision, record: RunRecord, recipe: Recipe,
                        perplexity_before: float | None) -> dict:
    model, tokenizer = load_model(recipe.model, device=recipe.device, dtype=recipe.dtype)
    if perplexity_before is None and is_main_process():
        perplexity_before = heldout_perplexity(model, tokenizer)
    if decision.action == "evaluate":  # trained, but its evaluation did not finish: evaluate it now
        print(f"{record.summary()}: trained; evaluating it now.")
        trained = attach_artifact(model, decision.folder / ARTIFACT)
    else:
        setup = apply_method(model, recipe.method, **recipe.method_options)
        print(f"[{recipe.method}] {setup}")
        dataset = EncodedDataset(tokenizer, recipe.task_spec(), training_rows(recipe))
        fit(record, decision.checkpoint, setup, tokenizer, dataset, recipe)
        trained = setup.model
    if not is_main_process():  # under torchrun/accelerate the other processes only help to train
        return {}
    metrics = evaluate_recipe(trained, tokenizer, recipe, decision.folder, perplexity_before)
    RunRecord.load(decision.folder).finish(metrics)  # training updated the record: read it again
    _release(model, trained)
    return metrics


def reevaluate_run(record: RunRecord, recipe: Recipe | None = None, out_dir: str | Path | None = None) -> dict:
    """Evaluate a finished run again into ``out_dir`` (default: a new ``eval-<time>/`` in the run folder).

    The training results (``metrics.json``, ``predictions.jsonl``) are never touched. ``recipe`` gives the test
    split and evaluation settings (default: the run's own).
    """
    recipe = recipe or recipe_for_evaluation(record)
    target = Path(out_dir) if out_dir is not None else evaluation_folder(record.folder)
    check_out_folder(target, purpose="evaluation")
    model, tokenizer = load_finetuned(record.folder, device=recipe.device, dtype=recipe.dtype, model=recipe.model)
    target.mkdir(parents=True, exist_ok=True)
    metrics = evaluate_recipe(model, tokenizer, recipe, target, save_metrics=True)
    write_json(target / "evaluation.json", {"run": str(record.folder.resolve()), "test_file": recipe.test_file,
                                            **{name: getattr(recipe, name) for name in EVALUATION_SETTINGS}})
    print(f"Evaluated {record.folder} again into {target}/ (its training results are unchanged).")
    _release(model)
    return metrics


def recipe_for_evaluation(record: RunRecord, model: str | None = None, **changes) -> Recipe:
    """The recipe to evaluate a finished run again: its own, with ``changes`` to its evaluation settings (or to
    ``task``, ``device``, ``dtype``). A run trained through ``helpers.train`` gets the defaults of its model,
    method and options. ``model`` names the base model when it moved (default: the one the run recorded).
    """
    allowed = {*EVALUATION_SETTINGS, "task", "device", "dtype"}
    unknown = sorted(set(changes) - allowed)
    if unknown:
        raise UserError(f"{unknown[0]!r} cannot change when a run is evaluated again; use one of "
                        f"{', '.join(sorted(allowed))}")
    given = {k: v for k, v in changes.items() if v is not None}
    settings = {k: v for k, v in stored_settings(record.recipe).items() if k not in ("device", "deepspeed")}
    task = given.pop("task", None) or record.task or record.recipe.get("task") or "ie"
    return resolve_recipe(record.base_model(model), record.method if record.method in METHODS else None, task,
                          method_options=record.method_options or None, **{**settings, **given})


def compare(model: str = "tiny", task: str = "ie", methods: list[str] | tuple[str, ...] = METHODS,
            out: str | Path = "runs/compare", *, fresh: bool = False, reevaluate: bool = False,
            method_options: dict[str, dict] | None = None, **settings) -> dict:
    """Run every method on ``task`` and write the side-by-side comparison into ``out``; returns its summary.

    ``settings`` are recipe settings shared by every method; ``method_options`` maps a method to its own options.
    Every method's recipe and folder are checked first, so a bad option or a changed rerun stops the job before
    anything trains.
    """
    from ..plotting import write_comparison

    methods = list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UserError(f"unknown method(s) {', '.join(unknown) or '(none given)'} (--methods); choose from "
                        f"{', '.join(METHODS)}")
    out = check_out_folder(out, purpose="comparison")
    recipes = [resolve_recipe(model, method, task, method_options=(method_options or {}).get(method), **settings)
               for method in methods]
    decisions = [decide(out / recipe.method, recipe, "fresh" if fresh else "keep") for recipe in recipes]
    started = time.time()
    out.mkdir(parents=True, exist_ok=True)
    before = None
    for recipe, decision in zip(recipes, decisions):
        metrics = run_recipe(recipe, decision.folder, reevaluate=reevaluate, perplexity_before=before,
                             decision=decision)
        before = metrics.get("perplexity_before")
    if not is_main_process():
        return {"out": str(out)}
    paths = write_comparison(load_runs(*(out / m for m in methods)), out)
    summary = {"out": str(out), "wall_time_s": round(time.time() - started, 1), "files": paths}
    write_json(out / "summary.json", summary)
    return summary
