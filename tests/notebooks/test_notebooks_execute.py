"""Run every notebook top to bottom, headless, on the tiny model: no errors, figures drawn, metrics shown, clean.

The five notebooks run in order in one shared runs folder (05_compare reads the runs of 01-04), with the
environment variables the notebooks read shortening training and evaluation; then 02 runs on the cls task and 04
on gen. Executed copies are written to a temporary folder, never into the repository. The seconds each notebook
took are printed with ``-s`` (the README's notebook table reports them; timing goals belong in bench/).
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import nbformat
import pytest

from helpers.run.recipe import resolve_recipe

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS_DIR = REPO / "notebooks"
METHOD_NOTEBOOKS = {"01_freeze.ipynb": "freeze", "02_embedding.ipynb": "embedding",
                    "03_ptuning_v2.ipynb": "ptuning_v2", "04_lora.ipynb": "lora"}
ORDER = [*METHOD_NOTEBOOKS, "05_compare.ipynb"]
OTHER_TASKS = {"02_embedding.ipynb": "cls", "04_lora.ipynb": "gen"}  # run after the five, with COURSE_TASK
MAIN_METRIC = {"ie": "f1", "gen": "rouge_l", "cls": "accuracy"}
BY_HAND = re.compile(r"by hand: ([\d,]+) trainable parameters")
# What 03 and 04 print when their mechanism checks pass (each line follows an assert in the notebook).
MECHANISM_CHECKS = {
    "03_ptuning_v2.ipynb": ("largest difference to the layer's own output",
                            "without its prefix the model gives the base model's logits, bit for bit: True"),
    "04_lora.ipynb": ("with B = 0 the adapted model gives the base model's logits exactly: True",
                      "adapters disabled: the base model's logits, bit for bit: True"),
}

pytestmark = pytest.mark.slow


def execute(name: str, out_dir: Path) -> tuple[nbformat.NotebookNode, float]:
    """Execute one notebook with the notebooks folder as working directory; returns it and the seconds taken."""
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOKS_DIR / name, as_version=4)
    client = NotebookClient(notebook, timeout=600, startup_timeout=180, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS_DIR)}})
    started = time.time()
    try:
        client.execute()
    finally:
        out_dir.mkdir(parents=True, exist_ok=True)
        nbformat.write(notebook, out_dir / name)  # kept for inspection when a test fails
    return notebook, time.time() - started


def course_env(monkeypatch: pytest.MonkeyPatch, model: Path, runs: Path, cache: Path) -> None:
    """What the kernel inherits: the tiny test checkpoint, few steps, few test rows, no TensorBoard server."""
    for key, value in {"COURSE_MODEL": str(model), "COURSE_STEPS": "8", "COURSE_EVAL_LIMIT": "4",
                       "COURSE_RUNS_DIR": str(runs), "CHATGLM_COURSE_CACHE": str(cache),
                       "COURSE_TENSORBOARD": "0", "TQDM_MININTERVAL": "5"}.items():
        monkeypatch.setenv(key, value)
    for key in ("COURSE_TASK", "COURSE_QUICK_COMPARE", "COURSE_FULL_DATA", "COURSE_LEARNING_RATE"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture(scope="module")
def executed(tiny_checkpoint, tmp_path_factory):
    """{name or (name, task): (executed notebook or the error, seconds)}: the five in order, then two on other tasks."""
    root = tmp_path_factory.mktemp("notebooks")
    results = {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        course_env(monkeypatch, tiny_checkpoint, root / "runs", root / "cache")
        for name in ORDER:
            started = time.time()
            try:
                results[name] = execute(name, root / "executed")
            except Exception as error:  # reported by the test of that notebook
                results[name] = (error, time.time() - started)
        monkeypatch.setenv("COURSE_STEPS", "4")
        monkeypatch.setenv("COURSE_EVAL_LIMIT", "2")
        for name, task in OTHER_TASKS.items():
            monkeypatch.setenv("COURSE_TASK", task)
            started = time.time()
            try:
                results[(name, task)] = execute(name, root / f"executed-{task}")
            except Exception as error:
                results[(name, task)] = (error, time.time() - started)
    report = ", ".join(f"{name} {results[name][1]:.0f} s" for name in ORDER)
    others = ", ".join(f"{name} on {task} {results[(name, task)][1]:.0f} s" for name, task in OTHER_TASKS.items())
    print(f"\nnotebook execution times (8 steps, 4 test rows): {report}; then (4 steps, 2 rows) {others}")
    results["runs"] = root / "runs"
    return results


def outputs(notebook, kind: str) -> list:
    return [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if kind in o.get("data", {})]


def stdout(notebook) -> str:
    return "".join(o.text for c in notebook.cells if c.cell_type == "code" for o in c.outputs
                   if o.output_type == "stream" and o.name == "stdout")


def stderr(notebook) -> str:
    return "".join(o.text for c in notebook.cells if c.cell_type == "code" for o in c.outputs
                   if o.output_type == "stream" and o.name == "stderr")


def assert_clean(notebook, name) -> None:
    """No frozen progress bar, no widget repr saved as text: what a reader of the executed notebook would see."""
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        for stream in ("stdout", "stderr"):
            text = "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == stream)
            shown = [line.rsplit("\r", 1)[-1] for line in text.split("\n")]  # what a terminal or Jupyter shows
            frozen = [line for line in shown if re.match(r"^[^|]*\b0%\|", line)]
            assert not frozen, f"{name} cell {index}: a progress bar left at 0%: {frozen[0]!r}"
            assert "Loading weights" not in text, f"{name} cell {index}: a 'Loading weights' bar"
        for output in cell.outputs:
            plain = output.get("data", {}).get("text/plain", "")
            assert not plain.startswith(("HBox(", "VBox(")), f"{name} cell {index}: a widget as text: {plain[:40]}"
            assert "application/vnd.jupyter.widget-view+json" not in output.get("data", {}), (
                f"{name} cell {index}: a widget output (run headless, the notebook must show plain outputs)")


def _result(executed, name):
    notebook, seconds = executed[name]
    if isinstance(notebook, Exception):
        pytest.fail(f"{name} failed after {seconds:.0f} s:\n{notebook}")
    return notebook


def test_python3_kernel_runs_this_interpreter():
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("python3")
    assert spec.argv[0] in ("python", "python3", sys.executable), (
        f"the python3 kernel runs {spec.argv[0]}, not this environment's Python; install ipykernel here")


def check_method_run(notebook, name: str, run: Path, task: str, steps: int, rows: int, tiny_checkpoint: Path) -> None:
    """What every executed method notebook must show and write, and its mechanism cell's count checked."""
    method = METHOD_NOTEBOOKS[name]
    assert_clean(notebook, name)
    assert len(outputs(notebook, "image/png")) >= 2, f"{name}: expected the live loss plot and the reference plot"
    tables = [o["data"]["text/markdown"] for o in outputs(notebook, "text/markdown")]
    main = MAIN_METRIC[task]
    assert any(t.startswith("| metric | value |") and f"**{main}** (main)" in t for t in tables), f"{name}: no metrics"
    text = stdout(notebook)
    assert "TOY MODE" in text, f"{name}: the tiny model must come with its banner"
    defaults = resolve_recipe(str(tiny_checkpoint), method, task, check_data=False)
    assert (f"Training: {steps} steps at learning rate {defaults.learning_rate:g} (this model's defaults for "
            f"{method} on {task}: {defaults.steps} steps") in text, f"{name}: the setup must say what it trains"
    assert "trainable params:" in text and "same answer after reloading: True" in text
    assert "Training settings of this run" in text and "AdamW" in text, f"{name}: the setup shows the run's settings"
    assert "trainable on this model:" in text and "at full size:" in text, f"{name}: the toy's share next to full size"
    for phrase in MECHANISM_CHECKS.get(name, ()):
        assert phrase in text, f"{name}: the mechanism check {phrase!r} did not print"
    training = next(c for c in notebook.cells if c.cell_type == "code" and "S.train(setup)" in c.source)
    streamed = "".join(o.get("text", "") for o in training.outputs if o.output_type == "stream")
    assert len(training.outputs) <= 4 and len(streamed) < 5000, (
        f"{name}: the training cell keeps one progress display, not {len(training.outputs)} outputs "
        f"({len(streamed)} characters of text)")
    assert f"helpers.{method} trains exactly" in text, f"{name}: the mechanism cell and helpers.{method} disagree"
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["task"] == task and metrics["n"] == rows and main in metrics and "perplexity_after" in metrics
    record = json.loads((run / "run.json").read_text(encoding="utf-8"))
    assert record["global_step"] == steps
    assert (run / "artifact" / "method.json").is_file()
    assert f"{main} = {metrics[main]:.4f}" in text, f"{name}: the results sentence must print this run's metric"

    # The count the mechanism cell printed (computed by hand in the notebook) equals helpers.methods' on a fresh model.
    from helpers.methods import apply_method
    from helpers.models import load_model

    printed = BY_HAND.findall(text)
    assert len(printed) == 1, f"{name}: expected one 'by hand: N trainable parameters' line, found {printed}"
    model, _ = load_model(tiny_checkpoint)
    setup = apply_method(model, method, **record["recipe"]["method_options"])
    assert int(printed[0].replace(",", "")) == setup.trainable_params
    assert record["trainable_params"] == setup.trainable_params


@pytest.mark.parametrize("name", METHOD_NOTEBOOKS)
def test_method_notebook(executed, name, tiny_checkpoint):
    notebook = _result(executed, name)
    run = executed["runs"] / f"{METHOD_NOTEBOOKS[name]}-ie"
    check_method_run(notebook, name, run, "ie", steps=8, rows=4, tiny_checkpoint=tiny_checkpoint)
    if name == "01_freeze.ipynb":  # the data and the token layout are explained here, once
        tables = [o["data"]["text/markdown"] for o in outputs(notebook, "text/markdown")]
        assert any("`[gMASK]`" in t and "`<sop>`" in t and "-100" in t for t in tables), f"{name}: no token layout"
        options = json.loads((run / "run.json").read_text(encoding="utf-8"))["recipe"]["method_options"]
        model_layers = json.loads((tiny_checkpoint / "config.json").read_text(encoding="utf-8"))["num_layers"]
        cli = resolve_recipe(str(tiny_checkpoint), "freeze", "ie", check_data=False).method_options
        assert options == cli, "the notebook trains what the command line trains for the same method and model"
        assert f"training the last {options['layers']} of {model_layers} blocks" in stdout(notebook)


@pytest.mark.parametrize("name, task", OTHER_TASKS.items())
def test_method_notebook_on_another_task(executed, name, task, tiny_checkpoint):
    notebook = _result(executed, (name, task))
    run = executed["runs"] / f"{METHOD_NOTEBOOKS[name]}-{task}"
    check_method_run(notebook, name, run, task, steps=4, rows=2, tiny_checkpoint=tiny_checkpoint)


def test_compare_notebook(executed):
    notebook = _result(executed, "05_compare.ipynb")
    assert len(outputs(notebook, "image/png")) >= 2, "expected the loss curves and the six-panel comparison"
    tables = [o["data"]["text/markdown"] for o in outputs(notebook, "text/markdown")]
    comparison = [t for t in tables if "trainable params" in t and "peak MB" in t]
    assert comparison, "no comparison table"
    for method in METHOD_NOTEBOOKS.values():
        assert f"{method}-ie" in comparison[0]
    assert len(comparison) == 1, "the comparison table is shown once"
    assert_clean(notebook, "05_compare.ipynb")
    published = [t for t in tables if "Source: [liucongg/ChatGLM-Finetuning README]" in t]
    from helpers.reference import published_markdown

    assert published == [published_markdown()], "05 renders the published table from data/reference, once"
    text = stdout(notebook)
    assert "original course, ptuning_v2: mean loss" in text and "of ChatGLM-6B's" in text


def test_compare_without_runs_says_so(tiny_checkpoint, tmp_path, monkeypatch):
    course_env(monkeypatch, tiny_checkpoint, tmp_path / "empty-runs", tmp_path / "cache")
    notebook, _ = execute("05_compare.ipynb", tmp_path / "executed")
    tables = [o["data"]["text/markdown"] for o in outputs(notebook, "text/markdown")]
    assert any("No runs found" in t and "QUICK_COMPARE" in t for t in tables)


def test_compare_trains_quickly_when_asked(tiny_checkpoint, tmp_path, monkeypatch):
    course_env(monkeypatch, tiny_checkpoint, tmp_path / "runs", tmp_path / "cache")
    monkeypatch.setenv("COURSE_QUICK_COMPARE", "1")
    monkeypatch.setenv("COURSE_STEPS", "2")
    monkeypatch.setenv("COURSE_EVAL_LIMIT", "2")
    notebook, _ = execute("05_compare.ipynb", tmp_path / "executed")
    assert "TOY MODE" in stdout(notebook)
    for method in METHOD_NOTEBOOKS.values():
        assert (tmp_path / "runs" / f"{method}-ie" / "metrics.json").is_file()
    assert len(outputs(notebook, "image/png")) >= 2


def test_compare_draws_someone_elses_bundle_next_to_yours(executed, tmp_path, monkeypatch, tiny_checkpoint):
    """A teacher's runs, exported as a bundle, join 05's plots and tables, labelled with their model and hardware."""
    from helpers.run.bundle import export_runs

    bundle = tmp_path / "teacher.zip"
    export_runs(executed["runs"], bundle)
    course_env(monkeypatch, tiny_checkpoint, executed["runs"], tmp_path / "cache")
    monkeypatch.setenv("COURSE_OTHER_RUNS", str(bundle))
    notebook, _ = execute("05_compare.ipynb", tmp_path / "executed")
    text = stdout(notebook)
    assert "from teacher.zip" in text and "Comparing the 8 runs of task 'ie'" in text
    tables = [o["data"]["text/markdown"] for o in outputs(notebook, "text/markdown")]
    comparison = next(t for t in tables if "trainable params" in t and "peak MB" in t)
    assert comparison.count("CPU (") >= 4, "the teacher's runs are labelled with the hardware they ran on"
