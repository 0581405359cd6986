"""``python -m bench cpu`` runs end to end on the tiny model and reports what it promises. Timings are not checked."""

import json

import pytest
import torch

from bench.__main__ import main
from bench.cpu import decode_bytes, format_training
from chatglm.quantization import QuantizedLinear
from tests.conftest import random_model


@pytest.mark.slow
def test_cpu_entry_measures_each_configuration_in_its_own_process(tmp_path, capsys):
    out = tmp_path / "records.json"
    assert main(["--json", "cpu", "--model", "tiny", "--quick", "--configs", "pure-fp32,fast-bf16", "--batches", "1,2",
                 "--train-steps", "0", "--dir", str(tmp_path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    records = [json.loads(line) for line in printed.splitlines() if line.startswith("{")]
    assert records == json.loads(out.read_text())
    machine, pure, fast = records
    assert machine["read_bytes_per_s"] > 0 and set(machine["mm_flops"]) == {"fp32", "bf16"}
    assert [(r["config"], r["kind"], r["status"]) for r in (pure, fast)] == [("pure-fp32", "infer", "ok"),
                                                                         ("fast-bf16", "infer", "ok")]
    assert pure["kernels"] == "pure PyTorch (fp32: exact)" and fast["kernels"] == "CPU fast path: int4pack (bf16)"
    for run in (pure, fast):
        assert run["prefill_8_s"] > 0 and run["prefill_16_s"] > 0 and run["peak_rss"] >= run["ready_rss"] > 0
        assert run["decode_1_tokens_per_s"] > 0 and run["decode_2_tokens_per_s"] > 0
    assert fast["decode_bytes"] < pure["decode_bytes"]  # the output layer in bf16 instead of fp32
    assert "| fast-bf16 | CPU fast path: int4pack (bf16) |" in printed
    assert not list(tmp_path.glob("tmp*"))  # the temporary checkpoint is removed


def test_training_child_reports_a_lora_step(capsys):
    assert main(["cpu", "--child", "train", "--model", "tiny", "--quick", "--dtype", "bf16"]) == 0
    (record,) = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert record["step_s"] > 0 and record["flops"] > 0 and record["peak_bytes"] > record["baseline_rss"] > 0
    assert record["trainable_params"] == 2 * 8 * (64 + 3 * 64)  # r=8 on each of the 2 layers' query_key_value
    machine = {"mm_flops": {"bf16": record["flops_per_s"] * 4}}
    line = format_training({"config": "fast-bf16", "kind": "train", "status": "ok", **record}, machine)
    assert "CPU MFU 25%" in line


def test_decode_bytes_count_the_packed_matrices_and_the_output_layer_once():
    model = random_model(bits=4).to(torch.bfloat16)
    config = model.config
    matrices = sum(m.weight.numel() for m in model.modules() if isinstance(m, QuantizedLinear))
    hidden, inner = config.hidden_size, config.inner_hidden_size
    assert matrices == config.num_layers * hidden * (3 * hidden + hidden + 2 * inner) // 2  # 4 bits a weight
    head = config.vocab_size * hidden * 2  # tied with the input embedding, read once per step
    assert matrices + head < decode_bytes(model) < 1.1 * (matrices + head)  # + scales, biases, LayerNorms
