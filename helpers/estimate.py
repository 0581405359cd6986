"""Predicted peak GPU memory of fine-tuning ChatGLM with each method (a planning aid, not a measurement).

The estimate adds up what training holds at its peak:

* weights as loaded: packed INT4/INT8 matrices (1 byte per stored element) and fp16/bf16 for the rest, except
  trainable tensors, which are kept in fp32;
* gradients (fp32) and AdamW's two moments (fp32) of the trainable parameters;
* activations saved for the backward pass, per token and per layer that the gradient has to pass through
  (LayerNorm inputs, attention q/k/v/output, the GELU input; LoRA adds its input and dropout mask), or only each
  layer's input with gradient checkpointing (plus one layer being recomputed);
* the loss: logits of the labelled tokens in the compute dtype and in fp32, and the fp32 softmax kept for
  the backward pass;
* a fixed allowance for the CUDA context and allocator slack.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .methods import apply_method
from .models import meta_model

GIB = 1 << 30
CUDA_OVERHEAD = int(0.6 * GIB)  # context, cuBLAS workspace, allocator fragmentation
GPUS = {"T4-16G": 15.0, "A100-40G": 39.5, "H100-80G": 79.0}  # usable GiB


@dataclass
class MemoryEstimate:
    method: str
    seq: int
    batch: int
    weights: int
    trainable_params: int
    gradients: int
    optimizer: int
    activations: int
    loss: int
    overhead: int = CUDA_OVERHEAD

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.loss + self.overhead

    def fits(self) -> dict[str, bool]:
        return {gpu: self.total <= usable * GIB for gpu, usable in GPUS.items()}

    def table(self) -> str:
        rows = [("weights", self.weights), ("gradients (fp32)", self.gradients),
                ("AdamW states (fp32)", self.optimizer), ("activations", self.activations),
                ("loss (logits, softmax)", self.loss), ("CUDA context, slack", self.overhead),
                ("total", self.total)]
        lines = [f"{self.method}, batch {self.batch} x seq {self.seq}, {self.trainable_params:,} trainable parameters",
                 ""] + [f"  {name:<24s}{value / GIB:8.2f} GiB" for name, value in rows]
        lines.append("")
        lines.append("  fits on: " + ", ".join(f"{gpu} {'yes' if ok else 'no'}" for gpu, ok in self.fits().items()))
        return "\n".join(lines)


def _weight_bytes(model: nn.Module, compute_bytes: int) -> int:
    total = 0
    for param in model.parameters():
        if param.requires_grad:
            total += param.numel() * 4
        elif param.dtype.is_floating_point:
            total += param.numel() * compute_bytes
        else:
            total += param.numel() * param.element_size()
    return total


def _layers_with_gradient(model: nn.Module, method: str, options: dict) -> int:
    config = model.config if hasattr(model, "config") else model.get_base_model().config
    if method == "freeze":
        return options.get("layers", 5)
    return config.num_layers


def estimate(
    model_name: str = "THUDM/chatglm-6b-int4",
    method: str = "lora",
    seq: int = 512,
    batch: int = 4,
    gradient_checkpointing: bool = False,
    compute_bytes: int = 2,
    label_fraction: float = 0.5,
    **method_options,
) -> MemoryEstimate:
    """Estimate peak training memory of ``method`` on the full-size model (built on ``meta``, nothing loaded).

    ``label_fraction`` is the share of tokens that carry a label (the answer part of each row).
    """
    model = meta_model(model_name)
    setup = apply_method(model, method, **method_options)
    config = model.config
    h, inner, vocab = config.hidden_size, config.inner_hidden_size, config.vocab_size
    tokens = seq * batch
    trainable = setup.trainable_params
    layers = _layers_with_gradient(setup.model, method, setup.options)
    prefix = setup.options.get("pre_seq_len", 0) if method == "ptuning_v2" else 0

    per_layer = 6 * h + inner  # LN inputs, q, k, v, attention output, GELU input
    if method == "lora":
        per_layer += 2 * h  # the adapter's input and its dropout mask
    if gradient_checkpointing:
        saved = tokens * layers * h * compute_bytes + tokens * per_layer * compute_bytes
    else:
        saved = tokens * layers * per_layer * compute_bytes
    if prefix:
        saved += batch * prefix * 2 * config.num_layers * h * (compute_bytes + 4)  # prefix keys/values, fp32 copy
    labelled = int(tokens * label_fraction)
    loss = labelled * vocab * (compute_bytes + 4 + 4)
    return MemoryEstimate(
        method=method, seq=seq, batch=batch, weights=_weight_bytes(setup.model, compute_bytes),
        trainable_params=trainable, gradients=4 * trainable, optimizer=8 * trainable, activations=saved, loss=loss,
    )
