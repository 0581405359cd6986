"""Each benchmark entry point runs (tiny sizes, CPU) and reports the figures it promises. Timings are not checked."""

import json

import pytest

from bench.__main__ import main
from helpers.cli import main as helpers_main


def records(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_train_entry_reports_throughput_memory_and_attention_ratio(capsys):
    assert main(["--json", "train", "--model", "small", "--method", "lora", "--seq", "32", "--bs", "2", "--steps", "1",
                 "--attention", "both", "--device", "cpu"]) == 0
    eager, sdpa, ratio = records(capsys)
    assert eager["attention"] == "eager" and sdpa["attention"] == "sdpa"
    assert sdpa["tokens_per_s"] > 0 and sdpa["peak_bytes"] > 0 and sdpa["trainable_params"] > 0
    assert ratio["sdpa_over_eager"] == pytest.approx(sdpa["tokens_per_s"] / eager["tokens_per_s"])


@pytest.mark.parametrize("method", ["freeze", "embedding", "ptuning_v2"])
def test_train_entry_runs_every_method(method, capsys):
    assert main(["--json", "train", "--model", "small", "--method", method, "--seq", "32", "--bs", "1", "--steps", "1",
                 "--device", "cpu", "--gradient-checkpointing"]) == 0
    (result,) = records(capsys)
    assert result["method"] == method and result["gradient_checkpointing"]


def test_int4_entry_compares_with_a_dense_layer(capsys):
    assert main(["--json", "int4", "--tokens", "4", "--repeat", "1", "--device", "cpu"]) == 0
    rows = records(capsys)
    assert [r["layer"] for r in rows] == ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    assert all(r["weight_bytes_int4"] * 3 < r["weight_bytes_dense"] for r in rows)  # packed: 4 bits + a scale per row


def test_eval_entry_compares_batched_with_one_by_one(capsys):
    assert main(["--json", "eval", "--model", "small", "--prompts", "3", "--new-tokens", "2", "--bs", "3",
                 "--device", "cpu"]) == 0
    (result,) = records(capsys)
    assert result["speedup"] == pytest.approx(result["one_by_one_s"] / result["batched_s"])


@pytest.mark.slow
def test_load_entry_measures_a_written_checkpoint(tmp_path, capsys):
    assert main(["--json", "load", "--model", "small", "--dir", str(tmp_path)]) == 0
    (result,) = records(capsys)
    assert result["checkpoint_bytes"] > 0 and result["peak_rss"] > result["baseline_rss"] > 0
    assert not any(tmp_path.iterdir())  # the temporary checkpoint is removed


def test_estimate_command_prints_a_fit_table(capsys):
    assert helpers_main(["estimate", "--method", "lora", "--bs", "4", "--seq", "512"]) == 0
    out = capsys.readouterr().out
    assert "total" in out and "fits on: T4-16G" in out and "3,670,016 trainable parameters" in out


def test_train_entry_counts_flops_and_measures_the_cpu_roofline(capsys):
    assert main(["--json", "train", "--model", "tiny", "--method", "freeze", "--layers", "1", "--dequantize",
                 "--seq", "16", "--bs", "1", "--steps", "1", "--warmup", "0", "--device", "cpu", "--roofline"]) == 0
    (result,) = records(capsys)
    assert result["options"] == {"layers": 1, "dequantize": True}
    assert result["forward_flops"] > 0 and result["backward_flops"] > 0
    assert result["cpu_mfu"] == pytest.approx(result["flops_per_s"] / result["gemm_flops_per_s"])
    assert result["peak_bytes"] >= result["ready_rss"] > 0 and result["baseline_rss"] > 0


def test_generate_entry_reports_peak_memory(capsys):
    assert main(["--json", "generate", "--model", "tiny", "--prompt", "8", "--new-tokens", "3", "--device",
                 "cpu"]) == 0
    (result,) = records(capsys)
    assert result["generated"] == 3 and result["peak_bytes"] >= result["ready_rss"] > 0 and result["baseline_rss"] > 0
