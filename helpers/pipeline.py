"""The course's main job: fine-tune one base model with several methods on one task and compare them.

For each method: load the base model, apply the method, train, evaluate on the task's test split, measure
perplexity on held-out general text before and after (does the method make the model forget?), and finally
write ``comparison.png``, ``comparison.md`` and ``comparison.json`` next to the run folders.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from transformers import set_seed

from .data import EncodedDataset, get_task, load_split
from .evaluation import evaluate, heldout_texts, perplexity
from .files import write_json
from .methods import METHODS, apply_method
from .models import is_small_model, load_model
from .plotting import load_runs, write_comparison
from .training import is_main_process, train

# Method options used unless given: the original course's choices where they fit every model size.
METHOD_DEFAULTS = {
    "freeze": {"layers": 5, "dequantize": False},
    "embedding": {},
    "ptuning_v2": {"pre_seq_len": 16, "prefix_projection": True},
    "lora": {"r": 8, "alpha": 32, "dropout": 0.1},
}
# Learning rates per method: small parameter sets (LayerNorms, prefixes) take larger steps. The tiny model's were
# chosen on its comparison; the real model's are starting points in the range the original course used.
LEARNING_RATES = {"freeze": 3e-2, "freeze_dequantized": 2e-3, "embedding": 2e-3, "ptuning_v2": 1e-2, "lora": 5e-3}
REAL_LEARNING_RATES = {"freeze": 1e-3, "freeze_dequantized": 1e-4, "embedding": 1e-4, "ptuning_v2": 2e-2,
                       "lora": 2e-4}
# Training and evaluation sizes for the embedded tiny model on a CPU (the whole comparison in minutes).
TINY_TRAINING = {"max_steps": 150, "batch_size": 8, "save_steps": 50, "warmup_steps": 10}
TINY_EVALUATION = {"batch_size": 16}
TINY_LENGTHS = {"max_source_length": 192, "max_target_length": 64}  # tokens; generation stops after the target
REAL_TRAINING = {"max_steps": 200, "batch_size": 4, "gradient_accumulation_steps": 2, "warmup_steps": 20,
                 "save_steps": 50}


def training_defaults(method: str, small: bool, dequantized: bool = False) -> dict:
    """Hyper-parameters of ``method`` for the tiny model (``small``) or ChatGLM-6B, before any override."""
    key = "freeze_dequantized" if method == "freeze" and dequantized else method
    if small:
        return {**TINY_TRAINING, "learning_rate": LEARNING_RATES.get(key, 1e-3)}
    return {**REAL_TRAINING, "learning_rate": REAL_LEARNING_RATES.get(key, 1e-4)}


def method_options(model, method: str, overrides: dict | None = None) -> dict:
    """The options of ``method`` for ``model``: defaults, clipped to the model (freeze layers), then overrides."""
    options = {**METHOD_DEFAULTS.get(method, {}), **(overrides or {})}
    if method == "freeze":
        options["layers"] = min(options["layers"], model.config.num_layers)
    return options


def run_method(
    model_name: str,
    task: str,
    method: str,
    out_dir: str | Path,
    method_overrides: dict | None = None,
    training: dict | None = None,
    evaluation: dict | None = None,
    lengths: dict | None = None,
    train_file: str | None = None,
    test_file: str | None = None,
    eval_limit: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    seed: int = 42,
    resume: bool = True,
    perplexity_before: float | None = None,
) -> dict:
    """Train and evaluate one method; returns its metrics (also written to ``out_dir/metrics.json``).

    Training, evaluation and token budgets start from the defaults for the model's size (the tiny model gets
    short runs and short sequences); ``training``, ``evaluation`` and ``lengths``
    (``max_source_length``/``max_target_length``) override them, for training and evaluation alike.
    """
    set_seed(seed)
    model, tokenizer = load_model(model_name, device=device, dtype=dtype)
    small = is_small_model(model)
    task_spec = dataclasses.replace(get_task(task), **{**(TINY_LENGTHS if small else {}), **(lengths or {})})
    heldout = heldout_texts()
    if perplexity_before is None and is_main_process():
        perplexity_before = perplexity(model, tokenizer, heldout)
    options = method_options(model, method, method_overrides)
    setup = apply_method(model, method, **options)
    print(f"[{method}] {setup}")
    dataset = EncodedDataset(tokenizer, task_spec, load_split(task, "train", train_file))
    hyperparameters = {**training_defaults(method, small, options.get("dequantize", False)), **(training or {})}
    train(setup, tokenizer, dataset, out_dir, task=task, resume=resume, seed=seed, **hyperparameters)
    if not is_main_process():  # under torchrun/accelerate the other processes only help to train
        return {}
    examples = load_split(task, "test", test_file, limit=eval_limit)
    evaluation = {**(TINY_EVALUATION if small else {}), **(evaluation or {})}
    metrics = evaluate(setup.model, tokenizer, task_spec, examples, out_dir=out_dir, **evaluation)
    metrics["perplexity_before"] = perplexity_before
    metrics["perplexity_after"] = perplexity(setup.model, tokenizer, heldout)
    write_json(Path(out_dir) / "metrics.json", metrics)
    del model, setup
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return metrics


def compare(
    model: str = "tiny",
    task: str = "ie",
    methods: list[str] | tuple[str, ...] = METHODS,
    out: str | Path = "runs/compare",
    training: dict | None = None,
    evaluation: dict | None = None,
    lengths: dict | None = None,
    **run_options,
) -> dict:
    """Run every method on ``task`` and write the side-by-side comparison into ``out``; returns its summary."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    started = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    before = None
    for method in methods:
        metrics = run_method(model, task, method, out / method, training=training, evaluation=evaluation,
                             lengths=lengths, perplexity_before=before, **run_options)
        before = metrics.get("perplexity_before")
    if not is_main_process():
        return {"out": str(out)}
    runs = load_runs(*(out / m for m in methods))
    paths = write_comparison(runs, out)
    summary = {"out": str(out), "wall_time_s": round(time.time() - started, 1), "files": paths}
    write_json(out / "summary.json", summary)
    return summary
