"""Keep the Colab badges and the install cell of every notebook in line with ``notebooks/course.toml``.

    python notebooks/badges.py --check    # list what is out of date (exit status 1 if anything is)
    python notebooks/badges.py --update   # rewrite it from course.toml

What it manages: every Colab link (``https://colab.research.google.com/github/<repository>/blob/<branch>/...``)
in the notebooks' Markdown cells and in README.md, the badge in each notebook's first cell (which must open
that very notebook), and the ``REPOSITORY = ...`` / ``BRANCH = ...`` lines of the install cell.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import nbformat

NOTEBOOKS_DIR = Path(__file__).resolve().parent
ROOT = NOTEBOOKS_DIR.parent
CONFIG = NOTEBOOKS_DIR / "course.toml"
README = ROOT / "README.md"
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
COLAB_LINK = re.compile(r"https://colab\.research\.google\.com/github/(?P<repository>[^/\s)]+/[^/\s)]+)"
                        r"/blob/(?P<branch>[^/\s)]+)/(?P<path>[^\s)\"'>]+)")
INSTALL_LINES = {"repository": re.compile(r'^REPOSITORY = "[^"]*"', re.MULTILINE),
                 "branch": re.compile(r'^BRANCH = "[^"]*"', re.MULTILINE)}


def read_config(path: Path = CONFIG) -> dict[str, str]:
    """``repository`` (owner/name) and ``branch`` from the ``[course]`` table of course.toml."""
    text = path.read_text(encoding="utf-8")
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the two plain string keys are read directly
        values = dict(re.findall(r'^(\w+)\s*=\s*"([^"]*)"', text, re.MULTILINE))
    else:
        values = tomllib.loads(text).get("course", {})
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", values.get("repository", "")):
        raise ValueError(f"{path}: [course] repository must look like 'owner/name', got {values.get('repository')!r}")
    return {"repository": values["repository"], "branch": values.get("branch", "main")}


def colab_url(config: dict[str, str], path: str) -> str:
    """The Colab link that opens ``path`` (relative to the repository root) from GitHub."""
    return f"https://colab.research.google.com/github/{config['repository']}/blob/{config['branch']}/{path}"


def badge(config: dict[str, str], path: str) -> str:
    return f"[![Open In Colab]({BADGE_IMAGE})]({colab_url(config, path)})"


def notebook_paths() -> list[Path]:
    return sorted(NOTEBOOKS_DIR.glob("*.ipynb"))


def _relink(text: str, config: dict[str, str]) -> str:
    return COLAB_LINK.sub(lambda m: colab_url(config, m["path"]), text)


def _reinstall(text: str, config: dict[str, str]) -> str:
    for key, pattern in INSTALL_LINES.items():
        text = pattern.sub(f'{key.upper()} = "{config[key]}"', text)
    return text


def updated_notebook(notebook, config: dict[str, str]):
    """A copy of ``notebook`` with its links and install lines made from ``config`` (the badge is not added)."""
    notebook = nbformat.from_dict(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            cell.source = _relink(cell.source, config)
        elif cell.cell_type == "code":
            cell.source = _reinstall(cell.source, config)
    return notebook


def notebook_problems(path: Path, notebook, config: dict[str, str]) -> list[str]:
    """What is out of date in one notebook (empty when all is well)."""
    problems = []
    name = f"notebooks/{path.name}"
    first = notebook.cells[0] if notebook.cells else None
    if first is None or first.cell_type != "markdown" or badge(config, name) not in first.source:
        problems.append(f"{name}: the first cell lacks the badge {badge(config, name)}")
    for cell in notebook.cells:
        for link in COLAB_LINK.finditer(cell.source if cell.cell_type == "markdown" else ""):
            if link[0] != colab_url(config, link["path"]):
                problems.append(f"{name}: link {link[0]} does not use {config['repository']}@{config['branch']}")
            if not (ROOT / link["path"]).is_file():
                problems.append(f"{name}: link {link[0]} points at a file that does not exist")
    install = [c for c in notebook.cells if c.cell_type == "code" and INSTALL_LINES["repository"].search(c.source)]
    if not install:
        problems.append(f"{name}: no install cell with a REPOSITORY = \"...\" line")
    for cell in install:
        if _reinstall(cell.source, config) != cell.source:
            problems.append(f"{name}: the install cell's REPOSITORY/BRANCH differ from course.toml")
    return problems


def readme_problems(text: str, config: dict[str, str]) -> list[str]:
    problems = []
    for link in COLAB_LINK.finditer(text):
        if link[0] != colab_url(config, link["path"]):
            problems.append(f"README.md: link {link[0]} does not use {config['repository']}@{config['branch']}")
        if not (ROOT / link["path"]).is_file():
            problems.append(f"README.md: link {link[0]} points at a file that does not exist")
    return problems


def check(config: dict[str, str] | None = None) -> list[str]:
    """Every problem in the notebooks and README.md."""
    config = config or read_config()
    problems = []
    for path in notebook_paths():
        problems += notebook_problems(path, nbformat.read(path, as_version=4), config)
    if README.is_file():
        problems += readme_problems(README.read_text(encoding="utf-8"), config)
    return problems


def update(config: dict[str, str] | None = None) -> list[Path]:
    """Rewrite links and install lines from course.toml; returns the files that changed."""
    config = config or read_config()
    changed = []
    for path in notebook_paths():
        notebook = nbformat.read(path, as_version=4)
        new = updated_notebook(notebook, config)
        if new != notebook:
            nbformat.write(new, path)
            changed.append(path)
    if README.is_file():
        text = README.read_text(encoding="utf-8")
        if _relink(text, config) != text:
            README.write_text(_relink(text, config), encoding="utf-8")
            changed.append(README)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--check", action="store_true", help="report what is out of date (the default)")
    action.add_argument("--update", action="store_true", help="rewrite links and install lines from course.toml")
    args = parser.parse_args(argv)
    if args.update:
        for path in update():
            print(f"updated {path.relative_to(ROOT)}")
    problems = check()
    for problem in problems:
        print(problem)
    if not problems:
        print(f"all badges and install cells use {read_config()['repository']}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
