"""The notebooks' run policy: token budgets and training settings for the model at hand, which run folder to use
(continue an interrupted run, or delete an old one and start afresh), and which runs a comparison reads.

The rules themselves live in :mod:`helpers.recipe` (settings) and :mod:`helpers.runs` (run folders); this module
applies them the way a notebook cell needs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .data import TASKS, Task, get_task
from .methods import METHODS
from .recipe import TINY_LENGTHS, training_settings
from .runs import Run, RunRecord, start_over
from .runtime import is_toy, runtime_info


def task_for(task: str, toy: bool) -> Task:
    """The task with token budgets that fit the model: shortened for the tiny model (its answers are short)."""
    return dataclasses.replace(get_task(task), **TINY_LENGTHS) if toy else get_task(task)


def training_options(method: str, toy: bool, steps: int | None = None, dequantized: bool = False,
                     gpu_memory_gib: float | None = None, task: str | None = None, **overrides: Any) -> dict[str, Any]:
    """Hyper-parameters for ``helpers.train``: the tiny recipe on CPU, or settings sized to the GPU.

    The same rule as the command line (:func:`helpers.recipe.training_settings`): on a GPU with under 30 GiB (T4)
    the batch shrinks to 1 with 8 accumulation steps and gradient checkpointing, so the effective batch stays 8.
    """
    memory = None
    if not toy:
        memory = gpu_memory_gib if gpu_memory_gib is not None else runtime_info()["gpu_memory_gib"]
    return training_settings(method, toy, dequantized, memory, {"max_steps": steps, **overrides}, task=task)


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def replace_or_resume_run(runs_dir: str | os.PathLike, name: str, model: str, method_options: dict,
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


def find_runs(runs_dir: str | os.PathLike) -> list[Run]:
    """The finished runs in ``runs_dir``; none (rather than an error) while the folder does not exist yet."""
    from .runs import load_runs

    return load_runs(runs_dir) if Path(runs_dir).is_dir() else []


def main_task(runs: Sequence[Run]) -> str | None:
    """The task with the most runs (ties: ie, gen, cls order)."""
    counts = {task: sum(run.task == task for run in runs) for task in TASKS}
    best = max(counts, key=lambda t: counts[t])
    return best if counts[best] else None


def quick_runs(model: str, task: str, runs_dir: str | os.PathLike, steps: int | None = None,
               eval_limit: int | None = None, methods: Sequence[str] = METHODS) -> list[Path]:
    """Train and evaluate every method briefly, as ``<method>-<task>`` runs (what the method notebooks write)."""
    from .pipeline import run_method

    toy = is_toy(model)
    folders = []
    for method in methods:
        folder = Path(runs_dir) / f"{method}-{task}"
        run_method(model, task, method, folder, training=training_options(method, toy, steps, task=task),
                   eval_limit=eval_limit, resume=False)
        folders.append(folder)
    return folders

