"""The course's main job: fine-tune one base model with several methods on one task and compare them.

For each method: resolve and check its recipe (before any weights load), load the base model, apply the method,
train, evaluate on the task's test split, measure perplexity on held-out general text before and after (does
the method make the model forget?), and finally write ``comparison.png``, ``comparison.md`` and
``comparison.json`` next to the run folders.

Reruns are safe: a finished run is not trained again (its stored result is shown; ``reevaluate`` evaluates it
again into a new ``eval-<time>/`` subfolder), an interrupted one resumes from its last complete checkpoint, and
a folder holding a run of another recipe is refused unless ``resume=False`` (``--fresh``) starts over.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import set_seed

from .augment import with_generated_rows
from .data import EncodedDataset, load_split
from .errors import UserError
from .evaluation import evaluate, heldout_texts, perplexity
from .files import write_json
from .methods import METHODS, apply_method
from .models import load_model
from .plotting import write_comparison
from .recipe import Recipe, describe, resolve_recipe
from .runs import (
    ARTIFACT,
    RunRecord,
    check_out_folder,
    evaluation_folder,
    last_complete_checkpoint,
    load_runs,
    start_over,
)
from .training import attach_artifact, is_main_process, train

START_OVER = "use --fresh to start over or another --out"
# Settings that change only the evaluation, not what trains (a finished run can be evaluated again with others).
EVALUATION_SETTINGS = ("eval_limit", "test_file", "eval_batch_size", "lengths.max_new_tokens")
EVALUATION_FLAGS = {"eval_limit": "--eval-limit", "test_file": "--test-file",
                    "lengths.max_new_tokens": "--max-new-tokens"}


def refuse_other_recipe(record: RunRecord, recipe: Recipe) -> None:
    """Raise one line naming what differs when ``record`` holds a run of another recipe."""
    if not record.recipe:
        return
    diffs = recipe.differences(record.recipe)
    if any(key == "method" for key, _, _ in diffs):  # another method has other options and rates: name the method
        diffs = [diff for diff in diffs if diff[0] == "method"]
    if diffs:
        was = ", ".join(describe(key, old) for key, old, _ in diffs)
        asks = ", ".join(describe(key, new) for key, _, new in diffs)
        hint = START_OVER
        if record.trained and all(key in EVALUATION_SETTINGS for key, _, _ in diffs):
            flags = "".join(f" {EVALUATION_FLAGS[key]} {new}" for key, _, new in diffs
                            if new is not None and key in EVALUATION_FLAGS)
            hint += f", or evaluate it with these settings: python -m helpers evaluate --run {record.folder}{flags}"
        raise UserError(f"{record.folder}: exists with {was}, this command asks {asks}; {hint}")


def _evaluate(model, tokenizer, recipe: Recipe, out_dir: Path) -> dict:
    """Metrics of ``model`` on the recipe's test split; predictions go to ``out_dir/predictions.jsonl``."""
    examples = load_split(recipe.task, "test", recipe.test_file, limit=recipe.eval_limit)
    return evaluate(model, tokenizer, recipe.task_spec(), examples, out_dir=out_dir, save_metrics=False,
                    train_examples=load_split(recipe.task, "train", recipe.train_file), **recipe.evaluation_options())


def _release(*objects) -> None:
    del objects
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_rerun(recipe: Recipe, out_dir: str | Path, resume: bool = True) -> None:
    """Raise, before anything trains, when ``out_dir`` cannot take ``recipe``: not a folder for a run, or it holds
    a run of another recipe that trained or saved a checkpoint (``resume=False`` starts over instead)."""
    out_dir = check_out_folder(out_dir)
    record = RunRecord.find(out_dir)
    if record is None or not resume:
        return
    try:
        refuse_other_recipe(record, recipe)
    except UserError:
        if record.trained or last_complete_checkpoint(out_dir, remove_broken=False) is not None:
            raise


def run_recipe(recipe: Recipe, out_dir: str | Path, resume: bool = True, reevaluate: bool = False,
               perplexity_before: float | None = None) -> dict:
    """Train and evaluate one recipe into ``out_dir``; returns its metrics (written to ``out_dir/metrics.json``).

    A finished run is not trained again: its stored metrics are returned (``reevaluate``: it is evaluated again
    into a new ``eval-<time>/`` subfolder, and those metrics are returned). An unfinished run of the same recipe
    resumes; one of another recipe is refused, unless it never saved a checkpoint. ``resume=False`` starts over.
    """
    out_dir = check_out_folder(out_dir)
    record = RunRecord.find(out_dir)
    if record is not None and not resume:
        print(f"{out_dir}: starting over (--fresh); the earlier run's files are removed.")
        start_over(out_dir)
        record = None
    if record is not None:
        try:
            refuse_other_recipe(record, recipe)
        except UserError:
            if record.trained or last_complete_checkpoint(out_dir, remove_broken=False) is not None:
                raise
            print(f"{out_dir}: replacing an earlier run of another recipe that saved no checkpoint.")
            start_over(out_dir)
            record = None
    if record is not None and record.trained and record.status == "finished" and record.metrics():
        if not reevaluate:
            print(f"{record.summary()}. Already finished: not training again; its stored metrics follow "
                  "(--reevaluate evaluates it again into a subfolder, --fresh trains it again).")
            return record.metrics()
        return reevaluate_run(record, recipe)

    set_seed(recipe.training.seed)
    if record is None:
        record = RunRecord(out_dir, name=out_dir.name, model=recipe.model, method=recipe.method, task=recipe.task,
                           recipe=recipe.to_dict(), started_at=None)
        record.save()
    try:
        metrics = _train_and_evaluate(record, recipe, perplexity_before)
    except KeyboardInterrupt:
        current = RunRecord.load(out_dir)  # train() may have updated it
        if current.status != "failed":
            current.mark_failed("interrupted (KeyboardInterrupt); run the same command again to resume")
        raise
    except Exception as error:
        RunRecord.load(out_dir).mark_failed(error)
        raise
    return metrics


def _train_and_evaluate(record: RunRecord, recipe: Recipe, perplexity_before: float | None) -> dict:
    out_dir = record.folder
    model, tokenizer = load_model(recipe.model, device=recipe.device, dtype=recipe.dtype)
    heldout = heldout_texts()
    if perplexity_before is None and is_main_process():
        perplexity_before = perplexity(model, tokenizer, heldout)
    if record.trained:  # trained, but its evaluation did not finish: evaluate it now
        print(f"{record.summary()}: trained; evaluating it now.")
        trained = attach_artifact(model, out_dir / ARTIFACT)
    else:
        setup = apply_method(model, recipe.method, **recipe.method_options)
        print(f"[{recipe.method}] {setup}")
        rows = with_generated_rows(recipe.task, load_split(recipe.task, "train", recipe.train_file),
                                   recipe.training.generated_rows, recipe.training.seed)
        dataset = EncodedDataset(tokenizer, recipe.task_spec(), rows)
        train(setup, tokenizer, dataset, out_dir, task=recipe.task, resume=True, recipe=recipe.to_dict(),
              finish=False, **recipe.training.as_options())
        trained = setup.model
    if not is_main_process():  # under torchrun/accelerate the other processes only help to train
        return {}
    metrics = _evaluate(trained, tokenizer, recipe, out_dir)
    metrics["perplexity_before"] = perplexity_before
    metrics["perplexity_after"] = perplexity(trained, tokenizer, heldout)
    record = RunRecord.load(out_dir)  # train() updated it
    record.write_metrics(metrics)
    record.mark_finished()
    _release(model, trained)
    return metrics


def reevaluate_run(record: RunRecord, recipe: Recipe | None = None, out_dir: str | Path | None = None) -> dict:
    """Evaluate a finished run again into ``out_dir`` (default: a new ``eval-<time>/`` in the run folder).

    The training results (``metrics.json``, ``predictions.jsonl``) are never touched. ``recipe`` gives the test
    split and evaluation settings (default: the run's own).
    """
    from .training import load_finetuned

    recipe = recipe or recipe_for_evaluation(record)
    target = Path(out_dir) if out_dir is not None else evaluation_folder(record.folder)
    check_out_folder(target, purpose="evaluation")
    model, tokenizer = load_finetuned(record.folder, device=recipe.device, dtype=recipe.dtype, model=recipe.model)
    target.mkdir(parents=True, exist_ok=True)
    examples = load_split(recipe.task, "test", recipe.test_file, limit=recipe.eval_limit)
    train_examples = load_split(recipe.task, "train", recipe.train_file)
    metrics = evaluate(model, tokenizer, recipe.task_spec(), examples, out_dir=target, train_examples=train_examples,
                       **recipe.evaluation_options())
    write_json(target / "evaluation.json", {"run": str(record.folder.resolve()), "test_file": recipe.test_file,
                                            "eval_limit": recipe.eval_limit, **recipe.evaluation_options()})
    print(f"Evaluated {record.folder} again into {target}/ (its training results are unchanged).")
    _release(model)
    return metrics


def recipe_for_evaluation(record: RunRecord, task: str | None = None, test_file: str | None = None,
                          eval_limit: int | None = None, max_new_tokens: int | None = None, device: str | None = None,
                          dtype: str | None = None, model: str | None = None) -> Recipe:
    """The recipe to evaluate a finished run again: its own, with the given evaluation settings changed.

    A run trained through ``helpers.train`` without a recipe gets the defaults of its model, method and options.
    ``model`` names the base model when it moved (default: the one the run recorded).
    """
    stored = record.recipe or {}
    lengths = dict(stored.get("lengths", {}))
    if max_new_tokens is not None:
        lengths["max_new_tokens"] = max_new_tokens
    return resolve_recipe(
        record.base_model(model), record.method, task or record.task or stored.get("task") or "ie",
        method_options=record.method_options or stored.get("method_options"), training=stored.get("training"),
        lengths=lengths, eval_limit=eval_limit, eval_batch_size=stored.get("eval_batch_size"),
        test_file=test_file or stored.get("test_file"), device=device, dtype=dtype or stored.get("dtype"),
    )


def run_method(
    model_name: str,
    task: str,
    method: str,
    out_dir: str | Path,
    method_overrides: dict | None = None,
    training: dict | None = None,
    evaluation: dict | None = None,
    lengths: dict | None = None,
    train_file: str | None = None,
    test_file: str | None = None,
    eval_limit: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    seed: int = 42,
    resume: bool = True,
    reevaluate: bool = False,
    perplexity_before: float | None = None,
) -> dict:
    """Train and evaluate one method; returns its metrics (also written to ``out_dir/metrics.json``).

    The recipe starts from the defaults for the model's size and the GPU (the tiny model gets short runs and
    short sequences); ``training`` (:class:`~helpers.recipe.TrainingSettings` fields), ``evaluation``
    (``max_new_tokens``, ``batch_size``) and ``lengths`` (``max_source_length``/``max_target_length``) override
    them. Everything is checked before the model loads; see :func:`run_recipe` for reruns.
    """
    recipe = resolve_recipe(model_name, method, task, **_recipe_options(
        method_overrides, training, evaluation, lengths, train_file, test_file, eval_limit, device, dtype, seed))
    return run_recipe(recipe, out_dir, resume=resume, reevaluate=reevaluate, perplexity_before=perplexity_before)


def _recipe_options(method_overrides, training, evaluation, lengths, train_file, test_file, eval_limit, device,
                    dtype, seed) -> dict:
    evaluation = dict(evaluation or {})
    unknown = sorted(set(evaluation) - {"max_new_tokens", "batch_size"})
    if unknown:
        raise UserError(f"unknown evaluation setting {unknown[0]!r}; use max_new_tokens or batch_size")
    return {"method_options": method_overrides, "training": {"seed": seed, **(training or {})},
            "lengths": {**(lengths or {}), "max_new_tokens": evaluation.get("max_new_tokens")},
            "eval_batch_size": evaluation.get("batch_size"), "eval_limit": eval_limit, "train_file": train_file,
            "test_file": test_file, "device": device, "dtype": dtype}


def compare(
    model: str = "tiny",
    task: str = "ie",
    methods: list[str] | tuple[str, ...] = METHODS,
    out: str | Path = "runs/compare",
    training: dict | None = None,
    evaluation: dict | None = None,
    lengths: dict | None = None,
    method_overrides: dict | None = None,
    train_file: str | None = None,
    test_file: str | None = None,
    eval_limit: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    seed: int = 42,
    resume: bool = True,
    reevaluate: bool = False,
) -> dict:
    """Run every method on ``task`` and write the side-by-side comparison into ``out``; returns its summary.

    Every method's recipe is resolved and checked first, so a bad option stops the job before anything trains.
    ``method_overrides`` maps a method to its options.
    """
    methods = list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UserError(f"unknown method(s) {', '.join(unknown) or '(none given)'} (--methods); choose from "
                        f"{', '.join(METHODS)}")
    check_out_folder(out, purpose="comparison")
    options = _recipe_options(None, training, evaluation, lengths, train_file, test_file, eval_limit, device, dtype,
                              seed)
    recipes = [resolve_recipe(model, method, task, **{**options, "method_options": (method_overrides or {}).get(
        method)}) for method in methods]
    started = time.time()
    out = Path(out)
    for recipe in recipes:  # a rerun with other settings stops here, not after the first methods have trained
        check_rerun(recipe, out / recipe.method, resume=resume)
    out.mkdir(parents=True, exist_ok=True)
    before = None
    for recipe in recipes:
        metrics = run_recipe(recipe, out / recipe.method, resume=resume, reevaluate=reevaluate,
                             perplexity_before=before)
        before = metrics.get("perplexity_before")
    if not is_main_process():
        return {"out": str(out)}
    runs = load_runs(*(out / m for m in methods))
    paths = write_comparison(runs, out)
    summary = {"out": str(out), "wall_time_s": round(time.time() - started, 1), "files": paths}
    write_json(out / "summary.json", summary)
    return summary
