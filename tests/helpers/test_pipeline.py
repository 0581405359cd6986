"""Defaults of the main job: sized by the model (tiny on a CPU, ChatGLM-6B on a GPU)."""

from helpers.models import is_small_model, meta_model
from helpers.pipeline import LEARNING_RATES, REAL_LEARNING_RATES, method_options, training_defaults


def test_training_defaults_follow_the_model_size():
    tiny = training_defaults("lora", small=True)
    real = training_defaults("lora", small=False)
    assert tiny["learning_rate"] == LEARNING_RATES["lora"] and real["learning_rate"] == REAL_LEARNING_RATES["lora"]
    assert real["max_steps"] > tiny["max_steps"]
    assert training_defaults("freeze", small=False, dequantized=True)["learning_rate"] == 1e-4


def test_model_size_detection(tiny_checkpoint):
    assert is_small_model("tiny") and is_small_model(str(tiny_checkpoint))
    assert not is_small_model("THUDM/chatglm-6b-int4")
    assert not is_small_model(meta_model("THUDM/chatglm-6b-int4"))


def test_freeze_layers_are_clipped_to_the_model():
    assert method_options(meta_model("THUDM/chatglm-6b-int4"), "freeze")["layers"] == 5
    from tests.conftest import random_model

    assert method_options(random_model(), "freeze")["layers"] == 3
