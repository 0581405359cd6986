"""Predicted peak memory of fine-tuning (or generating with) ChatGLM: GPU or CPU (a planning aid, not a measurement).

Training adds up what is held at its peak:

* weights as loaded: packed INT4/INT8 matrices (1 byte per stored element) and the compute dtype for the rest
  (fp16/bf16 on GPU, fp32 on CPU), except trainable tensors, which are kept in fp32;
* gradients (fp32) and AdamW's two moments (fp32) of the trainable parameters; when the trained tensor is the
  tied embedding, the output layer and the lookup each produce a dense gradient of the whole matrix and autograd
  adds them out of place, so three such matrices exist at the end of the backward pass (measured on CPU);
* activations saved for the backward pass, per token and per layer that the gradient has to pass through
  (LayerNorm inputs, attention q/k/v/output, the GELU input; LoRA adds its input and dropout mask), or only each
  layer's input with gradient checkpointing (plus one layer being recomputed);
* the loss: logits of the labelled tokens in the compute dtype (and an fp32 copy unless that is already fp32),
  the fp32 log-softmax kept for the backward pass, and the gradient of the logits;
* the unpack: a quantized layer dequantizes its whole matrix for each product (forward and input gradient), so
  one floating copy of the largest matrix exists at a time (bf16 is formed in fp32 first, then rounded);
* on GPU a fixed allowance for the CUDA context and allocator slack. On CPU, the heap growth glibc's allocator
  adds during the forward pass: freed unpack temporaries of the smaller matrices (below its mmap threshold, so
  taken from the heap) are reused only in part once saved activations sit between them. Measured on the
  full-size model (``python -m bench fullsize``): 23-35 MiB per layer that keeps activations, independent of the
  sequence length, i.e. about ``3 * hidden**2 / 2`` bytes (three int8 temporaries of the 4096 x 4096 matrix) per
  such layer; one layer with gradient checkpointing. The process's own baseline (Python, torch, transformers) is
  not counted: compare with peak RSS minus the RSS before the model is built.

Generation (:func:`estimate_generation`) holds the weights, the KV cache (plus one layer's cache being copied as
it grows), the largest activation of the prompt's forward pass, the logits and the unpack.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .errors import UserError
from .methods import apply_method, check_method
from .models import meta_model
from .run.memory import GIB

CUDA_OVERHEAD = int(0.6 * GIB)  # context, cuBLAS workspace, allocator fragmentation
GPUS = {"T4-16G": 15.0, "A100-40G": 39.5, "H100-80G": 79.0}  # usable GiB
DEVICES = ("cuda", "cpu")


def cpu_heap_per_layer(hidden: int) -> int:
    """Resident heap growth per layer that keeps activations on CPU (measured; see the module docstring)."""
    return 3 * hidden * hidden // 2


class _Estimate:
    """What both estimates share: a ``parts()`` breakdown (bytes by name), its total, fits, and the printed table."""

    device: str
    compute_bytes: int = 4

    def parts(self) -> dict[str, int]:
        raise NotImplementedError

    def head(self) -> str:
        raise NotImplementedError

    @property
    def total(self) -> int:
        return sum(self.parts().values())

    def fits(self) -> dict[str, bool]:
        return _fits(self.total, self.device)

    def table(self) -> str:
        return _table(self.head(), self.parts(), self.total, self.fits(), self.device, self.compute_bytes)


@dataclass
class MemoryEstimate(_Estimate):
    """The parts of a predicted peak, in bytes; ``total`` is their sum."""

    method: str
    seq: int
    batch: int
    weights: int
    trainable_params: int
    gradients: int
    optimizer: int
    activations: int
    loss: int
    unpack: int = 0
    overhead: int = CUDA_OVERHEAD
    device: str = "cuda"
    compute_bytes: int = 2

    def parts(self) -> dict[str, int]:
        """Each part by name (what :meth:`table` prints and a notebook can plot)."""
        return {"weights": self.weights, "gradients (fp32)": self.gradients, "AdamW states (fp32)": self.optimizer,
                "activations": self.activations, "loss (logits, softmax)": self.loss,
                "INT4 unpack (one matrix)": self.unpack, _overhead_name(self.device): self.overhead}

    def head(self) -> str:
        return f"{self.method}, batch {self.batch} x seq {self.seq}, {self.trainable_params:,} trainable parameters"


@dataclass
class GenerationEstimate(_Estimate):
    """The parts of the predicted peak of a greedy ``generate``, in bytes."""

    prompt: int
    new_tokens: int
    batch: int
    weights: int
    cache: int
    activations: int
    logits: int
    unpack: int
    overhead: int
    repacked: int = 0  # bf16 on a CPU: the int4pack kernels' copy of every INT4 matrix, made at first use
    device: str = "cuda"
    compute_bytes: int = 2
    notes: list[str] = field(default_factory=list)

    def parts(self) -> dict[str, int]:
        return {"weights": self.weights, "KV cache": self.cache, "activations (prompt)": self.activations,
                "logits": self.logits, "INT4 unpack (one matrix)": self.unpack,
                "INT4 repacked (CPU fast path)": self.repacked, _overhead_name(self.device): self.overhead}

    def head(self) -> str:
        return f"generate, batch {self.batch} x ({self.prompt} prompt + {self.new_tokens} new tokens)"


def _overhead_name(device: str) -> str:
    return "CUDA context, slack" if device == "cuda" else "allocator (heap growth)"


def _fits(total: int, device: str) -> dict[str, bool]:
    if device == "cuda":
        return {gpu: total <= usable * GIB for gpu, usable in GPUS.items()}
    import os

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {f"this machine's RAM ({ram / GIB:.1f} GiB)": total <= ram}


def _table(head: str, parts: dict[str, int], total: int, fits: dict[str, bool], device: str,
           compute_bytes: int = 4) -> str:
    lines = [head + ("" if device == "cuda" else f" (CPU, {'fp32' if compute_bytes == 4 else 'bf16'})"), ""]
    lines += [f"  {name:<30s}{value / GIB:8.2f} GiB" for name, value in {**parts, "total": total}.items()]
    lines += ["", "  fits on: " + ", ".join(f"{name} {'yes' if ok else 'no'}" for name, ok in fits.items())]
    return "\n".join(lines)


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be a whole number >= 1, got {value!r}")
    return value


def _check_common(device: str, compute_bytes: int | None) -> int:
    if device not in DEVICES:
        raise UserError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if compute_bytes is None:
        return 2 if device == "cuda" else 4
    if compute_bytes not in (2, 4):
        raise UserError(f"compute_bytes must be 2 (fp16/bf16) or 4 (fp32), got {compute_bytes!r}")
    return compute_bytes


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


def _unpack_bytes(model: nn.Module, compute_bytes: int) -> int:
    """One dequantized copy of the largest quantized matrix (fp16 or fp32; bf16 as fp32 and then bf16)."""
    from chatglm.quantization import QuantizedLinear

    largest = max((m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantizedLinear)),
                  default=0)
    return largest * (compute_bytes if compute_bytes == 4 else 4 + compute_bytes)


def _layers_with_gradient(model: nn.Module, method: str, options: dict) -> int:
    config = model.config if hasattr(model, "config") else model.get_base_model().config
    if method == "freeze":
        return options.get("layers", 5)
    return config.num_layers


def estimate(model_name: str = "THUDM/chatglm-6b-int4", method: str = "lora", seq: int = 512, batch: int = 4,
             gradient_checkpointing: bool = False, compute_bytes: int | None = None, label_fraction: float = 0.5,
             device: str = "cuda", **method_options) -> MemoryEstimate:
    """Estimate peak training memory of ``method`` on the full-size model (built on ``meta``, nothing loaded).

    ``device="cpu"`` predicts the resident memory a CPU run adds to its process (fp32 compute, no CUDA context);
    ``compute_bytes`` defaults to 2 (bf16/fp16) on GPU and 4 on CPU. ``label_fraction`` is the share of tokens
    that carry a label (the answer part of each row). Bad values raise :class:`~helpers.errors.UserError`.
    """
    seq, batch = _positive_int(seq, "seq"), _positive_int(batch, "batch")
    compute_bytes = _check_common(device, compute_bytes)
    if not 0 < label_fraction <= 1:
        raise UserError(f"label_fraction must be in (0, 1], got {label_fraction!r}")
    check_method(method, flag=None)
    for name in ("pre_seq_len", "r", "layers"):
        if method_options.get(name) is not None:
            _positive_int(method_options[name], name)
    model = meta_model(model_name)
    try:
        setup = apply_method(model, method, **method_options)
    except (TypeError, ValueError) as error:
        raise UserError(f"{method} options {method_options}: {error}") from None
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
    loss = labelled * vocab * (compute_bytes + (0 if compute_bytes == 4 else 4) + 4 + 4)
    gradients = 4 * trainable
    if method == "embedding":
        # The tied matrix gets two dense gradients (output layer, lookup) and autograd adds them out of place:
        # three matrices at the end of the backward pass, one of which stays as .grad.
        gradients += 2 * 4 * vocab * h
    if device == "cuda":
        overhead = CUDA_OVERHEAD
    else:
        overhead = cpu_heap_per_layer(h) * (1 if gradient_checkpointing else layers)
    return MemoryEstimate(
        method=method, seq=seq, batch=batch, weights=_weight_bytes(setup.model, compute_bytes),
        trainable_params=trainable, gradients=gradients, optimizer=8 * trainable, activations=saved, loss=loss,
        unpack=_unpack_bytes(setup.model, compute_bytes), overhead=overhead, device=device,
        compute_bytes=compute_bytes,
    )


def estimate_generation(model_name: str = "THUDM/chatglm-6b-int4", prompt: int = 32, new_tokens: int = 4,
                        batch: int = 1, device: str = "cuda", compute_bytes: int | None = None) -> GenerationEstimate:
    """Estimate the peak memory of a greedy, KV-cached ``generate`` (logits of the last position only)."""
    prompt, new_tokens, batch = (_positive_int(prompt, "prompt"), _positive_int(new_tokens, "new_tokens"),
                                 _positive_int(batch, "batch"))
    compute_bytes = _check_common(device, compute_bytes)
    model = meta_model(model_name)
    for param in model.parameters():
        param.requires_grad_(False)
    config = model.config
    h, inner, vocab, layers = config.hidden_size, config.inner_hidden_size, config.vocab_size, config.num_layers
    length = prompt + new_tokens
    cache = 2 * layers * batch * length * h * compute_bytes
    cache += 2 * batch * length * h * compute_bytes  # one layer's keys and values copied as they grow
    tokens = batch * prompt
    # The prompt's forward: the residual stream, the GELU input and output, and the attention scores.
    activations = tokens * (2 * h + 2 * inner) * compute_bytes
    activations += batch * config.num_attention_heads * prompt * prompt * 4
    logits = batch * vocab * (compute_bytes + 4) * 2  # the last position's logits, fp32 scores and their processing
    repacked = 0
    if device == "cpu" and compute_bytes == 2:  # chatglm.quantization: as large as the packed weights
        from chatglm.quantization import QuantizedLinear

        repacked = sum(m.weight.numel() for m in model.modules() if isinstance(m, QuantizedLinear) and m.bits == 4)
    return GenerationEstimate(
        prompt=prompt, new_tokens=new_tokens, batch=batch, weights=_weight_bytes(model, compute_bytes), cache=cache,
        activations=activations, logits=logits, unpack=_unpack_bytes(model, compute_bytes),
        overhead=CUDA_OVERHEAD if device == "cuda" else 0, device=device, repacked=repacked,
        compute_bytes=compute_bytes,
    )


# The notebooks' view: a method's parameter line and memory at full size, for the GPUs a learner has.
NOTEBOOK_GPUS = {name: GPUS[name] for name in ("T4-16G", "A100-40G")}  # usable GiB
PEAK_SETTINGS = {"seq": 512, "batch": 1, "gradient_checkpointing": True}  # the smallest training setup (a T4)


@dataclasses.dataclass
class FullSize:
    """A method applied to the full-size model: parameter counts and memory, from :func:`estimate`.

    ``weights_bytes`` and ``states_bytes`` (fp32 gradients and AdamW's two moments) are the parts before
    activations; ``peak_bytes`` is the whole estimated peak with activations for :data:`PEAK_SETTINGS`, so both
    figures come from this one memory model (the one ``python -m helpers estimate`` prints).
    """

    method: str
    model: str
    options: dict
    line: str
    trainable: int
    all_params: int
    weights_bytes: int
    states_bytes: int
    peak_bytes: int

    @property
    def total_gib(self) -> float:
        """Weights, gradients and optimizer states (before activations), GiB."""
        return (self.weights_bytes + self.states_bytes) / GIB

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    def fits(self) -> dict[str, bool]:
        """Whether the estimated peak (batch 1, gradient checkpointing) fits each GPU."""
        return {gpu: self.peak_gib <= usable for gpu, usable in NOTEBOOK_GPUS.items()}

    def __str__(self) -> str:
        options = ", ".join(f"{k}={v}" for k, v in self.options.items())
        fits = ", ".join(f"{gpu}: {'yes' if ok else 'no'}" for gpu, ok in self.fits().items())
        setting = f"batch {PEAK_SETTINGS['batch']}, {PEAK_SETTINGS['seq']} tokens, gradient checkpointing"
        return (f"{self.model} + {self.method}({options})\n{self.line}\n"
                f"weights {self.weights_bytes / GIB:.1f} GiB + gradients and AdamW states "
                f"{self.states_bytes / GIB:.1f} GiB = {self.total_gib:.1f} GiB before activations; "
                f"estimated peak {self.peak_gib:.1f} GiB ({setting})\nfits: {fits}")

    __repr__ = __str__


def full_size_line(method: str, model: str = "THUDM/chatglm-6b-int4", **options: Any) -> FullSize:
    """Apply ``method`` to the full-size model on the ``meta`` device (nothing is downloaded or allocated)."""
    setup = apply_method(meta_model(model), method, **options)
    memory = estimate(model, method, **PEAK_SETTINGS, **options)
    return FullSize(method, model, dict(setup.options), str(setup), setup.trainable_params, setup.all_params,
                    memory.weights, memory.gradients + memory.optimizer, memory.total)
