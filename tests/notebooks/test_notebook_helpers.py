"""helpers.notebook: parameters, model choice, tables, the live loss plot and the comparison explorer."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import helpers.course.display
from helpers import course as nb
from helpers.errors import UserError
from helpers.run.record import Run, RunRecord
from helpers.tasks import Example, get_task

# ---------------------------------------------------------------------------------------------------------
# Where we run
# ---------------------------------------------------------------------------------------------------------


def test_in_colab(monkeypatch):
    monkeypatch.delenv("COLAB_RELEASE_TAG", raising=False)
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    assert not nb.in_colab()
    monkeypatch.setitem(sys.modules, "google.colab", SimpleNamespace())
    assert nb.in_colab()


@pytest.mark.parametrize("env, expected", [
    ({}, False),
    ({"JPY_SESSION_NAME": "01_freeze.ipynb"}, True),
    ({"JPY_SESSION_NAME": "01_freeze.ipynb", "CI": "true"}, False),
    ({"CI": "true", "COURSE_TENSORBOARD": "1"}, True),
    ({"JPY_SESSION_NAME": "x", "COURSE_TENSORBOARD": "0"}, False),
])
def test_interactive_frontend(monkeypatch, env, expected):
    for key in ("JPY_SESSION_NAME", "CI", "COURSE_TENSORBOARD", "COLAB_RELEASE_TAG"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert nb.interactive_frontend() is expected


def test_runtime_report_on_cpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    info = nb.runtime_report()
    assert info["device"] == "cpu" and info["gpu"] is None and info["bf16"] is False
    assert info["cpu_cores"] >= 1
    assert "No GPU" in capsys.readouterr().out


def test_default_runs_dir_is_in_the_checkout():
    assert nb.default_runs_dir() == nb.repository_root() / "runs" / "notebooks"


# ---------------------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------------------


def test_params_defaults_and_environment():
    env = {"COURSE_STEPS": "8", "COURSE_EVAL_LIMIT": "all", "COURSE_DEQUANTIZE": "yes", "COURSE_TASK": "cls",
           "COURSE_LEARNING_RATE": "0.01", "COURSE_RUNS_DIR": "runs/ci", "COURSE_MODEL": " "}
    params = nb.params_from_env(env, model=None, task="ie", steps=None, eval_limit=4, dequantize=False,
                                learning_rate=None, runs_dir=None, layers=5)
    assert (params.model, params.task, params.steps, params.eval_limit) == (None, "cls", 8, None)
    assert params.dequantize is True and params.learning_rate == 0.01 and params.runs_dir == "runs/ci"
    assert params.layers == 5
    assert params.sources["steps"] == "COURSE_STEPS" and params.sources["layers"] == "notebook"
    assert "COURSE_STEPS" in repr(params) and "sources" not in params.as_dict()


def test_params_unknown_names_take_the_default_type():
    params = nb.params_from_env({"COURSE_WIDTH": "12", "COURSE_LABEL": "x"}, width=3, label=None)
    assert params.width == 12 and params.label == "x"


@pytest.mark.parametrize("env, message", [
    ({"COURSE_STEPS": "many"}, "COURSE_STEPS='many': expected int"),
    ({"COURSE_DEQUANTIZE": "maybe"}, "COURSE_DEQUANTIZE"),
    ({"COURSE_TASK": "ner"}, "task 'ner' is unknown"),
    ({"COURSE_STEPS": "0"}, r"COURSE_STEPS='0': steps \(--steps\) must be a whole number of at least 1"),
    ({"COURSE_LEARNING_RATE": "5"}, "far too large"),
])
def test_params_reject_bad_values(env, message):
    with pytest.raises(UserError, match=message):
        nb.params_from_env(env, task="ie", steps=None, dequantize=False)


@pytest.mark.parametrize("method, given, message", [
    ("qlora", {}, "unknown method 'qlora'; choose one of freeze, embedding, ptuning_v2, lora"),
    ("lora", {"max_steps": 10}, "unknown parameter 'max_steps' (did you mean steps?)"),
    ("lora", {"learnig_rate": 1e-3}, "unknown parameter 'learnig_rate' (did you mean learning_rate?)"),
    ("freeze", {"r": 4}, "r=4 is an option of lora, not of freeze"),
    ("lora", {"run_name": "../elsewhere"}, "run_name='../elsewhere': give a folder name for the run inside runs_dir"),
    ("lora", {"run_name": 3}, "run_name=3: give a folder name"),
    ("lora", {"other_runs": "nowhere.zip"}, "other_runs='nowhere.zip': no such file or folder"),
])
def test_setup_names_a_careless_parameter_before_anything_loads(monkeypatch, method, given, message):
    def no_loading(*args, **kwargs):
        raise AssertionError("loaded a model before checking the parameters")

    monkeypatch.setattr("helpers.models.load_model", no_loading)
    with pytest.raises(UserError, match=re.escape(message)):
        nb.setup(method, **given)


def test_setup_fills_in_the_parameters_left_out():
    filled = nb.setup_parameters("lora", {"steps": 3, "r": 2})
    assert filled == {"model": None, "task": "ie", "runs_dir": None, "run_name": None, "other_runs": None,
                      "full_data": False, "drive": False, "steps": 3, "r": 2}


# ---------------------------------------------------------------------------------------------------------
# Model choice and training settings
# ---------------------------------------------------------------------------------------------------------


def test_choose_model(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    name, banner = nb.choose_model()
    assert name == "tiny" and "TOY MODE" in banner
    name, banner = nb.choose_model("THUDM/chatglm-6b-int4")
    assert name == "THUDM/chatglm-6b-int4" and "WARNING: no GPU" in banner
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    name, banner = nb.choose_model()
    assert name == nb.REAL_MODEL and "TOY" not in banner and "WARNING" not in banner


def test_is_toy(tmp_path):
    assert nb.is_toy("tiny") and not nb.is_toy("THUDM/chatglm-6b-int4")
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64}))
    assert nb.is_toy(tmp_path) and nb.is_toy(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 4096}))
    assert not nb.is_toy(tmp_path)
    assert nb.is_toy(SimpleNamespace(config=SimpleNamespace(hidden_size=160)))


@pytest.mark.parametrize("method, parameters, argv", [
    ("freeze", {"layers": None, "dequantize": False}, []),
    ("freeze", {"layers": 1, "dequantize": False}, ["--layers", "1"]),
    ("ptuning_v2", {"pre_seq_len": 16, "prefix_projection": None}, ["--pre-seq-len", "16"]),
    ("lora", {"r": 8, "alpha": 32}, ["--r", "8", "--alpha", "32"]),
])
def test_notebook_and_command_line_train_the_same_parameters(tiny_checkpoint, method, parameters, argv):
    """The same method on the same model is the same run, whether a notebook or the command line asks for it."""
    from helpers.cli import build_parser, method_options
    from helpers.course.params import method_options as notebook_options
    from helpers.course.params import recipe_settings
    from helpers.methods import apply_method
    from helpers.models import load_model
    from helpers.run.recipe import given_settings, resolve_recipe

    params = nb.params_from_env({}, model=str(tiny_checkpoint), task="ie", steps=None, learning_rate=None,
                                eval_limit=None, runs_dir=None, **parameters)
    from_notebook = resolve_recipe(params.model, method, params.task, method_options=notebook_options(method, params),
                                   **recipe_settings(params))
    args = build_parser().parse_args(["train", "--model", str(tiny_checkpoint), "--method", method, "--out", "x",
                                      *argv])
    from_cli = resolve_recipe(args.model, method, args.task, method_options=method_options(args),
                              **given_settings(args))
    assert from_notebook == from_cli
    trained = [apply_method(load_model(str(tiny_checkpoint))[0], method, **recipe.method_options).trainable
               for recipe in (from_notebook, from_cli)]
    assert trained[0] == trained[1] and trained[0]


# ---------------------------------------------------------------------------------------------------------
# Full-size numbers
# ---------------------------------------------------------------------------------------------------------


def test_full_size_lines():
    freeze = nb.full_size_line("freeze", layers=5)
    assert freeze.trainable == 81_920 and "trainable params: 81,920 || all params: 3,355,746,304" in str(freeze)
    dequantized = nb.full_size_line("freeze", layers=5, dequantize=True)
    assert dequantized.trainable == 1_006_899_200
    assert dequantized.fits() == {"T4-16G": False, "A100-40G": True}
    assert nb.full_size_line("lora", r=8).trainable == 3_670_016
    assert nb.full_size_line("ptuning_v2", prefix_projection=False).trainable == 3_670_016
    projection = nb.full_size_line("ptuning_v2")
    assert projection.trainable == 956_600_320 and projection.states_bytes == 12 * 956_600_320
    assert 17 < projection.total_gib < 19


def test_full_size_table():
    table = nb.full_size_table([("freeze", {}), ("embedding", {})])
    assert "| freeze | defaults | 81,920 |" in table.text and "534,642,688" in table.text
    assert table._repr_markdown_() == repr(table) == table.text


# ---------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------

IE_EXAMPLE = Example("故障现象：发动机怠速抖动，火花塞积碳严重。", "发动机_性能故障_怠速抖动\n火花塞_部件故障_积碳严重")


def test_show_examples():
    table = nb.show_examples([IE_EXAMPLE, Example("x" * 200, "y")], n=5, width=20)
    assert "发动机_性能故障_怠速抖动<br>火花塞_部件故障_积碳严重" in table.text
    assert "x" * 20 + "…" in table.text and "2 rows in this split" in table.text


def test_layout_rows(small_tokenizer):
    task = get_task("ie")
    rows = nb.layout_rows(small_tokenizer, task, IE_EXAMPLE)
    roles = [r["role"] for r in rows]
    assert roles.count("[gMASK]") == roles.count("<sop>") == roles.count("<eop>") == 1
    gmask, sop = roles.index("[gMASK]"), roles.index("<sop>")
    assert sop == gmask + 1 and roles[-1] == "<eop>" and roles[0] == "prompt" and "text" in roles
    assert rows[gmask]["id"] == small_tokenizer.gmask_token_id and rows[-1]["id"] == small_tokenizer.eos_token_id
    assert all(not r["scored"] for r in rows[:sop]) and all(r["scored"] for r in rows[sop:])
    assert all(r["label"] == r["id"] for r in rows[sop:])


def test_show_layout(small_tokenizer):
    task = get_task("ie")
    short = nb.show_layout(small_tokenizer, task, IE_EXAMPLE)
    full = nb.show_layout(small_tokenizer, task, IE_EXAMPLE, full=True)
    assert "`[gMASK]`" in short.text and "`<sop>`" in short.text and "`<eop>`" in short.text
    assert "more) |" in short.text and "more) |" not in full.text
    assert len(full.text.splitlines()) == 4 + len(nb.layout_rows(small_tokenizer, task, IE_EXAMPLE))


def test_show_metrics_puts_the_main_metric_first():
    table = nb.show_metrics({"task": "ie", "main_metric": "f1", "precision": 0.5, "f1": 0.25, "n": 4})
    lines = table.text.splitlines()
    assert lines[0] == "| metric | value |" and lines[2] == "| **f1** (main) | **0.2500** |"
    assert "| n | 4 |" in lines and not any("main_metric" in line for line in lines)


def test_show_predictions_and_artifact(tmp_path):
    rows = [{"text": "文本|一", "prediction": "", "references": ["a_组成_b\nc_组成_d"]}]
    (tmp_path / "predictions.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    predictions = nb.show_predictions(tmp_path)
    assert "文本\\|一" in predictions.text and "| ∅ |" in predictions.text
    assert "a_组成_b<br>c_组成_d" in predictions.text
    (tmp_path / "artifact").mkdir()
    (tmp_path / "artifact" / "method.json").write_text("{}")
    (tmp_path / "artifact" / "trainable.safetensors").write_bytes(b"0" * 2048)
    artifact = nb.show_artifact(tmp_path)
    assert "| trainable.safetensors | 2.0 KiB |" in artifact.text and "2 files" in artifact.text


def test_show_runs_without_runs_says_what_to_do(tmp_path):
    text = nb.show_runs([], tmp_path).text
    assert "No runs found" in text and "QUICK_COMPARE" in text


# ---------------------------------------------------------------------------------------------------------
# Live loss plot
# ---------------------------------------------------------------------------------------------------------


def _feed(plot, losses, shell: bool = False):
    args, control = SimpleNamespace(max_steps=len(losses)), SimpleNamespace()
    state = SimpleNamespace(max_steps=len(losses), global_step=0, is_world_process_zero=True)
    plot.on_train_begin(args, state, control)
    for step, loss in enumerate(losses, start=1):
        state.global_step = step
        plot.on_log(args, state, control, logs={"loss": loss, "learning_rate": 0.1})
        plot.on_log(args, state, control, logs={"train_runtime": 1.0})  # not a loss line
    plot.on_train_end(args, state, control)


def test_live_loss_plot_collects_and_draws_without_a_notebook():
    plot = nb.LiveLossPlot(every=2, method="lora")
    _feed(plot, [3.0, 2.0, 1.5, 1.0, 0.5])
    assert plot.steps == [1, 2, 3, 4, 5] and plot.losses == [3.0, 2.0, 1.5, 1.0, 0.5]
    assert plot._handle is None  # no IPython kernel: nothing displayed
    figure = plot.figure()
    raw, smoothed = figure.axes[0].lines
    assert list(raw.get_ydata()) == plot.losses and smoothed.get_ydata()[0] == 3.0
    assert "lora: step 5/5, loss 0.5000" in figure.axes[0].get_title()


def test_live_loss_plot_updates_one_display(monkeypatch):
    shown = []

    class Handle:
        def update(self, figure):
            shown.append(("update", figure))

    def display(figure, display_id=False):
        shown.append(("display", figure))
        return Handle()

    import IPython.display

    monkeypatch.setattr(helpers.course.display, "shell_active", lambda: True)
    monkeypatch.setattr(IPython.display, "display", display)
    _feed(nb.LiveLossPlot(every=2), [3.0, 2.0, 1.0, 0.5])
    kinds = [kind for kind, _ in shown]
    assert kinds == ["display", "update", "update", "update"]  # begin, steps 2 and 4, end


# ---------------------------------------------------------------------------------------------------------
# Comparing runs
# ---------------------------------------------------------------------------------------------------------


def _run(method, task, loss=1.0):
    record = RunRecord(Path(f"{method}-{task}"), name=f"{method}-{task}", method=method, task=task,
                       trainable_params=10, all_params=100, peak_memory_bytes=2**20, train_runtime_s=1.0,
                       status="finished")
    history = [{"step": 1, "loss": loss + 1}, {"step": 2, "loss": loss}]
    return Run(record, history=history, metrics={"task": task, "main_metric": "f1", "f1": 0.1})


def test_main_task():
    assert nb.main_task([]) is None
    assert nb.main_task([_run("lora", "cls"), _run("freeze", "cls"), _run("lora", "ie")]) == "cls"


def test_comparison_explorer(monkeypatch):
    runs = [_run("freeze", "ie"), _run("lora", "ie"), _run("lora", "cls")]
    explorer = nb.ComparisonExplorer(runs, task="ie")
    assert [r.name for r in explorer.selected()] == ["freeze-ie", "lora-ie"]
    explorer.methods.value = ("lora",)
    assert [r.name for r in explorer.selected()] == ["lora-ie"]
    updates = []
    handle = SimpleNamespace(update=updates.append)
    explorer._figure = explorer._table = handle
    explorer.task.value = "cls"  # the widget calls update()
    assert [r.name for r in explorer.selected()] == ["lora-cls"]
    assert len(updates) == 2 and "lora-cls" in updates[1].text
    empty = nb.ComparisonExplorer([])
    figure, table = empty.views()
    assert "no runs found" in table.text and figure is not None


def test_task_files_default_to_the_bundled_sample():
    assert nb.task_files("ie", full=False) == (None, None)


def test_heldout_perplexity(small_tokenizer):
    from helpers.run.evaluation import heldout_texts, perplexity
    from tests.conftest import model_for

    model = model_for(small_tokenizer, seed=0)
    value = nb.heldout_perplexity(model, small_tokenizer, limit=3)
    assert value == pytest.approx(perplexity(model, small_tokenizer, heldout_texts(3)))


# ---------------------------------------------------------------------------------------------------------
# The method notebooks' setup companions
# ---------------------------------------------------------------------------------------------------------


def test_loss_windows_by_hand():
    losses = [10.0] * 2 + [5.0] * 16 + [1.0, 3.0]
    assert nb.loss_windows(losses) == (10.0, 2.0)  # a tenth of 20 points: the first two, the last two
    assert nb.loss_windows([4.0]) == (4.0, 4.0)
    with pytest.raises(ValueError):
        nb.loss_windows([])


@pytest.mark.parametrize("gpu_gib, expected", [(15.0, False), (79.0, True)])
def test_prefix_projection_follows_the_memory_estimate(capsys, gpu_gib, expected):
    from helpers.estimate import estimate

    course = SimpleNamespace(toy=False, runtime={"gpu_memory_gib": gpu_gib}, model_name=nb.REAL_MODEL,
                             task=get_task("ie"))
    assert nb.choose_prefix_projection(course, None, 16) is expected
    out = capsys.readouterr().out
    seq = get_task("ie").max_source_length + get_task("ie").max_target_length + 3
    peak = estimate(nb.REAL_MODEL, "ptuning_v2", seq=seq, batch=1, gradient_checkpointing=True,
                    prefix_projection=True).total / 2**30
    assert f"estimated peak is {peak:.1f} GiB" in out and f"this GPU has {gpu_gib:.1f} GiB" in out
    assert ("WARNING" in out and "IE F1 0.0" in out) is not expected


def test_prefix_projection_as_requested_and_on_the_tiny_model(capsys):
    course = SimpleNamespace(toy=True, runtime={"gpu_memory_gib": None}, model_name="tiny", task=get_task("ie"))
    assert nb.choose_prefix_projection(course, None, 4) is True
    assert nb.choose_prefix_projection(course, False, 4) is False
    out = capsys.readouterr().out
    assert "set by PREFIX_PROJECTION" in out and out.count("WARNING") == 1


def test_drive_only_on_colab(monkeypatch, capsys):
    monkeypatch.delenv("COLAB_RELEASE_TAG", raising=False)
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    assert nb.drive_runs_dir(False) is None
    assert nb.drive_runs_dir(True) is None
    assert "only applies on Colab" in capsys.readouterr().out


def test_comparison_explorer_headless_shows_no_widgets(monkeypatch):
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda obj, display_id=False: shown.append(obj))
    monkeypatch.setenv("COURSE_TENSORBOARD", "0")
    explorer = nb.ComparisonExplorer([_run("freeze", "ie")], task="ie")
    explorer.show()
    assert explorer.controls not in shown and len(shown) == 2  # the figure and the table
    monkeypatch.setenv("COURSE_TENSORBOARD", "1")
    explorer.show()
    assert shown[2] is explorer.controls


def test_find_runs_in_a_folder_not_made_yet(tmp_path):
    assert nb.find_runs(tmp_path / "not-yet") == []
    assert nb.find_runs(tmp_path) == []


def test_rankings_show_order_ties_and_the_published_ranking():
    runs = [_run("freeze", "ie", loss=2.0), _run("lora", "ie", loss=0.5), _run("embedding", "ie", loss=1.0)]
    runs[1].metrics["f1"] = 0.3
    runs[1].record.final_loss, runs[0].record.final_loss = 0.5, 2.0
    lines = nb.rankings(runs)
    assert lines[0] == "your runs by f1: lora-ie 0.300 > freeze-ie 0.100 = embedding-ie 0.100"
    assert lines[1] == "your runs by final training loss (lowest first): lora-ie 0.500 < freeze-ie 2.000"
    assert lines[2].endswith("PT 0.6283 > Freeze 0.5675 > Lora 0.5359 > PT-Only-Embedding 0.0")


def test_share_table_puts_the_toy_next_to_full_size():
    run = _run("embedding", "ie")
    run.record.trainable_params, run.record.all_params = 35, 100
    table = nb.share_table([run]).text
    assert "| embedding-ie | 35 | 35 % | 534,642,688 | 16 % |" in table
