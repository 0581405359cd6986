"""Run every notebook top to bottom, headless, on the tiny model: no errors, figures drawn, metrics shown.

The five notebooks run in order in one shared runs folder (05_compare reads the runs of 01-04), with the
environment variables the notebooks read shortening training and evaluation. Executed copies are written to a
temporary folder, never into the repository.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS_DIR = REPO / "notebooks"
METHOD_NOTEBOOKS = {"01_freeze.ipynb": "freeze", "02_embedding.ipynb": "embedding",
                    "03_ptuning_v2.ipynb": "ptuning_v2", "04_lora.ipynb": "lora"}
ORDER = [*METHOD_NOTEBOOKS, "05_compare.ipynb"]
TOTAL_BUDGET_S = 600  # all five on 2 CPU cores

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
    """{name: (executed notebook or the error, seconds)} for the five notebooks run in order."""
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
    results["runs"] = root / "runs"
    return results


def outputs(notebook, kind: str) -> list:
    return [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if kind in o.get("data", {})]


def stdout(notebook) -> str:
    return "".join(o.text for c in notebook.cells if c.cell_type == "code" for o in c.outputs
                   if o.output_type == "stream" and o.name == "stdout")


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


@pytest.mark.parametrize("name", METHOD_NOTEBOOKS)
def test_method_notebook(executed, name):
    notebook = _result(executed, name)
    method = METHOD_NOTEBOOKS[name]
    assert len(outputs(notebook, "image/png")) >= 2, f"{name}: expected the live loss plot and the runs' curves"
    tables = [o["data"]["text/markdown"] for o in outputs(notebook, "text/markdown")]
    assert any(t.startswith("| metric | value |") and "**f1** (main)" in t for t in tables), f"{name}: no metrics"
    assert any("`[gMASK]`" in t and "`<sop>`" in t and "-100" in t for t in tables), f"{name}: no token layout"
    text = stdout(notebook)
    assert "TOY MODE" in text, f"{name}: the tiny model must come with its banner"
    assert "trainable params:" in text and "same answer after reloading: True" in text
    run = executed["runs"] / f"{method}-ie"
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["n"] == 4 and "perplexity_after" in metrics
    assert json.loads((run / "run.json").read_text(encoding="utf-8"))["global_step"] == 8
    assert (run / "artifact" / "method.json").is_file()


def test_compare_notebook(executed):
    notebook = _result(executed, "05_compare.ipynb")
    assert len(outputs(notebook, "image/png")) >= 2, "expected the loss curves and the six-panel comparison"
    tables = [o["data"]["text/markdown"] for o in outputs(notebook, "text/markdown")]
    comparison = [t for t in tables if "trainable params" in t and "peak MB" in t]
    assert comparison, "no comparison table"
    for method in METHOD_NOTEBOOKS.values():
        assert f"{method}-ie" in comparison[0]
    assert outputs(notebook, "application/vnd.jupyter.widget-view+json"), "the task/method selector is missing"


def test_all_five_fit_the_time_budget(executed):
    seconds = {name: executed[name][1] for name in ORDER}
    total = sum(seconds.values())
    report = ", ".join(f"{name} {s:.0f} s" for name, s in seconds.items())
    print(f"\nnotebook execution times: {report}; total {total:.0f} s")
    assert total <= TOTAL_BUDGET_S, f"the notebooks took {total:.0f} s (budget {TOTAL_BUDGET_S} s): {report}"


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
