"""The CPU fast path of quantized layers: PyTorch's packed int4/int8 kernels for bf16, and the streamed pure path.

Tolerances. A packed kernel computes ``x @ (q * bf16(scale)).T`` with exact products, fp32 sums and one rounding to
bf16, then the bias is added in bf16 (a second rounding). So against the exact result it may differ by fp32 summing
(``K * 2**-24`` of the sum of absolute products) plus two bf16 roundings (``2**-8`` of the value each):
:func:`kernel_bound`. The pure bf16 path also rounds each weight to bf16 first: :func:`pure_bound` adds ``2**-8`` of
the sum of absolute products for that.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn

from chatglm import quantization
from chatglm.lora import lora_config
from chatglm.quantization import (
    CPU_KERNEL_MAX_ROWS,
    KERNEL_ENV,
    QuantizedLinear,
    dequantize_weight,
    explain_kernel,
    kernel_report,
)
from tests.conftest import glm_ids, random_model

BF16 = torch.bfloat16
# (in_features, out_features) that fit each kernel: INT4 needs out % 16 == 0 and in % 32 == 0 (groups of 256, 32)
FITTING = {4: [(256, 192), (96, 48)], 8: [(256, 192), (48, 20)]}
UNFIT = {4: [(80, 48), (64, 40)], 8: [(40, 24)]}  # in % 32, out % 16; in % 16


@pytest.fixture(autouse=True)
def automatic_kernel(monkeypatch):
    monkeypatch.delenv(KERNEL_ENV, raising=False)


@pytest.fixture
def kernel_calls(monkeypatch) -> list[int]:
    """Counts the calls of the packed kernels (one entry per call: the number of rows)."""
    assert quantization.cpu_kernel_problem(4) is None and quantization.cpu_kernel_problem(8) is None  # self-checks
    calls: list[int] = []
    real = quantization._cpu_packed_linear

    def spy(x, packed, bits):
        calls.append(x.numel() // x.shape[-1])
        return real(x, packed, bits)

    monkeypatch.setattr(quantization, "_cpu_packed_linear", spy)
    return calls


def make_layer(bits: int, in_features: int, out_features: int, seed: int = 0, dtype=BF16) -> QuantizedLinear:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features)
    with torch.no_grad():
        linear.bias.mul_(10)  # a bias as large as the products, so adding it in bf16 matters
    return QuantizedLinear.from_linear(linear, bits).to(dtype)


def weight64(layer: QuantizedLinear, scale: torch.Tensor | None = None) -> torch.Tensor:
    scale = layer.weight_scale if scale is None else scale
    return dequantize_weight(layer.weight, scale, layer.bits, torch.float64)


def exact(layer: QuantizedLinear, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    return x.double() @ weight64(layer, scale).T + layer.bias.double()


def kernel_bound(layer: QuantizedLinear, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    w = weight64(layer, scale)
    product = x.double() @ w.T
    abs_sum = x.double().abs() @ w.abs().T
    return 2**-8 * 1.01 * (product.abs() + (product + layer.bias.double()).abs()) + w.shape[1] * 2**-24 * abs_sum


def pure_bound(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    return kernel_bound(layer, x) + 2**-8 * (x.double().abs() @ weight64(layer).abs().T)


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor) -> None:
    error = (actual.double() - expected).abs()
    worst = (error - bound).argmax()
    assert (error <= bound).all(), (f"error {error.flatten()[worst]:.3g} where the bound is "
                                    f"{bound.flatten()[worst]:.3g}")


def pure_output(layer: QuantizedLinear, x: torch.Tensor, monkeypatch) -> torch.Tensor:
    with monkeypatch.context() as patch, torch.no_grad():
        patch.setenv(KERNEL_ENV, "torch")
        return layer(x)


# ------------------------------------------------------------------------------------------------ results


@pytest.mark.parametrize("rows", [1, 3, 64])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape_index", [0, 1])
def test_fast_forward_within_the_kernel_bound_of_exact(bits, shape_index, rows, kernel_calls, monkeypatch):
    in_features, out_features = FITTING[bits][shape_index]
    layer = make_layer(bits, in_features, out_features, seed=rows)
    assert layer.kernel() == f"cpu-int{bits}pack"
    x = torch.randn(rows, in_features).to(BF16)
    with torch.no_grad():
        out = layer(x)
    assert out.dtype == BF16 and out.shape == (rows, out_features)
    if rows <= CPU_KERNEL_MAX_ROWS[bits]:
        assert kernel_calls == [rows]
        assert_within(out, exact(layer, x), kernel_bound(layer, x))
    else:  # more rows: the streamed pure path, the same numbers as forcing it
        assert kernel_calls == []
        assert torch.equal(out, pure_output(layer, x, monkeypatch))
        assert_within(out, exact(layer, x), pure_bound(layer, x))


@pytest.mark.parametrize("bits", [4, 8])
def test_kernel_serves_up_to_its_row_limit_then_the_pure_path(bits, kernel_calls, monkeypatch):
    in_features, out_features = FITTING[bits][0]
    layer = make_layer(bits, in_features, out_features)
    limit = CPU_KERNEL_MAX_ROWS[bits]
    for rows in (limit, limit + 1):
        x = torch.randn(1, rows, in_features).to(BF16)
        with torch.no_grad():
            out = layer(x)
        assert out.shape == (1, rows, out_features)
        if rows > limit:
            assert torch.equal(out, pure_output(layer, x, monkeypatch))
    assert kernel_calls == [limit]


@pytest.mark.parametrize("bits", [4, 8])
def test_fp32_inputs_keep_the_exact_path(bits, kernel_calls):
    layer = make_layer(bits, *FITTING[bits][0], dtype=torch.float32)
    assert layer.explain_kernel() == ("torch", "exact")
    x = torch.randn(2, FITTING[bits][0][0])
    with torch.no_grad():
        out = layer(x)
    assert torch.equal(out, F.linear(x, layer.dequantized_weight(torch.float32)) + layer.bias)
    assert kernel_calls == [] and layer._packed is None


@pytest.mark.parametrize("bits", [4, 8])
def test_bf16_autocast_takes_the_kernel_with_the_scale_rounded_to_bf16(bits, kernel_calls):
    layer = make_layer(bits, *FITTING[bits][0], dtype=torch.float32)  # fp16 scales held in fp32
    x = torch.randn(3, FITTING[bits][0][0])
    with torch.autocast("cpu", dtype=BF16), torch.no_grad():
        out = layer(x)
    assert kernel_calls == [3]
    x16, scale16 = x.to(BF16), layer.weight_scale.to(BF16)
    # the bias is added in fp32 here (bf16 product + fp32 bias), so one bf16 rounding less than the bound allows
    assert_within(out, exact(layer, x16, scale16), kernel_bound(layer, x16, scale16))


@pytest.mark.parametrize("bits", [4, 8])
def test_training_streams_forward_and_input_gradient_in_blocks(bits, kernel_calls, monkeypatch):
    # A small block budget: the forward runs 10 blocks of output rows, the backward 3 blocks of input columns.
    monkeypatch.setattr(quantization, "STREAM_ELEMENTS", 2048)
    layer = make_layer(bits, 384, 48)
    torch.manual_seed(1)
    x = torch.randn(2, 5, 384).to(BF16).requires_grad_(True)
    grad_y = torch.randn(2, 5, 48).to(BF16)
    out = layer(x)
    out.backward(grad_y)
    assert kernel_calls == [] and layer._packed is None  # training never makes the repacked copy
    assert_within(out.detach(), exact(layer, x.detach()), pure_bound(layer, x.detach()))
    w = weight64(layer)
    expected = grad_y.double() @ w
    abs_sum = grad_y.double().abs() @ w.abs()
    # weights and result rounded to bf16 once each, fp32 sums over the 48 output rows
    bound = 2**-8 * 1.01 * (abs_sum + expected.abs()) + 48 * 2**-24 * abs_sum
    assert_within(x.grad, expected, bound)
    # the same as one unstreamed block
    monkeypatch.setattr(quantization, "STREAM_ELEMENTS", 1 << 30)
    x_ref = x.detach().clone().requires_grad_(True)
    reference = layer(x_ref)
    reference.backward(grad_y)
    assert_within(out.detach(), reference.double(), 2**-7 * reference.double().abs() + 1e-6)
    assert_within(x.grad, x_ref.grad.double(), 2**-7 * x_ref.grad.double().abs() + 1e-6)


@pytest.mark.parametrize("bits", [4, 8])
def test_streamed_fp32_path_equals_the_whole_matrix(bits, monkeypatch):
    monkeypatch.setattr(quantization, "STREAM_ELEMENTS", 2048)
    layer = make_layer(bits, 384, 48, dtype=torch.float32)
    x = torch.randn(4, 384, requires_grad=True)
    out = layer(x)
    out.backward(torch.ones_like(out))
    weight = layer.dequantized_weight(torch.float32)
    torch.testing.assert_close(out, F.linear(x, weight) + layer.bias, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(x.grad, torch.ones_like(out) @ weight, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("scale_dtype", [BF16, torch.float16])  # after .to(bf16); after from_pretrained(dtype=bf16)
def test_streamed_bf16_blocks_round_like_dequantize_weight(scale_dtype):
    layer = make_layer(4, 96, 48, dtype=torch.float32)
    scale = layer.weight_scale.to(scale_dtype)
    buffers = quantization._stream_buffers(scale, BF16, 48 * 96)
    assert (buffers[1] is None) == (scale_dtype == BF16)  # an fp16 scale takes the exact product in fp32 first
    block = quantization._dequantize_block(layer.weight, scale, 4, BF16, buffers)
    assert block.data_ptr() == buffers[0].data_ptr()  # written into the reused buffer
    assert torch.equal(block, dequantize_weight(layer.weight, scale, 4, BF16))


def test_misaligned_input_and_weight_for_the_int8_kernel():
    # The int8 kernel reads rows with aligned vector loads: views that start 2 bytes in must be copied first.
    layer = make_layer(8, 64, 32)
    x = torch.randn(3, 64).to(BF16)
    with torch.no_grad():
        aligned = layer(x)
        storage = torch.empty(3 * 64 + 1, dtype=BF16)
        shifted = storage[1:].view(3, 64)
        shifted.copy_(x)
        assert shifted.data_ptr() % 64 != 0
        assert torch.equal(layer(shifted), aligned)
        weights = torch.empty(32 * 64 + 1, dtype=torch.int8)
        weights[1:].copy_(layer.weight.flatten())
        layer.weight = nn.Parameter(weights[1:].view(32, 64), requires_grad=False)
        assert torch.equal(layer(x), aligned)


# ------------------------------------------------------------------------------------------------ dispatch


def test_env_forces_the_pure_path(monkeypatch, kernel_calls):
    layer = make_layer(4, 256, 192)
    monkeypatch.setenv(KERNEL_ENV, "torch")
    assert layer.explain_kernel() == ("torch", f"forced by {KERNEL_ENV}=torch")
    x = torch.randn(2, 256).to(BF16)
    with torch.no_grad():
        out = layer(x)
    assert kernel_calls == [] and layer._packed is None
    assert torch.equal(out, F.linear(x, layer.dequantized_weight(BF16)) + layer.bias)


@pytest.mark.parametrize("bits", [4, 8])
def test_missing_op_falls_back_and_says_so(bits, monkeypatch, kernel_calls):
    missing = quantization._CPU_OPS[bits][-1]
    real = quantization._aten_op
    monkeypatch.setattr(quantization, "_aten_op", lambda name: None if name == missing else real(name))
    layer = make_layer(bits, *FITTING[bits][0])
    kernel, reason = layer.explain_kernel()
    assert kernel == "torch" and f"no aten.{missing}" in reason
    x = torch.randn(2, FITTING[bits][0][0]).to(BF16)
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.dequantized_weight(BF16)) + layer.bias)
    assert kernel_calls == []
    assert kernel_report(nn.ModuleList([layer])) == f"pure PyTorch (bf16: {reason})"


@pytest.mark.parametrize("failure", ["raises", "wrong"])
def test_a_kernel_failing_its_self_check_is_not_used(failure, monkeypatch):
    name = quantization._CPU_OPS[4][1]
    real = quantization._aten_op

    def broken(*args):
        if failure == "raises":
            raise RuntimeError("not built for this CPU")
        return real(name)(*args).flip(-1)  # a wrong column order

    monkeypatch.setattr(quantization, "_aten_op", lambda op: broken if op == name else real(op))
    kernel, reason = explain_kernel(4, "cpu", BF16, (256, 192))
    assert kernel == "torch"
    assert ("failed its self-check" if failure == "raises" else "wrong results") in reason


@pytest.mark.parametrize("bits, shape", [(bits, shape) for bits in UNFIT for shape in UNFIT[bits]])
def test_shapes_the_kernels_cannot_take_fall_back(bits, shape, kernel_calls):
    layer = make_layer(bits, *shape)
    kernel, reason = layer.explain_kernel()
    assert kernel == "torch" and "multiple of" in reason
    x = torch.randn(3, shape[0]).to(BF16)
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.dequantized_weight(BF16)) + layer.bias)
    assert kernel_calls == [] and layer._packed is None


def test_other_dtypes_and_devices_keep_their_paths():
    assert explain_kernel(4, "cpu", torch.float32) == ("torch", "exact")
    assert explain_kernel(4, "cpu", torch.float16)[0] == "torch"  # the kernels are fast in bf16 only
    assert explain_kernel(4, "cpu", BF16) == ("cpu-int4pack", "packed CPU kernel")
    assert explain_kernel(8, "cpu", BF16) == ("cpu-int8pack", "packed CPU kernel")
    assert explain_kernel(8, "cuda", BF16)[0] == "torch"  # INT8 has no GPU kernel of ours


def test_kernel_report_names_each_path():
    model = random_model(bits=4)
    assert kernel_report(model) == "pure PyTorch (fp32: exact)"
    assert kernel_report(model, BF16) == "CPU fast path: int4pack (bf16)"
    assert kernel_report(random_model(bits=8).to(BF16)) == "CPU fast path: int8pack (bf16)"
    mixed = nn.ModuleList([make_layer(4, 256, 192), make_layer(4, 80, 48), make_layer(4, 96, 48)])
    report = kernel_report(mixed)
    assert report.startswith("CPU fast path: int4pack (bf16) for 2 of 3 layers; pure PyTorch (bf16: in_features 80")
    assert kernel_report(nn.Linear(2, 2)) == "no quantized layers"


# ------------------------------------------------------------------------------------------------ the repacked copy


@pytest.fixture
def pack_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = quantization._pack_for_cpu

    def spy(qweight, scale, bits):
        calls.append(bits)
        return real(qweight, scale, bits)

    monkeypatch.setattr(quantization, "_pack_for_cpu", spy)
    return calls


def fast(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return layer(x)


def assert_fast_equals_exact(layer: QuantizedLinear, x: torch.Tensor) -> None:
    assert_within(fast(layer, x), exact(layer, x), kernel_bound(layer, x))


@pytest.mark.parametrize("bits", [4, 8])
def test_repacked_once_then_again_after_every_kind_of_change(bits, pack_calls):
    layer, other = make_layer(bits, 256, 192, seed=0), make_layer(bits, 256, 192, seed=1)
    x = torch.randn(2, 256).to(BF16)
    other_out = fast(other, x)
    pack_calls.clear()
    for _ in range(3):
        assert_fast_equals_exact(layer, x)
    assert pack_calls == [bits]

    layer.set_weight(torch.randn(192, 256))  # a new weight and scale
    assert layer._packed is None
    assert_fast_equals_exact(layer, x)

    layer.load_state_dict(other.state_dict())
    assert layer._packed is None
    assert torch.equal(fast(layer, x), other_out)

    with torch.no_grad():  # in place through autograd-tracked ops: the version counters move
        layer.weight.copy_(make_layer(bits, 256, 192, seed=2).weight)
        layer.weight_scale.mul_(2)
    assert_fast_equals_exact(layer, x)

    layer.weight = nn.Parameter(other.weight.detach().clone(), requires_grad=False)  # a new parameter object
    assert_fast_equals_exact(layer, x)

    layer.float().to(BF16)  # .to() and friends drop the copy
    assert layer._packed is None
    assert_fast_equals_exact(layer, x)

    layer.weight.data.copy_(make_layer(bits, 256, 192, seed=3).weight)  # .data bypasses the version counter...
    layer.clear_packed()  # ...so the copy is dropped by hand
    assert_fast_equals_exact(layer, x)
    assert len(pack_calls) == 7


def test_state_dict_unchanged_byte_for_byte_after_fast_forwards():
    model = random_model(seed=5, bits=4).to(BF16)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    model.generate(torch.tensor([glm_ids([10, 11, 12])]), max_new_tokens=3, do_sample=False)
    assert all(layer._packed is not None for layer in model.modules() if isinstance(layer, QuantizedLinear))
    after = model.state_dict()
    assert list(after) == list(before)
    for name, tensor in after.items():
        assert tensor.dtype == before[name].dtype and tensor.shape == before[name].shape
        assert torch.equal(tensor.view(torch.uint8), before[name].view(torch.uint8)), name


def test_made_inside_inference_mode_the_copy_serves_outside_it():
    layer = make_layer(4, 256, 192)
    x = torch.randn(2, 256).to(BF16)
    with torch.inference_mode():
        inside = layer(x)
    assert not layer._packed[2].weight.is_inference()
    assert torch.equal(fast(layer, x), inside)


# ------------------------------------------------------------------------------------------------ the model


def test_bf16_model_generates_greedily_through_the_kernels_like_fp32(kernel_calls):
    model = random_model(seed=3, bits=4, eos_token_id=299)  # an eos that greedy decoding never hits
    ids = torch.tensor([glm_ids([10, 11, 12, 13, 14])])
    options = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    reference = model.generate(ids, **options)
    assert kernel_calls == []
    fast_run = model.to(BF16).generate(ids, **options)
    # every quantized layer (3 blocks x 4) took the kernel at every step: the 7-token prompt, then one row each
    assert kernel_calls == [7] * 12 + [1] * 12 * 7
    assert torch.equal(fast_run.sequences, reference.sequences)
    logits, ref_logits = torch.stack(fast_run.logits, 1).float(), torch.stack(reference.logits, 1)
    top2 = ref_logits.topk(2, dim=-1).values
    # the choice is not close: every step's top logit leads by far more than the bf16 run's largest difference
    assert (top2[..., 0] - top2[..., 1]).min() > 20 * (logits - ref_logits).abs().max()


def test_lora_training_step_streams_and_equals_the_forced_pure_path(monkeypatch, kernel_calls):
    ids = torch.tensor([glm_ids([10, 11, 12, 13], [20, 21, 22])])
    labels = torch.where(torch.arange(ids.shape[1]) >= 5, ids, torch.full_like(ids, -100))

    def step(kernel: str | None):
        with monkeypatch.context() as patch:
            if kernel:
                patch.setenv(KERNEL_ENV, kernel)
            torch.manual_seed(0)
            model = get_peft_model(random_model(seed=1, bits=4).to(BF16), lora_config(r=4, lora_dropout=0.0))
            model.train()
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
            return model, loss.detach(), grads

    model, loss, grads = step(None)
    _, pure_loss, pure_grads = step("torch")
    assert kernel_calls == []
    assert torch.equal(loss, pure_loss)
    assert grads.keys() == pure_grads.keys() and all(torch.equal(grads[n], pure_grads[n]) for n in grads)
    assert all(grads[n].abs().sum() > 0 for n in grads if "lora_B" in n)  # B starts at zero, so A's gradient is 0
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert all(layer._packed is None for layer in quantized)
    model.eval()
    model.generate(input_ids=ids[:, :6], max_new_tokens=2, do_sample=False)  # evaluation takes the kernels
    assert len(kernel_calls) == 12 * 2 and all(layer._packed is not None for layer in quantized)


@pytest.mark.parametrize("name", ["int4", "int8"])
def test_parity_fixtures_in_bf16_through_the_kernels(name, monkeypatch, kernel_calls):
    """The original's recorded fp32 outputs, replayed in bf16: the greedy ids are the original's, and the logits are
    as far from its fp32 numbers as bf16 itself takes the pure path (measured here), up to a factor 2 as for fp16."""
    from tests.chatglm.test_parity import generate, load_case, our_model

    meta, rec = load_case(name)

    def run() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        model = our_model(name).to(BF16)
        with torch.no_grad():
            logits = model(rec["input_ids"], use_cache=False).logits.float()
        ids, step_logits = generate(model, rec["prompt_ids"], meta["new_tokens"])
        return logits, ids, step_logits

    logits, ids, step_logits = run()
    assert kernel_calls  # the generation steps (2 rows) took the kernels
    with monkeypatch.context() as patch:
        patch.setenv(KERNEL_ENV, "torch")
        pure_logits, pure_ids, pure_step_logits = run()
    assert ids.tolist() == rec["generated_ids"].tolist() == pure_ids.tolist()
    for ours, pure, original in ((logits, pure_logits, rec["logits"]),
                                 (step_logits, pure_step_logits, rec["generation_scores"])):
        rounding = (pure - original).abs().max().item()
        assert 0 < rounding < 0.05 * original.abs().max().item()
        assert (ours - original).abs().max().item() <= 2 * rounding
