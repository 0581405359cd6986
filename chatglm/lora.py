"""LoRA on quantized layers through peft's custom-module mechanism (no patching of peft).

peft only knows floating layers. :class:`LoraQuantizedLinear` is the LoRA layer for our
:class:`~chatglm.quantization.QuantizedLinear`: the frozen INT4/INT8 base runs as is and the low-rank update
is added on top. Merging turns the base into an ordinary floating ``nn.Linear`` holding
``dequantized weight + B @ A * scaling``; unmerging restores the quantized layer.

Use :func:`lora_config` (or call :func:`register_quantized_lora` on your own ``LoraConfig``) before
``get_peft_model`` / ``PeftModel.from_pretrained(..., config=...)``; :func:`load_lora` does the latter.
"""

from __future__ import annotations

import os

import torch
from peft import LoraConfig, PeftConfig, PeftModel
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from .quantization import QuantizedLinear


class LoraQuantizedLinear(LoraLinear):
    """peft's LoRA ``Linear`` around a :class:`QuantizedLinear` base; plain LoRA only (no DoRA etc.)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, **kwargs) -> None:
        for option in ("use_dora", "lora_bias"):
            if getattr(config, option, False):
                raise ValueError(f"LoRA on quantized ChatGLM layers does not support {option}=True")
        kwargs.setdefault("r", config.r)
        kwargs.setdefault("lora_alpha", config.lora_alpha)
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        self._quantized_base: list[QuantizedLinear] = []  # a list keeps it out of state_dict/modules

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    @property
    def lora_variants(self):
        return {(): None}

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        base = self.get_base_layer()
        if isinstance(base, QuantizedLinear):
            # Work on a floating copy; keep the quantized layer to restore on unmerge.
            self._quantized_base.append(base)
            self.base_layer = base.to_linear(torch.float32).requires_grad_(False)
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unmerge(self) -> None:
        super().unmerge()
        if self._quantized_base and not self.merged:
            self.base_layer = self._quantized_base.pop()


def register_quantized_lora(config: LoraConfig) -> LoraConfig:
    """Teach ``config`` to put :class:`LoraQuantizedLinear` on quantized layers; returns the same config."""
    config._register_custom_module({QuantizedLinear: LoraQuantizedLinear})
    return config


def lora_config(
    r: int = 8,
    lora_alpha: int = 32,
    lora_dropout: float = 0.1,
    target_modules: tuple[str, ...] | list[str] = ("query_key_value",),
    **kwargs,
) -> LoraConfig:
    """A causal-LM ``LoraConfig`` for ChatGLM that works on floating and quantized models alike."""
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=list(target_modules),
        task_type="CAUSAL_LM",
        **kwargs,
    )
    return register_quantized_lora(config)


def load_lora(model: nn.Module, adapter_dir: str | os.PathLike, is_trainable: bool = False) -> PeftModel:
    """``PeftModel.from_pretrained`` for a ChatGLM adapter, on a floating or quantized base."""
    config = PeftConfig.from_pretrained(str(adapter_dir))
    if isinstance(config, LoraConfig):
        register_quantized_lora(config)
    return PeftModel.from_pretrained(model, str(adapter_dir), config=config, is_trainable=is_trainable)
