"""The weight format of the public INT8/INT4 ChatGLM-6B checkpoints: quantize, pack, unpack, dequantize.

Per quantized ``Linear``: ``weight_scale[o] = max_i |w[o, i]| / (2**(bits-1) - 1)`` stored in fp16,
``q = round(w / weight_scale)`` as int8. INT4 packs two values per byte, the even-indexed element in the
high nibble: ``byte = (q[2k] << 4) | (q[2k+1] & 0xF)``, so ``weight`` is int8 of shape ``[out, in // 2]``.

These functions import nothing else of the package, so both the layer (:mod:`chatglm.quantization`) and the
fused kernels (:mod:`chatglm.int4_triton`) build on them without importing each other.
"""

from __future__ import annotations

import torch


def check_bits(bits: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"weight-only quantization supports 4 or 8 bits, got {bits}")


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int8 values in [-8, 7] of shape [..., 2n] into int8 bytes [..., n], even index in the high nibble."""
    if q.dtype != torch.int8:
        raise TypeError(f"pack_int4 expects int8 values, got {q.dtype}")
    if q.shape[-1] % 2:
        raise ValueError(f"the last dimension must be even to pack two int4 values per byte, got {q.shape[-1]}")
    high, low = q[..., 0::2], q[..., 1::2]
    return (high << 4) | (low & 0x0F)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int8 bytes [..., n] to sign-extended int8 values [..., 2n]."""
    high = packed >> 4  # arithmetic shift keeps the sign of the high nibble
    low = (packed << 4) >> 4  # move the low nibble up, then shift back with sign extension
    return torch.stack((high, low), dim=-1).flatten(-2)


def quantize_weight(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a floating weight [out, in] per output row; returns (stored int8 weight, fp16 scale)."""
    check_bits(bits)
    # Same arithmetic as the public checkpoints were made with: the scale is rounded to fp16 first and the
    # division runs in the weight's dtype (promoted against the fp16 scale).
    scale = (weight.abs().amax(dim=-1) / (2 ** (bits - 1) - 1)).half()
    safe_scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero row stays zero
    q = torch.round(weight / safe_scale[:, None]).to(torch.int8)
    if bits == 4:
        q = pack_int4(q)
    return q, scale


def dequantize_weight(qweight: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """Floating weight [out, in] in ``dtype`` from the stored int8 weight and its per-row scale."""
    check_bits(bits)
    # q * scale is exact before the final rounding, so computing in fp16/fp32 rounds once; for bf16 (and others)
    # the exact product is formed in fp32 and rounded once at the end.
    exact = dtype in (torch.float16, torch.float32, torch.float64)
    compute = dtype if exact else torch.float32
    weight = unpack_into(torch.empty(qweight.numel() * 8 // bits, dtype=compute, device=qweight.device), qweight,
                         bits)
    weight.mul_(scale.to(compute)[:, None])
    return weight if exact else weight.to(dtype)


def unpack_into(buffer: torch.Tensor, qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """The integer values of the stored weight [rows, stored] written into the front of the flat ``buffer``
    (any floating dtype: every value of [-128, 127] is exact in it); returns that part as [rows, in]."""
    rows = qweight.shape[0]
    if bits == 4:
        # Straight into the floating output, one pass per nibble (no stacked int8 copy).
        pairs = buffer[: 2 * qweight.numel()].view(*qweight.shape, 2)
        pairs[..., 0] = qweight >> 4
        pairs[..., 1] = (qweight << 4) >> 4
        return pairs.view(rows, -1)
    values = buffer[: qweight.numel()].view(qweight.shape)
    values.copy_(qweight)
    return values
