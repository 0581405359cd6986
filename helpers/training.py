"""Training on ``transformers.Trainer`` (so ``torchrun``, ``accelerate launch`` and DeepSpeed work unchanged).

A run writes ``runs/<name>/`` (see :mod:`helpers.runs`, which owns the folder's layout):

* ``run.json``: the run record — status, method, task, model, hyper-parameters, versions, seed, parameter
  counts, time, peak memory;
* ``loss_history.jsonl`` and ``loss_history.csv``: one line per logged step, appended as training goes;
* ``tb/``: TensorBoard events;
* ``artifact/``: only what the method changed — a peft LoRA adapter, or the trained tensors in safetensors
  (prefix encoder, LayerNorms, embeddings, dequantized layers) plus ``method.json`` — never the base model;
* ``checkpoints/checkpoint-<step>/``: the same small artifact plus optimizer/scheduler/RNG state, so an
  interrupted run resumes exactly where it stopped (``train(..., resume=True)``, the default). Only complete
  checkpoints are used; one cut off by a kill is removed and the one before is taken. The loss history and the
  TensorBoard events are cut back to the checkpoint's step, so no step appears twice.

A finished run is not trained again: ``train`` returns its stored result. A folder holding a run with other
settings is refused (``resume=False`` starts over).
"""

from __future__ import annotations

import csv
import json
import os
import platform
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.integrations import TensorBoardCallback
from transformers.trainer_callback import ProgressCallback
from transformers.utils.notebook import NotebookProgressCallback

from .data import Collator
from .errors import UserError
from .files import FILE_MODE, read_history, write_json
from .methods import MethodSetup, apply_method, base_dtype
from .runs import (
    ARTIFACT,
    METHOD_FILE,
    TRAINABLE_FILE,
    RunRecord,
    artifact_problem,
    check_out_folder,
    last_complete_checkpoint,
    now,
    start_over,
)

HISTORY_FIELDS = ("step", "epoch", "loss", "learning_rate", "grad_norm", "elapsed_s")


@dataclass
class TrainingConfig:
    """Hyper-parameters of a run.

    Sizes are per device: the effective batch is ``batch_size * gradient_accumulation_steps * devices``.
    """

    max_steps: int = 100
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_scheduler_type: str = "linear"
    max_grad_norm: float = 1.0
    logging_steps: int = 1
    save_steps: int = 50
    save_total_limit: int = 2
    seed: int = 42
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"  # "auto": bf16 on GPUs that have it, else fp16 on GPU; fp32 on CPU
    dataloader_num_workers: int = 0
    deepspeed: str | None = None  # a DeepSpeed config file (see configs/), for multi-GPU runs
    progress: bool = True


@dataclass
class TrainResult:
    run_dir: Path
    info: dict
    history: list[dict] = field(default_factory=list)

    @property
    def final_loss(self) -> float | None:
        return self.history[-1]["loss"] if self.history else None


def _versions() -> dict:
    import peft
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}


def is_main_process() -> bool:
    """True outside distributed runs, and on rank 0 under ``torchrun``/``accelerate launch``/``deepspeed``."""
    return int(os.environ.get("RANK", "0")) == 0


def _mixed_precision(choice: str, model: nn.Module) -> dict:
    """Trainer's autocast flags: "auto" follows the base dtype (bf16/fp16 model), and on a GPU an fp32 model
    trains in bf16 where supported, else fp16; fp32 on a CPU stays fp32."""
    device = next(model.parameters()).device
    if choice == "auto":
        dtype = base_dtype(model)
        native_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
        if dtype == torch.bfloat16 or (dtype == torch.float32 and native_bf16):
            return {"bf16": True}
        if dtype == torch.float16 or device.type == "cuda":
            return {"fp16": True}
        return {}
    return {"no": {}, "fp32": {}, "bf16": {"bf16": True}, "fp16": {"fp16": True}}[choice]


# ----------------------------------------------------------------------------------------------------------
# Artifacts: only what the method trained
# ----------------------------------------------------------------------------------------------------------


def save_artifact(model: nn.Module, folder: str | os.PathLike, method: str, options: dict) -> Path:
    """Write the trained part of ``model`` to ``folder``: a peft adapter, or the trainable tensors."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(model, PeftModel):
        model.save_pretrained(folder)
    else:
        tensors = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        tmp = folder / (TRAINABLE_FILE + ".tmp")
        save_file(tensors, tmp, metadata={"method": method})
        os.replace(tmp, folder / TRAINABLE_FILE)
    write_json(folder / METHOD_FILE, {"method": method, "options": options})
    for path in folder.iterdir():  # safetensors writes 0600; results are readable by everyone, as open() writes them
        if path.is_file():
            os.chmod(path, FILE_MODE)
    return folder


def load_artifact(model: nn.Module, folder: str | os.PathLike) -> None:
    """Load trained tensors saved by :func:`save_artifact` into ``model`` (already prepared for the method)."""
    folder = Path(folder)
    if isinstance(model, PeftModel):
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        set_peft_model_state_dict(model, load_peft_weights(str(folder)))
        return
    tensors = load_file(folder / TRAINABLE_FILE)
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise ValueError(f"{folder / TRAINABLE_FILE}: tensors {unknown[:3]} do not belong to this model; "
                         "was it trained with another method or base model?")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].dtype))


class CourseTrainer(Trainer):
    """A ``Trainer`` whose checkpoints hold only the trained tensors (small even for the 6B model)."""

    def __init__(self, *args, method: str = "custom", method_options: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.method = method
        self.method_options = method_options or {}

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if self.args.should_save:
            save_artifact(self.accelerator.unwrap_model(self.model), output_dir or self.args.output_dir,
                          self.method, self.method_options)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        load_artifact(self.accelerator.unwrap_model(model or self.model), resume_from_checkpoint)


class HistoryCallback(TrainerCallback):
    """Appends every logged training loss to ``loss_history.jsonl``/``.csv`` as it happens."""

    def __init__(self, run_dir: Path, resumed_step: int = 0) -> None:
        self.jsonl, self.csv = run_dir / "loss_history.jsonl", run_dir / "loss_history.csv"
        self.started = time.time()
        self.offset = 0.0
        self._truncate(resumed_step)

    def _truncate(self, step: int) -> None:
        """Keep only the lines up to ``step`` (a resumed run repeats what came after its checkpoint)."""
        kept = [row for row in read_history(self.jsonl) if row["step"] <= step] if step else []
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


def _reset_peak_memory(device: torch.device) -> None:
    """Start measuring peak memory here (CUDA allocator, or the process's peak RSS on Linux)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident set size
    except OSError:
        pass  # elsewhere the process-wide peak is reported


def current_rss() -> int:
    """Resident bytes of this process now (0 where ``/proc`` is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _current_memory(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else current_rss()


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "rss"
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss"


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


TRAINING_IDENTITY_IGNORED = ("progress", "dataloader_num_workers")


def _settings_differences(record: RunRecord, info: dict) -> list[tuple[str, object, object]]:
    """(setting, stored, new) where an earlier run in the folder trained something else."""
    stored = {"model": record.model, "method": record.method, "task": record.task,
              "method_options": json.loads(json.dumps(record.method_options, default=str))}
    asked = {k: json.loads(json.dumps(info[k], default=str)) for k in stored}
    diffs = [(k, stored[k], asked[k]) for k in stored if stored[k] not in (None, {}) and stored[k] != asked[k]]
    old = record.hyperparameters or {}
    for key, value in info["hyperparameters"].items():
        if key in old and key not in TRAINING_IDENTITY_IGNORED and old[key] != value:
            diffs.append((key, old[key], value))
    return diffs


def refuse_other_settings(folder: Path, diffs: list[tuple[str, object, object]], start_over_hint: str) -> None:
    """Raise the one-line error of a folder that already holds a run with other settings."""
    from .recipe import describe

    was = ", ".join(describe(key, old) for key, old, _ in diffs)
    asks = ", ".join(describe(key, new) for key, _, new in diffs)
    raise UserError(f"{folder}: exists with {was}, this command asks {asks}; {start_over_hint}")


def train(
    model: nn.Module | MethodSetup,
    tokenizer,
    dataset,
    out_dir: str | os.PathLike,
    task: str | None = None,
    resume: bool = True,
    callbacks: list[TrainerCallback] | None = None,
    recipe: dict | None = None,
    finish: bool = True,
    **hyperparameters,
) -> TrainResult:
    """Train ``model`` (ideally a :class:`MethodSetup` from ``helpers.methods``) on ``dataset``; write ``out_dir``.

    ``hyperparameters`` are :class:`TrainingConfig` fields. With ``resume`` an earlier, interrupted run in the
    same folder continues from its last complete checkpoint (same loss sequence as an uninterrupted run), and a
    finished one is returned as it is, without training; a folder whose run had other settings is refused.
    ``resume=False`` starts over. ``recipe`` (a :meth:`Recipe.to_dict`) is stored in the run record;
    ``finish=False`` leaves the record ``running`` for a caller that evaluates next.
    """
    from .recipe import TrainingSettings, check_training

    setup = model if isinstance(model, MethodSetup) else MethodSetup(model, "custom")
    model = setup.model
    unknown = set(hyperparameters) - {f.name for f in TrainingConfig.__dataclass_fields__.values()}
    if unknown:
        raise TypeError(f"unknown training option(s): {', '.join(sorted(unknown))}")
    config = TrainingConfig(**hyperparameters)
    check_training({k: v for k, v in asdict(config).items() if k in TrainingSettings.__dataclass_fields__})
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError("nothing to train: no parameter of the model requires a gradient; apply a method first "
                        "(helpers.freeze, embedding, ptuning_v2 or lora) to a freshly loaded model")
    run_dir = check_out_folder(out_dir, option="out_dir", purpose="folder")
    main_process = is_main_process()  # under torchrun/accelerate only rank 0 writes files
    device = next(model.parameters()).device
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    model_name = getattr(base.config, "name_or_path", None) or getattr(base, "name_or_path", None)
    info = {
        "method": setup.method,
        "method_options": setup.options,
        "task": task,
        "model": model_name,
        "hyperparameters": asdict(config),
    }

    record = RunRecord.find(run_dir)
    if record is not None and not resume:
        print(f"{run_dir}: starting over (the earlier run's files are removed).")
        start_over(run_dir)
        record = None
    last = last_complete_checkpoint(run_dir) if record is not None else None
    if record is not None:
        diffs = _settings_differences(record, info)
        if diffs and (record.trained or last is not None):
            refuse_other_settings(run_dir, diffs, "train with resume=False to start over, or use another folder")
        if record.trained and not diffs:
            print(f"{record.summary()}: already trained; not training again (resume=False starts over).")
            return TrainResult(run_dir, record.to_dict(), record.history())
        if diffs:  # nothing to lose: no checkpoint, never finished
            print(f"{run_dir}: replacing an earlier run that had no checkpoint yet.")
            start_over(run_dir)
            record, last = None, None
    resumed_step = int(last.name.rsplit("-", 1)[-1]) if last else 0
    record = record or RunRecord(run_dir)
    record.recipe = recipe or record.recipe
    record.update(
        name=run_dir.name, status="running", error=None, model_path=_model_path(base, model_name), **info,
        quantization_bit=getattr(base.config, "quantization_bit", 0) or 0, device=str(device),
        dtype=str(next(base.parameters()).dtype).replace("torch.", ""), seed=config.seed, versions=_versions(),
        trainable_params=setup.trainable_params, all_params=setup.all_params, train_examples=len(dataset),
        resumed_from_step=resumed_step, world_size=int(os.environ.get("WORLD_SIZE", "1")),
        started_at=record.started_at or now(), trained_at=None, finished_at=None,
    )
    if main_process:
        truncate_events(run_dir / "tb", resumed_step)

    args = TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_steps,
        lr_scheduler_type=config.lr_scheduler_type,
        max_grad_norm=config.max_grad_norm,
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        seed=config.seed,
        activation_checkpointing=config.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if config.gradient_checkpointing else None,
        dataloader_num_workers=config.dataloader_num_workers,
        disable_tqdm=not config.progress,
        report_to="none",
        remove_unused_columns=False,
        label_names=["labels"],
        use_cpu=device.type == "cpu",
        deepspeed=config.deepspeed,
        **_mixed_precision(config.mixed_precision, model),
    )
    from torch.utils.tensorboard import SummaryWriter

    writers = []
    if main_process:
        tensorboard = TensorBoardCallback(SummaryWriter(log_dir=str(run_dir / "tb")))
        writers = [HistoryCallback(run_dir, resumed_step), tensorboard]
    trainer = CourseTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=Collator(tokenizer.pad_token_id),
        callbacks=[*writers, *(callbacks or [])],
        method=setup.method,
        method_options=setup.options,
    )
    if config.progress:
        trainer.remove_callback(ProgressCallback)
        trainer.remove_callback(NotebookProgressCallback)  # in Jupyter: one bar, not a table row per step
        trainer.add_callback(LossBar())
    _reset_peak_memory(device)
    at_start = _current_memory(device)
    started = time.time()
    try:
        if resumed_step >= config.max_steps:  # the last checkpoint is the end: take its tensors, train no more
            trainer._load_from_checkpoint(str(last))
            global_step = resumed_step
        else:  # the TensorBoard callback closes its writer at the end
            global_step = trainer.train(resume_from_checkpoint=str(last) if last else None).global_step
    except KeyboardInterrupt:
        record.mark_failed(f"interrupted at step {trainer.state.global_step} (KeyboardInterrupt); run the same "
                           "command again to resume from the last checkpoint")
        raise
    except Exception as error:
        record.mark_failed(error)
        raise
    model.eval()
    history = read_history(run_dir / "loss_history.jsonl")
    if not main_process:
        return TrainResult(run_dir, record.to_dict(), history)
    save_artifact(model, run_dir / ARTIFACT, setup.method, setup.options)
    peak, kind = _peak_memory(device)
    record.update(
        global_step=global_step,
        train_runtime_s=round(time.time() - started, 2),
        peak_memory_bytes=int(peak),
        peak_memory_kind=kind,
        memory_at_start_bytes=int(at_start),
        final_loss=history[-1]["loss"] if history else None,
        trained_at=now(),
    )
    if finish:
        record.mark_finished()
    return TrainResult(run_dir, record.to_dict(), history)


def _model_path(base: nn.Module, name: str | None) -> str | None:
    """The absolute folder the base model's weights came from (the cache folder for "tiny" or a hub name)."""
    folder = getattr(base.config, "_name_or_path", None)
    for candidate in (folder, name):
        if candidate and Path(str(candidate)).expanduser().is_dir():
            return str(Path(str(candidate)).expanduser().resolve())
    return None


def attach_artifact(model: nn.Module, artifact: str | os.PathLike) -> nn.Module:
    """``model`` (a freshly loaded base) with a run's artifact applied: its method, then the trained tensors.

    Returns the model to use (a peft wrapper for LoRA). Checks the artifact's files first and names a missing or
    damaged one.
    """
    artifact = Path(artifact)
    problem = artifact_problem(artifact)
    if problem:
        raise UserError(f"{problem}; the run's artifact is incomplete: train the run again (--fresh)")
    method = json.loads((artifact / METHOD_FILE).read_text(encoding="utf-8"))
    if method["method"] == "lora":
        from chatglm.lora import load_lora

        return load_lora(model, artifact).eval()
    setup = apply_method(model, method["method"], **method["options"]) if method["method"] != "custom" else None
    model = setup.model if setup else model
    load_artifact(model, artifact)
    # For inference the trained tensors join the base dtype, so the model runs (and chats) without autocast;
    # the prefix encoder stays fp32 as in the original (its output is cast where it is used).
    dtype = base_dtype(model)
    for name, param in model.named_parameters():
        param.requires_grad_(False)
        if param.dtype.is_floating_point and param.dtype != dtype and "prefix_encoder" not in name:
            param.data = param.data.to(dtype)
    return model.eval()


def load_finetuned(run_dir: str | os.PathLike, device: torch.device | str | None = None,
                   dtype: torch.dtype | str | None = None, model: str | None = None):
    """(model, tokenizer) rebuilt from a run folder: its base model, its method, and its small artifact.

    ``model`` names the base model when it is no longer where the run recorded it (default: the recorded one).
    """
    from .models import load_model

    record = RunRecord.load(run_dir)
    if not record.trained:
        raise UserError(f"{record.summary()}: training did not finish, so there is no artifact to load; run its "
                        "command again to resume")
    base = record.base_model(model)
    problem = artifact_problem(record.folder / ARTIFACT)
    if problem:  # checked before the base model loads
        raise UserError(f"{problem}; the run's artifact is incomplete: train the run again (--fresh)")
    model, tokenizer = load_model(base, device=device, dtype=dtype)
    if record.quantization_bit and not model.config.quantization_bit:
        model.quantize(record.quantization_bit)
    return attach_artifact(model, record.folder / ARTIFACT), tokenizer
