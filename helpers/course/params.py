"""A notebook's parameters: the recipe's settings and the method's options under the same names (``STEPS``,
``LEARNING_RATE``, ``R``, ...), plus a few of the course's own; ``COURSE_<NAME>`` environment variables override them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ..errors import UserError
from ..methods import METHOD_DEFAULTS, METHOD_OPTIONS, check_method
from ..run.recipe import SETTINGS, base_type, check_value, nearest_name
from ..tasks import TASKS
from .runtime import parse_bool

ENV_PREFIX = "COURSE_"
# The course's own parameters with their types and defaults (the others are recipe settings and method options,
# typed by their declarations). A method notebook's parameters cell lists them; ``setup`` fills in those left out.
COURSE_PARAMETERS = {"model": (str, None), "task": (str, "ie"), "runs_dir": (str, None), "run_name": (str, None),
                     "other_runs": (str, None), "full_data": (bool, False), "quick_compare": (bool, False),
                     "drive": (bool, False)}
SETUP_PARAMETERS = [name for name in COURSE_PARAMETERS if name != "quick_compare"]  # 05's own


def parameter_type(name: str, default: Any = None) -> type:
    """The type of a notebook parameter: the course's own, a recipe setting's, a method option's, or the default's."""
    if name in COURSE_PARAMETERS:
        return COURSE_PARAMETERS[name][0]
    if name in SETTINGS:
        return base_type(name)
    if name in METHOD_OPTIONS:
        return METHOD_OPTIONS[name]["type"]
    return type(default) if default is not None else str


def _convert(key: str, name: str, raw: str, kind: type) -> Any:
    if kind is bool:
        return parse_bool(key, raw)
    if raw.strip().lower() in ("none", "all"):
        return None
    try:
        value = kind(raw.strip())
    except ValueError:
        raise UserError(f"{key}={raw!r}: expected {kind.__name__}") from None
    if name in SETTINGS:
        try:
            check_value(name, value)
        except UserError as error:
            raise UserError(f"{key}={raw!r}: {error}") from None
    return value


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
    editing the notebook: ``COURSE_STEPS=8 COURSE_EVAL_LIMIT=4``; any recipe setting can be given so
    (``COURSE_BATCH_SIZE=2``) even where the cell does not list it. Values are converted to the parameter's type and
    checked as the command line checks them; ``none``/``all`` give ``None``.
    """
    environ = os.environ if environ is None else environ
    extra = {name: None for name in SETTINGS if environ.get(ENV_PREFIX + name.upper(), "").strip()}
    values, sources = {}, {}
    for name, default in {**extra, **defaults}.items():
        key = ENV_PREFIX + name.upper()
        raw = environ.get(key, "")
        if not raw.strip():
            values[name], sources[name] = default, "notebook"
            continue
        values[name], sources[name] = _convert(key, name, raw, parameter_type(name, default)), key
    if values.get("task") is not None and values["task"] not in TASKS:
        raise UserError(f"task {values['task']!r} is unknown; choose one of {', '.join(TASKS)}")
    return Params(**values, sources=sources)


def recipe_settings(params: Params) -> dict[str, Any]:
    """The recipe settings among a notebook's parameters (those left at ``None`` take the recipe's defaults)."""
    return {name: value for name, value in params.as_dict().items() if name in SETTINGS and value is not None}


def method_options(method: str, params: Params) -> dict[str, Any]:
    """The options of ``method`` among a notebook's parameters."""
    return {name: value for name, value in params.as_dict().items() if name in METHOD_DEFAULTS[method]}


def setup_parameters(method: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """A method notebook's parameters for ``setup``: the course's defaults, then ``given``, each name checked (a
    mistyped name, or an option of another method, is one line naming the right one) before anything loads."""
    check_method(method, flag=None)
    for name, value in given.items():
        owner = next((m for m, options in METHOD_DEFAULTS.items() if name in options), None)
        if owner is not None and owner != method:
            raise UserError(f"{name}={value!r} is an option of {owner}, not of {method}; leave it out")
        if owner is None and name not in SETUP_PARAMETERS and name not in SETTINGS:
            close = nearest_name(name, [*SETUP_PARAMETERS, *SETTINGS, *METHOD_DEFAULTS[method]])
            raise UserError(f"unknown parameter {name!r}{f' (did you mean {close}?)' if close else ''}; the "
                            f"parameters are {', '.join(SETUP_PARAMETERS)}, the options of {method} "
                            f"({', '.join(METHOD_DEFAULTS[method])}) and the recipe's settings ({', '.join(SETTINGS)})")
    return {**{name: COURSE_PARAMETERS[name][1] for name in SETUP_PARAMETERS}, **given}


def check_places(params: Params, method: str) -> None:
    """``run_name`` is a folder name and ``other_runs`` exists: checked before anything loads."""
    name, other = params.run_name, params.other_runs
    if name is not None and (not isinstance(name, str) or not name.strip() or Path(name).name != name
                             or name in (".", "..")):
        raise UserError(f"run_name={name!r}: give a folder name for the run inside runs_dir, without / (e.g. "
                        f"'{method}-2'), or None for '<method>-<task>'")
    if other is not None and not Path(other).exists():
        raise UserError(f"other_runs={str(other)!r}: no such file or folder; give a bundle (.zip) made by python -m "
                        "helpers export-runs or a folder of run folders, or None")
