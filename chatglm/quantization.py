"""Weight-only INT8/INT4 quantization in the format of the public ChatGLM-6B checkpoints.

The format and its functions (quantize, pack, unpack, dequantize) live in :mod:`chatglm.weight_format`, which the
fused kernels of :mod:`chatglm.int4_triton` share without importing this module.

A :class:`QuantizedLinear` keeps only the packed bytes and the scales. Its forward unpacks the weight on
the fly into the input's dtype (no persistent floating-point copy) and its backward returns the gradient
of the input, so frozen quantized layers pass gradients on to LoRA adapters, prefixes, embeddings and
LayerNorms. Pure PyTorch, so it runs on any device and dtype.

On CUDA, INT4 layers with fp16/bf16/fp32 inputs use the fused Triton kernels of :mod:`chatglm.int4_triton` when
``triton`` imports (same results up to the order of fp32 sums). ``CHATGLM_INT4_KERNEL=torch`` forces the pure path,
``CHATGLM_INT4_KERNEL=triton`` the Triton one (an error if it cannot run). INT8 layers always use the pure path.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from .weight_format import check_bits as _check_bits
from .weight_format import dequantize_weight, pack_int4, quantize_weight, unpack_int4  # noqa: F401 (re-exported)

QUANTIZABLE_LINEARS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
KERNEL_ENV = "CHATGLM_INT4_KERNEL"  # "torch", "triton", or unset / "auto"
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def _triton_kernels() -> ModuleType | Exception:
    """The module of fused kernels, or the error that prevents importing it (imported on first need only)."""
    try:
        from chatglm import int4_triton
    except Exception as exc:  # ImportError, or a triton install that fails while loading
        return exc
    return int4_triton


def int4_kernel(bits: int, device: torch.device | str, dtype: torch.dtype) -> str:
    """Which matmul a quantized layer runs for inputs of ``dtype`` on ``device``: ``"triton"`` or ``"torch"``.

    Automatic: Triton for INT4 on CUDA when ``triton`` imports, else pure PyTorch. ``CHATGLM_INT4_KERNEL`` forces
    one; forcing ``triton`` raises if it cannot run (no ``triton``, or CPU tensors outside ``TRITON_INTERPRET=1``).
    INT8 layers and inputs other than fp16/bf16/fp32 always take the pure path.
    """
    raw = os.environ.get(KERNEL_ENV, "")
    choice = raw.strip().lower() or "auto"
    if choice not in ("auto", "torch", "triton"):
        raise ValueError(f"environment variable {KERNEL_ENV}={raw!r} is not an INT4 kernel: set it to 'torch' or "
                         f"'triton', or unset it to choose automatically (Triton on CUDA when installed)")
    device = torch.device(device)
    if choice == "torch" or bits != 4 or dtype not in _TRITON_DTYPES or (choice == "auto" and device.type != "cuda"):
        return "torch"
    kernels = _triton_kernels()
    if choice == "auto":
        return "torch" if isinstance(kernels, Exception) else "triton"
    if isinstance(kernels, Exception):
        raise RuntimeError(f"{KERNEL_ENV}=triton but the Triton kernels cannot be loaded ({kernels!r}): install "
                           f"triton (`pip install triton`, Linux) or unset {KERNEL_ENV} to use pure PyTorch")
    if device.type != "cuda" and not kernels.interpreting():
        raise RuntimeError(f"{KERNEL_ENV}=triton but the input is on {device}: the Triton kernels need CUDA tensors, "
                           f"or TRITON_INTERPRET=1 set before triton is imported to run them on the CPU; or unset "
                           f"{KERNEL_ENV}")
    return "triton"


class _QuantizedMatmul(torch.autograd.Function):
    """``x @ W.T`` with W unpacked on the fly, forward and backward; W itself never gets a gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
        ctx.save_for_backward(qweight, scale)
        ctx.bits = bits
        device_type = x.device.type
        # Under autocast F.linear computes in the autocast dtype; the Triton path casts its input to match.
        autocast = device_type in ("cuda", "cpu") and x.is_floating_point() and torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else x.dtype
        ctx.kernel = int4_kernel(bits, x.device, dtype)
        if ctx.kernel == "triton":
            return _triton_kernels().int4_linear(x.to(dtype), qweight, scale)
        weight = dequantize_weight(qweight, scale, bits, x.dtype)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        qweight, scale = ctx.saved_tensors
        if ctx.kernel == "triton":
            return _triton_kernels().int4_linear_input_grad(grad_out, qweight, scale), None, None, None
        weight = dequantize_weight(qweight, scale, ctx.bits, grad_out.dtype)
        return grad_out @ weight, None, None, None


class QuantizedLinear(nn.Module):
    """A frozen ``Linear`` whose weight is stored as INT8 or packed INT4 with one fp16 scale per output row.

    ``weight``, ``weight_scale`` and ``bias`` are parameters (so they are counted and saved like the public
    checkpoints) that never require gradients.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_bits(bits)
        if bits == 4 and in_features % 2:
            raise ValueError(f"INT4 needs an even number of input features, got {in_features}")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        stored = in_features * bits // 8
        self.weight = nn.Parameter(
            torch.empty(out_features, stored, dtype=torch.int8, device=device), requires_grad=False
        )
        self.weight_scale = nn.Parameter(
            torch.empty(out_features, dtype=torch.float16, device=device), requires_grad=False
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int) -> QuantizedLinear:
        """Quantize a floating ``nn.Linear`` (on its own device) into a new layer; the bias keeps its dtype."""
        layer = cls(
            linear.in_features,
            linear.out_features,
            bits,
            bias=linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.bias.dtype if linear.bias is not None else None,
        )
        layer.set_weight(linear.weight.detach())
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Quantize ``weight`` [out, in] into this layer's stored bytes and scales."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight shape {tuple(weight.shape)} != ({self.out_features}, {self.in_features})")
        q, scale = quantize_weight(weight, self.bits)
        self.weight.data.copy_(q)
        self.weight_scale.data = scale.to(self.weight_scale.dtype)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as a floating tensor [out, in] (by default in the dtype of the bias or scale)."""
        if dtype is None:
            dtype = self.bias.dtype if self.bias is not None else self.weight_scale.dtype
        return dequantize_weight(self.weight, self.weight_scale, self.bits, dtype)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """An ordinary trainable ``nn.Linear`` holding the dequantized weight (and a copy of the bias)."""
        weight = self.dequantized_weight(dtype)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=weight.device,
                           dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _QuantizedMatmul.apply(x, self.weight, self.weight_scale, self.bits)
        if self.bias is not None:
            out = out + self.bias
        return out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"bias={self.bias is not None}"
        )


def quantize_linears(module: nn.Module, bits: int, names: tuple[str, ...] = QUANTIZABLE_LINEARS) -> int:
    """Replace every floating ``nn.Linear`` child called one of ``names`` by a :class:`QuantizedLinear`.

    Works layer by layer on each weight's own device, so a model can be quantized on the GPU one matrix at a
    time. Returns how many layers were replaced.
    """
    _check_bits(bits)
    replaced = 0
    for parent in list(module.modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in names and type(child) is nn.Linear:
                setattr(parent, child_name, QuantizedLinear.from_linear(child, bits))
                replaced += 1
    return replaced
