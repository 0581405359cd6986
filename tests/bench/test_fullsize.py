"""The full-size CPU benchmark's parts at toy sizes: FLOP counting, the memory watchdog, the GEMM roofline, tables."""

import sys

import torch

from bench.common import random_model
from bench.fullsize import CONFIGS, gemm_throughput, markdown_table, repredict, run_watched
from bench.train import train_flops_per_step
from helpers.methods import apply_method


def _flops(method, **options):
    model = random_model("tiny", "cpu", torch.float32)
    setup = apply_method(model, method, **options)
    config = model.config
    return train_flops_per_step(setup.model, config, seq=16, batch=2, labelled=14), config


def test_flops_forward_is_two_per_weight_and_token():
    flops, config = _flops("lora", r=2)
    h, inner, layers = config.hidden_size, config.inner_hidden_size, config.num_layers
    block = h * 3 * h + h * h + 2 * h * inner
    lora = layers * (h * 2 + 2 * 3 * h)
    attention = layers * 4 * 32 * 16 * h  # tokens x keys x hidden
    assert flops["forward_flops"] == 2 * 32 * (layers * block) + 2 * 32 * lora + attention + 2 * 14 * h * 1200
    # backward: input gradients everywhere (LoRA sits in the first layer) + weight gradients of the adapters
    assert flops["backward_flops"] == (2 * 32 * layers * block + 2 * 2 * 32 * lora + 2 * attention
                                       + 2 * 14 * h * 1200)


def test_freeze_backward_stops_below_its_first_trained_layer():
    one, config = _flops("freeze", layers=1)
    two, _ = _flops("freeze", layers=2)
    h, inner = config.hidden_size, config.inner_hidden_size
    block = 2 * 32 * (h * 3 * h + h * h + 2 * h * inner)
    attention = 4 * 32 * 16 * h
    assert one["forward_flops"] == two["forward_flops"]
    # all (2) layers: input gradients of every matrix, attention backward twice its forward; no weight gradients
    assert two["backward_flops"] == two["forward_flops"] + 2 * attention
    # the last layer only: the first layer's backward is never run
    assert one["backward_flops"] == two["backward_flops"] - block - 2 * attention


def test_embedding_pays_for_the_output_layers_weight_gradient():
    embedding, config = _flops("embedding")
    lora, _ = _flops("lora", r=2)
    head = 2 * 14 * config.hidden_size * config.vocab_size  # the weight gradient of the tied output layer
    attention = config.num_layers * 4 * 32 * 16 * config.hidden_size  # backward is twice the forward
    assert embedding["backward_flops"] - embedding["forward_flops"] == head + attention
    assert lora["backward_flops"] > lora["forward_flops"]


def test_watchdog_kills_a_process_above_the_limit():
    hog = [sys.executable, "-c", "import time; x = bytearray(400 << 20); x[::4096] = b'1' * len(x[::4096]); "
                                 "time.sleep(30)"]
    result = run_watched(hog, limit=200 << 20)
    assert result["status"] == "killed" and result["watched_peak"] > 200 << 20 and result["wall_s"] < 25


def test_watchdog_returns_the_last_json_line():
    result = run_watched([sys.executable, "-c", "print('x'); print('{\"a\": 1}')"], limit=1 << 40)
    assert result["status"] == "ok" and result["record"] == {"a": 1}


def test_gemm_throughput_covers_every_layer_shape():
    result = gemm_throughput(tokens=4, repeat=1)
    assert len(result["per_shape"]) == 8 and result["flops_per_s"] > 0 and result["threads"] == 2


def test_table_has_a_row_per_configuration_and_marks_what_did_not_run():
    rows = [{"kind": "gemm", "tokens": 64, "threads": 2, "flops_per_s": 50e9}]
    for method, options, checkpointing in CONFIGS:
        rows.append({"kind": "train", "label": f"{method} {options} {checkpointing}", "method": method,
                     "options": options, "gradient_checkpointing": checkpointing, "status": "killed",
                     "watched_peak": 19 << 30})
    measured = {"trainable_params": 5, "peak_bytes": 6 << 30, "baseline_rss": 1 << 30, "step_s": 2.0,
                "flops": 100e9, "flops_per_s": 50e9}
    rows[1].update(status="ok", measured=measured, measured_bytes=5 << 30, cpu_mfu=1.0)
    table = markdown_table(repredict(rows))
    lines = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(lines) == 1 + len(CONFIGS)
    assert "killed at 19.0 GiB" in table and "100%" in table and "50.0 GFLOP/s" in table
