"""The recipe of a run: every setting that decides it, declared once, with its default rule and its check.

A :class:`Recipe` is the one description of a run. Each field below declares its help text, its group and, where
it differs from ``--<name>``, its command-line flag; the command line builds its options from these declarations
(:func:`add_options`, :func:`given_settings`), the notebooks take parameters of the same names (``STEPS``,
``LEARNING_RATE``, ...), error messages spell a setting the same way (``learning_rate (--lr)``) and ``run.json``
stores :meth:`Recipe.to_dict`. The method's own options (rank, prefix length, ...) are declared next to the methods
(:data:`helpers.methods.METHOD_OPTIONS`).

:func:`resolve_recipe` fills in the defaults — the tables below, the only place they live — for the model's size, the
method, the task and the GPU, then checks every value before any weights load: first each value's own form (a bad
``--lr`` costs no model lookup), then the model's configuration (lengths must fit it), then the data files.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..methods import METHOD_OPTIONS, check_method, resolve_method_options
from ..tasks import TASKS, Task, check_file, get_task, load_split, warn_unseen_labels
from .memory import GIB

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
# Every run: the seed, the IE rows generated on top of the train file (off: they lowered validation F1, see
# helpers/tasks/augment.py), no DeepSpeed, no gradient checkpointing unless the GPU is small.
COMMON = {"seed": 42, "generated_rows": 0, "deepspeed": None, "grad_accum": 1, "gradient_checkpointing": False}
# The embedded tiny model on a CPU (the whole comparison in minutes); steps per task and method: TINY_STEPS.
TINY_TRAINING = {"steps": 150, "batch_size": 8, "save_steps": 50, "warmup_steps": 10, "eval_batch_size": 16}
TINY_LENGTHS = {"max_source_length": 192, "max_target_length": 64}  # tokens; generation stops after the target
REAL_TRAINING = {"steps": 200, "batch_size": 4, "grad_accum": 2, "warmup_steps": 20, "save_steps": 50,
                 "eval_batch_size": 8}
# On a GPU with less memory than this (a 16 GB T4) ChatGLM-6B trains one row at a time with 8 accumulation steps
# and gradient checkpointing, so the effective batch stays 8 as on the larger GPUs.
BIG_GPU_GIB = 30
BIG_GPU_SIZING = {"batch_size": 4, "grad_accum": 2, "gradient_checkpointing": False}
SMALL_GPU_SIZING = {"batch_size": 1, "grad_accum": 8, "gradient_checkpointing": True}

# Settings that change only the evaluation, not what trains (a finished run can be evaluated again with others),
# and settings that may differ between a run and its resumption (where it runs, not what it trains).
EVALUATION_SETTINGS = ("eval_limit", "test_file", "eval_batch_size", "max_new_tokens")
NOT_COMPARED = ("device",)
SHORT_NAMES = {"learning_rate": "lr"}  # in one-line messages: "exists with lr=0.005"


def setting(help: str, group: str, *, default: Any = None, flag: str | None = None, minimum: int | None = None):
    """A recipe field: its help text, its group of command-line options, its flag (``--<name>`` unless given) and,
    for whole numbers, the smallest value allowed. ``None`` as a value means "the default for this run"."""
    return field(default=default, metadata={"help": help, "group": group, "flag": flag, "minimum": minimum})


@dataclass(frozen=True)
class Recipe:
    """Everything that decides a run, resolved and validated (see :func:`resolve_recipe`); never changed after."""

    model: str = setting("'tiny' (the embedded model), a checkpoint folder, or a hub name", "run", default="tiny")
    method: str | None = setting("the fine-tuning method", "run", default="lora")
    task: str = setting("the task", "run", default="ie")
    method_options: dict = field(default_factory=dict, metadata={"group": "method"})  # helpers.methods
    train_file: str | None = setting("a JSON-lines training file (default: the bundled sample)", "run")
    test_file: str | None = setting("a JSON-lines test file (default: the bundled sample)", "run")
    steps: int | None = setting("optimizer steps to train", "training", minimum=1)
    learning_rate: float | None = setting("peak learning rate (AdamW, linear decay)", "training", flag="--lr")
    batch_size: int | None = setting("rows per step and device", "training", minimum=1)
    grad_accum: int | None = setting("batches added up per optimizer step", "training", minimum=1)
    warmup_steps: int | None = setting("steps of rising learning rate (at most a fifth of --steps)", "training",
                                       minimum=0)
    save_steps: int | None = setting("steps between checkpoints", "training", minimum=1)
    seed: int | None = setting("the random seed", "training", minimum=0)
    gradient_checkpointing: bool | None = setting("recompute activations in the backward pass", "training")
    deepspeed: str | None = setting("a DeepSpeed config (configs/deepspeed_zero2.json or _zero3.json)", "training")
    generated_rows: int | None = setting("ie: also train on N rows recombined from the train file's triples "
                                         "(helpers/tasks/augment.py)", "training", minimum=0)
    max_source_length: int | None = setting("tokens of prompt and text", "lengths", minimum=1)
    max_target_length: int | None = setting("tokens of the answer in training", "lengths", minimum=1)
    max_new_tokens: int | None = setting("longest generated answer in evaluation (default: the longest training "
                                         "answer plus a quarter)", "lengths", minimum=1)
    eval_limit: int | None = setting("evaluate on the first N test examples only", "evaluation", minimum=1)
    eval_batch_size: int | None = setting("rows generated at once in evaluation", "evaluation", minimum=1)
    device: str | None = setting("cpu or cuda (default: cuda when available)", "device")
    dtype: str | None = setting("fp32, fp16 or bf16 (default: fp32 on CPU, bf16/fp16 on GPU)", "device")

    def __post_init__(self) -> None:
        # a frozen dataclass with a dict inside: a private copy, so later changes to the caller's dict cannot reach it
        object.__setattr__(self, "method_options", _json_copy(self.method_options))

    def task_spec(self) -> Task:
        """The task with this recipe's token budgets."""
        return dataclasses.replace(get_task(self.task), max_source_length=self.max_source_length,
                                   max_target_length=self.max_target_length)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (what a run record stores)."""
        return _json_copy(dataclasses.asdict(self))

    def differences(self, stored: dict[str, Any]) -> list[tuple[str, Any, Any]]:
        """(setting, stored value, this recipe's value) for each setting in which ``stored`` (a ``to_dict``) differs.

        Another method has other options and rates, so only the method is named then.
        """
        mine, theirs = _flatten(self.to_dict()), _flatten(_json_copy(stored))
        keys = list(dict.fromkeys([*mine, *theirs]))
        diffs = [(key, theirs.get(key), mine.get(key)) for key in keys
                 if key not in NOT_COMPARED and theirs.get(key) != mine.get(key)]
        return [diff for diff in diffs if diff[0] == "method"] or diffs

    def lines(self) -> list[str]:
        """The settings that shape training and evaluation, for people (the notebooks print them)."""
        effective = self.batch_size * self.grad_accum
        return [f"method {self.method} {json.dumps(self.method_options)} on {self.task}; model {self.model}, "
                f"{self.device}, {self.dtype}",
                f"{self.steps} steps of {self.batch_size} rows x {self.grad_accum} accumulated = {effective} rows per "
                f"step; learning rate {self.learning_rate:g} after {self.warmup_steps} warm-up steps; seed {self.seed}",
                f"tokens: prompt and text <= {self.max_source_length}, answer <= {self.max_target_length}; evaluation "
                f"batches of {self.eval_batch_size}, answers <= "
                f"{self.max_new_tokens or 'the longest training answer + 25 %'} tokens"]


def _json_copy(value: Any) -> Any:
    """JSON-shaped copy (tuples become lists), so stored and fresh recipes compare equal."""
    return json.loads(json.dumps(value, default=str))


# Records written before the settings were one flat type kept them in "training" and "lengths" groups.
_OLD_NAMES = {"max_steps": "steps", "gradient_accumulation_steps": "grad_accum"}


def _flatten(values: dict[str, Any]) -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if key in ("training", "lengths") and isinstance(value, dict):
            flat.update({_OLD_NAMES.get(k, k): v for k, v in value.items()})
        elif key == "method_options" and isinstance(value, dict):
            flat.update({f"method_options.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def stored_settings(stored: dict[str, Any]) -> dict[str, Any]:
    """The settings of a stored recipe (any record version) by field name, without method options."""
    return {k: v for k, v in _flatten(stored).items() if k in SETTINGS}


# ----------------------------------------------------------------------------------------------------------
# The declarations, read by the command line, the notebooks and the messages
# ----------------------------------------------------------------------------------------------------------

FIELDS = {f.name: f for f in dataclasses.fields(Recipe)}
TYPES = {name: kind for name, kind in typing.get_type_hints(Recipe).items()}
SETTINGS = tuple(name for name in FIELDS if name not in ("model", "method", "task", "method_options"))


def flag(name: str) -> str:
    """How the command line spells a setting or a method option."""
    if name in METHOD_OPTIONS:
        return METHOD_OPTIONS[name]["flag"]
    return (FIELDS[name].metadata.get("flag") if name in FIELDS else None) or "--" + name.replace("_", "-")


def spelled(name: str) -> str:
    """``learning_rate (--lr)``: a setting as the API and the command line spell it, for messages."""
    return f"{name} ({flag(name)})"


def describe(key: str, value: Any) -> str:
    """``lr=0.005`` for the setting ``learning_rate``, ``r=8`` for ``method_options.r``."""
    leaf = key.rsplit(".", 1)[-1]
    return f"{SHORT_NAMES.get(leaf, leaf)}={'(none)' if value is None else value}"


def base_type(name: str) -> type:
    """int, float, str or bool: the type of a setting's values (its annotation without ``| None``)."""
    return next(kind for kind in typing.get_args(TYPES[name]) or (TYPES[name],) if kind is not type(None))


def add_options(parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None,
                defaults_help: dict[str, str] | None = None) -> None:
    """One ``--flag`` per recipe setting (all, or ``names``), in argument groups by their declared group;
    ``defaults_help`` adds each setting's default to its help."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name in names or SETTINGS:
        spec, kind = FIELDS[name], base_type(name)
        group = spec.metadata["group"]
        if group not in groups:
            groups[group] = parser.add_argument_group(f"{group} settings")
        text = spec.metadata["help"] + (f" ({defaults_help[name]})" if name in (defaults_help or {}) else "")
        if kind is bool:
            groups[group].add_argument(flag(name), dest=name, action="store_const", const=True, help=text)
        else:
            groups[group].add_argument(flag(name), dest=name, type=kind, help=text)


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe settings given on a command line (those left out are not in the dict)."""
    return {name: getattr(args, name) for name in SETTINGS if getattr(args, name, None) is not None}


def default_help() -> dict[str, str]:
    """The default of each training setting in words, from the tables above (for ``--help``)."""
    def rates(table: dict) -> str:
        return ", ".join(f"{method} {value:g}" for method, value in table.items())

    tiny_steps = "; ".join(f"{task}: {rates(steps)}" for task, steps in TINY_STEPS.items())
    tiny_rates = "; ".join(f"{task}: {rates(values)}" for task, values in LEARNING_RATES.items())
    small_gpu = f"on a GPU under {BIG_GPU_GIB} GiB"
    return {
        "steps": f"tiny model: {tiny_steps}; ChatGLM-6B: {REAL_TRAINING['steps']}",
        "learning_rate": f"tiny model, {tiny_rates}; ChatGLM-6B: {rates(REAL_LEARNING_RATES)}",
        "batch_size": f"tiny model: {TINY_TRAINING['batch_size']}; ChatGLM-6B: {REAL_TRAINING['batch_size']}, "
                      f"{SMALL_GPU_SIZING['batch_size']} {small_gpu}",
        "grad_accum": f"tiny model: 1; ChatGLM-6B: {REAL_TRAINING['grad_accum']}, {SMALL_GPU_SIZING['grad_accum']} "
                      f"{small_gpu}",
        "warmup_steps": f"tiny model: {TINY_TRAINING['warmup_steps']}; ChatGLM-6B: {REAL_TRAINING['warmup_steps']}",
        "save_steps": f"{REAL_TRAINING['save_steps']}, or the end of a shorter run",
        "seed": f"{COMMON['seed']}",
        "gradient_checkpointing": f"on by default {small_gpu}",
        "max_source_length": f"the task's: {', '.join(f'{t} {s.max_source_length}' for t, s in TASKS.items())}; "
                             f"{TINY_LENGTHS['max_source_length']} for the tiny model",
        "max_target_length": f"the task's: {', '.join(f'{t} {s.max_target_length}' for t, s in TASKS.items())}; "
                             f"{TINY_LENGTHS['max_target_length']} for the tiny model",
        "eval_batch_size": f"tiny model: {TINY_TRAINING['eval_batch_size']}; ChatGLM-6B: "
                           f"{REAL_TRAINING['eval_batch_size']}",
    }


# ----------------------------------------------------------------------------------------------------------
# Defaults and checks
# ----------------------------------------------------------------------------------------------------------


def defaults(small: bool, method: str | None, task: str, dequantized: bool = False,
             gpu_memory_gib: float | None = None) -> dict[str, Any]:
    """The default settings of a run: the tiny model's (per task and method), or ChatGLM-6B's sized to the GPU."""
    key = "freeze_dequantized" if method == "freeze" and dequantized else method
    if small:
        values = {**COMMON, **TINY_TRAINING, **TINY_LENGTHS,
                  "steps": TINY_STEPS[task].get(method, TINY_TRAINING["steps"]),
                  "learning_rate": LEARNING_RATES[task].get(key, 1e-3)}
    else:
        sizing = {} if gpu_memory_gib is None else BIG_GPU_SIZING if gpu_memory_gib >= BIG_GPU_GIB else SMALL_GPU_SIZING
        spec = get_task(task)
        values = {**COMMON, **REAL_TRAINING, **sizing, "learning_rate": REAL_LEARNING_RATES.get(key, 1e-4),
                  "max_source_length": spec.max_source_length, "max_target_length": spec.max_target_length}
    return {**values, "max_new_tokens": None, "eval_limit": None, "train_file": None, "test_file": None}


def check_value(name: str, value: Any) -> Any:
    """One setting's own form, before anything is looked up (a bad one raises naming it)."""
    kind, minimum = base_type(name), FIELDS[name].metadata.get("minimum")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise UserError(f"{spelled(name)} must be a whole number of at least {minimum}, got {value!r}")
    if name == "learning_rate":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise UserError(f"{spelled(name)} must be a finite number above 0 (e.g. 1e-3), got {value!r}")
        if value > 1:
            raise UserError(f"{spelled(name)} {value} is far too large (the course uses 1e-4 to 3e-2)")
        return float(value)
    if kind is bool and not isinstance(value, bool):
        raise UserError(f"{spelled(name)} must be True or False, got {value!r}")
    if kind is str and not isinstance(value, (str, Path)):
        raise UserError(f"{spelled(name)} must be a text, got {value!r}")
    return str(value) if isinstance(value, Path) else value


def nearest_name(name: str, names: Iterable[str]) -> str | None:
    """The known name a mistyped or older one most likely means (``max_steps`` → ``steps``), or ``None``."""
    return _OLD_NAMES.get(name) or next(iter(difflib.get_close_matches(name, list(names), 1)), None)


def _given(settings: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        close = nearest_name(unknown[0], SETTINGS)
        hint = " (method options go in method_options)" if unknown[0] in METHOD_OPTIONS else \
            f" (did you mean {close}?)" if close else ""
        raise UserError(f"unknown setting {unknown[0]!r}{hint}; the settings are: {', '.join(SETTINGS)}")
    return {name: check_value(name, value) for name, value in settings.items() if value is not None}


def _check_lengths(values: dict[str, Any], max_sequence_length: int) -> None:
    """Prompt and answer together must fit the model's ``max_sequence_length`` (the longest text it was made for)."""
    answer = "max_target_length"
    if values["max_new_tokens"] is not None and values["max_new_tokens"] > values["max_target_length"]:
        answer = "max_new_tokens"
    total = values["max_source_length"] + values[answer]
    if total > max_sequence_length:
        raise UserError(f"{spelled('max_source_length')} {values['max_source_length']} + {spelled(answer)} "
                        f"{values[answer]} = {total} tokens, more than the model's max_sequence_length "
                        f"{max_sequence_length}; lower them so they add up to at most {max_sequence_length}")


def _check_gpu_memory(gpu_memory_gib: Any) -> None:
    if gpu_memory_gib is not None and (isinstance(gpu_memory_gib, bool) or not isinstance(gpu_memory_gib, (int, float))
                                       or not math.isfinite(gpu_memory_gib) or gpu_memory_gib <= 0):
        raise UserError(f"gpu_memory_gib (--gpu-memory) must be a GPU's memory in GiB, above 0 (e.g. 15 for a T4), "
                        f"got {gpu_memory_gib!r}")


def _device(device: str | None) -> tuple[str, float | None]:
    """(device name, GPU memory in GiB or None) of ``device`` (default: the GPU when there is one)."""
    import torch

    from ..models import parse_device

    parsed = parse_device(device)
    if parsed.type == "cpu":
        return "cpu", None
    return str(parsed), torch.cuda.get_device_properties(parsed.index or 0).total_memory / GIB


def _dtype(dtype: str | None, device: str, small: bool) -> str:
    from ..models import dtype_name

    name = dtype_name(dtype, device, small)
    if device == "cpu" and name == "fp16":
        raise UserError("dtype (--dtype) fp16 does not train on a CPU; use fp32 (the default there) or bf16")
    return name


def resolve_recipe(model: str = "tiny", method: str | None = "lora", task: str = "ie", *,
                   method_options: dict[str, Any] | None = None, gpu_memory_gib: float | None = None,
                   check_data: bool = True, config=None, **settings: Any) -> Recipe:
    """The recipe of one run: the defaults for the model, method, task and device, then ``settings``, all checked.

    ``settings`` are :class:`Recipe` fields (``steps=100, learning_rate=1e-3, ...``; ``None`` means not given);
    ``method_options`` the method's own (``{"r": 8}``). ``gpu_memory_gib`` replaces the chosen GPU's memory when
    sizing the batch (for planning). ``method=None`` is the base model alone (for evaluating it). Only the model's
    configuration is read (``config`` when the model is already loaded), never its weights; with ``check_data`` the
    train and test files are read once to check them. Raises :class:`UserError` naming the first bad setting.
    """
    given = _given(settings)
    if method is not None:
        check_method(method)
    get_task(task)
    device, memory = _device(given.pop("device", None))
    dtype = given.pop("dtype", None)
    _check_gpu_memory(gpu_memory_gib)
    from ..models import dtype_name, is_small_model, model_config

    dtype_name(dtype)  # its spelling is checked before the model is looked up
    if config is None:
        config = model_config(model)
    dtype = _dtype(dtype, device, is_small_model(config))

    options = resolve_method_options(method, method_options, config) if method is not None else {}
    values = defaults(is_small_model(config), method, task, bool(options.get("dequantize")),
                      gpu_memory_gib if gpu_memory_gib is not None else memory)
    if "steps" in given:  # a shorter run also warms up for at most a fifth of it, and saves at its end
        values.update(warmup_steps=min(values["warmup_steps"], given["steps"] // 5),
                      save_steps=min(values["save_steps"], given["steps"]))
    values.update(given)
    _check_lengths(values, config.max_sequence_length)
    if values["generated_rows"] and task != "ie":
        raise UserError(f"{spelled('generated_rows')} only applies to the ie task (its triples are recombined); "
                        f"leave it out for {task}")
    if values["deepspeed"] is not None:
        if not Path(values["deepspeed"]).is_file():
            raise UserError(f"{spelled('deepspeed')} {values['deepspeed']}: no such file; see "
                            "configs/deepspeed_zero2.json")
        values["deepspeed"] = str(Path(values["deepspeed"]).resolve())
    if check_data:
        values["train_file"] = check_file(task, values["train_file"], "train", spelled("train_file"))
        values["test_file"] = check_file(task, values["test_file"], "test", spelled("test_file"))
        if task == "cls":
            warn_unseen_labels(load_split(task, "train", values["train_file"]),
                               load_split(task, "test", values["test_file"]))
    folder = Path(model).expanduser()
    return Recipe(model=str(folder.resolve()) if folder.is_dir() else model, method=method, task=task,
                  method_options=options, device=device, dtype=dtype, **values)
