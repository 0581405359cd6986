"""The four fine-tuning methods of the course, one small function each.

Every function decides which parameters train, keeps those in fp32 (the frozen base stays INT4/fp16/bf16)
and returns a :class:`MethodSetup`: the (possibly wrapped) model plus what was made trainable, printed as the
original course's line ``trainable params: N || all params: M || trainable%: P``.

:data:`METHOD_DEFAULTS` is the one table of method options; :func:`resolve_method_options` fills in and checks
options against a model's configuration (no weights needed), and every method function goes through it. A model
takes one method: applying a second one raises :class:`~helpers.errors.UserError` (load the base model again).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from chatglm.lora import lora_config
from chatglm.quantization import QUANTIZABLE_LINEARS, QuantizedLinear

from .errors import UserError

# The method options used unless given: the original course's choices. ``chatglm.lora.lora_config`` keeps its own
# library defaults (it is the model package, usable without this course); the helpers always pass every value.
METHOD_DEFAULTS: dict[str, dict] = {
    "freeze": {"layers": 5, "dequantize": False},
    "embedding": {},
    "ptuning_v2": {"pre_seq_len": 16, "prefix_projection": True},
    "lora": {"r": 8, "alpha": 32, "dropout": 0.1, "target_modules": ("query_key_value",)},
}
METHODS = tuple(METHOD_DEFAULTS)

# How the command line spells and explains each option (its default is in METHOD_DEFAULTS).
METHOD_OPTIONS = {
    "layers": {"flag": "--layers", "type": int, "help": "freeze: train the last N layers (capped at the model's)"},
    "dequantize": {"flag": "--dequantize", "type": bool,
                   "help": "freeze: turn those layers' INT4 matrices into trainable fp32 Linear layers"},
    "pre_seq_len": {"flag": "--pre-seq-len", "type": int, "help": "ptuning_v2: prefix length"},
    "prefix_projection": {"flag": "--no-projection", "type": bool, "help": "ptuning_v2: no MLP reparametrisation"},
    "r": {"flag": "--r", "aliases": ("--rank", "--lora-r"), "type": int, "help": "lora: rank"},
    "alpha": {"flag": "--alpha", "aliases": ("--lora-alpha",), "type": float,
              "help": "lora: scaling numerator (the update is scaled by alpha / r)"},
    "dropout": {"flag": "--lora-dropout", "type": float, "help": "lora: dropout"},
    "target_modules": {"flag": "--target-modules", "type": str, "help": "lora: comma-separated layer names"},
}
APPLIED_ATTRIBUTE = "applied_method"  # set on a model once a method is applied to it


def check_method(method: str, flag: str | None = "--method") -> None:
    """A :class:`UserError` naming the four methods unless ``method`` is one of them (``flag``: how it was given)."""
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}{f' ({flag})' if flag else ''}; choose one of {', '.join(METHODS)}")


@dataclass
class MethodSetup:
    """A model prepared for one method, and a record of what trains."""

    model: nn.Module
    method: str
    options: dict = field(default_factory=dict)
    trainable: list[str] = field(default_factory=list)

    @property
    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    @property
    def all_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def __str__(self) -> str:
        return trainable_line(self.model)


def trainable_line(model: nn.Module) -> str:
    """``trainable params: N || all params: M || trainable%: P`` with exact integers (tied weights once)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


def base_dtype(model: nn.Module) -> torch.dtype:
    """The compute dtype of the frozen base (trainable tensors are kept in fp32 and do not count)."""
    floating = [p for p in model.parameters() if p.dtype.is_floating_point]
    frozen = [p for p in floating if not p.requires_grad]
    return (frozen or floating)[0].dtype if floating else torch.float32


def mixed_precision(model: nn.Module):
    """An autocast context in the base dtype when fp32 trainable tensors sit in a fp16/bf16 model, else a no-op.

    Needed to run such a model outside ``Trainer`` (evaluation, generation): e.g. a fp32 LayerNorm cannot take a
    bf16 input unless autocast handles it.
    """
    import contextlib

    dtype = base_dtype(model)
    mixed = any(p.dtype.is_floating_point and p.dtype != dtype for p in model.parameters())
    if dtype == torch.float32 or not mixed:
        return contextlib.nullcontext()
    device = next(model.parameters()).device.type
    return torch.autocast(device_type=device, dtype=dtype)


def _freeze_all(model: nn.Module) -> None:
    for param in model.parameters():
        param.requires_grad_(False)


def _train_in_fp32(model: nn.Module, names: list[str]) -> list[str]:
    """Make the named parameters trainable and fp32 (in place); returns the names."""
    params = dict(model.named_parameters())
    for name in names:
        param = params[name]
        if param.dtype != torch.float32:
            param.data = param.data.float()
        param.requires_grad_(True)
    return names


def _chatglm_model(model: nn.Module):
    """The ``ChatGLMModel`` inside a causal-LM model (or the model itself)."""
    return getattr(model, "transformer", model)


# ----------------------------------------------------------------------------------------------------------
# Options: defaults, overrides, checks against the model's configuration
# ----------------------------------------------------------------------------------------------------------


def _spelled(name: str) -> str:
    return f"{name} ({METHOD_OPTIONS[name]['flag']})" if name in METHOD_OPTIONS else name


@lru_cache(maxsize=1)
def lora_target_names() -> tuple[str, ...]:
    """The linear layers of a GLM block that LoRA can target, e.g. ``attention.query_key_value``.

    Read from a block built on the ``meta`` device, so the list is the model's own (nothing is allocated).
    """
    from chatglm import ChatGLMConfig
    from chatglm.modeling import GLMBlock

    with torch.device("meta"):
        block = GLMBlock(ChatGLMConfig(), 0)
    return tuple(name for name, module in block.named_modules() if isinstance(module, nn.Linear))


def _integer(name: str, value, low: int, high: int, why: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
        raise UserError(f"{_spelled(name)} must be an integer between {low} and {high}{why}, got {value!r}")
    return int(value)


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"{_spelled(name)} must be True or False, got {value!r}")
    return value


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise UserError(f"{_spelled(name)} must be a finite number, got {value!r}")
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _target_modules(value) -> list[str]:
    names = value.split(",") if isinstance(value, str) else value
    valid = lora_target_names()
    short = [n.rsplit(".", 1)[-1] for n in valid]
    hint = f"choose from {', '.join(short)} (or their full names {', '.join(valid)})"
    if not isinstance(names, Sequence) or not names or not all(isinstance(n, str) for n in names):
        raise UserError(f"{_spelled('target_modules')} must be one or more layer names; {hint}; got {value!r}")
    names = [n.strip() for n in names]
    unknown = [n for n in names if n not in valid and n not in short]
    if unknown:
        raise UserError(f"{_spelled('target_modules')}: ChatGLM's blocks have no layer {unknown[0]!r}; {hint}")
    return list(dict.fromkeys(names))


def _check_option_names(method: str, options: dict) -> None:
    unknown = [k for k in options if k not in METHOD_DEFAULTS[method]]
    if unknown:
        valid = ", ".join(_spelled(k) for k in METHOD_DEFAULTS[method]) or "none"
        owner = next((m for m, defaults in METHOD_DEFAULTS.items() if unknown[0] in defaults), None)
        hint = ""
        if owner is not None:
            spelling = METHOD_OPTIONS[unknown[0]]["flag"]
            hint = f" ({spelling} is an option of {owner}: drop it, or use method {owner})"
        raise UserError(f"{method} has no option {unknown[0]!r}; its options are: {valid}{hint}")


def resolve_method_options(method: str, overrides: dict | None, config) -> dict:
    """The options of ``method`` for a model of ``config``: :data:`METHOD_DEFAULTS` updated by ``overrides``.

    ``config`` is a ``ChatGLMConfig`` (or anything with ``num_layers``, ``hidden_size`` and
    ``max_sequence_length``); no weights are needed. An override of ``None`` means "not given". Every value is
    checked and a bad one raises :class:`UserError` naming the option as the API and the command line spell it.
    The freeze default (5 layers) becomes the model's layer count on a model with fewer layers, and the returned
    options say so (``layers`` holds the number that trains); an explicit ``layers`` out of range is an error.
    ``target_modules`` comes back as a list (as stored in run records).
    """
    check_method(method)
    config = getattr(config, "config", config)  # a model is accepted too
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    _check_option_names(method, given)
    options = {**METHOD_DEFAULTS[method], **given}
    if method == "freeze":
        layers = config.num_layers
        if "layers" not in given:
            options["layers"] = min(options["layers"], layers)
        options["layers"] = _integer("layers", options["layers"], 1, layers, f" (the model has {layers} layers)")
        options["dequantize"] = _flag("dequantize", options["dequantize"])
    elif method == "ptuning_v2":
        limit = config.max_sequence_length // 2
        why = f" (half the model's max_sequence_length {config.max_sequence_length}, so the text keeps room)"
        options["pre_seq_len"] = _integer("pre_seq_len", options["pre_seq_len"], 1, limit, why)
        options["prefix_projection"] = _flag("prefix_projection", options["prefix_projection"])
    elif method == "lora":
        width = config.hidden_size
        options["r"] = _integer("r", options["r"], 1, width, " (the model's hidden_size; a larger rank adds nothing)")
        options["alpha"] = _number("alpha", options["alpha"])
        options["dropout"] = _number("dropout", options["dropout"])
        if options["alpha"] <= 0:
            raise UserError(f"{_spelled('alpha')} must be greater than 0 (the adapter's update is scaled by "
                            f"alpha / r; 0 would make it do nothing), got {options['alpha']!r}")
        if not 0 <= options["dropout"] < 1:
            raise UserError(f"{_spelled('dropout')} must be at least 0 and below 1, got {options['dropout']!r}")
        options["target_modules"] = _target_modules(options["target_modules"])
    return options


# ----------------------------------------------------------------------------------------------------------
# One method per model
# ----------------------------------------------------------------------------------------------------------


def applied_method(model: nn.Module) -> str | None:
    """The method already applied to ``model`` (by its mark, a peft wrapper, LoRA layers or a prefix), or None."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    for owner in (model, base, _chatglm_model(base)):
        mark = getattr(owner, APPLIED_ATTRIBUTE, None)
        if isinstance(mark, str):
            return mark
    if isinstance(model, PeftModel) or any(isinstance(m, BaseTunerLayer) for m in base.modules()):
        return "lora"
    if getattr(_chatglm_model(base), "prefix_encoder", None) is not None:
        return "ptuning_v2"
    return None


def _refuse_second_method(model: nn.Module, method: str) -> None:
    present = applied_method(model)
    if present is not None:
        raise UserError(f"this model already has {present} applied; load the base model again "
                        f"(helpers.load_model(...)) before applying {method}")


def _mark(model: nn.Module, method: str) -> None:
    for owner in (model, _chatglm_model(model)):
        setattr(owner, APPLIED_ATTRIBUTE, method)


# ----------------------------------------------------------------------------------------------------------
# The methods
# ----------------------------------------------------------------------------------------------------------


def freeze(model: nn.Module, layers: int | None = None, dequantize: bool | None = None) -> MethodSetup:
    """Train only the last ``layers`` GLM blocks (default: :data:`METHOD_DEFAULTS`).

    On a quantized model the INT4/INT8 matrices cannot take gradients, so — as in the original course —
    only those blocks' LayerNorms train (81,920 parameters at full size). ``dequantize=True`` first turns the
    blocks' quantized matrices into fp32 ``nn.Linear`` layers, so the whole blocks train.
    """
    _refuse_second_method(model, "freeze")
    options = resolve_method_options("freeze", {"layers": layers, "dequantize": dequantize},
                                     _chatglm_model(model).config)
    blocks = _chatglm_model(model).layers
    _freeze_all(model)
    first = len(blocks) - options["layers"]
    if options["dequantize"]:
        for block in blocks[first:]:
            for parent in (block.attention, block.mlp):
                for name in QUANTIZABLE_LINEARS:
                    child = getattr(parent, name, None)
                    if isinstance(child, QuantizedLinear):
                        setattr(parent, name, child.to_linear(torch.float32))
    names = []
    for name, param in model.named_parameters():
        parts = name.split(".")
        if "layers" not in parts:
            continue
        index = int(parts[parts.index("layers") + 1])
        is_matrix_of_quantized_layer = param.dtype == torch.int8 or name.endswith("weight_scale")
        owner = model.get_submodule(name.rsplit(".", 1)[0])
        if index >= first and not is_matrix_of_quantized_layer and not isinstance(owner, QuantizedLinear):
            names.append(name)
    _train_in_fp32(model, names)
    _mark(model, "freeze")
    return MethodSetup(model, "freeze", options, names)


def embedding(model: nn.Module) -> MethodSetup:
    """Train only the word embeddings (shared with the output layer, so both ends of the model move)."""
    _refuse_second_method(model, "embedding")
    options = resolve_method_options("embedding", None, _chatglm_model(model).config)
    _freeze_all(model)
    name = next(n for n, p in model.named_parameters() if p is _chatglm_model(model).word_embeddings.weight)
    _train_in_fp32(model, [name])
    _mark(model, "embedding")
    return MethodSetup(model, "embedding", options, [name])


def ptuning_v2(model: nn.Module, pre_seq_len: int | None = None, prefix_projection: bool | None = None) -> MethodSetup:
    """Train only a P-Tuning v2 prefix: ``pre_seq_len`` learned keys/values in front of every layer.

    A model built with a prefix (``pre_seq_len`` in its config) and no method applied keeps that prefix and trains
    it, provided the options match it.
    """
    glm = _chatglm_model(model)
    options = resolve_method_options(
        "ptuning_v2", {"pre_seq_len": pre_seq_len, "prefix_projection": prefix_projection}, glm.config
    )
    wanted = (options["pre_seq_len"], options["prefix_projection"])
    own_prefix = getattr(glm, "prefix_encoder", None) is not None and getattr(glm, APPLIED_ATTRIBUTE, None) is None
    if own_prefix and not isinstance(model, PeftModel):
        if (glm.config.pre_seq_len, glm.config.prefix_projection) != wanted:
            raise UserError(
                f"the model already has a prefix (pre_seq_len={glm.config.pre_seq_len}, "
                f"prefix_projection={glm.config.prefix_projection}); load the base model again to change it"
            )
    else:
        _refuse_second_method(model, "ptuning_v2")
        glm.add_prefix_encoder(*wanted)
    _freeze_all(model)
    names = [n for n, _ in model.named_parameters() if ".prefix_encoder." in f".{n}"]
    _train_in_fp32(model, names)
    _mark(model, "ptuning_v2")
    return MethodSetup(model, "ptuning_v2", options, names)


def lora(model: nn.Module, r: int | None = None, alpha: float | None = None, dropout: float | None = None,
         target_modules: Sequence[str] | str | None = None) -> MethodSetup:
    """Add LoRA adapters (rank ``r``, scaling ``alpha / r``) through peft; only the adapters train.

    Defaults come from :data:`METHOD_DEFAULTS`. Returns a setup whose ``model`` is the peft wrapper (``PeftModel``).
    """
    _refuse_second_method(model, "lora")
    given = {"r": r, "alpha": alpha, "dropout": dropout, "target_modules": target_modules}
    options = resolve_method_options("lora", given, _chatglm_model(model).config)
    _freeze_all(model)
    config = lora_config(r=options["r"], lora_alpha=options["alpha"], lora_dropout=options["dropout"],
                         target_modules=tuple(options["target_modules"]))
    wrapped = get_peft_model(model, config)
    names = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    _train_in_fp32(wrapped, names)
    _mark(model, "lora")
    return MethodSetup(wrapped, "lora", options, names)


def apply_method(model: nn.Module, method: str, **options) -> MethodSetup:
    """Dispatch by name (``freeze``, ``embedding``, ``ptuning_v2``, ``lora``); options as in each function."""
    functions = {"freeze": freeze, "embedding": embedding, "ptuning_v2": ptuning_v2, "lora": lora}
    check_method(method)
    _check_option_names(method, options)  # a clear message rather than a TypeError
    return functions[method](model, **options)
