"""Weight-only INT8/INT4 layers in the format of the public ChatGLM-6B checkpoints, and the matmuls behind them.

The format (:mod:`chatglm.weight_format`): int8 ``weight`` (two INT4 values per byte for INT4, even input index in
the high nibble) and one fp16 ``weight_scale`` per output row. A :class:`QuantizedLinear` keeps exactly these
parameters, so ``state_dict()`` is the public layout; any faster copy of the weight lives beside them, is made in
memory at first use and is never saved. Its backward returns the gradient of the input, so frozen quantized layers
pass gradients on to LoRA adapters, prefixes, embeddings and LayerNorms.

The matmul paths (:func:`explain_kernel` is the one rule that picks them; :func:`kernel_report` says it in words):

- ``"torch"``, the pure path, everywhere: the weight is dequantized in the input's dtype (``q * scale`` exact, rounded
  once) and multiplied with ``F.linear``. On the CPU it is unpacked a block of rows (forward) or of input columns
  (backward) at a time into one reused buffer, which stays in the cache: the same numbers as unpacking the whole
  matrix, several times faster (a 12288 x 4096 matrix, one fp32 row, 2 cores: 114 ms -> 18 ms).
- ``"triton"``: on CUDA, INT4 layers with fp16/bf16/fp32 inputs use the fused kernels of :mod:`chatglm.int4_triton`
  when ``triton`` imports (same results up to the order of fp32 sums).
- ``"cpu-int4pack"`` / ``"cpu-int8pack"``: on the CPU, bf16 inputs use PyTorch's own weight-only kernels
  (``aten._weight_int4pack_mm_for_cpu`` on a repacked copy of the INT4 weight, ``aten._weight_int8pack_mm`` on the
  INT8 weight as stored). They serve decoding and short prompts: at most 64 rows (INT4) or 16 rows (INT8), outside
  autograd. Beyond that, and in every backward pass, the streamed pure path is as fast or faster (the four matrices
  of a full-size layer, bf16, 2 cores: INT4 kernel 49, 114, 154 ms for 32, 64, 80 rows, streamed 91, 130, 155 ms;
  a 12288 x 4096 matrix: kernel 1.0 ms for one row and 105 ms for 256, streamed 18 and 56 ms).

Precision. The kernels are fast only in bf16 (their fp32 and x86 fp16 versions are scalar loops: 44 ms for one
fp32 row of that matrix, 190 ms for four). So bf16 inputs, and inputs under a bf16 ``autocast``, take them; fp32
inputs keep the exact pure path (the parity tests against the original hold at 1e-5), since casting them to bf16
would round every input and output (relative error about 4e-3). In the kernels each weight is ``q * bf16(scale)``
exactly in fp32 and the sums run in fp32, rounded once to bf16: within the pure bf16 path's own rounding of each
weight and output. On the parity fixtures in bf16 the greedy ids stay the original's.

Memory and the backward pass. The INT4 repacked copy is as large as the stored weight (2.6 GiB at full size; about
10 s to make on 2 cores) and exists only once a layer has run the kernel (generation, evaluation); training never
makes it, because autograd-recording forwards stream the stored bytes, and so does every backward pass. A second
packed copy of the transposed matrix would make the input gradient about 1.5x faster (64 rows on the matrix above:
23 vs 35 ms; a full-size LoRA step about 1.3 s shorter than its 8.6 s) but hold 2.6 GiB more (a LoRA step from
4.6 to 7.2 GiB, and 9.8 GiB once the model also generates): the step is within its target without it, and a 16 GB
laptop keeps its headroom. The stored bytes stay resident (``state_dict()``, the other paths, repacking after a
change): the kernel's layout depends on the CPU's vector width, so the public bytes are not rebuilt from it.

The repacked copy is keyed on the identity, address and version counter of ``weight`` and ``weight_scale`` and
dropped by ``set_weight``, ``load_state_dict`` and ``.to()``/``.float()``/...; a write through ``.data`` bypasses the
version counter, so call :meth:`QuantizedLinear.clear_packed` after one. Before first use, each kernel is checked
once per process on a small weight with a known exact result; if it is missing (older PyTorch), fails, or answers
wrongly (an unknown packing layout), the layer falls back to the pure path and :func:`kernel_report` says why.

``CHATGLM_INT4_KERNEL=torch`` forces the pure path everywhere, ``CHATGLM_INT4_KERNEL=triton`` the Triton one (an
error if it cannot run).
"""

from __future__ import annotations

import collections
import functools
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from .weight_format import check_bits, dequantize_weight, pack_int4, quantize_weight, unpack_int4, unpack_into

__all__ = [
    "KERNEL_ENV",
    "QUANTIZABLE_LINEARS",
    "QuantizedLinear",
    "dequantize_weight",
    "explain_kernel",
    "int4_kernel",
    "kernel_report",
    "pack_int4",
    "quantize_linears",
    "quantize_weight",
    "unpack_int4",
]

QUANTIZABLE_LINEARS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
KERNEL_ENV = "CHATGLM_INT4_KERNEL"  # "torch", "triton", or unset / "auto"
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Up to this many input rows the packed CPU kernels beat the streamed unpack + GEMM (measured, bf16, 2 cores).
CPU_KERNEL_MAX_ROWS = {4: 64, 8: 16}
STREAM_ELEMENTS = 1 << 21  # weights unpacked per block on the CPU: 4 MiB in bf16, 8 MiB in fp32
PACK_ROWS = 128  # rows repacked per call (a multiple of every kernel's block of output rows: 64, 32 or 16)
_INT4_GROUP_SIZES = (256, 128, 64, 32)  # the group sizes the int4pack kernel takes, largest (fewest scales) first
_CPU_OPS = {4: ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu"), 8: ("_weight_int8pack_mm",)}


# ---------------------------------------------------------------------------------------------------- Triton


@functools.cache
def _triton_kernels() -> ModuleType | Exception:
    """The module of fused kernels, or the error that prevents importing it (imported on first need only)."""
    try:
        from chatglm import int4_triton
    except Exception as exc:  # ImportError, or a triton install that fails while loading
        return exc
    return int4_triton


# ---------------------------------------------------------------------------------------------------- CPU kernels


def _aten_op(name: str) -> Callable | None:
    """``torch.ops.aten.<name>``, or None where this PyTorch build lacks it."""
    return getattr(torch.ops.aten, name, None)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous and starting on a 64-byte boundary: the int8 kernel reads its rows with aligned loads."""
    t = t.contiguous()
    return t if t.data_ptr() % 64 == 0 else t.clone()


def _int4_group_size(in_features: int) -> int | None:
    return next((size for size in _INT4_GROUP_SIZES if in_features % size == 0), None)


@dataclass(frozen=True)
class _CpuPacked:
    """A layer's weight as a packed CPU kernel takes it.

    INT4: ``weight`` uint8 [out, in / 2] in the kernel's own layout, ``scale`` [in / group, out, 2] bf16 (each group's
    scale is the row's scale, zero point 0). INT8: ``weight`` the stored int8 [out, in], ``scale`` [out] bf16.
    """

    weight: torch.Tensor
    scale: torch.Tensor
    group_size: int = 0


def _pack_for_cpu(qweight: torch.Tensor, scale: torch.Tensor, bits: int) -> _CpuPacked:
    """Repack the stored weight for the CPU kernel of ``bits`` (INT4: a new copy; INT8: the stored bytes as is)."""
    scale = scale.detach().to(torch.bfloat16)
    if bits == 8:
        return _CpuPacked(_aligned(qweight.detach()), scale)
    rows, in_features = qweight.shape[0], 2 * qweight.shape[1]
    convert = _aten_op(_CPU_OPS[4][0])
    packed = torch.empty(rows, in_features // 2, dtype=torch.uint8)
    values = torch.empty(min(rows, PACK_ROWS), in_features // 2, 2, dtype=torch.int32)
    for start in range(0, rows, PACK_ROWS):  # a block of rows at a time: the int32 values stay in the cache
        # The kernel takes unsigned nibbles u = q + 8 (it computes (u - 8) * scale + zero); flipping the top bit of
        # each nibble (xor 0x88 on the byte) turns q into q + 8.
        unsigned = (qweight[start : start + PACK_ROWS] ^ -0x78).view(torch.uint8)
        block = values[: unsigned.shape[0]]
        block[..., 0] = unsigned >> 4  # even input index: the high nibble
        block[..., 1] = unsigned & 0xF
        packed[start : start + PACK_ROWS] = convert(block.view(-1, in_features), 1)
    group = _int4_group_size(in_features)
    scale_and_zero = torch.stack((scale, torch.zeros_like(scale)), dim=-1)
    return _CpuPacked(packed, scale_and_zero.expand(in_features // group, rows, 2).contiguous(), group)


def _cpu_packed_linear(x: torch.Tensor, packed: _CpuPacked, bits: int) -> torch.Tensor:
    """``x @ W.T`` through the packed CPU kernel; x is rounded to bf16, the result is bf16."""
    rows = _aligned(x.reshape(-1, x.shape[-1]).to(torch.bfloat16))
    if bits == 4:
        y = _aten_op(_CPU_OPS[4][1])(rows, packed.weight, packed.group_size, packed.scale)
    else:
        y = _aten_op(_CPU_OPS[8][0])(rows, packed.weight, packed.scale)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def cpu_kernel_problem(bits: int) -> str | None:
    """Why the packed CPU kernel for ``bits`` cannot serve in this process, or None when it can."""
    ops = tuple(_aten_op(name) for name in _CPU_OPS[bits])
    missing = [name for name, op in zip(_CPU_OPS[bits], ops) if op is None]
    if missing:
        return f"this PyTorch {torch.__version__} has no aten.{missing[0]}"
    return _self_check(bits, ops)


@functools.cache
def _self_check(bits: int, ops: tuple) -> str | None:
    """Run the kernel once on a weight whose exact result is known (cached per kernel ops); the problem, or None.

    Powers-of-two scales keep every ``q * scale`` exact in bf16, and an identity input picks single weights out of
    the sums, so nibble order, zero point, scale layout and the block-wise repacking must all be right.
    """
    generator = torch.Generator().manual_seed(0)
    rows, in_features = (PACK_ROWS + 48, 96) if bits == 4 else (20, 48)  # INT4: two repack blocks, three groups
    low = -(2 ** (bits - 1))
    q = torch.randint(low, -low, (rows, in_features), dtype=torch.int8, generator=generator)
    qweight = pack_int4(q) if bits == 4 else q
    scale = (2.0 ** -torch.randint(0, 8, (rows,), generator=generator)).half()
    try:
        with torch.no_grad(), torch.inference_mode(False):
            got = _cpu_packed_linear(torch.eye(in_features), _pack_for_cpu(qweight, scale, bits), bits)
    except Exception as error:  # not built for this CPU, or a changed signature
        return f"aten.{_CPU_OPS[bits][-1]} failed its self-check ({type(error).__name__}: {str(error)[:120]})"
    if not torch.equal(got, dequantize_weight(qweight, scale, bits, torch.bfloat16).T):
        return f"aten.{_CPU_OPS[bits][-1]} gave wrong results in its self-check (a packing layout unknown here)"
    return None


def _cpu_shape_problem(bits: int, in_features: int, out_features: int) -> str | None:
    if bits == 4 and out_features % 16:
        return f"out_features {out_features} is not a multiple of 16 (int4pack kernel)"
    if bits == 4 and _int4_group_size(in_features) is None:
        return f"in_features {in_features} is not a multiple of 32 (int4pack group size)"
    if bits == 8 and in_features % 16:
        # the vectorised int8 kernel steps over 16 inputs at a time and reads past a shorter row
        return f"in_features {in_features} is not a multiple of 16 (int8pack kernel)"
    return None


# ---------------------------------------------------------------------------------------------------- the rule


def _forced_kernel() -> str:
    raw = os.environ.get(KERNEL_ENV, "")
    choice = raw.strip().lower() or "auto"
    if choice not in ("auto", "torch", "triton"):
        raise ValueError(f"environment variable {KERNEL_ENV}={raw!r} is not an INT4 kernel: set it to 'torch' or "
                         f"'triton', or unset it to choose automatically (Triton on CUDA when installed)")
    return choice


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


def explain_kernel(bits: int, device: torch.device | str, dtype: torch.dtype,
                   shape: tuple[int, int] | None = None) -> tuple[str, str]:
    """Which matmul a quantized layer runs for inputs of ``dtype`` on ``device``, and why: (kernel, reason).

    ``kernel`` is ``"torch"`` (pure PyTorch), ``"triton"``, ``"cpu-int4pack"`` or ``"cpu-int8pack"``; ``shape`` is the
    layer's (in_features, out_features) when known. Automatic: Triton for INT4 on CUDA when ``triton`` imports; on the
    CPU the packed kernel of the layer's bits for bf16 inputs when it passed its self-check and the shape fits it;
    the pure path otherwise. ``CHATGLM_INT4_KERNEL`` forces one; forcing ``triton`` raises if it cannot run (no
    ``triton``, or CPU tensors outside ``TRITON_INTERPRET=1``). INT8 layers and inputs other than fp16/bf16/fp32
    never take Triton.
    """
    check_bits(bits)
    choice = _forced_kernel()
    device = torch.device(device)
    if choice == "torch":
        return "torch", f"forced by {KERNEL_ENV}=torch"
    if choice == "auto" and device.type == "cpu":
        return _cpu_choice(bits, dtype, shape)
    if bits != 4 or dtype not in _TRITON_DTYPES or (choice == "auto" and device.type != "cuda"):
        return "torch", f"no fused kernel for INT{bits} {_dtype_name(dtype)} on {device.type}"
    kernels = _triton_kernels()
    if choice == "auto":
        if isinstance(kernels, Exception):
            return "torch", f"triton does not load ({type(kernels).__name__})"
        return "triton", "fused Triton kernel"
    if isinstance(kernels, Exception):
        raise RuntimeError(f"{KERNEL_ENV}=triton but the Triton kernels cannot be loaded ({kernels!r}): install "
                           f"triton (`pip install triton`, Linux) or unset {KERNEL_ENV} to use pure PyTorch")
    if device.type != "cuda" and not kernels.interpreting():
        raise RuntimeError(f"{KERNEL_ENV}=triton but the input is on {device}: the Triton kernels need CUDA tensors, "
                           f"or TRITON_INTERPRET=1 set before triton is imported to run them on the CPU; or unset "
                           f"{KERNEL_ENV}")
    return "triton", f"forced by {KERNEL_ENV}=triton"


def _cpu_choice(bits: int, dtype: torch.dtype, shape: tuple[int, int] | None) -> tuple[str, str]:
    if dtype in (torch.float32, torch.float64):
        return "torch", "exact"
    if dtype != torch.bfloat16:
        return "torch", "the packed CPU kernels are fast in bf16 only"
    problem = cpu_kernel_problem(bits) or (_cpu_shape_problem(bits, *shape) if shape else None)
    if problem:
        return "torch", problem
    return f"cpu-int{bits}pack", "packed CPU kernel"


def int4_kernel(bits: int, device: torch.device | str, dtype: torch.dtype,
                shape: tuple[int, int] | None = None) -> str:
    """The kernel of :func:`explain_kernel` alone: ``"torch"``, ``"triton"``, ``"cpu-int4pack"``, ``"cpu-int8pack"``."""
    return explain_kernel(bits, device, dtype, shape)[0]


# ---------------------------------------------------------------------------------------------------- pure path


def _dequantize_block(qweight: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype,
                      buffers: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
    """:func:`dequantize_weight` of a block of the stored weight, written into reused buffers; the same rounding.

    ``buffers`` is (result in ``dtype``, fp32 work space or None). A bf16 product of two bf16 values is the exact
    product rounded once, so with the scale already in ``dtype`` (or an exact ``dtype``) the block is computed in
    place; an fp16 scale for bf16 (as ``from_pretrained(dtype=torch.bfloat16)`` leaves it) needs the exact product in
    fp32 first, rounded once into the result.
    """
    out, work = buffers
    if work is None:
        return unpack_into(out, qweight, bits).mul_(scale.to(dtype)[:, None])
    exact = unpack_into(work, qweight, bits).mul_(scale.float()[:, None])
    return out[: exact.numel()].view(exact.shape).copy_(exact)


def _stream_buffers(scale: torch.Tensor, dtype: torch.dtype, elements: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    direct = dtype in (torch.float16, torch.float32, torch.float64) or scale.dtype == dtype
    out = torch.empty(elements, dtype=dtype, device=scale.device)
    return out, None if direct else torch.empty(elements, dtype=torch.float32, device=scale.device)


def _pure_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """``x @ W.T`` with W dequantized in x's dtype; on the CPU a block of output rows at a time."""
    out_features, in_features = qweight.shape[0], qweight.shape[1] * 8 // bits
    step = max(1, STREAM_ELEMENTS // in_features)
    if x.device.type != "cpu" or step >= out_features:
        return F.linear(x, dequantize_weight(qweight, scale, bits, x.dtype))
    buffers = _stream_buffers(scale, x.dtype, step * in_features)
    blocks = [F.linear(x, _dequantize_block(qweight[start : start + step], scale[start : start + step], bits,
                                            x.dtype, buffers))
              for start in range(0, out_features, step)]
    return torch.cat(blocks, dim=-1)


def _pure_input_grad(grad: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """``grad @ W`` with W dequantized in grad's dtype; on the CPU a block of input columns at a time, so each
    result column is still one GEMM over all output rows."""
    out_features, per_byte = qweight.shape[0], 8 // bits
    in_features = qweight.shape[1] * per_byte
    step = max(128, STREAM_ELEMENTS // out_features // 128 * 128)  # whole bytes, whole cache lines
    if grad.device.type != "cpu" or step >= in_features:
        return grad @ dequantize_weight(qweight, scale, bits, grad.dtype)
    buffers = _stream_buffers(scale, grad.dtype, step * out_features)
    blocks = [grad @ _dequantize_block(qweight[:, start // per_byte : (start + step) // per_byte], scale, bits,
                                       grad.dtype, buffers)
              for start in range(0, in_features, step)]
    return torch.cat(blocks, dim=-1)


class _QuantizedMatmul(torch.autograd.Function):
    """``x @ W.T`` on the pure or the Triton path, forward and backward; W itself never gets a gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bits: int, kernel: str,
                dtype: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(qweight, scale)
        ctx.bits, ctx.kernel = bits, kernel
        if kernel == "triton":
            return _triton_kernels().int4_linear(x.to(dtype), qweight, scale)
        return _pure_linear(x, qweight, scale, bits)  # under autocast F.linear computes in the autocast dtype

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        qweight, scale = ctx.saved_tensors
        if ctx.kernel == "triton":
            grad = _triton_kernels().int4_linear_input_grad(grad_out, qweight, scale)
        else:
            grad = _pure_input_grad(grad_out, qweight, scale, ctx.bits)
        return grad, None, None, None, None, None


def _input_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer computes in for ``x``: the autocast dtype where autocast is on."""
    device_type = x.device.type
    autocast = device_type in ("cuda", "cpu") and x.is_floating_point() and torch.is_autocast_enabled(device_type)
    return torch.get_autocast_dtype(device_type) if autocast else x.dtype


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # an inference tensor (made under torch.inference_mode) has no version counter
        return -1


# ---------------------------------------------------------------------------------------------------- the layer


class QuantizedLinear(nn.Module):
    """A frozen ``Linear`` whose weight is stored as INT8 or packed INT4 with one fp16 scale per output row.

    ``weight``, ``weight_scale`` and ``bias`` are parameters (so they are counted and saved like the public
    checkpoints) that never require gradients. :meth:`kernel` says which matmul runs; on the CPU a repacked copy
    for the packed kernel may sit beside the parameters (see the module docstring).
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
        check_bits(bits)
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
        self._packed: tuple | None = None  # (key, weak references to the sources, _CpuPacked)

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
        self.weight.copy_(q)
        self.weight_scale.copy_(scale)
        self.clear_packed()

    def clear_packed(self) -> None:
        """Drop the repacked copy of the weight (it is made again at its next use)."""
        self._packed = None

    def _apply(self, fn, recurse: bool = True):
        self.clear_packed()  # moved, cast or replaced parameters: repack at the next use
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.clear_packed()

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the layer computes in unless told otherwise: that of its bias (or scale)."""
        return (self.bias if self.bias is not None else self.weight_scale).dtype

    def explain_kernel(self, dtype: torch.dtype | None = None) -> tuple[str, str]:
        """(kernel, reason) of :func:`explain_kernel` for inputs of ``dtype`` (default: :attr:`compute_dtype`)."""
        return explain_kernel(self.bits, self.weight.device, dtype or self.compute_dtype,
                              (self.in_features, self.out_features))

    def kernel(self, dtype: torch.dtype | None = None) -> str:
        """Which matmul this layer runs for inputs of ``dtype``: see :func:`explain_kernel`."""
        return self.explain_kernel(dtype)[0]

    def _cpu_packed(self) -> _CpuPacked:
        """The weight repacked for the CPU kernel, made at the first call and again whenever the parameters changed."""
        sources = (self.weight, self.weight_scale)
        key = tuple((t.data_ptr(), _version(t), t.dtype) for t in sources)
        cached = self._packed
        if cached is None or cached[0] != key or any(ref() is not t for ref, t in zip(cached[1], sources)):
            self._packed = None  # free the old copy before making the new one
            with torch.no_grad(), torch.inference_mode(False):  # an ordinary tensor, even inside inference mode
                packed = _pack_for_cpu(self.weight, self.weight_scale, self.bits)
            self._packed = cached = (key, tuple(weakref.ref(t) for t in sources), packed)
        return cached[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _input_dtype(x)
        kernel = explain_kernel(self.bits, x.device, dtype, (self.in_features, self.out_features))[0]
        rows = x.numel() // self.in_features
        if kernel.startswith("cpu-") and not torch.is_grad_enabled() and 0 < rows <= CPU_KERNEL_MAX_ROWS[self.bits]:
            out = _cpu_packed_linear(x, self._cpu_packed(), self.bits)
        else:
            out = _QuantizedMatmul.apply(x, self.weight, self.weight_scale, self.bits, kernel, dtype)
        if self.bias is not None:
            out = out + self.bias
        return out

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as a floating tensor [out, in] (by default in the dtype of the bias or scale)."""
        return dequantize_weight(self.weight, self.weight_scale, self.bits, dtype or self.compute_dtype)

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
    check_bits(bits)
    replaced = 0
    for parent in list(module.modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in names and type(child) is nn.Linear:
                setattr(parent, child_name, QuantizedLinear.from_linear(child, bits))
                replaced += 1
    return replaced


_KERNEL_NAMES = {"cpu-int4pack": "CPU fast path: int4pack", "cpu-int8pack": "CPU fast path: int8pack",
                 "triton": "Triton", "torch": "pure PyTorch"}


def kernel_report(model: nn.Module, dtype: torch.dtype | None = None) -> str:
    """One line saying which matmul the quantized layers of ``model`` run for inputs of ``dtype`` (default: each
    layer's :attr:`~QuantizedLinear.compute_dtype`), e.g. ``"CPU fast path: int4pack (bf16)"`` or
    ``"pure PyTorch (fp32: exact)"``; several groups are joined with their layer counts."""
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    if not layers:
        return "no quantized layers"
    groups = collections.Counter()
    for layer in layers:
        layer_dtype = dtype or layer.compute_dtype
        kernel, reason = layer.explain_kernel(layer_dtype)
        detail = _dtype_name(layer_dtype) if kernel != "torch" else f"{_dtype_name(layer_dtype)}: {reason}"
        groups[f"{_KERNEL_NAMES[kernel]} ({detail})"] += 1
    if len(groups) == 1:
        return next(iter(groups))
    return "; ".join(f"{text} for {count} of {len(layers)} layers" for text, count in groups.most_common())
