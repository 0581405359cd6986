"""Every Colab badge and the install cell come from notebooks/course.toml, and each badge opens its own notebook."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def _load_badges():
    spec = importlib.util.spec_from_file_location("course_badges", REPO / "notebooks" / "badges.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


badges = _load_badges()


def test_config_names_one_repository():
    config = badges.read_config()
    assert re.fullmatch(r"[\w.-]+/[\w.-]+", config["repository"])
    assert config["branch"]


def test_check_finds_nothing_to_update():
    problems = badges.check()
    assert not problems, "\n".join(problems) + "\nRun: python notebooks/badges.py --update"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_first_cell_badge_opens_this_notebook(path):
    config = badges.read_config()
    notebook = nbformat.read(path, as_version=4)
    first = notebook.cells[0]
    expected = (f"https://colab.research.google.com/github/{config['repository']}/blob/{config['branch']}"
                f"/notebooks/{path.name}")
    assert first.cell_type == "markdown"
    links = [m[0] for m in badges.COLAB_LINK.finditer(first.source)]
    assert links == [expected], f"{path.name}: the first cell's Colab links are {links}, expected [{expected}]"
    assert badges.BADGE_IMAGE in first.source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_install_cell_clones_the_configured_repository(path):
    config = badges.read_config()
    notebook = nbformat.read(path, as_version=4)
    install = [c for c in notebook.cells if c.cell_type == "code" and "git" in c.source and "clone" in c.source]
    assert len(install) == 1, f"{path.name}: expected exactly one install cell"
    source = install[0].source
    assert f'REPOSITORY = "{config["repository"]}"' in source
    assert f'BRANCH = "{config["branch"]}"' in source
    assert 'f"https://github.com/{REPOSITORY}.git"' in source


def test_readme_links_every_notebook_with_the_configured_repository():
    config = badges.read_config()
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for path in NOTEBOOKS:
        url = badges.colab_url(config, f"notebooks/{path.name}")
        assert url in readme, f"README.md lacks the Colab link of {path.name}"
    assert not badges.readme_problems(readme, config)


def test_update_rewrites_links_and_install_lines(tmp_path):
    notebook = nbformat.read(NOTEBOOKS[0], as_version=4)
    other = {"repository": "someone/fork", "branch": "dev"}
    updated = badges.updated_notebook(notebook, other)
    problems = badges.notebook_problems(NOTEBOOKS[0], updated, other)
    assert problems == [], problems
    assert "someone/fork" in updated.cells[0].source
    assert 'REPOSITORY = "someone/fork"' in "".join(c.source for c in updated.cells)
    assert badges.notebook_problems(NOTEBOOKS[0], notebook, other), "the original must be out of date for 'other'"
