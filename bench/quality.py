"""What the embedded tiny model learns: ``python -m bench tune`` and ``python -m bench quality``.

``tune`` chooses learning rates honestly: it carves a validation split out of each task's bundled train file (a
fifth of its distinct texts, seed 0, so no text is on both sides) and fine-tunes every method at its default
learning rate times each ``--factors`` on the rest, scoring on the held-out fifth. The test files are never read.
The chosen rates go into ``helpers.run.recipe.LEARNING_RATES`` (per task and method; the one place they live).

``quality`` runs every method with its defaults on every task's test file, for one or more tiny model folders
(for example the same recipe built with three seeds: ``python -m helpers build-tiny --seed 1 --out ...``), and
prints the task × method table: main metric and repetition rate as mean and min-max over the models and
fine-tuning seeds (``--seeds``), the training time, and, with several models, each model's mean main metric.

Both write one run folder per (model, task, method, rate) under ``--out``; a rerun reuses finished runs.
"""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

from helpers.methods import METHODS
from helpers.run.pipeline import run_recipe
from helpers.run.recipe import resolve_recipe
from helpers.run.record import RunRecord
from helpers.tasks import MAIN_METRIC, TASKS, bundled_path

VALIDATION_SHARE = 0.2
VALIDATION_SEED = 0


def _text_of(task: str, row: dict) -> str:
    return row.get("sentence", row.get("text", "")) if task == "cls" else row.get("text", "")


def validation_split(task: str, folder: Path, share: float = VALIDATION_SHARE, seed: int = VALIDATION_SEED,
                     source: Path | None = None) -> tuple[Path, Path]:
    """Write ``folder/train.jsonl`` and ``folder/val.jsonl`` from the task's train file, split by distinct text."""
    source = source or bundled_path(task, "train")
    lines = [line for line in Path(source).read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    keyed = [(_text_of(task, json.loads(line)), line) for line in lines]
    texts = list(dict.fromkeys(text for text, _ in keyed))
    random.Random(seed).shuffle(texts)
    held = set(texts[: max(1, int(len(texts) * share))])
    folder.mkdir(parents=True, exist_ok=True)
    train, val = folder / "train.jsonl", folder / "val.jsonl"
    train.write_text("".join(line + "\n" for text, line in keyed if text not in held), encoding="utf-8")
    val.write_text("".join(line + "\n" for text, line in keyed if text in held), encoding="utf-8")
    return train, val


def _row(model: str, task: str, method: str, out_dir: Path, metrics: dict, lr: float, split: str) -> dict:
    record = RunRecord.load(out_dir)
    main = MAIN_METRIC[task]
    return {"model": model, "task": task, "method": method, "lr": lr, "split": split, "main_metric": main,
            "steps": record.setting("steps"),
            "main": metrics.get(main), "repetition_rate": metrics.get("repetition_rate"),
            "char_f1": metrics.get("char_f1"), "train_s": record.train_runtime_s}


def default_lr(model: str, task: str, method: str) -> float:
    return resolve_recipe(model, method, task).learning_rate


def tune(model: str, tasks: list[str], methods: list[str], factors: list[float], out: Path,
         steps: list[int | None] = (None,)) -> list[dict]:
    """Every method at each multiple of its default rate (and each number of steps; None: the default)."""
    rows = []
    for task in tasks:
        train, val = validation_split(task, out / "splits" / task)
        for method in methods:
            base = default_lr(model, task, method)
            for max_steps in steps:
                for factor in factors:
                    lr = float(f"{base * factor:.3g}")
                    folder = out / task / (f"{method}-lr{lr:g}" + (f"-steps{max_steps}" if max_steps else ""))
                    recipe = resolve_recipe(model, method, task, learning_rate=lr, steps=max_steps,
                                            train_file=str(train), test_file=str(val))
                    metrics = run_recipe(recipe, folder)
                    rows.append(_row(model, task, method, folder, metrics, lr, "validation"))
                    print(json.dumps(rows[-1]), flush=True)
    return rows


def quality(models: list[str], tasks: list[str], methods: list[str], out: Path,
            seeds: list[int] = (42,)) -> list[dict]:
    """Every method with its defaults on every task's test file, for each model and fine-tuning seed."""
    rows = []
    for index, model in enumerate(models):
        for seed in seeds:
            for task in tasks:
                for method in methods:
                    folder = out / f"model{index}-seed{seed}" / task / method
                    metrics = run_recipe(resolve_recipe(model, method, task, seed=seed), folder)
                    lr = RunRecord.load(folder).setting("learning_rate")
                    rows.append(_row(model, task, method, folder, metrics, lr, "test") | {"seed": seed})
                    print(json.dumps(rows[-1]), flush=True)
    return rows


def _spread(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = f"{statistics.fmean(values):.{digits}f}"
    return mean if len(values) == 1 else f"{mean} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def format_table(rows: list[dict]) -> str:
    """Markdown: one line per (task, method), the main metric and repetition rate as mean (min-max) over all runs.

    With more than one model (for example one build per seed), a last column gives the main metric of each model,
    averaged over its fine-tuning seeds, in the order the models were given.
    """
    models = list(dict.fromkeys(row["model"] for row in rows))
    by_model = len(models) > 1
    lines = ["| task | method | lr | steps | main metric | repetition rate | train s |"
             + (" main metric per model |" if by_model else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if by_model else "")]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["method"], row["lr"], row.get("steps")), []).append(row)
    for (task, method, lr, steps), group in groups.items():
        line = (f"| {task} | {method} | {lr:g} | {steps} | {group[0]['main_metric']} "
                f"{_spread([r['main'] for r in group])} "
                f"| {_spread([r['repetition_rate'] for r in group], 2)} "
                f"| {_spread([r['train_s'] for r in group], 0)} |")
        if by_model:
            means = [[r["main"] for r in group if r["model"] == model and r["main"] is not None] for model in models]
            line += " " + " / ".join(f"{statistics.fmean(m):.3f}" if m else "-" for m in means) + " |"
        lines.append(line)
    seeds = sorted({row["seed"] for row in rows if "seed" in row})
    lines.append(f"\n{len(models)} model(s): {', '.join(models)}" + (f"; fine-tuning seeds {seeds}" if seeds else ""))
    return "\n".join(lines)


def add_arguments(tune_parser, quality_parser) -> None:
    for parser in (tune_parser, quality_parser):
        parser.add_argument("--tasks", default=",".join(TASKS), type=lambda s: s.split(","))
        parser.add_argument("--methods", default=",".join(METHODS), type=lambda s: s.split(","))
        parser.add_argument("--json-out", help="also write the rows to this JSON file")
    tune_parser.add_argument("--model", default="tiny")
    tune_parser.add_argument("--factors", default="0.333,1,3", type=lambda s: [float(f) for f in s.split(",")],
                             help="multiples of each method's default learning rate to try")
    tune_parser.add_argument("--steps", default=[None], type=lambda s: [int(n) for n in s.split(",")],
                             help="comma-separated numbers of training steps to try (default: the recipe's)")
    tune_parser.add_argument("--out", default="runs/tune")
    quality_parser.add_argument("--models", default="tiny", type=lambda s: s.split(","),
                                help="comma-separated model names or folders (e.g. one build per seed)")
    quality_parser.add_argument("--seeds", default=[42], type=lambda s: [int(n) for n in s.split(",")],
                                help="comma-separated fine-tuning seeds (default 42, the course's)")
    quality_parser.add_argument("--out", default="runs/quality")


def run(args) -> list[dict]:
    out = Path(args.out)
    if args.command == "tune":
        rows = tune(args.model, args.tasks, args.methods, args.factors, out, args.steps)
    else:
        rows = quality(args.models, args.tasks, args.methods, out, args.seeds)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    print(format_table(rows))
    return rows
