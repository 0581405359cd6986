"""INT8/INT4 weight-only quantization: the public byte format, error bounds, forward and backward."""

import pytest
import torch
from torch import nn

from chatglm.quantization import (
    QuantizedLinear,
    dequantize_weight,
    pack_int4,
    quantize_linears,
    quantize_weight,
    unpack_int4,
)
from tests.conftest import glm_ids, random_model


def test_pack_int4_hand_computed_bytes():
    q = torch.tensor([[1, 2, -1, 7, -7, -8, 0, -3, 5, 0]], dtype=torch.int8)
    # even index in the high nibble: (q0 << 4) | (q1 & 0xF), as unsigned bytes
    expected_unsigned = [0x12, 0xF7, 0x98, 0x0D, 0x50]
    packed = pack_int4(q)
    assert packed.dtype == torch.int8 and packed.shape == (1, 5)
    assert [b & 0xFF for b in packed[0].tolist()] == expected_unsigned
    assert torch.equal(unpack_int4(packed), q)


def test_pack_unpack_every_pair_round_trips():
    values = torch.arange(-8, 8, dtype=torch.int8)
    pairs = torch.cartesian_prod(values, values).reshape(1, -1)  # all 256 nibble pairs
    packed = pack_int4(pairs)
    assert sorted(b & 0xFF for b in packed[0].tolist()) == list(range(256))
    assert torch.equal(unpack_int4(packed), pairs)


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))
    with pytest.raises(TypeError):
        pack_int4(torch.zeros(2, 4))


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_scale_and_error_bound(bits):
    torch.manual_seed(0)
    w = torch.randn(16, 32)
    w[3] = 0.0  # an all-zero row stays zero instead of dividing by zero
    q, scale = quantize_weight(w, bits)
    levels = 2 ** (bits - 1) - 1
    assert scale.dtype == torch.float16
    assert torch.equal(scale, (w.abs().amax(-1) / levels).half())
    assert q.shape == ((16, 16) if bits == 4 else (16, 32)) and q.dtype == torch.int8
    values = unpack_int4(q) if bits == 4 else q
    assert values.abs().max() <= levels
    back = dequantize_weight(q, scale, bits, torch.float32)
    # rounding error at most half a step (plus the fp16 rounding of the scale itself)
    step = scale.float()[:, None]
    assert ((back - w).abs() <= step * 0.5 + w.abs() * 1e-3 + 1e-7).all()
    assert torch.equal(back[3], torch.zeros(32))


def test_hand_computed_int8_row():
    w = torch.tensor([[0.5, -1.27, 0.01, 1.0]])
    q, scale = quantize_weight(w, 8)
    assert scale.item() == pytest.approx(0.01, rel=1e-3)
    assert q.tolist() == [[50, -127, 1, 100]]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequantize_rounds_once_in_low_precision(dtype):
    q, scale = quantize_weight(torch.randn(8, 16), 4)
    exact = dequantize_weight(q, scale, 4, torch.float64)
    assert torch.equal(dequantize_weight(q, scale, 4, dtype), exact.to(dtype))


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_linear_forward_and_input_grad_match_dequantized_linear(bits):
    torch.manual_seed(1)
    linear = nn.Linear(32, 24)
    qlinear = QuantizedLinear.from_linear(linear, bits)
    reference = qlinear.to_linear(torch.float32)
    assert not any(p.requires_grad for p in qlinear.parameters())
    x = torch.randn(3, 5, 32, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, out_ref = qlinear(x), reference(x_ref)
    assert torch.allclose(out, out_ref, atol=1e-6)
    grad = torch.randn_like(out)
    out.backward(grad)
    out_ref.backward(grad)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-6)
    assert qlinear.weight.grad is None


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_model_equals_fp_model_on_dequantized_weights(bits):
    fp = random_model(seed=2)
    quantized = random_model(seed=2, bits=bits)
    # put the dequantized weights into the floating model: both now compute the same function
    for (name, module), (_, qmodule) in zip(fp.named_modules(), quantized.named_modules()):
        if isinstance(qmodule, QuantizedLinear):
            module.weight.data.copy_(qmodule.dequantized_weight(torch.float32))
    ids = torch.tensor([glm_ids([10, 11, 12, 13], [20, 21, 22])])
    with torch.no_grad():
        assert (fp(ids).logits - quantized(ids).logits).abs().max() <= 1e-5


def test_quantize_linears_replaces_only_layer_matrices():
    model = random_model()
    replaced = quantize_linears(model.transformer.layers, 4)
    assert replaced == 4 * model.config.num_layers
    assert type(model.lm_head) is nn.Linear
    assert all(
        isinstance(getattr(layer.attention, n), QuantizedLinear) for layer in model.transformer.layers
        for n in ("query_key_value", "dense")
    )


def test_quantized_weights_never_require_grad_and_count_like_public():
    model = random_model(bits=4)
    layer = model.transformer.layers[0].attention.query_key_value
    assert layer.weight.dtype == torch.int8 and layer.weight.shape == (192, 32)
    assert layer.weight_scale.shape == (192,)
    names = {n for n, _ in model.named_parameters()}
    assert "transformer.layers.0.attention.query_key_value.weight_scale" in names
