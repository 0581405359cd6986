"""The four fine-tuning methods of the course, one small function each.

Every function decides which parameters train, keeps those in fp32 (the frozen base stays INT4/fp16/bf16)
and returns a :class:`MethodSetup`: the (possibly wrapped) model plus what was made trainable, printed as the
original course's line ``trainable params: N || all params: M || trainable%: P``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from peft import get_peft_model
from torch import nn

from chatglm.lora import lora_config
from chatglm.quantization import QUANTIZABLE_LINEARS, QuantizedLinear

METHODS = ("freeze", "embedding", "ptuning_v2", "lora")


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


def trainable_report(model: nn.Module) -> str:
    """Print and return the trainable-parameter line of ``model``."""
    line = trainable_line(model)
    print(line)
    return line


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


def _glm(model: nn.Module):
    """The ``ChatGLMModel`` inside a causal-LM model (or the model itself)."""
    return getattr(model, "transformer", model)


def freeze(model: nn.Module, layers: int = 5, dequantize: bool = False) -> MethodSetup:
    """Train only the last ``layers`` GLM blocks.

    On a quantized model the INT4/INT8 matrices cannot take gradients, so — as in the original course —
    only those blocks' LayerNorms train (81,920 parameters at full size). ``dequantize=True`` first turns the
    blocks' quantized matrices into fp32 ``nn.Linear`` layers, so the whole blocks train.
    """
    blocks = _glm(model).layers
    if not 1 <= layers <= len(blocks):
        raise ValueError(f"layers must be between 1 and {len(blocks)}, got {layers}")
    _freeze_all(model)
    first = len(blocks) - layers
    if dequantize:
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
    return MethodSetup(model, "freeze", {"layers": layers, "dequantize": dequantize}, names)


def embedding(model: nn.Module) -> MethodSetup:
    """Train only the word embeddings (shared with the output layer, so both ends of the model move)."""
    _freeze_all(model)
    name = next(n for n, p in model.named_parameters() if p is _glm(model).word_embeddings.weight)
    _train_in_fp32(model, [name])
    return MethodSetup(model, "embedding", {}, [name])


def ptuning_v2(model: nn.Module, pre_seq_len: int = 16, prefix_projection: bool = True) -> MethodSetup:
    """Train only a P-Tuning v2 prefix: ``pre_seq_len`` learned keys/values in front of every layer."""
    glm = _glm(model)
    if getattr(glm, "prefix_encoder", None) is None:
        glm.add_prefix_encoder(pre_seq_len, prefix_projection)
    elif (glm.config.pre_seq_len, glm.config.prefix_projection) != (pre_seq_len, prefix_projection):
        raise ValueError(
            f"the model already has a prefix (pre_seq_len={glm.config.pre_seq_len}, "
            f"prefix_projection={glm.config.prefix_projection}); load the base model again to change it"
        )
    _freeze_all(model)
    names = [n for n, _ in model.named_parameters() if ".prefix_encoder." in f".{n}"]
    _train_in_fp32(model, names)
    return MethodSetup(model, "ptuning_v2", {"pre_seq_len": pre_seq_len, "prefix_projection": prefix_projection}, names)


def lora(
    model: nn.Module,
    r: int = 8,
    alpha: int = 32,
    dropout: float = 0.1,
    target_modules: tuple[str, ...] = ("query_key_value",),
) -> MethodSetup:
    """Add LoRA adapters (rank ``r``, scaling ``alpha / r``) through peft; only the adapters train.

    Returns a setup whose ``model`` is the peft wrapper (``PeftModel``).
    """
    _freeze_all(model)
    config = lora_config(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=tuple(target_modules))
    wrapped = get_peft_model(model, config)
    names = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    _train_in_fp32(wrapped, names)
    options = {"r": r, "alpha": alpha, "dropout": dropout, "target_modules": list(target_modules)}
    return MethodSetup(wrapped, "lora", options, names)


def apply_method(model: nn.Module, method: str, **options) -> MethodSetup:
    """Dispatch by name (``freeze``, ``embedding``, ``ptuning_v2``, ``lora``)."""
    functions = {"freeze": freeze, "embedding": embedding, "ptuning_v2": ptuning_v2, "lora": lora}
    if method not in functions:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return functions[method](model, **options)
