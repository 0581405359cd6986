"""A bundle of runs: finished runs made elsewhere (a teacher's runs of the real model), in one small zip to hand out.

On laptops without a GPU the notebooks draw these runs next to the learners' own tiny-model runs. A bundle holds only
what plots and tables read, never weights::

    bundle.json                 the manifest: format, version, created_at, and per run its folder, name, task,
                                method, model and hardware
    <run>/run.json              the run record
    <run>/loss_history.jsonl    the logged training losses
    <run>/metrics.json          the test metrics
    <run>/predictions.jsonl     the test answers

:func:`export_runs` writes one (``python -m helpers export-runs``); :func:`read_bundle` reads its runs straight from the
zip (``load_runs`` accepts a ``.zip`` wherever it accepts a folder of runs).
"""

from __future__ import annotations

import json
import os
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..files import atomic_file, parse_json_lines
from .record import HISTORY_FILE, METRICS_FILE, PREDICTIONS_FILE, RUN_FILE, Run, RunRecord, load_runs, now

MANIFEST = "bundle.json"
FORMAT = "chatglm-course runs"
VERSION = 1  # raise it when a reader of this version would misread a new bundle
BUNDLED = (RUN_FILE, HISTORY_FILE, METRICS_FILE, PREDICTIONS_FILE)
EXPORT_HINT = "python -m helpers export-runs RUNS_DIR --out NAME.zip"


def export_runs(runs_dir: str | os.PathLike, out: str | os.PathLike) -> list[Run]:
    """Write the finished runs in ``runs_dir`` (a folder of run folders, or one run folder) to the new zip ``out``.

    Unfinished and failed runs are left out with a printed line each. ``out`` is never overwritten, and appears only
    once complete. Returns the runs written.
    """
    runs_dir, out = Path(runs_dir), Path(out)
    if out.suffix != ".zip":
        raise UserError(f"--out {out}: a bundle is a .zip file; give a name such as {out.stem or 'runs'}.zip")
    if out.exists():
        raise UserError(f"--out {out}: already exists, and a bundle is never overwritten; choose another name, such as "
                        f"{out.with_name(out.stem + '-2.zip')}")
    if not runs_dir.is_dir():
        raise UserError(f"{runs_dir}: no such folder; give a folder of run folders (runs/compare-ie) or one run folder")
    runs = load_runs(runs_dir)
    if not runs:
        raise UserError(f"{runs_dir}: no finished run in it, so there is nothing to export; finish a run first (python "
                        "-m helpers compare or train) and export the folder that holds it")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out, "wb") as handle, zipfile.ZipFile(handle, "w", zipfile.ZIP_DEFLATED) as bundle:
        bundle.writestr(MANIFEST, json.dumps(manifest(runs), indent=2, ensure_ascii=False) + "\n")
        for run in runs:
            for name in BUNDLED:
                if (run.path / name).is_file():
                    bundle.write(run.path / name, f"{run.path.name}/{name}")
    return runs


def manifest(runs: Sequence[Run]) -> dict[str, Any]:
    """What ``bundle.json`` says: the format and its version, when, and per run what labels and checks need."""
    return {"format": FORMAT, "version": VERSION, "created_at": now(),
            "runs": [{"folder": run.path.name, "name": run.name, "task": run.task, "method": run.method,
                      "model": run.record.model, "hardware": run.record.hardware} for run in runs]}


def read_bundle(path: str | os.PathLike) -> list[Run]:
    """Every run of the bundle ``path``, read from the zip, each with ``source`` = the bundle's file name.

    A damaged or foreign file raises :class:`UserError` naming it and what is wrong.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as bundle:
            entries = _check_manifest(path, _member_json(bundle, path, MANIFEST))
            return [_read_run(bundle, path, entry["folder"]) for entry in entries]
    except (zipfile.BadZipFile, zlib.error, EOFError) as error:
        raise UserError(f"{path}: not a complete zip file (cut off, or another kind of file: {error}); copy or "
                        "download the bundle again") from error


def _member(bundle: zipfile.ZipFile, path: Path, name: str) -> str | None:
    """The text of the member ``name``, or ``None`` when the bundle has none."""
    try:
        data = bundle.read(name)
    except KeyError:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: {name} is not UTF-8 text ({error}); the bundle is damaged: export it again "
                        f"({EXPORT_HINT})") from error


def _member_json(bundle: zipfile.ZipFile, path: Path, name: str) -> dict[str, Any]:
    """The JSON object in the member ``name``; a missing one names what the bundle should hold."""
    text = _member(bundle, path, name)
    if text is None:
        what = "a bundle of runs" if name == MANIFEST else "a complete bundle"
        raise UserError(f"{path}: has no {name}, so it is not {what}; make one with {EXPORT_HINT}")
    try:
        values = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: {name} is not valid JSON ({error.msg}, line {error.lineno}); the bundle is damaged: "
                        f"export it again ({EXPORT_HINT})") from error
    if not isinstance(values, dict):
        raise UserError(f"{path}: {name} is not a JSON object; the bundle is damaged: export it again ({EXPORT_HINT})")
    return values


def _check_manifest(path: Path, values: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifest's run entries, once its format and version are ones this course reads."""
    version, entries = values.get("version"), values.get("runs")
    if values.get("format") != FORMAT or not isinstance(version, int):
        raise UserError(f"{path}: {MANIFEST} is not the manifest of a bundle of runs (no format {FORMAT!r} and "
                        f"version); make the bundle with {EXPORT_HINT}")
    if version > VERSION:
        raise UserError(f"{path}: bundle format version {version} is newer than this course reads ({VERSION}); "
                        "update the course, or export the runs again with this version")
    if not isinstance(entries, list) or not all(isinstance(e, dict) and e.get("folder") for e in entries):
        raise UserError(f"{path}: {MANIFEST} does not list the bundle's runs; export the bundle again ({EXPORT_HINT})")
    return entries


def _read_run(bundle: zipfile.ZipFile, path: Path, folder: str) -> Run:
    """One run of the bundle: its record, loss history and metrics, labelled with the bundle's name."""
    record = RunRecord.from_dict(path / folder, _member_json(bundle, path, f"{folder}/{RUN_FILE}"))
    history = parse_json_lines(_member(bundle, path, f"{folder}/{HISTORY_FILE}") or "",
                               path / folder / HISTORY_FILE, "loss history")
    has_metrics = f"{folder}/{METRICS_FILE}" in bundle.namelist()
    metrics = _member_json(bundle, path, f"{folder}/{METRICS_FILE}") if has_metrics else {}
    return Run(record, history, metrics, source=path.name)


def runs_of_task(runs: Sequence[Run], task: str | None, source: str) -> list[Run]:
    """The runs of ``task`` (all for ``None``) from ``source`` ("bundle teacher.zip"); runs of other tasks only are an
    error that says how to choose."""
    kept = [run for run in runs if task is None or run.task == task]
    others = sorted({run.task for run in runs} - {task}) if task is not None else []
    if not kept and others:
        raise UserError(f"{source} holds runs of task {', '.join(others)}; this notebook compares {task}: export the "
                        f"{task} runs, or set TASK = {others[0]!r}")
    if others:
        print(f"{source}: {len(runs) - len(kept)} run(s) of task {', '.join(others)} left out (this notebook "
              f"compares {task})")
    return kept


def load_bundle(path: str | os.PathLike, task: str | None = None) -> list[Run]:
    """The finished runs of the bundle ``path`` (of ``task`` when given), ordered as :func:`load_runs` orders runs.

    ``path`` may also be a folder of run folders (someone's runs copied as folders): the check of the task is the same.
    """
    path = Path(path)
    return runs_of_task(load_runs(path), task, f"{'bundle' if path.suffix == '.zip' else 'folder'} {path.name}")
