"""The course notebooks' shape: short, little repetition, the mechanism in a cell, answers to every exercise,
published numbers only as data/reference has them. Reads the committed notebooks (no execution; fast)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import nbformat
import pytest

from helpers.reference import published_results

NOTEBOOKS_DIR = Path(__file__).resolve().parents[2] / "notebooks"
METHOD_OF = {"01_freeze.ipynb": "freeze", "02_embedding.ipynb": "embedding", "03_ptuning_v2.ipynb": "ptuning_v2",
             "04_lora.ipynb": "lora"}
METHOD_NOTEBOOKS = list(METHOD_OF)
COURSE_NOTEBOOKS = [*METHOD_NOTEBOOKS, "05_compare.ipynb"]
MAX_CELLS = 28
MAX_SHARED_CELLS = 8
# What each method's mechanism cell must spell out (issue: the code in the cell is the method).
MECHANISM = {
    "01_freeze.ipynb": ("named_parameters()", "requires_grad_("),
    "02_embedding.ipynb": ("lm_head.weight is E", "requires_grad_("),
    "03_ptuning_v2.ipynb": ("add_prefix_encoder(", "prefix_key_values("),
    "04_lora.ipynb": ("lora_config(", "get_peft_model(", "print_trainable_parameters()"),
}


def read(name: str):
    return nbformat.read(NOTEBOOKS_DIR / name, as_version=4)


def shared_sources(notebooks) -> Counter:
    """How many notebooks hold each cell source (a source counted once per notebook)."""
    counts = Counter()
    for notebook in notebooks:
        counts.update({cell.source for cell in notebook.cells})
    return counts


def test_shared_cells_counts_repeats_across_notebooks():
    make = nbformat.v4
    one = make.new_notebook(cells=[make.new_markdown_cell("a"), make.new_markdown_cell("b"), make.new_code_cell("a")])
    two = make.new_notebook(cells=[make.new_markdown_cell("a"), make.new_code_cell("c")])
    assert {s: n for s, n in shared_sources([one, two]).items() if n > 1} == {"a": 2}


def test_method_notebooks_repeat_few_cells():
    counts = shared_sources([read(name) for name in METHOD_NOTEBOOKS])
    repeated = sorted(source.splitlines()[0][:60] for source, n in counts.items() if n > 1)
    assert len(repeated) <= MAX_SHARED_CELLS, f"{len(repeated)} cells repeat across 01-04: {repeated}"


@pytest.mark.parametrize("name", METHOD_NOTEBOOKS)
def test_method_notebook_is_short_and_shows_its_mechanism(name):
    notebook = read(name)
    assert len(notebook.cells) <= MAX_CELLS, f"{name} has {len(notebook.cells)} cells (at most {MAX_CELLS})"
    setups = [c for c in notebook.cells if c.cell_type == "code" and "nb.setup(" in c.source]
    assert len(setups) == 1, f"{name}: the setup is one call"
    mechanism = [c for c in notebook.cells if c.cell_type == "code" and "by hand:" in c.source]
    assert len(mechanism) == 1, f"{name}: one mechanism cell printing 'by hand: N trainable parameters'"
    lines = len(mechanism[0].source.splitlines())
    assert 5 <= lines <= 16, f"{name}: the mechanism cell has {lines} lines"
    for needle in MECHANISM[name]:
        assert needle in mechanism[0].source, f"{name}: the mechanism cell lacks {needle!r}"
    later = notebook.cells[notebook.cells.index(mechanism[0]) + 1:]
    method = METHOD_OF[name]
    assert any(f"helpers.{method}(" in c.source and "assert" in c.source for c in later), (
        f"{name}: after the mechanism cell, helpers.{method} is applied and checked against it")


@pytest.mark.parametrize("name", [*COURSE_NOTEBOOKS, "06_when_things_break.ipynb"])
def test_every_exercise_has_an_answer(name):
    cell = next(c for c in read(name).cells if c.cell_type == "markdown" and c.source.startswith("## Exercises"))
    items = re.findall(r"^\d+\. \*\*", cell.source, flags=re.M)
    answers = cell.source.count("<details>")
    assert items and answers == len(items), f"{name}: {len(items)} exercises, {answers} folded answers"


def test_published_scores_in_prose_are_the_published_ones():
    """A score typed in prose must be one of data/reference/published.json's (the tables themselves are rendered)."""
    published = {f"{row['ie_f1']:.4f}" for row in published_results()["rows"]}
    for name in COURSE_NOTEBOOKS:
        for index, cell in enumerate(read(name).cells):
            if cell.cell_type != "markdown":
                continue
            for score in re.findall(r"\b0\.\d{3,4}\b", cell.source):
                assert f"{float(score):.4f}" in published and len(score) == 6, (
                    f"{name} cell {index}: {score} is not a published IE F1 as data/reference has it ({published})")
            assert "F1 of **0.0**" not in cell.source, f"{name} cell {index}: the 0.0 belongs to a prefix run"


def test_published_table_comes_from_data_reference():
    for name in ["03_ptuning_v2.ipynb", "05_compare.ipynb"]:
        sources = [c.source for c in read(name).cells if c.cell_type == "code"]
        assert any("published_markdown(" in s for s in sources), f"{name}: render the table from data/reference"


def test_install_cell_is_the_same_everywhere_and_explains_a_failed_clone():
    installs = {name: next(c.source for c in read(name).cells if c.cell_type == "code" and "git" in c.source
                           and "clone" in c.source) for name in COURSE_NOTEBOOKS}
    assert len(set(installs.values())) == 1, "01-05 share one install cell"
    source = installs["01_freeze.ipynb"]
    assert "except subprocess.CalledProcessError" in source and "Could not clone" in source


@pytest.mark.parametrize("name", COURSE_NOTEBOOKS)
def test_drive_is_one_flag(name):
    notebook = read(name)
    parameters = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    assert re.search(r"^DRIVE = False\b", parameters.source, flags=re.M), f"{name}: DRIVE = False in the parameters"
    assert sum("drive=DRIVE" in c.source for c in notebook.cells) == 1


@pytest.mark.parametrize("name", [*COURSE_NOTEBOOKS, "06_when_things_break.ipynb"])
def test_no_template_placeholder_is_left_in_the_prose(name):
    for index, cell in enumerate(read(name).cells):
        if cell.cell_type == "markdown":
            left = re.findall(r"\{[A-Za-z_]\w*\}", cell.source)
            assert not left, f"{name} cell {index}: a placeholder was never filled in: {left[0]}"


@pytest.mark.parametrize("name", METHOD_NOTEBOOKS)
def test_exercises_that_train_again_name_another_run_folder(name):
    """Rerunning a method with other settings replaces its run unless the exercise names a new RUN_NAME."""
    cell = next(c for c in read(name).cells if c.cell_type == "markdown" and c.source.startswith("## Exercises"))
    for item in re.split(r"\n(?=\d+\. \*\*)", cell.source)[1:]:
        question = item.split("<details>")[0]
        reruns = re.search(r"\b([Rr]un (again|the notebook again|with)|Set `(?!RUN_NAME)[A-Z_]+`|Double `)", question)
        if reruns and "DEQUANTIZE" not in question:  # a dequantized run has a folder of its own
            assert "RUN_NAME" in question, f"{name}: exercise {question[:40]!r} trains again without a new RUN_NAME"


@pytest.mark.parametrize("name", COURSE_NOTEBOOKS)
def test_answers_say_something(name):
    """An answer is concrete or points to a cell that prints it; "read it from your runs" is no answer."""
    cell = next(c for c in read(name).cells if c.cell_type == "markdown" and c.source.startswith("## Exercises"))
    assert "read it from your runs" not in cell.source.lower(), f"{name}: an answer only says to read the runs"
