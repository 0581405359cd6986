"""Fused INT4 kernels in Triton: unpack + scale + matmul in one pass over the packed weight.

The weight is the public checkpoint format of :mod:`chatglm.weight_format`: int8 bytes ``[N, K // 2]`` holding two
int4 values each (the even input index in the high nibble) and one fp16 scale per output row ``[N]``. Three kernels:

- :func:`int4_linear` (forward, any number of rows): ``y[M, N] = x[M, K] @ W.T``, tiled like a GEMM;
- :func:`int4_linear_rows` (forward for decoding, a few rows): every program reads its slice of the packed weight
  once for all rows, with the input dimension optionally split over programs (``split_k``);
- :func:`int4_linear_input_grad` (backward): ``grad_x[M, K] = grad_y[M, N] @ W``.

Rounding follows the pure path: each weight is dequantized as ``q * scale`` (exact in fp32) and rounded once to
the input's dtype, exactly as :func:`chatglm.weight_format.dequantize_weight` does, then multiplied with fp32
accumulation and rounded once to the input's dtype at the end. The only difference is the order of the fp32 sums
(tiles, K slices, fused multiply-adds). In the interpreter (the tests) bf16 tiles enter ``tl.dot`` as fp32 (its bf16
dot is wrong there; the products are exact either way) and fp32 -> bf16 is rounded by hand (it truncates there).
fp32 inputs use ``tl.dot`` in IEEE fp32 unless ``torch.set_float32_matmul_precision`` allows TF32, as for the pure
path's ``F.linear`` on CUDA. fp16, bf16 and fp32 inputs are supported; INT8 layers stay on the pure path.

Importing this module imports ``triton``. The kernels run on CUDA tensors, or on CPU tensors in Triton's interpreter
(``TRITON_INTERPRET=1`` set before ``triton`` is first imported), which is how the tests check them.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from .weight_format import dequantize_weight

OLDEST_TRITON = (3, 4)  # the oldest release tested (the `test` extra of pyproject.toml pins the range)
if tuple(int(part) for part in triton.__version__.split(".")[:2]) < OLDEST_TRITON:
    raise ImportError(f"the fused INT4 kernels need triton >= {'.'.join(map(str, OLDEST_TRITON))}, "
                      f"found {triton.__version__}")

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DECODE_MAX_ROWS = 8  # up to this many rows the forward uses the row kernel, which streams the weight once

try:  # the interpreter's own class is the ground truth for whether our kernels were built for it
    from triton.runtime.interpreter import InterpretedFunction as _Interpreted
except ImportError:  # pragma: no cover - layout of older triton releases
    _Interpreted = None


@triton.jit
def _unpack_int4(packed, BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """int8 bytes [rows, BLOCK_K // 2] -> sign-extended int32 values [rows, BLOCK_K] (high nibble first)."""
    b = packed.to(tl.int32)
    high = b >> 4  # arithmetic shift keeps the sign of the high nibble
    low = (b << 28) >> 28  # the low nibble moved to the top, then shifted back with sign extension
    return tl.reshape(tl.join(high, low), (BLOCK_ROWS, BLOCK_K))


@triton.jit
def _round_to(v, DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """fp32 -> DTYPE, rounding to nearest even. The interpreter truncates fp32 -> bf16, so there it is done by hand."""
    if EMULATE_BF16:
        bits = v.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # round the 16 low bits away, ties to even
        return bits.to(tl.float32, bitcast=True).to(DTYPE)  # now exact
    else:
        return v.to(DTYPE)


@triton.jit
def _dequantized_tile(w_ptr, s_ptr, rows, half_cols, N, half_k, half_end, DTYPE: tl.constexpr,
                      BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """The weight tile W[rows, 2 * half_cols (+1)] in DTYPE, rounded once from the exact ``q * scale``.

    ``half_k`` is the row stride of the packed bytes, ``half_end`` the first byte column not to read.
    """
    mask = (rows < N)[:, None] & (half_cols < half_end)[None, :]
    packed = tl.load(w_ptr + rows[:, None] * half_k + half_cols[None, :], mask=mask, other=0)
    scale = tl.load(s_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
    q = _unpack_int4(packed, BLOCK_ROWS, BLOCK_K).to(tl.float32)
    return _round_to(q * scale[:, None], DTYPE, EMULATE_BF16)


@triton.jit
def _int4_linear_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, half_k,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        EMULATE_BF16: tl.constexpr, PRECISION: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of y = x @ W.T, looping over K."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rj = tl.arange(0, BLOCK_K // 2)
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * K + kk[None, :], mask=(rm < M)[:, None] & (kk < K)[None, :], other=0.0)
        w = _dequantized_tile(w_ptr, s_ptr, rn, k0 // 2 + rj, N, half_k, half_k, dtype, BLOCK_N, BLOCK_K, EMULATE_BF16)
        if EMULATE_BF16:  # the interpreter's bf16 dot is wrong; fp32 operands give the same exact products
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], _round_to(acc, dtype, EMULATE_BF16), mask=mask)


@triton.jit
def _int4_rows_kernel(x_ptr, w_ptr, s_ptr, part_ptr, M, N, K, half_k, k_per_split, tiles_per_split,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      EMULATE_BF16: tl.constexpr):
    """fp32 partial sums over one K slice of y[:, rows] for all (at most BLOCK_M) rows of x; reads W once."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rj = tl.arange(0, BLOCK_K // 2)
    dtype = x_ptr.dtype.element_ty
    k_start = pid_s * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # loop bounds straight from the arguments: older interpreters cannot loop up to a computed value
    for tile in range(0, tiles_per_split):
        k0 = k_start + tile * BLOCK_K
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * K + kk[None, :], mask=(rm < M)[:, None] & (kk < k_end)[None, :], other=0.0)
        w = _dequantized_tile(w_ptr, s_ptr, rn, k0 // 2 + rj, N, half_k, k_end // 2, dtype, BLOCK_N, BLOCK_K,
                              EMULATE_BF16)
        # products of two fp16/bf16 values are exact in fp32, as on the tensor cores
        acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(part_ptr + pid_s * M * N + rm[:, None] * N + rn[None, :], acc, mask=mask)


@triton.jit
def _int4_input_grad_kernel(g_ptr, w_ptr, s_ptr, gx_ptr, M, N, K, half_k,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            EMULATE_BF16: tl.constexpr, PRECISION: tl.constexpr):
    """One [BLOCK_M, BLOCK_K] tile of grad_x = grad_y @ W, looping over N."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rj = pid_k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    rn0 = tl.arange(0, BLOCK_N)
    dtype = g_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + rn0
        g = tl.load(g_ptr + rm[:, None] * N + rn[None, :], mask=(rm < M)[:, None] & (rn < N)[None, :], other=0.0)
        w = _dequantized_tile(w_ptr, s_ptr, rn, rj, N, half_k, half_k, dtype, BLOCK_N, BLOCK_K, EMULATE_BF16)
        if EMULATE_BF16:
            g = g.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(g, w, acc, input_precision=PRECISION)
    mask = (rm < M)[:, None] & (rk < K)[None, :]
    tl.store(gx_ptr + rm[:, None] * K + rk[None, :], _round_to(acc, dtype, EMULATE_BF16), mask=mask)


def interpreting() -> bool:
    """Whether this module's kernels were built for Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    if _Interpreted is not None:
        return isinstance(_int4_linear_kernel, _Interpreted)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")  # pragma: no cover


def _check(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, k_dim: int, what: str) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the Triton INT4 kernels take fp16/bf16/fp32 {what}, got {x.dtype}")
    if qweight.dtype != torch.int8 or qweight.dim() != 2 or scale.shape != (qweight.shape[0],):
        raise ValueError(f"expected int8 packed weight [N, K/2] and scale [N], got {tuple(qweight.shape)} "
                         f"{qweight.dtype} and {tuple(scale.shape)}")
    if x.shape[-1] != k_dim:
        raise ValueError(f"{what} has {x.shape[-1]} features, the layer expects {k_dim}")
    if x.device.type != "cuda" and not interpreting():
        raise RuntimeError(f"the Triton INT4 kernels run on CUDA tensors (got {x.device}); on the CPU set "
                           "TRITON_INTERPRET=1 before importing triton, or use CHATGLM_INT4_KERNEL=torch")


def _emulate_bf16(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and interpreting()


def _precision(dtype: torch.dtype) -> str:
    tf32 = dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"
    return "tf32" if tf32 else "ieee"


def _gemm_config(rows: int, dtype: torch.dtype) -> dict[str, int]:
    """Tile sizes by the number of rows (not tuned on a GPU yet: see :func:`benchmark_shapes`).

    Few rows get narrow output tiles so that more programs share the weight; fp32 tiles use a shorter K so the
    pipeline fits in shared memory.
    """
    block_m = min(128, max(16, triton.next_power_of_2(rows)))
    block_n = 128 if block_m >= 64 else (32 if block_m == 16 else 64)
    block_k = 32 if dtype == torch.float32 else 64
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)


def _on_device(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on the tensor's own GPU (Triton launches on the current device; layers may sit on several GPUs)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _launch_options(x: torch.Tensor, block_m: int, block_n: int) -> dict[str, object]:
    if interpreting():
        return {}
    stages = 3 if torch.cuda.get_device_capability(x.device)[0] >= 8 else 2
    # fp fusion (FMA) stated explicitly: Triton 3.9 warns that its default changes in 3.10
    return dict(num_warps=8 if block_m * block_n >= 128 * 128 else 4, num_stages=stages, enable_fp_fusion=True)


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                config: dict[str, int] | None = None) -> torch.Tensor:
    """``x[..., K] @ W.T`` for the packed INT4 weight ``qweight [N, K/2]`` and ``scale [N]``; result in x's dtype.

    Few rows (at most ``DECODE_MAX_ROWS``) go to :func:`int4_linear_rows`; ``config`` overrides the tile sizes
    (``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K``; the tests use small tiles to cover several programs).
    """
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    _check(x, qweight, scale, k, "input")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    if m <= DECODE_MAX_ROWS and config is None:
        return int4_linear_rows(x, qweight, scale)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y.reshape(*lead, n)
    cfg = config or _gemm_config(m, x.dtype)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    with _on_device(x):
        _int4_linear_kernel[grid](x2, qweight, scale, y, m, n, k, k // 2, **cfg, EMULATE_BF16=_emulate_bf16(x.dtype),
                                  PRECISION=_precision(x.dtype), **_launch_options(x, cfg["BLOCK_M"], cfg["BLOCK_N"]))
    return y.reshape(*lead, n)


def _rows_split(n_blocks: int, k: int, block_k: int, device: torch.device) -> int:
    """Split K so that there are about four programs per multiprocessor, keeping at least 4 tiles per split."""
    if device.type != "cuda":
        return 1
    programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    most = max(1, k // (4 * block_k))
    return max(1, min(most, triton.cdiv(programs, n_blocks)))


def int4_linear_rows(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, split_k: int | None = None,
                     block_n: int | None = None, block_k: int | None = None) -> torch.Tensor:
    """``x @ W.T`` for a few rows (decoding): each program streams its slice of the packed weight once.

    ``split_k`` programs share each block of output rows, each summing a slice of K into an fp32 partial; the
    partials are added in fp32 and rounded once to x's dtype. By default it is chosen from the GPU's size.
    """
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    _check(x, qweight, scale, k, "input")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    if m > DECODE_MAX_ROWS:
        raise ValueError(f"int4_linear_rows takes at most {DECODE_MAX_ROWS} rows, got {m}; use int4_linear")
    if m == 0 or n == 0:
        return torch.empty(*lead, n, dtype=x.dtype, device=x.device)
    block_m = triton.next_power_of_2(m)
    # keep BLOCK_M * BLOCK_N * BLOCK_K at 8192 values: 64 fp32 registers a thread with 4 warps
    block_n = block_n or (64 if block_m <= 2 else 32)
    block_k = block_k or max(32, 8192 // (block_m * block_n))
    n_blocks = triton.cdiv(n, block_n)
    split = split_k or _rows_split(n_blocks, k, block_k, x.device)
    k_per_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k  # whole tiles, so nibble pairs stay whole
    split = triton.cdiv(k, k_per_split)
    partial = torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    options = {} if interpreting() else dict(num_warps=4, enable_fp_fusion=True)
    with _on_device(x):
        _int4_rows_kernel[(n_blocks, split)](x2, qweight, scale, partial, m, n, k, k // 2, k_per_split,
                                             k_per_split // block_k, BLOCK_M=block_m, BLOCK_N=block_n,
                                             BLOCK_K=block_k, EMULATE_BF16=_emulate_bf16(x.dtype), **options)
    y = partial[0] if split == 1 else partial.sum(0)
    return y.to(x.dtype).reshape(*lead, n)


def int4_linear_input_grad(grad_y: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                           config: dict[str, int] | None = None) -> torch.Tensor:
    """``grad_y[..., N] @ W`` for the packed INT4 weight: the gradient of :func:`int4_linear` for its input."""
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    _check(grad_y, qweight, scale, n, "output gradient")
    lead = grad_y.shape[:-1]
    g2 = grad_y.reshape(-1, n).contiguous()
    m = g2.shape[0]
    gx = torch.empty(m, k, dtype=grad_y.dtype, device=grad_y.device)
    if m == 0 or k == 0:
        return gx.reshape(*lead, k)
    cfg = config or _gemm_config(m, grad_y.dtype)
    if config is None:  # here the output tiles run over K and the loop over N
        cfg = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_K"], BLOCK_K=cfg["BLOCK_N"])
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(k, cfg["BLOCK_K"]))
    with _on_device(grad_y):
        _int4_input_grad_kernel[grid](g2, qweight, scale, gx, m, n, k, k // 2, **cfg,
                                      EMULATE_BF16=_emulate_bf16(grad_y.dtype), PRECISION=_precision(grad_y.dtype),
                                      **_launch_options(grad_y, cfg["BLOCK_M"], cfg["BLOCK_K"]))
    return gx.reshape(*lead, k)


CHATGLM_6B_SHAPES = {"query_key_value": (12288, 4096), "dense": (4096, 4096), "dense_h_to_4h": (16384, 4096),
                     "dense_4h_to_h": (4096, 16384)}  # layer: (out features N, in features K)


def benchmark_shapes(device: str = "cuda", dtype: torch.dtype = torch.float16, rows: tuple[int, ...] = (1, 16, 2048),
                     repeats: int = 20, shapes: dict[str, tuple[int, int]] | None = None) -> list[dict[str, object]]:
    """Time the pure and the Triton INT4 paths per layer shape (ChatGLM-6B's by default): forward and input gradient.

    One dict per (layer, rows, pass) with milliseconds per call on each path, their ratio and the largest
    difference between the two results. On a GPU:
    ``python -c "from chatglm.int4_triton import benchmark_shapes as b; print(*b(), sep='\\n')"``; on the CPU it
    runs only in the interpreter (``TRITON_INTERPRET=1``, small ``shapes``), as a dry run of this function.
    """
    import time

    gen = torch.Generator(device=device).manual_seed(0)
    cuda = torch.device(device).type == "cuda"
    results: list[dict[str, object]] = []

    def timed(fn) -> tuple[float, torch.Tensor]:
        out = fn()  # warm-up (and the compile)
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        if cuda:
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) * 1000 / repeats, out

    for name, (n, k) in (shapes or CHATGLM_6B_SHAPES).items():
        qweight = torch.randint(-128, 128, (n, k // 2), dtype=torch.int8, device=device, generator=gen)
        scale = (torch.rand(n, device=device, generator=gen) * 0.01 + 1e-3).half()
        for m in rows:
            x = torch.randn(m, k, device=device, generator=gen).to(dtype)
            g = torch.randn(m, n, device=device, generator=gen).to(dtype)
            passes = {
                "forward": (lambda: x @ dequantize_weight(qweight, scale, 4, dtype).T,
                            lambda: int4_linear(x, qweight, scale)),
                "input_grad": (lambda: g @ dequantize_weight(qweight, scale, 4, dtype),
                               lambda: int4_linear_input_grad(g, qweight, scale)),
            }
            for pass_name, (pure, fused) in passes.items():
                (pure_ms, expected), (triton_ms, actual) = timed(pure), timed(fused)
                results.append({"layer": name, "n": n, "k": k, "rows": m, "pass": pass_name,
                                "torch_ms": round(pure_ms, 4), "triton_ms": round(triton_ms, 4),
                                "speedup": round(pure_ms / triton_ms, 2),
                                "max_abs_diff": (actual.float() - expected.float()).abs().max().item()})
    return results
