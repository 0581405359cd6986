"""The fused Triton INT4 kernels against the pure-PyTorch path, and how a quantized layer chooses between them.

Triton runs on CPU tensors only in its interpreter, which must be switched on (``TRITON_INTERPRET=1``) before
``triton`` is imported. So the Triton side runs once, in a child process with that variable set
(:func:`_triton_side`), and saves its outputs; this process computes the pure path itself and compares. Nothing
here sets ``TRITON_INTERPRET`` in the test process.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chatglm import quantization
from chatglm.quantization import KERNEL_ENV, QuantizedLinear, dequantize_weight, int4_kernel, quantize_weight
from tests.conftest import REPO, glm_ids, random_model

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# name: rows, out features N, in features K, how the Triton side is called. Sizes are not multiples of the tiles.
SHAPES = {
    "one-row": (1, 37, 70, {}),
    "one-row-split-k": (1, 45, 134, {"split_k": 3, "block_k": 32}),
    "three-rows": (3, 29, 62, {}),
    "few-rows": (5, 50, 96, {}),
    "rows": (40, 70, 130, {}),
    "rows-small-tiles": (33, 45, 78, {"config": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32}}),
}
CASES = [f"{shape}-{dtype}" for shape in SHAPES for dtype in DTYPES]
EXACT = (21, 38)  # N, K of the identity-input cases


def _case_inputs(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded packed weight, scale, input and output gradient of one case (the same in both processes)."""
    shape, dtype = name.rsplit("-", 1)
    rows, n, k, _ = SHAPES[shape]
    torch.manual_seed(CASES.index(name))
    qweight, scale = quantize_weight(torch.randn(n, k), 4)
    x = torch.randn(rows, k).to(DTYPES[dtype])
    grad_y = torch.randn(rows, n).to(DTYPES[dtype])
    return qweight, scale, x, grad_y


def _exact_weight() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(100)
    return quantize_weight(torch.randn(*EXACT), 4)


def _layer_and_input() -> tuple[QuantizedLinear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(7)
    layer = QuantizedLinear.from_linear(nn.Linear(46, 30), 4)
    return layer, torch.randn(2, 3, 46), torch.randn(2, 3, 30)


def _model_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([glm_ids([10, 11, 12, 13, 14], [20, 21, 22]), glm_ids([30, 31, 32, 33, 34], [40, 41, 42])])
    labels = ids.clone()
    labels[:, :7] = -100  # loss on the answer only
    return ids, labels


def _model_run(model) -> dict[str, torch.Tensor]:
    """Forward with a loss, the input gradient reaching the embeddings, and a greedy generation."""
    ids, labels = _model_inputs()
    out = model(ids, labels=labels)
    out.loss.backward()
    with torch.no_grad():
        generated = model.generate(ids[:1, :7], max_new_tokens=4, do_sample=False)
    return {"logits": out.logits.detach(), "loss": out.loss.detach(),
            "embedding_grad": model.transformer.word_embeddings.weight.grad.clone(), "generated": generated}


def _triton_side(path: str) -> None:
    """Run every case through the Triton kernels (in the interpreter) and save the results to ``path``."""
    from chatglm import int4_triton

    assert int4_triton.interpreting(), "the child process must run with TRITON_INTERPRET=1"
    results: dict[str, object] = {}
    for name in CASES:
        qweight, scale, x, grad_y = _case_inputs(name)
        options = SHAPES[name.rsplit("-", 1)[0]][3]
        if "split_k" in options:
            y = int4_triton.int4_linear_rows(x, qweight, scale, **options)
        else:
            y = int4_triton.int4_linear(x, qweight, scale, **options)
        grad_x = int4_triton.int4_linear_input_grad(grad_y, qweight, scale, config=options.get("config"))
        results[name] = (y, grad_x)
    qweight, scale = _exact_weight()
    for dtype_name, dtype in DTYPES.items():
        n, k = EXACT
        tiles = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}
        results[f"exact-{dtype_name}"] = (
            int4_triton.int4_linear(torch.eye(k, dtype=dtype), qweight, scale, config=tiles),
            int4_triton.int4_linear_rows(torch.eye(k, dtype=dtype)[:5], qweight, scale, split_k=2, block_k=16),
            int4_triton.int4_linear_input_grad(torch.eye(n, dtype=dtype), qweight, scale, config=tiles),
        )

    # Through the layer and the whole model, with the kernel forced by the environment (set by the parent).
    calls = {"forward": 0, "input_grad": 0}
    forward, input_grad = int4_triton.int4_linear, int4_triton.int4_linear_input_grad

    def counted_forward(*args, **kwargs):
        calls["forward"] += 1
        return forward(*args, **kwargs)

    def counted_input_grad(*args, **kwargs):
        calls["input_grad"] += 1
        return input_grad(*args, **kwargs)

    int4_triton.int4_linear, int4_triton.int4_linear_input_grad = counted_forward, counted_input_grad
    layer, x, grad_y = _layer_and_input()
    x.requires_grad_(True)
    out = layer(x)
    out.backward(grad_y)
    results["layer"] = (out.detach(), x.grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        results["layer-autocast"] = layer(x).detach()
    calls.update(forward=0, input_grad=0)
    results["model"] = _model_run(random_model(seed=3, bits=4))
    results["model_calls"] = dict(calls)
    results["benchmark"] = int4_triton.benchmark_shapes(device="cpu", dtype=torch.float32, rows=(1, 20), repeats=1,
                                                        shapes={"tiny": (48, 64)})
    torch.save(results, path)


@pytest.fixture(autouse=True)
def automatic_kernel(monkeypatch):
    """This process computes the pure path: no kernel forced from outside unless a test sets one."""
    monkeypatch.delenv(KERNEL_ENV, raising=False)


@pytest.fixture(scope="module")
def triton_results(tmp_path_factory) -> dict[str, object]:
    if importlib.util.find_spec("triton") is None:
        pytest.fail("triton is not installed: it is a test dependency (pip install -e '.[test]', Linux wheels)")
    path = tmp_path_factory.mktemp("int4_triton") / "results.pt"
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TRITON_INTERPRET": "1", KERNEL_ENV: "triton", "PYTHONPATH": python_path}
    code = f"from tests.chatglm.test_int4_triton import _triton_side; _triton_side({str(path)!r})"
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"the Triton interpreter run failed:\n{run.stdout}\n{run.stderr}"
    return torch.load(path)


def _tolerance(dtype: torch.dtype) -> float:
    """About one rounding of the result: both paths round the same dtype weights once, only fp32 sums differ."""
    return {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    tol = _tolerance(expected.dtype)
    scale = expected.float().abs().max().item()
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("name", CASES)
def test_kernels_match_pure_path(triton_results, name):
    qweight, scale, x, grad_y = _case_inputs(name)
    weight = dequantize_weight(qweight, scale, 4, x.dtype)
    y, grad_x = triton_results[name]
    _assert_close(y, F.linear(x, weight))
    _assert_close(grad_x, grad_y @ weight)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_kernels_dequantize_exactly_like_pure_path(triton_results, dtype_name):
    # An identity input picks single weights out of the sums, so any rounding difference in the unpacked and
    # scaled weight (nibble order, sign extension, scale rounding) shows up bit for bit.
    qweight, scale = _exact_weight()
    weight = dequantize_weight(qweight, scale, 4, DTYPES[dtype_name])
    columns, first_rows, rows = triton_results[f"exact-{dtype_name}"]
    assert torch.equal(columns, weight.T)
    assert torch.equal(first_rows, weight.T[:5])
    assert torch.equal(rows, weight)


def test_quantized_linear_forced_to_triton_matches_pure_path(triton_results):
    layer, x, grad_y = _layer_and_input()
    x.requires_grad_(True)
    out = layer(x)
    out.backward(grad_y)
    y, grad_x = triton_results["layer"]
    _assert_close(y, out.detach())
    _assert_close(grad_x, x.grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # F.linear computes in bf16; the Triton path casts to match
        _assert_close(triton_results["layer-autocast"], layer(x).detach())


def test_model_forward_backward_generate_match_pure_path(triton_results):
    triton_run = triton_results["model"]
    pure_run = _model_run(random_model(seed=3, bits=4))
    assert (triton_run["logits"] - pure_run["logits"]).abs().max() <= 1e-4
    assert abs(triton_run["loss"].item() - pure_run["loss"].item()) <= 1e-5
    assert (triton_run["embedding_grad"] - pure_run["embedding_grad"]).abs().max() <= 1e-5
    assert torch.equal(triton_run["generated"], pure_run["generated"])
    # all 12 quantized layers (3 blocks x 4) ran on Triton: the forward, the backward, and each generation step
    calls = triton_results["model_calls"]
    assert calls["input_grad"] == 12 and calls["forward"] >= 12 * 3


def test_benchmark_dry_run_compares_both_paths(triton_results):
    rows = triton_results["benchmark"]
    assert [(r["rows"], r["pass"]) for r in rows] == [(1, "forward"), (1, "input_grad"), (20, "forward"),
                                                     (20, "input_grad")]
    assert all(r["torch_ms"] > 0 and r["triton_ms"] > 0 and r["max_abs_diff"] <= 1e-5 for r in rows)


@pytest.fixture
def no_triton_load(monkeypatch):
    def fail():
        raise AssertionError("the Triton kernels were loaded")

    monkeypatch.setattr(quantization, "_triton_kernels", fail)


def test_cpu_default_is_pure_path_without_loading_triton(no_triton_load):
    assert int4_kernel(4, "cpu", torch.float16) == "torch"
    layer, x, _ = _layer_and_input()
    assert torch.equal(layer(x), F.linear(x, layer.dequantized_weight(torch.float32), layer.bias))


def test_cuda_default_is_triton_when_it_loads(monkeypatch):
    assert int4_kernel(4, "cuda", torch.bfloat16) == "triton"  # triton is a test dependency
    monkeypatch.setattr(quantization, "_triton_kernels", lambda: ImportError("No module named 'triton'"))
    assert int4_kernel(4, "cuda", torch.bfloat16) == "torch"


def test_env_forces_pure_path(monkeypatch, no_triton_load):
    monkeypatch.setenv(KERNEL_ENV, "torch")
    assert int4_kernel(4, "cuda", torch.float16) == "torch"


def test_int8_and_other_dtypes_stay_on_pure_path(monkeypatch, no_triton_load):
    monkeypatch.setenv(KERNEL_ENV, "triton")
    assert int4_kernel(8, "cuda", torch.float16) == "torch"
    assert int4_kernel(4, "cuda", torch.float64) == "torch"


def test_forcing_triton_without_triton_is_an_error(monkeypatch):
    monkeypatch.setenv(KERNEL_ENV, "triton")
    monkeypatch.setattr(quantization, "_triton_kernels", lambda: ImportError("No module named 'triton'"))
    with pytest.raises(RuntimeError, match="pip install triton"):
        int4_kernel(4, "cuda", torch.float16)


def test_forcing_triton_on_cpu_outside_the_interpreter_is_an_error(monkeypatch):
    from chatglm import int4_triton

    monkeypatch.setenv(KERNEL_ENV, "triton")
    monkeypatch.setattr(int4_triton, "interpreting", lambda: False)
    assert int4_kernel(4, "cuda", torch.float16) == "triton"
    layer, x, _ = _layer_and_input()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        layer(x)


def test_unknown_kernel_name_is_an_error(monkeypatch):
    monkeypatch.setenv(KERNEL_ENV, "cuda")
    with pytest.raises(ValueError, match=f"{KERNEL_ENV}='cuda'"):
        int4_kernel(4, "cpu", torch.float32)


# kernel, GPU (compute capability), dtype: the T4 of free Colab (sm 75, no bf16), the A100 (80), the H100/H200 (90)
GPU_TARGETS = [("forward", 75, "fp16"), ("input_grad", 80, "bf16"), ("rows", 90, "fp16")]


@pytest.mark.parametrize("kernel_name, capability, dtype", GPU_TARGETS)
def test_kernels_compile_for_gpus(monkeypatch, tmp_path, kernel_name, capability, dtype):
    # The interpreter checks the arithmetic; this checks that the same kernels, with the tiles used for 2048 rows
    # (or 1 row), lower to machine code for a real GPU (Triton compiles ahead of time without one) and fit the
    # T4's 64 KiB of shared memory per block.
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from chatglm import int4_triton

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    gemm = int4_triton._gemm_config(2048, DTYPES[dtype])
    kernel, pointers, constants = {
        "forward": (int4_triton._int4_linear_kernel, {"x_ptr": dtype, "y_ptr": dtype},
                    {**gemm, "EMULATE_BF16": False, "PRECISION": "ieee"}),
        "input_grad": (int4_triton._int4_input_grad_kernel, {"g_ptr": dtype, "gx_ptr": dtype},
                       {"BLOCK_M": gemm["BLOCK_M"], "BLOCK_N": gemm["BLOCK_K"], "BLOCK_K": gemm["BLOCK_N"],
                        "EMULATE_BF16": False, "PRECISION": "ieee"}),
        "rows": (int4_triton._int4_rows_kernel, {"x_ptr": dtype, "part_ptr": "fp32"},
                 {"BLOCK_M": 1, "BLOCK_N": 64, "BLOCK_K": 128, "EMULATE_BF16": False}),
    }[kernel_name]
    types = {**{name: f"*{t}" for name, t in pointers.items()}, "w_ptr": "*i8", "s_ptr": "*fp16",
             **{name: "constexpr" for name in constants}}
    signature = {name: types.get(name, "i32") for name in kernel.arg_names}  # the rest are sizes
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
    options = {"num_warps": 8 if constants["BLOCK_M"] == 128 else 4, "num_stages": 2 if capability < 80 else 3,
               "enable_fp_fusion": True}
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)
    assert compiled.asm["cubin"]
    assert compiled.metadata.shared <= 64 * 1024
