"""The quantized linear layer against a dense one of the same shape, and eager attention against SDPA."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from chatglm.quantization import QuantizedLinear

from .common import median, timed

# (in, out) of the four quantized matrices of a ChatGLM-6B layer
SHAPES_6B = {"query_key_value": (4096, 12288), "dense": (4096, 4096), "dense_h_to_4h": (4096, 16384),
             "dense_4h_to_h": (16384, 4096)}


def bench_int4(tokens: int, device: str, dtype: torch.dtype, bits: int = 4, repeat: int = 10) -> list[dict]:
    """Forward and forward+backward (input gradient) time: unpack-on-the-fly INT4 vs a dense weight."""
    results = []
    for name, (inp, out) in SHAPES_6B.items():
        dense_weight = torch.randn(out, inp, device=device, dtype=torch.float32) * 0.02
        linear = torch.nn.Linear(inp, out, device=device, dtype=torch.float32)
        linear.weight.data.copy_(dense_weight)
        quantized = QuantizedLinear.from_linear(linear, bits).to(dtype)
        weight = quantized.dequantized_weight(dtype)  # the dense baseline uses the same values
        bias = quantized.bias
        x = torch.randn(tokens, inp, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(tokens, out, device=device, dtype=dtype)

        def ours_forward():
            with torch.no_grad():
                quantized(x)

        def dense_forward():
            with torch.no_grad():
                F.linear(x, weight, bias)

        def ours_both():
            quantized(x).backward(grad)
            x.grad = None

        def dense_both():
            F.linear(x, weight, bias).backward(grad)
            x.grad = None

        row = {"layer": name, "shape": f"{inp}x{out}", "tokens": tokens}
        for key, fn in (("int4_fwd", ours_forward), ("dense_fwd", dense_forward), ("int4_fwd_bwd", ours_both),
                        ("dense_fwd_bwd", dense_both)):
            row[key] = median(timed(fn, device, repeat))
        row["weight_bytes_int4"] = quantized.weight.numel() + 2 * quantized.weight_scale.numel()
        row["weight_bytes_dense"] = weight.numel() * weight.element_size()
        results.append(row)
    return results


def format_int4(row: dict) -> str:
    return (f"{row['layer']:16s} {row['shape']:>11s} x{row['tokens']:5d}  fwd {1e3 * row['int4_fwd']:8.2f} ms vs "
            f"dense {1e3 * row['dense_fwd']:8.2f} ms ({row['int4_fwd'] / row['dense_fwd']:.2f}x)   fwd+bwd "
            f"{1e3 * row['int4_fwd_bwd']:8.2f} ms vs {1e3 * row['dense_fwd_bwd']:8.2f} ms "
            f"({row['int4_fwd_bwd'] / row['dense_fwd_bwd']:.2f}x)   "
            f"weight {row['weight_bytes_int4'] / 2**20:.0f} MiB vs "
            f"{row['weight_bytes_dense'] / 2**20:.0f} MiB")
