"""Run folders before they are trusted: may results be written here, is a checkpoint complete, is an artifact whole,
and — in one place — what a folder that already holds a run means for a new command (:func:`decide`).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .record import (
    CHECKPOINTS,
    EVAL_PREFIX,
    METRICS_FILE,
    PREDICTIONS_FILE,
    RUN_ENTRIES,
    RUN_FILE,
    RunRecord,
    is_main_process,
)

TRAINABLE_FILE = "trainable.safetensors"  # an artifact's trained tensors (all methods but LoRA)
METHOD_FILE = "method.json"  # an artifact's method and options
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")  # a LoRA artifact (peft's files)


def start_over(folder: str | os.PathLike) -> None:
    """Remove what an earlier run wrote into ``folder`` (only the run's own files; anything else stays)."""
    folder = Path(folder)
    if not folder.is_dir() or not is_main_process():
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
        if remove_broken and is_main_process():
            shutil.rmtree(folder, ignore_errors=True)
    return None


# ----------------------------------------------------------------------------------------------------------
# What a command does with a folder that may already hold a run: decided once, before anything loads
# ----------------------------------------------------------------------------------------------------------

CLI_HINT = "use --fresh to start over or another --out"
MODES = ("keep", "replace", "fresh")


@dataclass(frozen=True)
class Decision:
    """What a run folder means for a recipe (see :func:`decide`).

    ``action``: ``"train"`` (a new run, or the interrupted one in ``record`` resumed from ``checkpoint``),
    ``"evaluate"`` (trained, evaluation missing) or ``"done"`` (finished: nothing to do). ``replace``: the earlier
    run's files are removed first. ``note`` is printed when the decision is carried out.
    """

    folder: Path
    action: str
    record: RunRecord | None = None
    checkpoint: Path | None = None
    replace: bool = False
    note: str = ""

    def begin(self, recipe, **fields) -> RunRecord:
        """Carry the decision out: remove what is replaced, and return the run's record (a new one is saved)."""
        if self.note:
            print(self.note)
        if self.replace:
            start_over(self.folder)
        if self.record is not None:
            return self.record
        record = RunRecord(self.folder, name=self.folder.name, model=recipe.model, method=recipe.method,
                           task=recipe.task, recipe=recipe.to_dict(), **fields)
        return record.save()


def decide(folder: str | os.PathLike, recipe, mode: str = "keep", hint: str = CLI_HINT,
           option: str = "--out") -> Decision:
    """The one rerun policy: what running ``recipe`` into ``folder`` does with an earlier run there.

    ``mode="keep"`` (the command line, ``helpers.train``): a finished run of the same recipe is kept and not
    trained again, one trained but not evaluated is evaluated, an interrupted one resumes from its last complete
    checkpoint; a run of another recipe is refused with one line naming the differences (``hint`` says how to start
    over), unless it never got as far as a checkpoint. ``mode="replace"`` (the notebooks): an interrupted run of the
    same recipe resumes, anything else is replaced. ``mode="fresh"`` (``--fresh``): start over. ``option`` names
    the folder in messages. Nothing is written.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    folder = check_out_folder(folder, option)
    record = RunRecord.find(folder)
    if record is None:
        return Decision(folder, "train")
    if mode == "fresh":
        return Decision(folder, "train", replace=True,
                        note=f"{folder}: starting over (--fresh); the earlier run's files are removed.")
    checkpoint = last_complete_checkpoint(folder, remove_broken=False)
    diffs = recipe.differences(record.recipe)
    if diffs or (mode == "replace" and (record.trained or record.status == "finished")):
        if mode == "keep" and (record.trained or checkpoint is not None):
            raise _refusal(record, diffs, hint)
        what = "another recipe that saved no checkpoint" if diffs and mode == "keep" else "the earlier run"
        return Decision(folder, "train", replace=True, note=f"{folder}: replacing {what}.")
    if record.trained:
        finished = record.status == "finished" and record.metrics()
        return Decision(folder, "done" if finished else "evaluate", record)
    note = f"{folder}: continuing the interrupted run from {checkpoint.name}." if checkpoint else ""
    return Decision(folder, "train", record, checkpoint, note=note)


def _refusal(record: RunRecord, diffs: list, hint: str) -> UserError:
    """The one-line error of a folder that holds a run of another recipe (and the way to evaluate it otherwise)."""
    from .recipe import EVALUATION_SETTINGS, describe, flag

    was = ", ".join(describe(key, old) for key, old, _ in diffs)
    asks = ", ".join(describe(key, new) for key, _, new in diffs)
    if record.trained and all(key in EVALUATION_SETTINGS for key, _, _ in diffs):
        flags = "".join(f" {flag(key)} {new}" for key, _, new in diffs if new is not None)
        hint += f", or evaluate it with these settings: python -m helpers evaluate --run {record.folder}{flags}"
    return UserError(f"{record.folder}: exists with {was}, this command asks {asks}; {hint}")
