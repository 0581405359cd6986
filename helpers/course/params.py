"""A notebook's parameters: the recipe's settings and the method's options under the same names (``STEPS``,
``LEARNING_RATE``, ``R``, ...), plus a few of the course's own; ``COURSE_<NAME>`` environment variables override them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

from ..errors import UserError
from ..methods import METHOD_DEFAULTS, METHOD_OPTIONS
from ..run.recipe import SETTINGS, base_type, check_value
from ..tasks import TASKS
from .runtime import parse_bool

ENV_PREFIX = "COURSE_"
# The course's own parameters (the others are recipe settings and method options, typed by their declarations).
COURSE_PARAMETERS = {"model": str, "task": str, "runs_dir": str, "run_name": str, "other_runs": str,
                     "full_data": bool, "quick_compare": bool, "drive": bool}


def parameter_type(name: str, default: Any = None) -> type:
    """The type of a notebook parameter: the course's own, a recipe setting's, a method option's, or the default's."""
    if name in COURSE_PARAMETERS:
        return COURSE_PARAMETERS[name]
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
        raise ValueError(f"{key}={raw!r}: expected {kind.__name__}") from None
    if name in SETTINGS:
        try:
            check_value(name, value)
        except UserError as error:
            raise ValueError(f"{key}={raw!r}: {error}") from None
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
        raise ValueError(f"task {values['task']!r} is unknown; choose one of {', '.join(TASKS)}")
    return Params(**values, sources=sources)


def recipe_settings(params: Params) -> dict[str, Any]:
    """The recipe settings among a notebook's parameters (those left at ``None`` take the recipe's defaults)."""
    return {name: value for name, value in params.as_dict().items() if name in SETTINGS and value is not None}


def method_options(method: str, params: Params) -> dict[str, Any]:
    """The options of ``method`` among a notebook's parameters."""
    return {name: value for name, value in params.as_dict().items() if name in METHOD_DEFAULTS[method]}
