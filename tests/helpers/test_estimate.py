"""The memory estimate adds up its parts from the model's real shapes."""

import pytest

from helpers.estimate import GIB, estimate


def test_lora_estimate_parts():
    result = estimate(method="lora", seq=512, batch=4)
    assert result.trainable_params == 3_670_016
    assert result.gradients == 4 * 3_670_016 and result.optimizer == 8 * 3_670_016
    # weights: 2.82e9 packed int8 elements at 1 byte + the rest (embeddings, LayerNorms, biases, scales) at 2 bytes
    assert 3.4 * GIB < result.weights < 3.9 * GIB
    assert result.total == pytest.approx(result.weights + result.gradients + result.optimizer + result.activations
                                         + result.loss + result.overhead)


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
    assert not result.fits()["T4-16G"] and result.fits()["A100-40G"]
