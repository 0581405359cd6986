"""The command line end to end on a fast tiny model: compare writes the plot and the table."""

import json

import pytest

from helpers.cli import main


@pytest.mark.slow
def test_compare_end_to_end(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "compare"
    code = main(["compare", "--model", str(tiny_checkpoint), "--task", "cls", "--methods", "freeze,lora",
                 "--steps", "3", "--batch-size", "4", "--eval-limit", "4", "--max-new-tokens", "4", "--out", str(out)])
    assert code == 0
    for name in ("comparison.png", "comparison.md", "comparison.json", "summary.json"):
        assert (out / name).stat().st_size > 0
    rows = json.loads((out / "comparison.json").read_text())
    assert [r["method"] for r in rows] == ["freeze", "lora"]
    assert all(r["accuracy"] is not None and r["trainable_params"] > 0 for r in rows)
    for method in ("freeze", "lora"):
        metrics = json.loads((out / method / "metrics.json").read_text())
        assert {"accuracy", "rank_accuracy", "perplexity_before", "perplexity_after"} <= set(metrics)
        assert (out / method / "predictions.jsonl").read_text().count("\n") == 4
    printed = capsys.readouterr().out
    assert "| method |" in printed and "comparison.png" in printed


@pytest.mark.slow
def test_train_then_evaluate_a_run_folder(tiny_checkpoint, tmp_path, capsys):
    run = tmp_path / "pt"
    assert main(["train", "--model", str(tiny_checkpoint), "--task", "gen", "--method", "ptuning_v2",
                 "--pre-seq-len", "4", "--no-projection", "--steps", "2", "--batch-size", "2", "--eval-limit", "2",
                 "--max-new-tokens", "4", "--out", str(run)]) == 0
    info = json.loads((run / "run.json").read_text())
    assert info["method_options"] == {"pre_seq_len": 4, "prefix_projection": False}
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--eval-limit", "2", "--max-new-tokens", "4",
                 "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    first = json.loads((run / "metrics.json").read_text())
    assert again["rouge_l"] == pytest.approx(first["rouge_l"])  # the reloaded run answers the same


def test_download_lists_the_registry(capsys):
    assert main(["download", "--list"]) == 0
    out = capsys.readouterr().out
    assert "spo" in out and "d2q" in out and "tnews" in out
