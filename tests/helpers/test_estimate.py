"""The memory estimate adds up its parts from the model's real shapes, on GPU and on CPU, and refuses bad inputs."""

import pytest

from helpers.errors import UserError
from helpers.estimate import GIB, cpu_heap_per_layer, estimate, estimate_generation


def test_lora_estimate_parts():
    result = estimate(method="lora", seq=512, batch=4)
    assert result.trainable_params == 3_670_016
    assert result.gradients == 4 * 3_670_016 and result.optimizer == 8 * 3_670_016
    # weights: 2.82e9 packed int8 elements at 1 byte + the rest (embeddings, LayerNorms, biases, scales) at 2 bytes
    assert 3.4 * GIB < result.weights < 3.9 * GIB
    assert result.total == sum(result.parts().values())
    assert result.total == pytest.approx(result.weights + result.gradients + result.optimizer + result.activations
                                         + result.loss + result.unpack + result.overhead)
    # bf16: the largest matrix (4096 x 16384) unpacked in fp32, then rounded to bf16
    assert result.unpack == 4096 * 16384 * 6


def test_checkpointing_and_smaller_batches_need_less():
    full = estimate(method="lora", batch=4)
    assert estimate(method="lora", batch=4, gradient_checkpointing=True).activations < full.activations / 4
    assert estimate(method="lora", batch=1).total < full.total


def test_freeze_keeps_activations_of_its_layers_only():
    assert estimate(method="freeze", layers=5).activations == pytest.approx(
        estimate(method="lora").activations * 5 / 28, rel=0.3)


def test_embedding_trains_in_fp32_and_pays_for_adam():
    result = estimate(method="embedding")
    assert result.trainable_params == 534_642_688
    assert result.optimizer == 8 * 534_642_688
    # .grad plus, for a moment, the two dense gradients of the tied matrix that autograd adds
    assert result.gradients == 3 * 4 * 534_642_688
    assert not result.fits()["T4-16G"] and result.fits()["A100-40G"]


def test_cpu_variant_is_fp32_without_cuda_context():
    gpu = estimate(method="lora", seq=64, batch=1)
    cpu = estimate(method="lora", seq=64, batch=1, device="cpu")
    assert cpu.activations == 2 * gpu.activations  # fp32 instead of bf16
    assert cpu.weights > gpu.weights + GIB  # the 130k x 4096 embedding in fp32
    assert cpu.unpack == 4096 * 16384 * 4
    assert cpu.overhead == 28 * cpu_heap_per_layer(4096)  # heap growth per layer keeping activations
    assert "CUDA" not in cpu.table() and "CPU, fp32" in cpu.table()
    checkpointed = estimate(method="lora", seq=64, batch=1, device="cpu", gradient_checkpointing=True)
    assert checkpointed.overhead == cpu_heap_per_layer(4096)


def test_cpu_freeze_grows_the_heap_of_its_layers_only():
    assert estimate(method="freeze", layers=5, device="cpu").overhead == 5 * cpu_heap_per_layer(4096)


def test_generation_estimate_counts_the_cache():
    short = estimate_generation(prompt=32, new_tokens=4, batch=1, device="cpu")
    long = estimate_generation(prompt=1024, new_tokens=4, batch=1, device="cpu")
    per_token = 2 * 28 * 4096 * 4  # keys and values of every layer, fp32
    assert long.cache - short.cache == pytest.approx(per_token * (1024 - 32), rel=0.05)
    assert short.total == sum(short.parts().values())


@pytest.mark.parametrize("kwargs, name", [
    ({"seq": -100000}, "seq"), ({"seq": 0}, "seq"), ({"batch": 0}, "batch"), ({"seq": 1.5}, "seq"),
    ({"label_fraction": 0}, "label_fraction"), ({"device": "tpu"}, "device"), ({"compute_bytes": 3}, "compute_bytes"),
    ({"method": "adapter"}, "adapter"), ({"method": "ptuning_v2", "pre_seq_len": 0}, "pre_seq_len"),
    ({"method": "freeze", "layers": 40}, "layers"),
])
def test_bad_inputs_raise_a_one_line_user_error(kwargs, name):
    with pytest.raises(UserError, match=name) as error:
        estimate(**kwargs)
    assert "\n" not in str(error.value)


def test_bad_generation_inputs_raise_a_user_error():
    with pytest.raises(UserError, match="new_tokens"):
        estimate_generation(new_tokens=0)


def test_the_notebooks_full_size_line_is_the_estimate():
    from helpers.estimate import PEAK_SETTINGS, estimate, full_size_line

    for method, options in [("ptuning_v2", {}), ("lora", {"r": 4})]:
        line, memory = full_size_line(method, **options), estimate(method=method, **PEAK_SETTINGS, **options)
        assert line.peak_bytes == memory.total
        assert line.weights_bytes + line.states_bytes == memory.weights + memory.gradients + memory.optimizer
