"""The notebooks are committed clean: no outputs, no machine paths, short cells with prose between them."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[2]
EXPECTED = ["01_freeze.ipynb", "02_embedding.ipynb", "03_ptuning_v2.ipynb", "04_lora.ipynb", "05_compare.ipynb",
            "06_when_things_break.ipynb"]
NOTEBOOKS = [REPO / "notebooks" / name for name in EXPECTED]
MAX_CODE_LINES = 25
MACHINE_PATH = re.compile(r"(?<![\w.])(/work|/home|/tmp|/Users|/root|[A-Za-z]:\\\\)\b")
STRIP_HINT = "run python notebooks/strip_outputs.py before committing"


def test_the_course_notebooks_exist():
    assert sorted(p.name for p in (REPO / "notebooks").glob("*.ipynb")) == EXPECTED


@pytest.fixture(params=NOTEBOOKS, ids=lambda p: p.name)
def notebook(request):
    return request.param.name, nbformat.read(request.param, as_version=4)


def test_valid_nbformat(notebook):
    _, nb = notebook
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"


def test_outputs_are_stripped(notebook):
    name, nb = notebook
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name} cell {index} has outputs; {STRIP_HINT}"
            assert cell.execution_count is None, f"{name} cell {index} has an execution count; {STRIP_HINT}"
        assert set(cell.metadata) <= {"tags"}, f"{name} cell {index} has metadata {sorted(cell.metadata)}; {STRIP_HINT}"
    assert "widgets" not in nb.metadata, f"{name} stores widget state; {STRIP_HINT}"


def test_strip_outputs_cleans_an_executed_notebook():
    import importlib.util

    spec = importlib.util.spec_from_file_location("strip_outputs", REPO / "notebooks" / "strip_outputs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    notebook = nbformat.read(NOTEBOOKS[0], as_version=4)
    dirty = nbformat.from_dict(notebook)
    code = next(c for c in dirty.cells if c.cell_type == "code")
    code.outputs = [nbformat.v4.new_output("stream", name="stdout", text="hi\n")]
    code.execution_count = 3
    code.metadata["execution"] = {"iopub.status.busy": "2024-01-01T00:00:00Z"}
    dirty.metadata["widgets"] = {"state": {}}
    assert module.strip(dirty) == notebook


def test_no_machine_paths(notebook):
    name, nb = notebook
    for index, cell in enumerate(nb.cells):
        match = MACHINE_PATH.search(cell.source)
        assert not match, f"{name} cell {index} mentions the machine path {match[0]!r}"


def test_code_cells_are_short(notebook):
    name, nb = notebook
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            lines = len(cell.source.splitlines())
            assert lines <= MAX_CODE_LINES, f"{name} cell {index} has {lines} lines (at most {MAX_CODE_LINES})"


def test_prose_between_code_cells(notebook):
    name, nb = notebook
    run = 0
    for index, cell in enumerate(nb.cells):
        run = run + 1 if cell.cell_type == "code" else 0
        assert run <= 2, f"{name} cell {index}: three code cells in a row; explain what happens between them"
    prose = sum(len(c.source) for c in nb.cells if c.cell_type == "markdown")
    code = sum(len(c.source) for c in nb.cells if c.cell_type == "code")
    assert prose > code, f"{name}: more code than prose; the notebooks teach"


def test_structure(notebook):
    """Badge first, one install cell, one papermill parameters cell, exercises at the end."""
    name, nb = notebook
    assert nb.cells[0].cell_type == "markdown" and "colab-badge.svg" in nb.cells[0].source
    installs = [c for c in nb.cells if c.cell_type == "code" and "pip" in c.source and "install" in c.source]
    assert len(installs) == 1, f"{name}: installs belong in one cell"
    assert "google.colab" in installs[0].source, f"{name}: the install cell must do nothing outside Colab"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0].cell_type == "code", f"{name}: needs one code cell tagged 'parameters'"
    assert any(c.cell_type == "markdown" and c.source.startswith("## Exercises") for c in nb.cells)
