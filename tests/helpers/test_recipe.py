"""Recipes: defaults by model size and GPU, overrides, and every bad value refused before any weights load."""

from __future__ import annotations

import dataclasses
import json

import pytest

from helpers.errors import UserError
from helpers.run.recipe import (
    LEARNING_RATES,
    REAL_LEARNING_RATES,
    REAL_TRAINING,
    TINY_LENGTHS,
    TINY_STEPS,
    TINY_TRAINING,
    Recipe,
    describe,
    resolve_recipe,
)

REAL = "THUDM/chatglm-6b-int4"
LORA_IE = LEARNING_RATES["ie"]["lora"]  # the tiny model's default for LoRA on IE


@pytest.fixture
def no_weights(monkeypatch):
    """Any attempt to load model weights fails the test: recipes read configurations only."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("model weights were loaded while resolving a recipe")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def test_tiny_model_gets_the_tiny_defaults(tiny_checkpoint, no_weights):
    recipe = resolve_recipe(str(tiny_checkpoint), "lora", "ie", device="cpu")
    assert recipe.steps == TINY_STEPS["ie"]["lora"]
    assert recipe.learning_rate == LEARNING_RATES["ie"]["lora"]
    assert recipe.batch_size == TINY_TRAINING["batch_size"] and recipe.seed == 42
    assert recipe.max_source_length == TINY_LENGTHS["max_source_length"]
    assert recipe.eval_batch_size == 16 and recipe.dtype == "fp32" and recipe.device == "cpu"
    assert recipe.task_spec().max_target_length == TINY_LENGTHS["max_target_length"]


def test_tiny_steps_are_per_task_and_method(tiny_checkpoint, no_weights):
    steps = {(task, method): resolve_recipe(str(tiny_checkpoint), method, task, device="cpu").steps
             for task, methods in TINY_STEPS.items() for method in methods}
    assert steps == {(task, method): n for task, methods in TINY_STEPS.items() for method, n in methods.items()}
    assert len(set(steps.values())) > 1  # the table is not one number in disguise
    dequantized = resolve_recipe(str(tiny_checkpoint), "freeze", "cls", method_options={"dequantize": True},
                                 device="cpu")
    assert dequantized.steps == TINY_STEPS["cls"]["freeze"]
    base = resolve_recipe(str(tiny_checkpoint), None, "gen", device="cpu")
    assert base.steps == TINY_TRAINING["steps"]
    given = resolve_recipe(str(tiny_checkpoint), "lora", "ie", device="cpu", steps=20)
    assert given.steps == 20


def test_full_size_model_is_sized_by_the_gpu(no_weights):
    """The one batch-sizing rule: at least 30 GiB -> batch 4 x 2; a T4 -> batch 1 x 8 with checkpointing."""
    a100 = resolve_recipe(REAL, "lora", "ie", device="cpu", gpu_memory_gib=40, check_data=False)
    t4 = resolve_recipe(REAL, "lora", "ie", device="cpu", gpu_memory_gib=15, check_data=False)
    assert (a100.batch_size, a100.grad_accum, a100.gradient_checkpointing) == (4, 2, False)
    assert (t4.batch_size, t4.grad_accum, t4.gradient_checkpointing) == (1, 8, True)
    assert a100.steps == REAL_TRAINING["steps"] and a100.learning_rate == REAL_LEARNING_RATES["lora"]
    dequantized = resolve_recipe(REAL, "freeze", "ie", method_options={"dequantize": True}, device="cpu",
                                 check_data=False)
    assert dequantized.learning_rate == REAL_LEARNING_RATES["freeze_dequantized"]
    assert dequantized.method_options == {"layers": 5, "dequantize": True}


def test_overrides_win_and_a_short_run_shortens_warmup_and_saves_at_its_end(tiny_checkpoint):
    recipe = resolve_recipe(str(tiny_checkpoint), "ptuning_v2", "gen", device="cpu", steps=8, learning_rate=0.02,
                            batch_size=None, max_new_tokens=5, method_options={"pre_seq_len": 4})
    assert recipe.steps == 8 and recipe.learning_rate == 0.02
    assert recipe.batch_size == TINY_TRAINING["batch_size"]  # None: not given
    assert recipe.warmup_steps == 1 and recipe.save_steps == 8
    assert recipe.max_new_tokens == 5 and recipe.method_options["pre_seq_len"] == 4


def test_freeze_layers_are_clipped_to_a_smaller_model(tiny_checkpoint):
    layers = json.loads((tiny_checkpoint / "config.json").read_text())["num_layers"]
    assert resolve_recipe(str(tiny_checkpoint), "freeze", device="cpu").method_options["layers"] == layers
    assert resolve_recipe(REAL, "freeze", device="cpu", check_data=False).method_options["layers"] == 5


@pytest.mark.parametrize("overrides, option", [
    ({"steps": 0}, "--steps"),
    ({"steps": -3}, "--steps"),
    ({"steps": "3"}, "--steps"),
    ({"learning_rate": 0.0}, "--lr"),
    ({"learning_rate": float("nan")}, "--lr"),
    ({"learning_rate": float("inf")}, "--lr"),
    ({"batch_size": 0}, "--batch-size"),
    ({"grad_accum": 0}, "--grad-accum"),
    ({"save_steps": 0}, "--save-steps"),
    ({"warmup_steps": -1}, "--warmup-steps"),
    ({"epochs": 3}, "epochs"),
    ({"eval_limit": 0}, "--eval-limit"),
    ({"eval_limit": -1}, "--eval-limit"),
    ({"eval_batch_size": 0}, "--eval-batch-size"),
    ({"max_source_length": 0}, "--max-source-length"),
    ({"max_new_tokens": -5}, "--max-new-tokens"),
    ({"gradient_checkpointing": "yes"}, "--gradient-checkpointing"),
    ({"method_options": {"r": 0}}, "--r"),
    ({"method_options": {"alpha": 0}}, "--alpha"),
    ({"device": "tpu"}, "--device"),
    ({"dtype": "fp8"}, "--dtype"),
])
def test_bad_values_are_refused_naming_the_option(tiny_checkpoint, no_weights, overrides, option):
    with pytest.raises(UserError, match=option):
        resolve_recipe(str(tiny_checkpoint), "lora", "ie", **{"device": "cpu", **overrides})


def test_lengths_must_fit_the_models_max_sequence_length(tiny_checkpoint, no_weights):
    longest = json.loads((tiny_checkpoint / "config.json").read_text())["max_sequence_length"]
    with pytest.raises(UserError, match=rf"--max-source-length\) {longest} \+ max_target_length "
                                        rf"\(--max-target-length\) 1 = {longest + 1} tokens, more than the model's "
                                        rf"max_sequence_length {longest}"):
        resolve_recipe(str(tiny_checkpoint), "lora", "ie", device="cpu", max_source_length=longest,
                       max_target_length=1)
    with pytest.raises(UserError, match=r"--max-new-tokens\) 100000"):
        resolve_recipe(str(tiny_checkpoint), None, "ie", device="cpu", max_new_tokens=100000)
    fits = resolve_recipe(str(tiny_checkpoint), "lora", "ie", device="cpu", max_source_length=longest - 8,
                          max_target_length=8)
    assert fits.max_source_length + fits.max_target_length == longest


@pytest.mark.parametrize("memory", [0, -5, float("nan"), float("inf"), "16"])
def test_gpu_memory_for_planning_must_be_a_size(no_weights, memory):
    with pytest.raises(UserError, match=r"gpu_memory_gib \(--gpu-memory\) must be a GPU's memory in GiB"):
        resolve_recipe(REAL, "lora", "ie", device="cpu", gpu_memory_gib=memory, check_data=False)


def test_unknown_method_task_and_model_are_refused(tiny_checkpoint, tmp_path, no_weights):
    with pytest.raises(UserError, match="unknown method 'bitfit'"):
        resolve_recipe(str(tiny_checkpoint), "bitfit", "ie", device="cpu")
    with pytest.raises(UserError, match="unknown task 'ner'"):
        resolve_recipe(str(tiny_checkpoint), "lora", "ner", device="cpu")
    with pytest.raises((UserError, FileNotFoundError), match="config.json"):
        resolve_recipe(str(tmp_path), "lora", "ie", device="cpu")  # a folder that is no checkpoint


def test_data_files_are_checked_before_any_weights_load(tiny_checkpoint, tmp_path, no_weights):
    with pytest.raises(UserError, match=r"--train-file\) .*missing.jsonl: no such file"):
        resolve_recipe(str(tiny_checkpoint), "lora", "ie", device="cpu", train_file=tmp_path / "missing.jsonl")
    broken = tmp_path / "test.jsonl"
    broken.write_text('{"text": "发动机抖动", "answer": "发动机_性能故障_抖动"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(UserError, match=f"{broken}:2"):
        resolve_recipe(str(tiny_checkpoint), "lora", "ie", device="cpu", test_file=broken)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(UserError, match="no examples|empty"):
        resolve_recipe(str(tiny_checkpoint), "lora", "ie", device="cpu", train_file=empty)


def test_recipe_is_immutable_and_round_trips(tiny_checkpoint):
    options = {"r": 4}
    recipe = resolve_recipe(str(tiny_checkpoint), "lora", "ie", device="cpu", method_options=options)
    options["r"] = 16  # the caller's dict changes; the recipe does not
    assert recipe.method_options["r"] == 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.method = "freeze"
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.learning_rate = 1.0
    assert Recipe(**json.loads(json.dumps(recipe.to_dict()))) == recipe


def test_differences_name_each_changed_setting(tiny_checkpoint):
    stored = resolve_recipe(str(tiny_checkpoint), "lora", "ie", device="cpu").to_dict()
    asked = resolve_recipe(str(tiny_checkpoint), "lora", "ie", device="cpu", learning_rate=0.01,
                           method_options={"r": 4})
    diffs = asked.differences(stored)
    assert [(key, old, new) for key, old, new in diffs] == [("method_options.r", 8, 4),
                                                            ("learning_rate", LORA_IE, 0.01)]
    assert describe(*diffs[1][:2]) == f"lr={LORA_IE:g}"
    assert asked.differences(asked.to_dict()) == []
    moved = {**asked.to_dict(), "device": "cuda"}  # where it runs is not what it trains
    assert asked.differences(moved) == []


def test_a_record_of_the_grouped_format_compares_setting_by_setting(tiny_checkpoint):
    """Records written before the settings were one flat type kept "training" and "lengths" groups."""
    recipe = resolve_recipe(str(tiny_checkpoint), "lora", "ie", device="cpu")
    flat = recipe.to_dict()
    grouped = {k: v for k, v in flat.items() if k not in ("steps", "grad_accum", "learning_rate", "max_source_length")}
    grouped["training"] = {"max_steps": flat["steps"], "gradient_accumulation_steps": flat["grad_accum"],
                           "learning_rate": 0.5}
    grouped["lengths"] = {"max_source_length": flat["max_source_length"]}
    assert recipe.differences(grouped) == [("learning_rate", 0.5, recipe.learning_rate)]


def test_every_setting_is_declared_once_for_the_command_line_and_the_notebooks():
    import argparse

    from helpers.run.recipe import SETTINGS, add_options, flag, given_settings

    parser = argparse.ArgumentParser()
    add_options(parser)
    flags = {flag(name) for name in SETTINGS}
    assert len(flags) == len(SETTINGS) and {"--lr", "--steps", "--eval-batch-size", "--grad-accum"} <= flags
    args = parser.parse_args(["--lr", "0.01", "--steps", "5", "--gradient-checkpointing", "--dtype", "bf16"])
    assert given_settings(args) == {"learning_rate": 0.01, "steps": 5, "gradient_checkpointing": True,
                                    "dtype": "bf16"}


@pytest.mark.parametrize("native", [True, False])
def test_the_real_model_computes_in_bf16_on_a_cpu_that_has_it_and_the_tiny_model_in_fp32(monkeypatch, tiny_checkpoint,
                                                                                        native):
    import helpers.models

    monkeypatch.setattr(helpers.models, "cpu_has_bf16", lambda: native)
    real = resolve_recipe(REAL, "lora", "ie", device="cpu", check_data=False)
    assert real.dtype == ("bf16" if native else "fp32")
    assert resolve_recipe(REAL, "lora", "ie", device="cpu", dtype="fp32", check_data=False).dtype == "fp32"
    assert resolve_recipe(str(tiny_checkpoint), "lora", "ie", device="cpu").dtype == "fp32"  # exact, as measured


def test_generation_on_a_cpu_in_bf16_counts_the_repacked_copy():
    from helpers.estimate import estimate_generation

    bf16 = estimate_generation(device="cpu", compute_bytes=2).parts()
    fp32 = estimate_generation(device="cpu", compute_bytes=4).parts()
    assert fp32["INT4 repacked (CPU fast path)"] == 0
    assert bf16["INT4 repacked (CPU fast path)"] == 28 * (12288 + 4096 + 16384 + 16384) * 4096 // 2  # every INT4 byte
