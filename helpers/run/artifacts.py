"""Artifacts: only what a method trained (a peft LoRA adapter, or the trained tensors in safetensors, plus
``method.json``), never the base model; and the way back, base model + artifact = the fine-tuned model.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import UserError
from ..files import FILE_MODE, write_json
from ..methods import apply_method, base_dtype
from .folder import METHOD_FILE, TRAINABLE_FILE, artifact_problem
from .record import ARTIFACT, RunRecord


def save_artifact(model: nn.Module, folder: str | os.PathLike, method: str, options: dict) -> Path:
    """Write the trained part of ``model`` to ``folder``: a peft adapter, or the trainable tensors."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(model, PeftModel):
        model.save_pretrained(folder)
    else:
        tensors = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        tmp = folder / (TRAINABLE_FILE + ".tmp")
        save_file(tensors, tmp, metadata={"method": method})
        os.replace(tmp, folder / TRAINABLE_FILE)
    write_json(folder / METHOD_FILE, {"method": method, "options": options})
    for path in folder.iterdir():  # safetensors writes 0600; results are readable by everyone, as open() writes them
        if path.is_file():
            os.chmod(path, FILE_MODE)
    return folder


def load_artifact(model: nn.Module, folder: str | os.PathLike) -> None:
    """Load trained tensors saved by :func:`save_artifact` into ``model`` (already prepared for the method)."""
    folder = Path(folder)
    if isinstance(model, PeftModel):
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        set_peft_model_state_dict(model, load_peft_weights(str(folder)))
        return
    tensors = load_file(folder / TRAINABLE_FILE)
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise ValueError(f"{folder / TRAINABLE_FILE}: tensors {unknown[:3]} do not belong to this model; "
                         "was it trained with another method or base model?")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].dtype))


def attach_artifact(model: nn.Module, artifact: str | os.PathLike, keep_base: bool = False) -> nn.Module:
    """``model`` (a freshly loaded base) with a run's artifact applied: its method, then the trained tensors.

    Returns the model to use (a peft wrapper for LoRA). Checks the artifact's files first and names a missing or
    damaged one. ``keep_base`` keeps a copy of the base values the artifact replaces (Freeze, embedding-only), so that
    :func:`as_base_model` can switch back to the base model without loading it twice.
    """
    artifact = check_artifact(artifact)
    method = json.loads((artifact / METHOD_FILE).read_text(encoding="utf-8"))
    if method["method"] == "lora":
        from chatglm.lora import load_lora

        return load_lora(model, artifact).eval()
    setup = apply_method(model, method["method"], **method["options"]) if method["method"] != "custom" else None
    model = setup.model if setup else model
    params = dict(model.named_parameters())
    names = []
    if keep_base and method["method"] != "ptuning_v2":  # the names only: the header, not the tensors
        with safe_open(artifact / TRAINABLE_FILE, "pt") as handle:
            names = list(handle.keys())
    base = {name: params[name].detach().clone() for name in names if name in params}
    load_artifact(model, artifact)
    # For inference the trained tensors join the base dtype, so the model runs (and chats) without autocast;
    # the prefix encoder stays fp32 as in the original (its output is cast where it is used).
    dtype = base_dtype(model)
    for name, param in model.named_parameters():
        param.requires_grad_(False)
        if param.dtype.is_floating_point and param.dtype != dtype and "prefix_encoder" not in name:
            param.data = param.data.to(dtype)
    if base:
        model.base_tensors = {name: value.to(params[name].dtype) for name, value in base.items()}
    return model.eval()


@contextlib.contextmanager
def as_base_model(model: nn.Module):
    """Run a fine-tuned model as its base model for the duration of the block: LoRA adapters disabled, the P-Tuning
    prefix switched off, or the base values swapped back in (kept by ``attach_artifact(..., keep_base=True)``)."""
    if isinstance(model, PeftModel):
        with model.disable_adapter():
            yield model
        return
    config = getattr(model, "config", None)
    if getattr(config, "pre_seq_len", None):
        pre_seq_len, config.pre_seq_len = config.pre_seq_len, None
        try:
            yield model
        finally:
            config.pre_seq_len = pre_seq_len
        return
    base = getattr(model, "base_tensors", None)
    if base is None:
        raise UserError("this model keeps no copy of its base values; load it with keep_base=True "
                        "(load_finetuned(run, keep_base=True))")
    params = dict(model.named_parameters())
    with torch.no_grad():
        trained = {name: params[name].detach().clone() for name in base}
        for name, value in base.items():
            params[name].copy_(value)
        try:
            yield model
        finally:
            for name, value in trained.items():
                params[name].copy_(value)


def check_artifact(folder: str | os.PathLike) -> Path:
    """The artifact folder, after checking that its files are whole (:class:`UserError` names a missing or cut one)."""
    problem = artifact_problem(folder)
    if problem:
        raise UserError(f"{problem}; the run's artifact is incomplete: train the run again (--fresh)")
    return Path(folder)


def load_finetuned(run_dir: str | os.PathLike, device: torch.device | str | None = None,
                   dtype: torch.dtype | str | None = None, model: str | None = None, keep_base: bool = False):
    """(model, tokenizer) rebuilt from a run folder: its base model, its method, and its small artifact.

    ``model`` names the base model when it is no longer where the run recorded it (default: the recorded one).
    """
    from ..models import load_model

    record = RunRecord.load(run_dir)
    if not record.trained:
        raise UserError(f"{record.summary()}: training did not finish, so there is no artifact to load; run its "
                        "command again to resume")
    base = record.base_model(model)
    check_artifact(record.folder / ARTIFACT)  # before the base model loads
    model, tokenizer = load_model(base, device=device, dtype=dtype)
    if record.quantization_bit and not model.config.quantization_bit:
        model.quantize(record.quantization_bit)
    return attach_artifact(model, record.folder / ARTIFACT, keep_base), tokenizer
