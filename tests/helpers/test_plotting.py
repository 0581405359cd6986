"""Run folders written by hand: loading, smoothing, the comparison table and figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from matplotlib.container import BarContainer
from matplotlib.figure import Figure

from helpers import plotting
from helpers.run.record import load_runs


def write_run(root: Path, name: str, method: str, losses=(2.0, 1.5, 1.0), metrics: dict | None = None,
              trainable: int = 1000, extra_history: str = "") -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    info = {
        "name": name, "method": method, "method_options": {}, "task": "ie", "model": "tiny", "quantization_bit": 4,
        "device": "cpu", "dtype": "float32", "hyperparameters": {"learning_rate": 1e-3}, "seed": 0,
        "versions": {}, "trainable_params": trainable, "all_params": 200_000, "status": "finished",
        "train_runtime_s": 12.5, "peak_memory_bytes": 3 * (1 << 20), "peak_memory_kind": "rss",
        "memory_at_start_bytes": 1 << 20,
        "global_step": len(losses), "final_loss": losses[-1] if losses else None,
    }
    (folder / "run.json").write_text(json.dumps(info), encoding="utf-8")
    lines = [json.dumps({"step": i + 1, "epoch": (i + 1) / len(losses), "loss": loss, "learning_rate": 1e-3,
                         "grad_norm": None, "elapsed_s": float(i)}) for i, loss in enumerate(losses)]
    (folder / "loss_history.jsonl").write_text("\n".join(lines) + "\n" + extra_history, encoding="utf-8")
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    return folder


IE_METRICS = {"task": "ie", "main_metric": "f1", "precision": 0.5, "recall": 0.25, "f1": 1 / 3, "sample_precision": 0.4,
              "sample_recall": 0.3, "sample_f1": 0.3, "n": 4, "eval_seconds": 1.0}


@pytest.fixture
def runs_dir(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "z-lora", "lora", metrics={**IE_METRICS, "perplexity_before": 20.0, "perplexity_after": 21.5})
    write_run(root, "a-freeze", "freeze", metrics=IE_METRICS, trainable=123_456)
    write_run(root, "m-pt", "ptuning_v2", extra_history='{"step": 4, "loss": 0.')  # cut off while writing
    write_run(root, "b-other", "bitfit")
    write_run(root, "c-embed", "embedding")
    (root / "not-a-run").mkdir()
    (root / "notes.txt").write_text("hello", encoding="utf-8")
    return root


def test_load_runs_orders_by_method_and_skips_non_runs(runs_dir):
    runs = load_runs(runs_dir)
    assert [r.method for r in runs] == ["freeze", "embedding", "ptuning_v2", "lora", "bitfit"]
    assert [r.name for r in runs] == ["a-freeze", "c-embed", "m-pt", "z-lora", "b-other"]
    assert runs[0].metrics["main_metric"] == "f1" and runs[1].metrics == {}
    assert runs[0].task == "ie"


def test_load_runs_accepts_run_folders_and_ignores_duplicates(runs_dir):
    runs = load_runs(runs_dir / "z-lora", runs_dir / "a-freeze", runs_dir, runs_dir / "not-a-run")
    assert [r.name for r in runs] == ["a-freeze", "c-embed", "m-pt", "z-lora", "b-other"]


def test_truncated_last_history_line_is_ignored(runs_dir):
    run = load_runs(runs_dir / "m-pt")[0]
    assert [row["loss"] for row in run.history] == [2.0, 1.5, 1.0]


def test_broken_line_in_the_middle_is_an_error(tmp_path):
    folder = write_run(tmp_path, "bad", "lora")
    path = folder / "loss_history.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join([lines[0], "{oops", lines[1]]) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="loss_history.jsonl:2"):
        load_runs(folder)


def test_smooth_by_hand():
    # weight 0.5: EMA 0.5, 1.25, 2.125 divided by 1 - 0.5**k = 0.5, 0.75, 0.875
    assert plotting.smooth([1.0, 2.0, 3.0], weight=0.5) == pytest.approx([1.0, 5 / 3, 17 / 7])
    assert plotting.smooth([4.0, 1.0], weight=0.0) == [4.0, 1.0]
    assert plotting.smooth([]) == []


def test_plot_loss_curves_draws_raw_and_smoothed_line_per_run(runs_dir):
    runs = load_runs(runs_dir)
    fig = plotting.plot_loss_curves(runs)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert len(ax.lines) == 2 * len(runs)
    raw, smoothed = ax.lines[0], ax.lines[1]
    assert raw.get_alpha() == pytest.approx(0.25)
    assert raw.get_color() == smoothed.get_color() == plotting.METHOD_COLORS["freeze"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [r.method for r in runs]


def test_legend_names_runs_that_share_a_method(tmp_path):
    write_run(tmp_path, "lora-a", "lora")
    write_run(tmp_path, "lora-b", "lora")
    fig = plotting.plot_loss_curves(load_runs(tmp_path))
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["lora (lora-a)", "lora (lora-b)"]


def test_comparison_rows_and_markdown(runs_dir):
    runs = load_runs(runs_dir)
    rows = plotting.comparison_rows(runs)
    freeze = rows[0]
    assert freeze["main_metric"] == "f1" and freeze["main_value"] == pytest.approx(1 / 3)
    assert freeze["precision"] == 0.5 and freeze["sample_f1"] == 0.3
    assert freeze["trainable_params"] == 123_456
    assert freeze["trainable_pct"] == pytest.approx(100 * 123_456 / 200_000)
    assert freeze["peak_memory_mb"] == pytest.approx(3.0)
    assert freeze["train_runtime_s"] == 12.5 and freeze["final_loss"] == 1.0
    assert rows[1]["main_value"] is None
    assert rows[3]["perplexity_after"] == 21.5
    table = plotting.comparison_markdown(rows)
    lines = table.strip().splitlines()
    assert len(lines) == 2 + len(runs)
    assert "123,456" in lines[2] and "0.3333" in lines[2] and "61.7280" in lines[2]


def test_plot_comparison_panels(runs_dir, tmp_path):
    runs = load_runs(runs_dir)
    fig = plotting.plot_comparison(runs, tmp_path / "fig.png")
    assert (tmp_path / "fig.png").stat().st_size > 0
    loss, metric, params, memory, runtime, forgetting = fig.axes
    assert len(loss.lines) == 2 * len(runs)
    bars = lambda ax: sum(len(c) for c in ax.containers if isinstance(c, BarContainer))  # noqa: E731
    headline = plotting.HEADLINE_METRICS[runs[0].task]
    assert bars(metric) == 2 * len(headline)  # only freeze and lora were evaluated; one bar per headline metric
    assert bars(params) == bars(runtime) == len(runs)
    assert bars(memory) == 2 * len(runs)  # peak, and the part in use at the start drawn over it
    assert params.get_yscale() == "log"
    assert bars(forgetting) == 2  # before and after, for the one run that has them
    legend = [t.get_text() for t in forgetting.get_legend().get_texts()]
    assert legend == ["before training", "after training"]  # words, not metrics.json keys
    assert all("_" not in t.get_text() for t in metric.get_legend().get_texts())
    assert runtime.get_ylabel() == "time (s)"


def test_bar_labels_use_one_format_per_panel():
    assert plotting._labels([626.0, 1000.0, 12.4]) == ["626", "1,000", "12"]  # not "1k" next to "626"
    assert plotting._labels([81_920.0, 3_670_016.0]) == ["81.9k", "3.67M"]
    assert plotting._labels([0.5359, 0.0]) == ["0.536", "0"]


def test_plot_comparison_without_perplexity_shows_a_note(tmp_path):
    write_run(tmp_path, "only", "lora")
    fig = plotting.plot_comparison(load_runs(tmp_path))
    assert "No forgetting check" in fig.axes[-1].texts[0].get_text()


def test_write_comparison_writes_three_files(runs_dir, tmp_path):
    runs = load_runs(runs_dir)
    paths = plotting.write_comparison(runs, tmp_path / "out")
    assert sorted(p.name for p in paths.values()) == ["comparison.json", "comparison.md", "comparison.png"]
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    markdown_rows = [line for line in paths["md"].read_text(encoding="utf-8").splitlines() if line.startswith("| ")]
    assert len(markdown_rows) == 1 + len(runs)  # header and one row per run
    assert [row["name"] for row in json.loads(paths["json"].read_text(encoding="utf-8"))] == [r.name for r in runs]
