"""Strip what running a notebook adds, so that only the lesson is committed.

    python notebooks/strip_outputs.py            # every notebook in notebooks/
    python notebooks/strip_outputs.py FILE ...   # only these

Removes outputs, execution counts, per-cell metadata other than tags (timings, scroll state, Colab ids) and saved
widget state. tests/notebooks/test_notebook_hygiene.py checks that this was done.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat


def strip(notebook):
    """The notebook without outputs, execution counts, widget state and cell metadata other than tags."""
    for cell in notebook.cells:
        tags = cell.metadata.get("tags")
        cell.metadata = {"tags": tags} if tags else {}
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    notebook.metadata.pop("widgets", None)
    return notebook


def main(paths: list[str]) -> int:
    if any(p in ("-h", "--help") for p in paths):
        print(__doc__.strip())
        return 0
    files = [Path(p) for p in paths] or sorted(Path(__file__).resolve().parent.glob("*.ipynb"))
    for path in files:
        if path.suffix != ".ipynb" or not path.is_file():
            print(f"error: {path}: not a notebook file (.ipynb); give notebook paths or nothing for all",
                  file=sys.stderr)
            return 2
        before = nbformat.read(path, as_version=4)
        after = strip(nbformat.from_dict(before))
        if after != before:
            nbformat.write(after, path)
            print(f"stripped {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
