"""The run record: the one writer and reader of a run folder's ``run.json``, and the typed view plots and tables read.

A run folder (``runs/<name>/``) holds:

* ``run.json``: the :class:`RunRecord` — status (running, finished, failed with its error), the recipe, what
  trained, versions, the absolute model path, the hardware, timings, memory and parameter counts; written atomically;
* ``metrics.json`` and ``predictions.jsonl``: the evaluation on the test split (written once);
* ``loss_history.jsonl`` / ``.csv``, ``tb/`` (TensorBoard), ``artifact/`` (what the method trained) and
  ``checkpoints/checkpoint-<step>/`` (to resume);
* ``eval-<time>/``: later evaluations (``python -m helpers evaluate --run``), never over the training results.

:func:`load_runs` reads folders of runs (and bundles of runs, :mod:`helpers.run.bundle`) as :class:`Run` objects for
plots and tables; unfinished and failed runs are left out with a printed note unless asked for.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..files import read_json_lines, write_json
from ..methods import METHODS

RUN_FILE = "run.json"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.jsonl"
HISTORY_FILE = "loss_history.jsonl"
ARTIFACT = "artifact"
CHECKPOINTS = "checkpoints"
STATUSES = ("running", "finished", "failed")
# What a run writes into its folder; starting over removes exactly these and leaves anything else alone.
RUN_ENTRIES = (RUN_FILE, METRICS_FILE, PREDICTIONS_FILE, HISTORY_FILE, "loss_history.csv", "tb", ARTIFACT,
               CHECKPOINTS)
EVAL_PREFIX = "eval-"
RECORD_VERSION = 2  # 2: the recipe is one flat set of settings (1: "training" and "lengths" groups)


def now() -> str:
    """The current time, UTC, as ISO 8601 (what records store)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def is_main_process() -> bool:
    """True outside distributed runs, and on rank 0 under ``torchrun``/``accelerate launch``/``deepspeed``: only it
    writes run folders."""
    return int(os.environ.get("RANK", "0")) == 0


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
    recipe: dict[str, Any] = field(default_factory=dict)  # Recipe.to_dict(): every setting of the run
    quantization_bit: int = 0
    device: str | None = None
    dtype: str | None = None
    hardware: str | None = None  # "NVIDIA A100-SXM4-40GB" or "CPU, 2 cores": where the numbers were measured
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
    peak_memory_kind: str | None = None  # "cuda" (allocator) or "rss" (the CPU process)
    memory_at_start_bytes: int | None = None
    record_version: int = RECORD_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept as they were

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
        extra = {k: v for k, v in values.items() if k not in names and k != "extra"}
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

    @property
    def method_options(self) -> dict[str, Any]:
        return dict(self.recipe.get("method_options") or self.extra.get("method_options") or {})

    def setting(self, name: str) -> Any:
        """One setting of the run's recipe (``steps``, ``learning_rate``, ...), whatever the record's version."""
        from .recipe import stored_settings

        return stored_settings(self.recipe).get(name)

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
        return read_json_lines(self.folder / HISTORY_FILE, "loss history")

    def summary(self) -> str:
        """One line: status, steps, final loss (and the error of a failed run)."""
        steps = f"step {self.global_step}" if self.global_step is not None else "no step"
        planned = self.setting("steps")
        text = f"{self.folder}: {self.status}, {steps}{f' of {planned}' if planned else ''}"
        if self.final_loss is not None:
            text += f", final loss {self.final_loss:.4f}"
        if self.error:
            text += f" ({self.error})"
        return text

    def save(self) -> RunRecord:
        """Write ``run.json`` atomically (only on the main process of a distributed run)."""
        if is_main_process():
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

    def finish(self, metrics: dict[str, Any]) -> RunRecord:
        """Write ``metrics.json`` (once per evaluation) and mark the run finished."""
        if is_main_process():
            write_json(self.folder / METRICS_FILE, dict(metrics))
        return self.update(status="finished", error=None, finished_at=now())


def read_predictions(folder: str | os.PathLike, limit: int | None = None) -> list[dict[str, Any]]:
    """The rows of ``predictions.jsonl`` in a run or evaluation folder (text, prediction, references)."""
    path = Path(folder) / PREDICTIONS_FILE
    if not path.is_file():
        raise UserError(f"{path}: missing; the run has not been evaluated yet")
    return read_json_lines(path, "predictions file")[:limit]


# ----------------------------------------------------------------------------------------------------------
# Reading several runs (plots, tables, the comparison notebook)
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One run folder as plots and tables see it: its record, its loss history and its test metrics."""

    record: RunRecord
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    source: str | None = None  # where a run made elsewhere came from (a bundle), for labels

    @property
    def path(self) -> Path:
        return self.record.folder

    @property
    def name(self) -> str:
        return self.record.name or self.path.name

    @property
    def method(self) -> str:
        return self.record.method or "unknown"

    @property
    def task(self) -> str:
        return self.record.task or self.metrics.get("task", "")

    @property
    def status(self) -> str:
        return self.record.status

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @property
    def hardware(self) -> str:
        """Where the run's times and memory were measured (records written before it was kept do not say)."""
        return self.record.hardware or "hardware not recorded"

    def origin(self) -> str:
        """The run's model and hardware, for labels: ``THUDM/chatglm-6b-int4 on NVIDIA A100-SXM4-40GB``."""
        model = self.record.model or "model not recorded"
        return f"{Path(model).name if Path(model).is_absolute() else model} on {self.hardware}"

    def note(self) -> str:
        """Why a run is left out of comparisons, in one line."""
        step = self.record.global_step
        where = f" at step {step}" if step is not None else ""
        if self.status == "failed":
            return f"{self.path}: failed{where} ({self.record.error or 'no error recorded'}); left out"
        return f"{self.path}: not finished{where} (running, or stopped; run its command again to resume); left out"


def load_run(path: str | os.PathLike) -> Run:
    """Read one run folder (it must hold ``run.json``)."""
    record = RunRecord.load(path)
    return Run(record, record.history(), record.metrics())


def finished_runs(runs: Sequence[Run]) -> list[Run]:
    """The finished runs of ``runs``; a note is printed for each one left out."""
    for run in runs:
        if not run.finished:
            print(run.note())
    return [run for run in runs if run.finished]


def _method_rank(run: Run) -> tuple[int, str]:
    return (METHODS.index(run.method) if run.method in METHODS else len(METHODS)), run.name


def load_runs(*paths: str | os.PathLike, unfinished: bool = False) -> list[Run]:
    """Runs found at ``paths`` (run folders, folders of run folders, or bundles of runs: ``.zip`` files written by
    ``export-runs``), ordered freeze, embedding, ptuning_v2, lora.

    Folders without ``run.json`` are skipped; other methods follow the four, by name. Unfinished and failed runs
    are left out with a printed note, unless ``unfinished`` (then each has its ``status``).
    """
    from .bundle import read_bundle

    folders: list[Path] = []
    found_in: set[Path] = set()  # run folders found inside a given folder (a damaged record there is skipped)
    loaded = []
    for path in map(Path, paths):
        if path.suffix == ".zip" and path.is_file():
            loaded.extend(read_bundle(path))
        elif (path / RUN_FILE).is_file():
            folders.append(path)
        elif path.is_dir():
            children = [child for child in sorted(path.iterdir()) if (child / RUN_FILE).is_file()]
            if not children:
                print(f"{path}: no run folders found (a run folder holds {RUN_FILE})")
            folders.extend(children)
            found_in.update(child.resolve() for child in children)
        else:
            what = "is a file" if path.exists() else "no such file" if path.suffix == ".zip" else "no such folder"
            raise UserError(f"{path}: {what}; give run folders, a folder of run folders (runs/) or a bundle of runs "
                            "(.zip)")
    for folder in dict.fromkeys(folder.resolve() for folder in folders):
        try:
            loaded.append(load_run(folder))
        except UserError as error:
            if folder not in found_in:
                raise
            print(f"{error}; left out")
    runs = sorted(loaded, key=_method_rank)
    return runs if unfinished else finished_runs(runs)
