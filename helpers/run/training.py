"""Training on ``transformers.Trainer`` (so ``torchrun``, ``accelerate launch`` and DeepSpeed work unchanged).

The recipe's settings become ``TrainingArguments`` in one place (:func:`training_arguments`); what every run shares
— AdamW, a linear schedule after the warm-up, gradient clipping, one log line per step — are the constants below.
A run writes into its folder as it goes (see :mod:`helpers.run.record`): the record, the loss history, TensorBoard
events, checkpoints that hold only the trained tensors (small even for the 6B model) plus the optimizer, scheduler
and RNG state, so an interrupted run resumes exactly where it stopped; at the end, the artifact.

:func:`fit` trains one decided run (:func:`helpers.run.folder.decide`); :func:`train` is the same for a model
prepared by hand in Python: it resolves a recipe from the model and the settings given, then decides and fits.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftModel
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.integrations import TensorBoardCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.utils.notebook import NotebookProgressCallback

from ..errors import UserError
from ..methods import MethodSetup, base_dtype
from ..models import dtype_name
from ..tasks import Collator
from .artifacts import load_artifact, save_artifact
from .callbacks import HistoryCallback, LossBar, truncate_events
from .folder import decide
from .memory import current_memory, peak_memory, reset_peak
from .record import ARTIFACT, RunRecord, is_main_process, now

# How every run trains: Trainer's AdamW (betas 0.9/0.999) without weight decay, a linear decay to zero after the
# warm-up, gradients clipped to norm 1, the loss logged every step, the last two checkpoints kept.
OPTIMIZER = "AdamW"
WEIGHT_DECAY = 0.0
SCHEDULE = "linear"
MAX_GRAD_NORM = 1.0
SAVE_TOTAL_LIMIT = 2


@dataclass
class TrainResult:
    run_dir: Path
    record: RunRecord
    history: list[dict] = field(default_factory=list)

    @property
    def final_loss(self) -> float | None:
        return self.history[-1]["loss"] if self.history else None


def describe_training() -> str:
    """The optimizer and schedule every run uses, in words (the notebooks print it next to the recipe)."""
    return (f"{OPTIMIZER} (weight decay {WEIGHT_DECAY:g}), {SCHEDULE} decay to 0 after the warm-up, gradients "
            f"clipped to norm {MAX_GRAD_NORM:g}; only the method's trainable tensors are updated")


def _mixed_precision(model: nn.Module) -> dict:
    """Trainer's autocast flags: a bf16/fp16 base trains in its dtype; on a GPU an fp32 base trains in bf16 where the
    GPU has it, else fp16; an fp32 base on a CPU stays fp32."""
    device = next(model.parameters()).device
    dtype = base_dtype(model)
    native_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    if dtype == torch.bfloat16 or (dtype == torch.float32 and native_bf16):
        return {"bf16": True}
    if dtype == torch.float16 or device.type == "cuda":
        return {"fp16": True}
    return {}


def training_arguments(recipe, run_dir: Path, model: nn.Module, progress: bool = True) -> TrainingArguments:
    """The recipe's training settings as ``TrainingArguments`` (the one place they change form)."""
    checkpointing = recipe.gradient_checkpointing
    return TrainingArguments(
        output_dir=str(run_dir / "checkpoints"), max_steps=recipe.steps, per_device_train_batch_size=recipe.batch_size,
        gradient_accumulation_steps=recipe.grad_accum, learning_rate=recipe.learning_rate,
        warmup_steps=recipe.warmup_steps, save_steps=recipe.save_steps, seed=recipe.seed, deepspeed=recipe.deepspeed,
        weight_decay=WEIGHT_DECAY, lr_scheduler_type=SCHEDULE, max_grad_norm=MAX_GRAD_NORM, logging_steps=1,
        save_strategy="steps", save_total_limit=SAVE_TOTAL_LIMIT, activation_checkpointing=checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        disable_tqdm=not progress, report_to="none", remove_unused_columns=False, label_names=["labels"],
        use_cpu=next(model.parameters()).device.type == "cpu", **_mixed_precision(model),
    )


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


def hardware(device: torch.device) -> str:
    """Where a run's numbers were measured: the GPU's name, or the CPU and its core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine() or 'unknown'}), {os.cpu_count()} cores"


def _versions() -> dict:
    import peft
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}


def _model_path(base: nn.Module) -> str | None:
    """The absolute folder the base model's weights came from (the cache folder for "tiny" or a hub name)."""
    for candidate in (getattr(base.config, "_name_or_path", None), getattr(base.config, "name_or_path", None)):
        if candidate and Path(str(candidate)).expanduser().is_dir():
            return str(Path(str(candidate)).expanduser().resolve())
    return None


def _start(record: RunRecord, checkpoint: Path | None, setup: MethodSetup, dataset) -> int:
    """Mark the record running with what trains; returns the step training resumes from (0: from the start)."""
    resumed = int(checkpoint.name.rsplit("-", 1)[-1]) if checkpoint else 0
    base = setup.model.get_base_model() if isinstance(setup.model, PeftModel) else setup.model
    device = next(base.parameters()).device
    record.update(status="running", error=None, model_path=_model_path(base),
                  quantization_bit=getattr(base.config, "quantization_bit", 0) or 0, device=str(device),
                  dtype=dtype_name(base_dtype(base)), hardware=hardware(device), versions=_versions(),
                  trainable_params=setup.trainable_params, all_params=setup.all_params, train_examples=len(dataset),
                  resumed_from_step=resumed, world_size=int(os.environ.get("WORLD_SIZE", "1")),
                  started_at=record.started_at or now(), trained_at=None, finished_at=None)
    return resumed


def _trainer(setup: MethodSetup, tokenizer, dataset, recipe, run_dir: Path, resumed: int,
             callbacks: list[TrainerCallback], progress: bool) -> CourseTrainer:
    writers = []
    if is_main_process():  # under torchrun/accelerate only rank 0 writes files
        from torch.utils.tensorboard import SummaryWriter

        truncate_events(run_dir / "tb", resumed)
        writers = [HistoryCallback(run_dir, resumed), TensorBoardCallback(SummaryWriter(log_dir=str(run_dir / "tb")))]
    trainer = CourseTrainer(model=setup.model, args=training_arguments(recipe, run_dir, setup.model, progress),
                            train_dataset=dataset, data_collator=Collator(tokenizer.pad_token_id),
                            callbacks=[*writers, *callbacks], method=setup.method, method_options=setup.options)
    if progress:
        trainer.remove_callback(ProgressCallback)
        trainer.remove_callback(NotebookProgressCallback)  # in Jupyter: one bar, not a table row per step
        trainer.add_callback(LossBar())
    else:
        trainer.remove_callback(PrinterCallback)  # without a bar Trainer prints every log line instead
    return trainer


def fit(record: RunRecord, checkpoint: Path | None, setup: MethodSetup, tokenizer, dataset, recipe,
        callbacks: list[TrainerCallback] | None = None, progress: bool = True) -> TrainResult:
    """Train ``setup`` on ``dataset`` as ``recipe`` says into the run of ``record`` (new, or resumed from
    ``checkpoint``, as :meth:`Decision.begin` left it); save the artifact and what training cost. The record stays
    ``running`` (evaluation comes next) and is marked ``failed`` with the error if training stops."""
    if not any(p.requires_grad for p in setup.model.parameters()):
        raise UserError("nothing to train: no parameter of the model requires a gradient; apply a method first "
                        "(helpers.freeze, embedding, ptuning_v2 or lora) to a freshly loaded model")
    resumed = _start(record, checkpoint, setup, dataset)
    run_dir = record.folder
    trainer = _trainer(setup, tokenizer, dataset, recipe, run_dir, resumed, list(callbacks or []), progress)
    device = next(setup.model.parameters()).device
    reset_peak(device)
    at_start, started = current_memory(device), time.time()
    try:
        if resumed >= recipe.steps:  # the last checkpoint is the end: take its tensors, train no more
            trainer._load_from_checkpoint(str(checkpoint))
            global_step = resumed
        else:  # the TensorBoard callback closes its writer at the end
            global_step = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None).global_step
    except KeyboardInterrupt:
        record.mark_failed(f"interrupted at step {trainer.state.global_step} (KeyboardInterrupt); run the same "
                           "command again to resume from the last checkpoint")
        raise
    except Exception as error:
        record.mark_failed(error)
        raise
    setup.model.eval()
    history = record.history()
    if is_main_process():
        save_artifact(setup.model, run_dir / ARTIFACT, setup.method, setup.options)
        peak, kind = peak_memory(device)
        record.update(global_step=global_step, train_runtime_s=round(time.time() - started, 2),
                      peak_memory_bytes=int(peak), peak_memory_kind=kind, memory_at_start_bytes=int(at_start),
                      final_loss=history[-1]["loss"] if history else None, trained_at=now())
    return TrainResult(run_dir, record, history)


def train(model: nn.Module | MethodSetup, tokenizer, dataset, out_dir: str | os.PathLike, task: str = "ie", *,
          fresh: bool = False, callbacks: list[TrainerCallback] | None = None, progress: bool = True,
          **settings) -> TrainResult:
    """Train ``model`` (ideally a :class:`MethodSetup` from ``helpers.methods``) on ``dataset``; write ``out_dir``.

    ``settings`` are recipe settings (``steps``, ``learning_rate``, ``batch_size``, ...; the defaults are those of
    the model's size, method and task, see :mod:`helpers.run.recipe`), checked before anything is written. A
    finished run of the same settings is returned as it is, an interrupted one continues from its last complete
    checkpoint (the same losses as an uninterrupted run); a folder holding a run of other settings is refused,
    unless ``fresh=True`` starts over.
    """
    from ..methods import METHODS
    from .recipe import resolve_recipe

    setup = model if isinstance(model, MethodSetup) else MethodSetup(model, "custom")
    base = setup.model.get_base_model() if isinstance(setup.model, PeftModel) else setup.model
    parameter = next(base.parameters())
    name = getattr(base.config, "name_or_path", None) or getattr(base.config, "_name_or_path", None) or "custom"
    method = setup.method if setup.method in METHODS else None
    recipe = resolve_recipe(str(name), method, task, method_options=setup.options if method else None,
                            config=base.config, check_data=False, device=str(parameter.device),
                            dtype=dtype_name(base_dtype(base)), **settings)
    hint = "pass fresh=True to start over, or use another folder"
    decision = decide(out_dir, recipe, "fresh" if fresh else "keep", hint, option="out_dir")
    if decision.action != "train":
        print(f"{decision.record.summary()}: already trained; not training again (fresh=True starts over).")
        return TrainResult(decision.folder, decision.record, decision.record.history())
    record = decision.begin(recipe)
    result = fit(record, decision.checkpoint, setup, tokenizer, dataset, recipe, callbacks, progress)
    if is_main_process():
        result.record.update(status="finished", finished_at=now())
    return result

