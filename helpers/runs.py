"""Run folders: the one writer and reader of ``run.json``, and the checks a folder passes before it is trusted.

A run folder (``runs/<name>/``) holds:

* ``run.json``: the :class:`RunRecord` — status (running, finished, failed with its error), the recipe, what
  trained, versions, the absolute model path, timings, memory and parameter counts; written atomically;
* ``metrics.json`` and ``predictions.jsonl``: the evaluation on the test split (written once, by the record);
* ``loss_history.jsonl`` / ``.csv``, ``tb/`` (TensorBoard), ``artifact/`` (what the method trained) and
  ``checkpoints/checkpoint-<step>/`` (to resume);
* ``eval-<time>/``: later evaluations (``python -m helpers evaluate --run``), never over the training results.

:func:`load_runs` reads folders of runs for plots and tables; unfinished and failed runs are left out with a
printed note unless asked for.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError
from .files import read_history, write_json
from .methods import METHODS

RUN_FILE = "run.json"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.jsonl"
HISTORY_FILE = "loss_history.jsonl"
ARTIFACT = "artifact"
CHECKPOINTS = "checkpoints"
TRAINABLE_FILE = "trainable.safetensors"
METHOD_FILE = "method.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
STATUSES = ("running", "finished", "failed")
# What a run writes into its folder; starting over removes exactly these and leaves anything else alone.
RUN_ENTRIES = (RUN_FILE, METRICS_FILE, PREDICTIONS_FILE, HISTORY_FILE, "loss_history.csv", "tb", ARTIFACT,
               CHECKPOINTS)
EVAL_PREFIX = "eval-"
RECORD_VERSION = 1


def now() -> str:
    """The current time, UTC, as ISO 8601 (what records store)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class RunRecord:
    """The typed content of ``run.json``. ``save`` writes it atomically (temporary file, rename, mode 0644)."""

    folder: Path
    name: str = ""
    status: str = "running"
    error: str | None = None
    method: str | None = None
    task: str | None = None
    model: str | None = None  # as given: "tiny", a folder, or a hub name (what reloading asks for)
    model_path: str | None = None  # the absolute folder the weights came from
    method_options: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)  # Recipe.to_dict() when the run came from a recipe
    hyperparameters: dict[str, Any] = field(default_factory=dict)  # what helpers.train used
    seed: int | None = None
    quantization_bit: int = 0
    device: str | None = None
    dtype: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    trainable_params: int | None = None
    all_params: int | None = None
    train_examples: int | None = None
    world_size: int = 1
    started_at: str | None = None
    trained_at: str | None = None  # set when training reached its last step and the artifact was saved
    finished_at: str | None = None
    resumed_from_step: int = 0
    global_step: int | None = None
    train_runtime_s: float | None = None
    final_loss: float | None = None
    peak_memory_bytes: int | None = None
    peak_memory_kind: str | None = None
    memory_at_start_bytes: int | None = None
    record_version: int = RECORD_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept as they were

    # --- reading -------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, folder: str | os.PathLike) -> RunRecord:
        """The record of a run folder; a missing or unreadable ``run.json`` raises :class:`UserError` naming it."""
        folder = Path(folder)
        path = folder / RUN_FILE
        if not path.is_file():
            what = "does not exist" if not folder.exists() else f"has no {RUN_FILE}"
            raise UserError(f"{folder}: {what}; give a run folder written by train or compare (runs/<name>/)")
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise UserError(f"{path}: not valid JSON ({error}); the run record is damaged: train again with --fresh "
                            "or remove the folder") from error
        if not isinstance(values, dict):
            raise UserError(f"{path}: not a run record (expected a JSON object); train again with --fresh")
        return cls.from_dict(folder, values)

    @classmethod
    def find(cls, folder: str | os.PathLike) -> RunRecord | None:
        """The record in ``folder``, or ``None`` when the folder holds no ``run.json``."""
        return cls.load(folder) if (Path(folder) / RUN_FILE).is_file() else None

    @classmethod
    def from_dict(cls, folder: str | os.PathLike, values: dict[str, Any]) -> RunRecord:
        names = {f.name for f in dataclasses.fields(cls)} - {"folder", "extra"}
        known = {k: v for k, v in values.items() if k in names}
        extra = {k: v for k, v in values.items() if k not in names}
        if "record_version" not in values and values.get("status") == "finished":
            known.setdefault("trained_at", values.get("finished_at") or "before records had trained_at")
        record = cls(folder=Path(folder), **known, extra={**values.get("extra", {}), **extra})
        if record.status not in STATUSES:
            raise UserError(f"{Path(folder) / RUN_FILE}: unknown status {record.status!r}; expected one of "
                            f"{', '.join(STATUSES)}")
        return record

    def to_dict(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("folder", "extra")}
        return {**self.extra, **values}

    @property
    def trained(self) -> bool:
        """Whether training reached its last step (the artifact is saved); evaluation may still be missing."""
        return self.trained_at is not None

    @property
    def path(self) -> Path:
        return self.folder / RUN_FILE

    def base_model(self, model: str | None = None) -> str:
        """The base model to load the run onto: ``model`` when given (the checkpoint moved), else the recorded one.

        A recorded folder that is gone (moved, deleted, or a run copied from another machine) is named with the way
        out, before anything loads.
        """
        if model is not None:
            return model
        if not self.model:
            raise UserError(f"{self.path} does not name its base model; name it: python -m helpers evaluate --run "
                            f"{self.folder} --model <folder or hub name> (API: load_finetuned(run, model=...))")
        if Path(self.model).is_absolute() and not Path(self.model).is_dir():
            raise UserError(f"{self.path}: the run's base model {self.model} is not there any more (no such folder); "
                            f"put it back, or say where it is now: python -m helpers evaluate --run {self.folder} "
                            "--model <folder> (API: load_finetuned(run, model=...))")
        return self.model

    def metrics(self) -> dict[str, Any]:
        """The test metrics (``metrics.json``), or ``{}`` before evaluation."""
        path = self.folder / METRICS_FILE
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise UserError(f"{path}: not valid JSON ({error}); evaluate the run again "
                            "(python -m helpers evaluate --run) or train it again with --fresh") from error

    def history(self) -> list[dict[str, Any]]:
        """The logged training losses (``loss_history.jsonl``)."""
        return read_history(self.folder / HISTORY_FILE)

    def predictions(self) -> list[dict[str, Any]]:
        """The test answers next to their references (``predictions.jsonl``)."""
        return read_predictions(self.folder)

    def summary(self) -> str:
        """One line: status, steps, final loss (and the error of a failed run)."""
        steps = f"step {self.global_step}" if self.global_step is not None else "no step"
        planned = self.hyperparameters.get("max_steps")
        text = f"{self.folder}: {self.status}, {steps}{f' of {planned}' if planned else ''}"
        if self.final_loss is not None:
            text += f", final loss {self.final_loss:.4f}"
        if self.error:
            text += f" ({self.error})"
        return text

    # --- writing -------------------------------------------------------------------------------------------

    def save(self) -> RunRecord:
        """Write ``run.json`` atomically (only on the main process of a distributed run)."""
        if _is_main_process():
            self.folder.mkdir(parents=True, exist_ok=True)
            write_json(self.path, self.to_dict())
        return self

    def update(self, **values: Any) -> RunRecord:
        """Set fields (unknown names are an error) and save."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise TypeError(f"RunRecord has no field {unknown[0]!r}")
        for key, value in values.items():
            setattr(self, key, value)
        return self.save()

    def mark_failed(self, error: BaseException | str) -> RunRecord:
        """Status ``failed`` with the error's one-line description."""
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}".strip().rstrip(":")
        return self.update(status="failed", error=" ".join(str(text).split()))

    def mark_finished(self) -> RunRecord:
        return self.update(status="finished", error=None, finished_at=now())

    def write_metrics(self, metrics: dict[str, Any]) -> Path:
        """Write ``metrics.json`` (once per evaluation)."""
        return write_json(self.folder / METRICS_FILE, dict(metrics))


def read_predictions(folder: str | os.PathLike, limit: int | None = None) -> list[dict[str, Any]]:
    """The rows of ``predictions.jsonl`` in a run or evaluation folder (text, prediction, references)."""
    path = Path(folder) / PREDICTIONS_FILE
    if not path.is_file():
        raise UserError(f"{path}: missing; the run has not been evaluated yet")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if limit is not None and len(rows) >= limit:
            break
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise UserError(f"{path}:{number}: not valid JSON ({error.msg}); evaluate the run again") from error
    return rows


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def start_over(folder: str | os.PathLike) -> None:
    """Remove what an earlier run wrote into ``folder`` (only the run's own files; anything else stays)."""
    folder = Path(folder)
    if not folder.is_dir() or not _is_main_process():
        return
    for name in RUN_ENTRIES:
        entry = folder / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        elif entry.exists() or entry.is_symlink():
            entry.unlink()
    for entry in folder.glob(EVAL_PREFIX + "*"):
        if entry.is_dir() and (entry / METRICS_FILE).exists():
            shutil.rmtree(entry)


def check_out_folder(folder: str | os.PathLike, option: str = "--out", purpose: str = "run") -> Path:
    """Check a folder that results are about to be written into; raise :class:`UserError` naming ``option``.

    ``purpose`` is ``"run"`` (a training run: a new or empty folder, or one that already holds a run),
    ``"evaluation"`` (no run and no earlier evaluation inside, so nothing is overwritten), ``"comparison"`` (a
    folder of run folders, not a run itself) or ``"folder"`` (only: a folder that can be made). Nothing is written.
    """
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{option} {folder}: is a file, not a folder; give a folder path such as runs/{folder.stem}")
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise UserError(f"{option} {folder}: {existing} is a file, so no folder can be made there; choose another "
                        f"{option}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{option} {folder}: {existing} is not writable; choose a folder you can write, such as "
                        "runs/<name>")
    if not folder.is_dir() or purpose == "folder":
        return folder
    has_run = (folder / RUN_FILE).is_file()
    if purpose == "evaluation":
        if has_run:
            raise UserError(f"{option} {folder}: is a training run folder; evaluating into it would overwrite its "
                            f"results; use --run {folder} (a new eval-<time>/ subfolder is used) or another {option}")
        earlier = [name for name in (METRICS_FILE, PREDICTIONS_FILE) if (folder / name).exists()]
        if earlier:
            raise UserError(f"{option} {folder}: already holds an earlier evaluation ({earlier[0]}); choose a new "
                            f"{option} so it is kept (or leave {option} out with --run)")
    elif purpose == "comparison":
        if has_run:
            raise UserError(f"{option} {folder}: is the run folder of one method; compare writes one run folder per "
                            f"method inside {option}: give another {option} such as runs/compare")
    elif not has_run:
        others = sorted(entry.name for entry in folder.iterdir()
                        if not entry.name.startswith(".") and entry.name not in RUN_ENTRIES
                        and not entry.name.startswith(EVAL_PREFIX))
        if others:
            shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise UserError(f"{option} {folder}: already holds other files ({shown}) and no {RUN_FILE}; a run "
                            f"writes its results there: give a new or empty folder such as runs/<name>")
    return folder


def evaluation_folder(run_dir: str | os.PathLike) -> Path:
    """A new ``eval-<time>`` folder name inside a run (a number is added when two evaluations share a second)."""
    base = Path(run_dir) / (EVAL_PREFIX + time.strftime("%Y%m%d-%H%M%S"))
    candidate, count = base, 1
    while candidate.exists():
        count += 1
        candidate = base.with_name(f"{base.name}-{count}")
    return candidate


# ----------------------------------------------------------------------------------------------------------
# Checking files before they are trusted
# ----------------------------------------------------------------------------------------------------------


def safetensors_problem(path: Path) -> str | None:
    """Why a ``.safetensors`` file is unusable (missing, cut off, bad header), or ``None``; reads only the header."""
    if not path.is_file():
        return f"{path}: missing"
    size = path.stat().st_size
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > size - 8:
                return f"{path}: cut off (header longer than the file)"
            header = json.loads(handle.read(length))
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError, OSError) as error:
        return f"{path}: not a safetensors file ({type(error).__name__})"
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    if 8 + length + max(ends, default=0) > size:
        return f"{path}: cut off ({size} bytes, the header describes {8 + length + max(ends, default=0)})"
    return None


def _zip_problem(path: Path) -> str | None:
    """``torch.save`` writes zip archives; a file cut off by a kill has no intact central directory."""
    if not path.is_file():
        return f"{path.name} missing"
    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except (zipfile.BadZipFile, OSError):
        return f"{path.name} is cut off or damaged"
    return None


def _json_problem(path: Path) -> str | None:
    if not path.is_file():
        return f"{path.name} missing"
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{path.name} is not valid JSON"
    return None


def artifact_problem(folder: str | os.PathLike) -> str | None:
    """Why an artifact folder (``method.json`` plus trained tensors) cannot be loaded, or ``None``."""
    folder = Path(folder)
    if not folder.is_dir():
        return f"{folder}: missing"
    problem = _json_problem(folder / METHOD_FILE)
    if problem:
        return f"{folder}: {problem}"
    method = json.loads((folder / METHOD_FILE).read_text(encoding="utf-8")).get("method")
    if method == "lora":
        problem = _json_problem(folder / ADAPTER_FILES[1])
        return f"{folder}: {problem}" if problem else safetensors_problem(folder / ADAPTER_FILES[0])
    return safetensors_problem(folder / TRAINABLE_FILE)


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``checkpoint-<step>/`` is not a complete checkpoint (Trainer writes ``trainer_state.json`` last)."""
    state = folder / "trainer_state.json"
    problem = _json_problem(state)
    if problem:
        return problem
    step = json.loads(state.read_text(encoding="utf-8")).get("global_step")
    if str(step) != folder.name.rsplit("-", 1)[-1]:
        return f"trainer_state.json is at step {step}"
    for name in ("optimizer.pt", "scheduler.pt"):
        problem = _zip_problem(folder / name)
        if problem:
            return problem
    rng = sorted(folder.glob("rng_state*.pth"))
    if not rng:
        return "rng_state.pth missing"
    for path in rng:
        problem = _zip_problem(path)
        if problem:
            return problem
    return artifact_problem(folder)


def checkpoint_step(folder: Path) -> int | None:
    name = folder.name
    if not name.startswith("checkpoint-") or not name[len("checkpoint-"):].isdigit():
        return None
    return int(name[len("checkpoint-"):])


def last_complete_checkpoint(run_dir: str | os.PathLike, remove_broken: bool = True) -> Path | None:
    """The newest complete ``checkpoints/checkpoint-<step>/`` of a run, or ``None``.

    A checkpoint cut off by a kill while it was saved is reported, removed (on the main process) and skipped, so
    the run resumes from the one before.
    """
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return None
    found = sorted((p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None),
                   key=checkpoint_step, reverse=True)
    for folder in found:
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        print(f"{folder}: incomplete checkpoint ({problem}), probably cut off while being saved; "
              + ("removed, resuming from the one before" if remove_broken else "skipped"))
        if remove_broken and _is_main_process():
            shutil.rmtree(folder, ignore_errors=True)
    return None


# ----------------------------------------------------------------------------------------------------------
# Reading several runs (plots, tables, the comparison notebook)
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One run folder as plots and tables see it: ``run.json`` as a dict, the loss history and the metrics."""

    path: Path | None
    info: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.info.get("name") or (self.path.name if self.path else ""))

    @property
    def method(self) -> str:
        return str(self.info.get("method", "unknown"))

    @property
    def task(self) -> str:
        return str(self.info.get("task") or self.metrics.get("task", ""))

    @property
    def status(self) -> str:
        return str(self.info.get("status", "finished"))

    @property
    def finished(self) -> bool:
        return self.status == "finished"


def load_run(path: str | os.PathLike) -> Run:
    """Read one run folder (it must hold ``run.json``)."""
    record = RunRecord.load(path)
    return Run(path=record.folder, info=record.to_dict(), history=record.history(), metrics=record.metrics())


def _method_rank(run: Run) -> tuple[int, str]:
    return (METHODS.index(run.method) if run.method in METHODS else len(METHODS)), run.name


def unfinished_note(run: Run) -> str:
    """Why a run is left out of comparisons, in one line."""
    info = run.info
    step = info.get("global_step")
    where = f" at step {step}" if step is not None else ""
    if run.status == "failed":
        return f"{run.path}: failed{where} ({info.get('error') or 'no error recorded'}); left out"
    return f"{run.path}: not finished{where} (running, or stopped; run its command again to resume); left out"


def finished_runs(runs: Sequence[Run]) -> list[Run]:
    """The finished runs of ``runs``; a note is printed for each one left out."""
    kept = []
    for run in runs:
        if run.finished:
            kept.append(run)
        else:
            print(unfinished_note(run))
    return kept


def load_runs(*paths: str | os.PathLike, unfinished: bool = False) -> list[Run]:
    """Runs found at ``paths`` (run folders, or folders of run folders), ordered freeze, embedding, ptuning_v2, lora.

    Folders without ``run.json`` are skipped; other methods follow the four, by name. Unfinished and failed runs
    are left out with a printed note, unless ``unfinished`` (then each has its ``status``).
    """
    folders: list[Path] = []
    found_in: dict[Path, Path] = {}  # run folder -> the folder it was found in (damaged records there are skipped)
    for path in paths:
        path = Path(path)
        if (path / RUN_FILE).is_file():
            folders.append(path)
        elif path.is_dir():
            children = [child for child in sorted(path.iterdir()) if (child / RUN_FILE).is_file()]
            if not children:
                print(f"{path}: no run folders found (a run folder holds {RUN_FILE})")
            folders.extend(children)
            found_in.update({child.resolve(): path for child in children})
        elif path.exists():
            raise UserError(f"{path}: is a file; give run folders or a folder of run folders (runs/)")
        else:
            raise UserError(f"{path}: no such folder; give run folders or a folder of run folders (runs/)")
    unique = list(dict.fromkeys(folder.resolve() for folder in folders))
    loaded = []
    for folder in unique:
        try:
            loaded.append(load_run(folder))
        except UserError as error:
            if folder not in found_in:
                raise
            print(f"{error}; left out")
    runs = sorted(loaded, key=_method_rank)
    return runs if unfinished else finished_runs(runs)
