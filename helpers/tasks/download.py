"""The full public datasets of the tasks (``data/registry.json``), downloaded with a progress bar and checked."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import UserError
from ..files import DATA_DIR, cache_root
from .rows import DataError

REGISTRY_FILE = DATA_DIR / "registry.json"


def registry() -> dict:
    """The full public datasets the course knows: name -> task, source, and per split url/sha256/rows."""
    return json.loads(REGISTRY_FILE.read_text(encoding="utf-8"))


def dataset_cache_dir() -> Path:
    return cache_root() / "datasets"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify(path: Path, spec: dict, name: str, where: str) -> None:
    """The file must be what the course was tested with: same sha256 when known, else same row count."""
    hint = f"call download({name!r}, verify=False) to use it anyway"
    if spec.get("sha256"):
        if _sha256(path) != spec["sha256"]:
            raise DataError(f"{where}: differs from the file this course was tested with (sha256 "
                            f"{spec['sha256'][:12]}...); {hint}")
        return
    with path.open(encoding="utf-8", errors="replace") as handle:
        rows = sum(1 for line in handle if line.strip())
    if rows != spec["rows"]:
        raise DataError(f"{where}: has {rows} rows, the course was tested with {spec['rows']}; {hint}")


def download(name: str, folder: str | os.PathLike | None = None, verify: bool = True) -> dict[str, Path]:
    """Fetch a public dataset of the registry (with a progress bar) and return {split: local path}.

    Files are written to a temporary name and moved into place only when complete and checked (sha256 when
    ``verify``), so an interrupted download never leaves a half-written file. Already present files are
    checked and reused.
    """
    from tqdm.auto import tqdm

    entries = registry()
    if name not in entries:
        raise UserError(f"unknown dataset {name!r}; known: {', '.join(entries)}")
    target = Path(folder).expanduser() if folder else dataset_cache_dir() / name
    if target.exists() and not target.is_dir():
        raise UserError(f"--dir {target}: is a file, not a folder; give a folder for the {name} files")
    target.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, spec in entries[name]["files"].items():
        path = target / spec["filename"]
        if not path.exists():
            fd, tmp = tempfile.mkstemp(dir=target, prefix=".download-")
            os.close(fd)
            try:
                try:
                    with urllib.request.urlopen(spec["url"], timeout=60) as response, open(tmp, "wb") as out:
                        total = int(response.headers.get("Content-Length") or 0) or None
                        with tqdm(total=total, unit="B", unit_scale=True, desc=f"{name}/{spec['filename']}") as bar:
                            while block := response.read(1 << 16):
                                out.write(block)
                                bar.update(len(block))
                except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                    reason = getattr(error, "reason", None) or error
                    raise UserError(f"{spec['url']}: download failed ({reason}); check the internet connection and "
                                    f"run it again, or save the file by hand as {path}") from error
                if verify:
                    _verify(Path(tmp), spec, name, spec["url"])
                shutil.move(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        elif verify:
            _verify(path, spec, name, str(path))
        paths[split] = path
    return paths
