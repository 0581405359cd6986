"""Where the course's files live, and writing result files so that an interruption never leaves a half-written one.

Result files are readable by everyone (mode 0644), like files written with ``open``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

DATA_DIR = Path(__file__).resolve().parent.parent / "data"  # bundled samples, corpus, reference results, tiny model
FILE_MODE = 0o644


def cache_root() -> Path:
    """``$CHATGLM_COURSE_CACHE``, else ``~/.cache/chatglm-course`` (downloads, tiny models built from other recipes)."""
    return Path(os.environ.get("CHATGLM_COURSE_CACHE") or Path.home() / ".cache" / "chatglm-course")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """A handle on a temporary file in ``path``'s folder that becomes ``path`` (flushed to disk, renamed, mode 0644)
    only when the block ends without error: an interruption leaves the old file, or none, never half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, FILE_MODE)  # mkstemp creates 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` atomically (:func:`atomic_file`)."""
    with atomic_file(path) as handle:
        handle.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, content) -> Path:
    return write_text(path, json.dumps(content, indent=2, ensure_ascii=False, default=str) + "\n")


def read_json_lines(path: str | os.PathLike, what: str = "file") -> list[dict]:
    """The rows of a JSON-lines result file (loss history, predictions); ``[]`` when it does not exist."""
    path = Path(path)
    return parse_json_lines(path.read_text(encoding="utf-8"), path, what) if path.exists() else []


def parse_json_lines(text: str, where: str | os.PathLike, what: str = "file") -> list[dict]:
    """The rows of JSON-lines ``text`` read from ``where`` (a file, or a member of a bundle of runs).

    A cut-off last line (a run stopped while writing it) is ignored; a broken line before it is an error naming
    the file and the line.
    """
    from .errors import UserError

    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    rows = []
    for index, (number, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            if index == len(lines) - 1:
                break
            raise UserError(f"{where}:{number}: not valid JSON ({error.msg}); only the last line of a {what} may be "
                            "cut off") from error
    return rows
