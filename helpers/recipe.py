"""The recipe of a run: what it trains and how, resolved and checked once, before any model weights load.

Model, method, task and device give the defaults (the tiny model gets short runs and short sequences; ChatGLM-6B
gets a batch that fits the GPU's memory); the user's overrides win. :func:`resolve_recipe` checks every value and
raises :class:`~helpers.errors.UserError` naming the option, so a bad option fails in a second, not after the
weights have loaded. The command line, the pipeline, the notebooks and the memory estimate all read recipes, and
a run record stores its recipe so that a rerun can tell whether it asks for the same run.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from .data import TASKS, Task, get_task, load_split, warn_unseen_labels
from .errors import UserError
from .methods import METHODS, resolve_method_options

GIB = 1 << 30

# Learning rates per task and method: small parameter sets (LayerNorms, prefixes) take larger steps. The tiny
# model's were chosen on validation splits carved from each task's training file (a fifth of its texts, seed 0;
# never the test file) by ``python -m bench tune``: for each method the earlier rate/3, rate and 3*rate at 150
# steps, the best main metric kept (IE: exact-triple F1, then char F1 where F1 was 0 for every rate); differences
# under 0.01 count as ties, and a tie keeps the middle rate. IE had a second round around the first round's
# choices; IE and classification a third after their training files grew (517 and 449 rows; gen's did not change
# and kept its rates). Dequantized Freeze was not tuned again. The real model's are starting points in the range
# the original course used.
LEARNING_RATES = {
    "ie": {"freeze": 3.33e-2, "freeze_dequantized": 2e-3, "embedding": 1.8e-2, "ptuning_v2": 1e-2, "lora": 1.5e-2},
    "gen": {"freeze": 3.33e-2, "freeze_dequantized": 2e-3, "embedding": 2e-3, "ptuning_v2": 3.33e-3, "lora": 1.67e-3},
    "cls": {"freeze": 1e-1, "freeze_dequantized": 2e-3, "embedding": 1.8e-2, "ptuning_v2": 3.33e-3, "lora": 5e-3},
}
REAL_LEARNING_RATES = {"freeze": 1e-3, "freeze_dequantized": 1e-4, "embedding": 1e-4, "ptuning_v2": 2e-2,
                       "lora": 2e-4}
# Training steps of the tiny model per task and method, chosen on the same validation splits at the rates above
# (``python -m bench tune --factors 1 --steps 150,300,450`` for IE, ``--steps 150,300`` for gen and cls): the fewest
# steps whose main metric is within 0.01 of the best; on IE, where exact-triple F1 is within 0.01 at every step
# count (Freeze: 0.000-0.008), char F1 decides the same way. On IE every method gained from 150 to 300 steps
# (exact-triple F1 embedding 0.058 -> 0.103, LoRA 0.008 -> 0.066; Freeze char F1 0.52 -> 0.58) and none from 300
# to 450; at 300 steps the rates x 1/3 and x 3 did no better. Generation: Freeze, embedding-only and P-tuning v2
# gained (ROUGE-L +0.03 to +0.05), LoRA lost 0.02. Classification: LoRA 0.236 -> 0.427 and P-tuning v2 0.101 ->
# 0.146 accuracy, while embedding-only (0.539 -> 0.427) and Freeze (0.112 -> 0.056) lost.
# Dequantized Freeze takes Freeze's steps; the base model alone (no method) TINY_TRAINING's.
TINY_STEPS = {
    "ie": {"freeze": 300, "embedding": 300, "ptuning_v2": 300, "lora": 300},
    "gen": {"freeze": 300, "embedding": 300, "ptuning_v2": 300, "lora": 150},
    "cls": {"freeze": 150, "embedding": 150, "ptuning_v2": 300, "lora": 300},
}
# Training and evaluation sizes for the embedded tiny model on a CPU (the whole comparison in minutes).
TINY_TRAINING = {"max_steps": 150, "batch_size": 8, "save_steps": 50, "warmup_steps": 10}  # steps: TINY_STEPS
TINY_EVALUATION = {"batch_size": 16}
TINY_LENGTHS = {"max_source_length": 192, "max_target_length": 64}  # tokens; generation stops after the target
REAL_TRAINING = {"max_steps": 200, "batch_size": 4, "gradient_accumulation_steps": 2, "warmup_steps": 20,
                 "save_steps": 50}
REAL_EVALUATION = {"batch_size": 8}
# On a GPU with less memory than this (a 16 GB T4) ChatGLM-6B trains one row at a time with 8 accumulation steps
# and gradient checkpointing, so the effective batch stays 8 as on the larger GPUs.
BIG_GPU_GIB = 30
BIG_GPU_SIZING = {"batch_size": 4, "gradient_accumulation_steps": 2, "gradient_checkpointing": False}
SMALL_GPU_SIZING = {"batch_size": 1, "gradient_accumulation_steps": 8, "gradient_checkpointing": True}

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_ALIASES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "half": "fp16"}
# How each setting is spelled on the command line, for error messages and the help text.
OPTION_FLAGS = {
    "max_steps": "--steps", "learning_rate": "--lr", "batch_size": "--batch-size",
    "gradient_accumulation_steps": "--grad-accum", "warmup_steps": "--warmup-steps", "save_steps": "--save-steps",
    "seed": "--seed", "gradient_checkpointing": "--gradient-checkpointing", "deepspeed": "--deepspeed",
    "max_source_length": "--max-source-length", "max_target_length": "--max-target-length",
    "max_new_tokens": "--max-new-tokens", "eval_limit": "--eval-limit", "eval_batch_size": "--eval-batch-size",
    "generated_rows": "--generated-rows", "train_file": "--train-file", "test_file": "--test-file",
    "device": "--device", "dtype": "--dtype",
    "model": "--model", "method": "--method", "task": "--task",
}
# Short names for the settings in one-line messages ("exists with lr=0.005").
SHORT_NAMES = {"learning_rate": "lr", "max_steps": "steps", "gradient_accumulation_steps": "grad_accum",
               "batch_size": "batch_size"}
# Settings that may change between an interrupted run and its resumption (where it runs, not what it trains).
NOT_COMPARED = ("device",)


def _spelled(name: str) -> str:
    return f"{name} ({OPTION_FLAGS[name]})" if name in OPTION_FLAGS else name


@dataclass(frozen=True)
class TrainingSettings:
    """The training side of a recipe: :meth:`as_options` are the keyword arguments of :func:`helpers.train`."""

    max_steps: int
    learning_rate: float
    batch_size: int
    gradient_accumulation_steps: int = 1
    warmup_steps: int = 0
    save_steps: int = 50
    seed: int = 42
    gradient_checkpointing: bool = False
    deepspeed: str | None = None
    generated_rows: int = 0  # IE: rows recombined from the train file's own triples (helpers.augment)

    def as_options(self) -> dict[str, Any]:
        """What :func:`helpers.train` takes (the generated rows are part of the dataset, made before)."""
        options = dataclasses.asdict(self)
        del options["generated_rows"]
        return options


@dataclass(frozen=True)
class Lengths:
    """Token budgets: prompt and text, answer (training), and the longest generated answer (evaluation)."""

    max_source_length: int
    max_target_length: int
    max_new_tokens: int | None = None  # None: the evaluation's own budget for the task


@dataclass(frozen=True)
class Recipe:
    """Everything that decides a run, resolved and validated (see :func:`resolve_recipe`); never changed after."""

    model: str
    method: str | None
    task: str
    method_options: dict[str, Any]
    training: TrainingSettings
    lengths: Lengths
    eval_batch_size: int
    eval_limit: int | None = None
    train_file: str | None = None
    test_file: str | None = None
    device: str = "cpu"
    dtype: str = "fp32"

    def __post_init__(self) -> None:
        # a frozen dataclass with a dict inside: keep a private copy so later changes to the caller's dict
        # cannot reach the recipe
        object.__setattr__(self, "method_options", _plain(self.method_options))

    def task_spec(self) -> Task:
        """The task with this recipe's token budgets."""
        return dataclasses.replace(get_task(self.task), max_source_length=self.lengths.max_source_length,
                                   max_target_length=self.lengths.max_target_length)

    def evaluation_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`helpers.evaluate` (batch size and answer length)."""
        return {"batch_size": self.eval_batch_size, "max_new_tokens": self.lengths.max_new_tokens}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (what a run record stores)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["training"] = dataclasses.asdict(self.training)
        values["lengths"] = dataclasses.asdict(self.lengths)
        return _plain(values)

    def differences(self, stored: dict[str, Any]) -> list[tuple[str, Any, Any]]:
        """(setting, stored value, this recipe's value) for each setting in which ``stored`` (a ``to_dict``) differs."""
        mine, theirs = _flatten(self.to_dict()), _flatten(_plain(stored))
        keys = list(dict.fromkeys([*mine, *theirs]))
        return [(key, theirs.get(key), mine.get(key)) for key in keys
                if key not in NOT_COMPARED and theirs.get(key) != mine.get(key)]


def _plain(value: Any) -> Any:
    """JSON-shaped copy (tuples become lists), so stored and fresh recipes compare equal."""
    return json.loads(json.dumps(value, default=str))


def _flatten(values: dict[str, Any]) -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and key in ("training", "lengths", "method_options"):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def describe(key: str, value: Any) -> str:
    """``lr=0.005`` for the setting ``training.learning_rate``."""
    leaf = key.rsplit(".", 1)[-1]
    return f"{SHORT_NAMES.get(leaf, leaf)}={'(none)' if value is None else value}"


# ----------------------------------------------------------------------------------------------------------
# The rules: one place for each default
# ----------------------------------------------------------------------------------------------------------


def gpu_sizing(gpu_memory_gib: float | None) -> dict[str, Any]:
    """Batch size, accumulation and gradient checkpointing of ChatGLM-6B for a GPU (``None``: no GPU, no change)."""
    if gpu_memory_gib is None:
        return {}
    return dict(BIG_GPU_SIZING if gpu_memory_gib >= BIG_GPU_GIB else SMALL_GPU_SIZING)


def training_settings(method: str, small: bool, dequantized: bool = False, gpu_memory_gib: float | None = None,
                      overrides: dict[str, Any] | None = None, task: str | None = None) -> dict[str, Any]:
    """Training settings of ``method`` before validation: the defaults for the model size, GPU and task, then
    overrides.

    A shorter run (``max_steps`` given) also shortens the warm-up (at most a fifth of the steps) and saves at
    least once, at its end. Overrides of ``None`` mean "not given".
    """
    key = "freeze_dequantized" if method == "freeze" and dequantized else method
    if small:
        default_steps = TINY_STEPS.get(task, TINY_STEPS["ie"]).get(method, TINY_TRAINING["max_steps"])
        settings = {**TINY_TRAINING, "max_steps": default_steps,
                    "learning_rate": LEARNING_RATES.get(task, LEARNING_RATES["ie"]).get(key, 1e-3)}
    else:
        settings = {**REAL_TRAINING, **gpu_sizing(gpu_memory_gib), "learning_rate": REAL_LEARNING_RATES.get(key, 1e-4)}
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    steps = given.get("max_steps")
    if isinstance(steps, int) and steps >= 1:
        settings.update(warmup_steps=min(settings.get("warmup_steps", 0), steps // 5),
                        save_steps=min(settings.get("save_steps", steps), steps))
    settings.update(given)
    return settings


def default_lengths(task: str, small: bool) -> dict[str, int]:
    """Token budgets of ``task``: the task's own, or shorter ones for the tiny model."""
    spec = get_task(task)
    lengths = {"max_source_length": spec.max_source_length, "max_target_length": spec.max_target_length}
    if small:
        lengths.update(TINY_LENGTHS)
    return lengths


def model_config(model: str):
    """The ``ChatGLMConfig`` of ``model`` ("tiny", a folder, or a hub name) without loading any weights.

    Never builds the tiny model just to check options: :func:`helpers.models.model_config` is the one rule.
    """
    from .models import model_config as checked_config

    if not isinstance(model, str) or not model.strip():
        raise UserError(f"model (--model) must be 'tiny', a checkpoint folder or a hub name, got {model!r}")
    return checked_config(model)


def _device(device: str | None) -> tuple[str, float | None]:
    """(device name, GPU memory in GiB or None) for ``device`` (default: the GPU when there is one)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"device (--device) {device!r} is not a device; use cpu or cuda (cuda:1 for the second GPU)") \
            from None
    if parsed.type == "cpu":
        return "cpu", None
    if parsed.type != "cuda":
        raise UserError(f"device (--device) {device!r}: the course trains on cpu or cuda")
    if not torch.cuda.is_available():
        raise UserError(f"device (--device) {device!r}: no CUDA GPU is visible here; use --device cpu")
    index = parsed.index or 0
    if index >= torch.cuda.device_count():
        raise UserError(f"device (--device) {device!r}: there are only {torch.cuda.device_count()} GPU(s)")
    return str(parsed), torch.cuda.get_device_properties(index).total_memory / GIB


def _dtype(dtype: str | None, device: str) -> str:
    if dtype is None:
        from .models import default_dtype

        return next(name for name, value in DTYPES.items() if value == default_dtype(device))
    name = DTYPE_ALIASES.get(str(dtype).lower(), str(dtype).lower())
    if name not in DTYPES:
        raise UserError(f"dtype (--dtype) {dtype!r} is unknown; use one of {', '.join(DTYPES)}")
    if device == "cpu" and name == "fp16":
        raise UserError("dtype (--dtype) fp16 does not train on a CPU; use fp32 (the default there) or bf16")
    return name


# ----------------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------------


def _whole(name: str, value: Any, low: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UserError(f"{_spelled(name)} must be a whole number of at least {low} ({what}), got {value!r}")
    return value


def check_training(settings: dict[str, Any]) -> TrainingSettings:
    """The settings as :class:`TrainingSettings`, each value checked (:class:`UserError` names a bad one)."""
    known = {f.name for f in dataclasses.fields(TrainingSettings)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise UserError(f"unknown training setting {unknown[0]!r}; the settings are: {', '.join(sorted(known))}")
    _whole("max_steps", settings.get("max_steps"), 1, "optimizer steps to train")
    _whole("batch_size", settings.get("batch_size"), 1, "rows per step and device")
    _whole("gradient_accumulation_steps", settings.get("gradient_accumulation_steps", 1), 1,
           "batches added up per optimizer step")
    _whole("warmup_steps", settings.get("warmup_steps", 0), 0, "steps of rising learning rate")
    _whole("save_steps", settings.get("save_steps", 50), 1, "steps between checkpoints")
    _whole("seed", settings.get("seed", 42), 0, "the random seed")
    _whole("generated_rows", settings.get("generated_rows", 0), 0, "IE rows recombined from the training triples")
    lr = settings.get("learning_rate")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise UserError(f"{_spelled('learning_rate')} must be a finite number above 0 (e.g. 1e-3), got {lr!r}")
    if lr > 1:
        raise UserError(f"{_spelled('learning_rate')} {lr} is far too large (the course uses 1e-4 to 3e-2)")
    if not isinstance(settings.get("gradient_checkpointing", False), bool):
        raise UserError(f"{_spelled('gradient_checkpointing')} must be True or False")
    deepspeed = settings.get("deepspeed")
    if deepspeed is not None:
        if not Path(deepspeed).is_file():
            raise UserError(f"{_spelled('deepspeed')} {deepspeed}: no such file; see configs/deepspeed_zero2.json")
        settings = {**settings, "deepspeed": str(Path(deepspeed).resolve())}
    return TrainingSettings(**{**settings, "learning_rate": float(lr)})


def check_lengths(budget: dict[str, int], max_sequence_length: int) -> None:
    """Prompt and answer together must fit the model's ``max_sequence_length`` (the longest text it was made for)."""
    for name in ("max_source_length", "max_target_length", "max_new_tokens"):
        if name in budget:
            _whole(name, budget[name], 1, "tokens")
    answer_name = "max_target_length"
    if budget.get("max_new_tokens") is not None and budget["max_new_tokens"] > budget["max_target_length"]:
        answer_name = "max_new_tokens"
    total = budget["max_source_length"] + budget[answer_name]
    if total > max_sequence_length:
        raise UserError(f"{_spelled('max_source_length')} {budget['max_source_length']} + {_spelled(answer_name)} "
                        f"{budget[answer_name]} = {total} tokens, more than the model's max_sequence_length "
                        f"{max_sequence_length}; lower them so they add up to at most {max_sequence_length}")


def _check_file(name: str, path: str | Path | None, task: str, split: str) -> str | None:
    """The absolute path of a user's data file, after checking that it exists and parses (``None``: bundled)."""
    if path is None:
        rows = load_split(task, split)
        if not rows:
            raise UserError(f"the bundled {split} split of {task} is empty; reinstall the course")
        return None
    file = Path(path).expanduser()
    if not file.exists():
        raise UserError(f"{_spelled(name)} {path}: no such file; give a JSON-lines file with text and answer fields")
    if not file.is_file():
        raise UserError(f"{_spelled(name)} {path}: is a folder, not a file")
    rows = load_split(task, split, file)  # a bad line raises with its file and line number
    if not rows:
        raise UserError(f"{_spelled(name)} {path}: holds no examples; add JSON lines with text and answer fields")
    return str(file.resolve())


# ----------------------------------------------------------------------------------------------------------
# Resolving
# ----------------------------------------------------------------------------------------------------------


def resolve_recipe(
    model: str = "tiny",
    method: str | None = "lora",
    task: str = "ie",
    *,
    method_options: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    lengths: dict[str, Any] | None = None,
    eval_limit: int | None = None,
    eval_batch_size: int | None = None,
    train_file: str | Path | None = None,
    test_file: str | Path | None = None,
    device: str | None = None,
    dtype: str | None = None,
    gpu_memory_gib: float | None = None,
    check_data: bool = True,
) -> Recipe:
    """The recipe of one run: defaults for the model, method, task and device, then the overrides, all checked.

    ``training`` overrides :class:`TrainingSettings` fields, ``lengths`` the :class:`Lengths` fields; ``None``
    values mean "not given". ``gpu_memory_gib`` replaces the memory of the chosen GPU when sizing the batch (for
    planning). ``method=None`` is the base model alone (for evaluating it). Only the model's configuration is read
    (no weights); with ``check_data`` the train and test files are read once to check them. Raises
    :class:`UserError` naming the first bad setting.
    """
    if method is not None and method not in METHODS:
        raise UserError(f"unknown method {method!r} (--method); choose one of {', '.join(METHODS)}")
    if task not in TASKS:
        raise UserError(f"unknown task {task!r} (--task); choose one of {', '.join(TASKS)}")
    device_name, memory = _device(device)
    dtype_name = _dtype(dtype, device_name)
    if gpu_memory_gib is not None and (isinstance(gpu_memory_gib, bool) or not isinstance(gpu_memory_gib, (int, float))
                                       or not math.isfinite(gpu_memory_gib) or gpu_memory_gib <= 0):
        raise UserError(f"gpu_memory_gib (--gpu-memory) must be a GPU's memory in GiB, above 0 (e.g. 15 for a T4), "
                        f"got {gpu_memory_gib!r}")
    config = model_config(model)
    small = _is_small(config)
    options = resolve_method_options(method, method_options, config) if method is not None else {}
    memory = gpu_memory_gib if gpu_memory_gib is not None else memory
    settings = check_training(training_settings(method, small, bool(options.get("dequantize")), memory, training,
                                                task=task))
    if settings.generated_rows and task != "ie":
        raise UserError(f"{_spelled('generated_rows')} only applies to the ie task (its triples are recombined); "
                        f"leave it out for {task}")

    given = {k: v for k, v in (lengths or {}).items() if v is not None}
    unknown = sorted(set(given) - {f.name for f in dataclasses.fields(Lengths)})
    if unknown:
        raise UserError(f"unknown length setting {unknown[0]!r}; use max_source_length, max_target_length or "
                        "max_new_tokens")
    budget = {**default_lengths(task, small), **given}
    check_lengths(budget, config.max_sequence_length)
    if eval_limit is not None:
        _whole("eval_limit", eval_limit, 1, "test examples to evaluate; leave it out for all")
    batch = eval_batch_size if eval_batch_size is not None else (TINY_EVALUATION if small else REAL_EVALUATION)[
        "batch_size"]
    _whole("eval_batch_size", batch, 1, "rows generated at once")
    if check_data:
        train_file = _check_file("train_file", train_file, task, "train")
        test_file = _check_file("test_file", test_file, task, "test")
        if task == "cls":
            warn_unseen_labels(load_split(task, "train", train_file), load_split(task, "test", test_file))
    return Recipe(model=model if not Path(model).expanduser().is_dir() else str(Path(model).expanduser().resolve()),
                  method=method, task=task, method_options=options, training=settings, lengths=Lengths(**budget),
                  eval_batch_size=batch, eval_limit=eval_limit,
                  train_file=str(train_file) if train_file is not None else None,
                  test_file=str(test_file) if test_file is not None else None,
                  device=device_name, dtype=dtype_name)


def _is_small(config) -> bool:
    from .models import is_small_model

    return is_small_model(SimpleNamespace(config=config))


def recipe_from_dict(values: dict[str, Any]) -> Recipe:
    """A recipe as stored by :meth:`Recipe.to_dict` (not checked again: it was checked when it was made)."""
    values = dict(values)
    training = TrainingSettings(**values.pop("training"))
    budget = Lengths(**values.pop("lengths"))
    known = {f.name for f in dataclasses.fields(Recipe)}
    return Recipe(training=training, lengths=budget, **{k: v for k, v in values.items() if k in known})
