"""Run folders written by hand: loading, smoothing, the comparison table and figures."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest
from matplotlib.container import BarContainer
from matplotlib.figure import Figure

from helpers import plotting, plotting_panels
from helpers.errors import UserError
from helpers.estimate import full_size_line
from helpers.run.memory import GIB, MIB
from helpers.run.record import Run, RunRecord, load_runs


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
    write_run(root, "z-lora", "lora", metrics={**IE_METRICS, "perplexity_before": 20.0, "perplexity_after": 24.0})
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
    assert rows[3]["perplexity_after"] == 24.0
    assert freeze["seconds_per_step"] == pytest.approx(12.5 / 3) and freeze["global_step"] == 3
    assert freeze["peak_memory_kind"] == "rss" and freeze["memory_at_start_mb"] == pytest.approx(1.0)
    assert freeze["full_size_peak_gib"] == pytest.approx(full_size_line("freeze").peak_gib)
    assert rows[-1]["method"] == "bitfit" and rows[-1]["full_size_peak_gib"] is None  # not one of the four
    table = plotting.comparison_markdown(rows)
    lines = table.strip().splitlines()
    assert len(lines) == 2 + len(runs)
    assert "123,456" in lines[2] and "0.3333" in lines[2] and "61.7280" in lines[2]
    assert "| 3 (CPU process RSS) |" in lines[2]  # the measured peak says what it measured
    assert "20 → 24 (+20 %)" in lines[5]


def test_plot_comparison_panels(runs_dir, tmp_path):
    runs = load_runs(runs_dir)
    fig = plotting.plot_comparison(runs, tmp_path / "fig.png")
    assert (tmp_path / "fig.png").stat().st_size > 0
    loss, metric, params, memory, runtime, forgetting = fig.axes
    assert len(loss.lines) == 2 * len(runs)
    bars = lambda ax: sum(len(c) for c in ax.containers if isinstance(c, BarContainer))  # noqa: E731
    headline = plotting_panels.HEADLINE_METRICS[runs[0].task]
    assert bars(metric) == 2 * len(headline)  # only freeze and lora were evaluated; one bar per headline metric
    assert bars(params) == bars(runtime) == bars(memory) == len(runs)  # bitfit: no estimate, an empty slot
    assert params.get_yscale() == "log"
    assert bars(forgetting) == 1  # the one run that has a perplexity before and after
    assert [t.get_text() for t in forgetting.texts] == ["+20 %"]
    assert "×1" in forgetting.get_legend().get_texts()[0].get_text()
    assert all("_" not in t.get_text() for t in metric.get_legend().get_texts())
    assert runtime.get_ylabel() == "seconds per training step"


def test_bar_labels_use_one_format_per_panel():
    assert plotting_panels._labels([626.0, 1000.0, 12.4]) == ["626", "1,000", "12"]  # not "1k" next to "626"
    assert plotting_panels._labels([81_920.0, 3_670_016.0]) == ["81.9k", "3.67M"]
    assert plotting_panels._labels([0.5359, 0.0, None]) == ["0.536", "0", "–"]


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


# ----------------------------------------------------------------------------------------------------------
# Figures that read right: the tiny model's IE runs of issue 21 (perplexity 3,693 before every run)
# ----------------------------------------------------------------------------------------------------------

OPTIONS = {"freeze": {"layers": 4, "dequantize": False}, "embedding": {},
           "ptuning_v2": {"pre_seq_len": 16, "prefix_projection": True},
           "lora": {"r": 8, "alpha": 32, "dropout": 0.1, "target_modules": ["query_key_value"]}}
AFTER = {"freeze": 5_634.0, "embedding": 6_575_773_263.0, "ptuning_v2": 45_264.0, "lora": 3_485.0}
PEAK_MIB = {"freeze": 666, "embedding": 690, "ptuning_v2": 672, "lora": 682}


def made_run(method: str, source: str | None = None, steps: int = 300, runtime: float = 300.0,
             **record: object) -> Run:
    """A finished IE run in memory, as the issue measured it on the tiny model (fields overridable)."""
    fields = dict(name=f"{method}-ie", status="finished", method=method, task="ie", model="tiny",
                  hardware="CPU (x86_64), 2 cores", recipe={"method_options": OPTIONS.get(method, {}), "steps": steps,
                                                             "batch_size": 8},
                  trainable_params=4096, all_params=2_451_968, global_step=steps, train_runtime_s=runtime,
                  peak_memory_bytes=PEAK_MIB.get(method, 680) * MIB, peak_memory_kind="rss",
                  memory_at_start_bytes=515 * MIB)
    fields.update(record)
    rng = random.Random(method)
    history = [{"step": step, "loss": 3.0 / step + rng.random() / 10} for step in range(1, steps + 1, 10)]
    metrics = {"task": "ie", "main_metric": "f1", "f1": 0.1, "char_f1": 0.6, "perplexity_before": 3_693.0,
               "perplexity_after": AFTER.get(method, 3_693.0)}
    return Run(RunRecord(Path(fields["name"]), **fields), history, metrics, source=source)


def issue_runs() -> list[Run]:
    return [made_run(method) for method in ("freeze", "embedding", "ptuning_v2", "lora")]


def patches(ax) -> list:
    return [patch for container in ax.containers if isinstance(container, BarContainer) for patch in container]


def test_perplexity_change_by_hand():
    assert plotting.perplexity_change(3_693, 5_634) == "+53 %"  # 5,634 / 3,693 = 1.5256
    assert plotting.perplexity_change(3_693, 3_485) == "\u22126 %"  # 0.9437: 5.6 % lower
    assert plotting.perplexity_change(3_693, 45_264) == "×12.3"  # 12.257
    assert plotting.perplexity_change(3_693, 6_575_773_263) == "×1.78 million"  # 1,780,592
    assert plotting.perplexity_change(20, 24) == "+20 %"
    assert plotting.perplexity_change(200, 201) == "+0.5 %"
    assert plotting.perplexity_change(50, 50) == "±0 %"
    assert plotting.perplexity_change(10, 40) == "×4"
    assert plotting.perplexity_change(1_000, 4) == "÷250"
    assert plotting.perplexity_change(0, 5) == plotting.perplexity_change(5, math.nan) == "–"


def test_people_number_by_hand():
    assert [plotting.people_number(v) for v in (0.94366, 21.5, 20.0, 3_693.24, 45_264.0, 999_999.0)] == \
        ["0.944", "21.5", "20", "3,693", "45,264", "1 million"]
    assert plotting.people_number(6_575_773_263.2) == "6.58 billion"
    assert plotting.people_number(1_780_592.0) == "1.78 million"


def test_markdown_writes_perplexity_for_people():
    table = plotting.comparison_markdown(plotting.comparison_rows(issue_runs()))
    assert "3,693 → 6.58 billion (×1.78 million)" in table and "3,693 → 5,634 (+53 %)" in table
    assert "3,693 → 3,485 (\u22126 %)" in table


def test_forgetting_panel_keeps_every_bar_visible_on_a_log_axis():
    fig = plotting.plot_comparison(issue_runs())
    forgetting = fig.axes[5]
    assert forgetting.get_yscale() == "log"
    low, high = (math.log10(limit) for limit in forgetting.get_ylim())
    for patch in patches(forgetting):
        ends = sorted(math.log10(y) for y in (patch.get_y(), patch.get_y() + patch.get_height()))
        assert ends[0] <= 0 <= ends[1], "every bar starts at ×1"
        assert (ends[1] - ends[0]) / (high - low) > 0.02, "each bar spans more than 2 % of the axis"
    lora = patches(forgetting)[3]
    assert min(lora.get_y(), lora.get_y() + lora.get_height()) < 1, "a lower perplexity draws below ×1"
    labels = [text.get_text() for text in forgetting.texts]
    assert labels == ["+53 %", "×1.78 million", "×12.3", "\u22126 %"]
    assert not any(re.search(r"\d{5,}(\.\d*)?\s*%", label.replace(",", "")) for label in labels)
    assert "relative" in forgetting.get_title() and "higher = more forgetting" in forgetting.get_title()


def test_memory_panel_of_cpu_runs_shows_the_full_size_estimate_and_names_rss():
    runs = issue_runs()
    memory = plotting.plot_comparison(runs).axes[3]
    words = memory.get_title() + memory.get_ylabel()
    assert "CPU process" in words and "RSS" in words and "full-size" in words
    heights = [patch.get_height() for patch in patches(memory)]
    expected = [full_size_line(run.method, **OPTIONS[run.method]).peak_gib for run in runs]
    assert heights == pytest.approx(expected)
    assert heights[3] < 6 < 16 < heights[1] < heights[2]  # LoRA ~5.2 GiB, embedding ~16.1, P-tuning v2 ~19.5
    labels = [text.get_text() for text in memory.texts]
    assert "RSS 690 MiB" in labels[1] and "515 at start" in labels[1]


def test_memory_panel_of_gpu_runs_puts_measured_next_to_estimate_in_gib():
    runs = [made_run(method, peak_memory_kind="cuda", peak_memory_bytes=7 * GIB) for method in ("freeze", "lora")]
    memory = plotting.plot_comparison(runs).axes[3]
    assert "GiB" in memory.get_ylabel()
    measured, estimated = [[patch.get_height() for patch in container] for container in memory.containers]
    assert measured == pytest.approx([7.0, 7.0])
    assert estimated == pytest.approx([full_size_line(m, **OPTIONS[m]).peak_gib for m in ("freeze", "lora")])


def test_memory_panel_without_any_estimate_names_the_cpu_process():
    memory = plotting.plot_comparison([made_run("bitfit")]).axes[3]
    assert memory.get_ylabel() == "this CPU process (RSS), MiB"
    assert patches(memory)[0].get_height() == pytest.approx(680)


def test_time_panel_shows_seconds_per_step_when_step_counts_differ():
    runs = [made_run("freeze", steps=300, runtime=360.0), made_run("lora", steps=150, runtime=30.0),
            made_run("embedding", steps=300, runtime=100.0, resumed_from_step=200)]  # 100 s for the last 100 steps
    assert plotting.seconds_per_step(runs) == {"freeze-ie": 1.2, "lora-ie": 0.2, "embedding-ie": 1.0}
    runtime = plotting.plot_comparison(runs).axes[4]
    assert "per step" in runtime.get_title() and runtime.get_ylabel() == "seconds per training step"
    assert [patch.get_height() for patch in patches(runtime)] == pytest.approx([1.2, 0.2, 1.0])  # in the given order
    labels = [text.get_text() for text in runtime.texts]
    assert "150 steps" in labels[1] and "30 s" in labels[1] and "100 steps" in labels[2]


def test_runs_from_elsewhere_name_their_model_and_hardware(tmp_path):
    teacher = made_run("lora", source="teacher.zip", model="THUDM/chatglm-6b-int4", hardware="NVIDIA A100-SXM4-40GB")
    unknown = made_run("freeze", source="teacher.zip", model="THUDM/chatglm-6b-int4", hardware=None)
    runs = [made_run("lora"), teacher, unknown]
    assert plotting.run_labels(runs) == ["lora", "lora (chatglm-6b-int4, NVIDIA A100-SXM4-40GB)",
                                         "freeze (chatglm-6b-int4, hardware not recorded)"]
    fig = plotting.plot_comparison(runs)
    legend = [text.get_text() for text in fig.axes[0].get_legend().get_texts()]
    assert legend == plotting.run_labels(runs)
    for ax in fig.axes[1:]:
        ticks = [" ".join(tick.get_text().split()) for tick in ax.get_xticklabels()]
        assert "lora (chatglm-6b-int4, NVIDIA A100-SXM4-40GB)" in ticks, ax.get_title()
    curves = [line.get_label() for line in plotting.plot_reference_curves(runs).axes[0].get_lines()
              if not line.get_label().startswith("_")]
    assert "your run: lora, 291 steps" in curves
    assert "lora (chatglm-6b-int4, NVIDIA A100-SXM4-40GB), 291 steps" in curves
    assert not any(label.startswith("your run: freeze") for label in curves)
    assert "| lora (chatglm-6b-int4, NVIDIA A100-SXM4-40GB) |" in plotting.comparison_markdown(
        plotting.comparison_rows(runs))


def test_figures_take_a_folder_or_one_run_and_refuse_other_things(runs_dir):
    runs = load_runs(runs_dir)
    from_folder = plotting.plot_loss_curves(runs_dir).axes[0]
    assert [t.get_text() for t in from_folder.get_legend().get_texts()] == [r.method for r in runs]
    assert len(plotting.plot_loss_curves(runs[0]).axes[0].lines) == 2
    assert plotting.comparison_rows(str(runs_dir)) == plotting.comparison_rows(runs)
    for wrong in (3, ["runs"]):
        with pytest.raises(UserError, match="runs must be Run objects"):
            plotting.plot_loss_curves(wrong)
