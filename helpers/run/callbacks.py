"""What a training run writes as it goes: the loss history, TensorBoard events cut back on resume, the progress bar.

``loss_history.jsonl`` and ``.csv`` get one line per logged step as it happens; a resumed run first cuts them (and the
TensorBoard events) back to its checkpoint's step, so no step appears twice.
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from ..files import read_json_lines

HISTORY_FIELDS = ("step", "epoch", "loss", "learning_rate", "grad_norm", "elapsed_s")


class HistoryCallback(TrainerCallback):
    """Appends every logged training loss to ``loss_history.jsonl``/``.csv`` as it happens."""

    def __init__(self, run_dir: Path, resumed_step: int = 0) -> None:
        self.jsonl, self.csv = run_dir / "loss_history.jsonl", run_dir / "loss_history.csv"
        self.started = time.time()
        self.offset = 0.0
        self._truncate(resumed_step)

    def _truncate(self, step: int) -> None:
        """Keep only the lines up to ``step`` (a resumed run repeats what came after its checkpoint)."""
        kept = [row for row in read_json_lines(self.jsonl, "loss history") if row["step"] <= step] if step else []
        self.offset = kept[-1]["elapsed_s"] if kept else 0.0
        with self.jsonl.open("w", encoding="utf-8") as out:
            out.writelines(json.dumps(row) + "\n" for row in kept)
        with self.csv.open("w", encoding="utf-8", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=HISTORY_FIELDS)
            writer.writeheader()
            writer.writerows(kept)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), "loss": float(logs["loss"]),
               "learning_rate": logs.get("learning_rate"), "grad_norm": logs.get("grad_norm"),
               "elapsed_s": round(self.offset + time.time() - self.started, 3)}
        with self.jsonl.open("a", encoding="utf-8") as out:
            out.write(json.dumps(row) + "\n")
        with self.csv.open("a", encoding="utf-8", newline="") as out:
            csv.DictWriter(out, fieldnames=HISTORY_FIELDS).writerow(row)


class LossBar(ProgressCallback):
    """The usual progress bar, showing the latest loss on the bar instead of printing a line per step."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{float(logs['loss']):.4f}", refresh=False)



def truncate_events(folder: str | os.PathLike, step: int) -> None:
    """Drop the TensorBoard events logged after ``step`` (a resumed run logs those steps again); 0 drops all."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    for path in sorted(folder.glob("events.out.tfevents.*")):
        if step == 0:
            path.unlink()
            continue
        try:
            records = list(RawEventFileLoader(str(path)).Load())
        except Exception:  # noqa: BLE001 - a file cut off by a kill: keep what can be read
            records = []
        kept = [record for record in records if Event.FromString(record).step <= step]
        if len(kept) == len(records) and records:
            continue
        tmp = path.with_name(".truncating-" + path.name)
        with tmp.open("wb") as handle:
            writer = RecordWriter(handle)
            for record in kept:
                writer.write(record)
            writer.flush()
        os.replace(tmp, path)
