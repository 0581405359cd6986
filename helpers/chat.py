"""``python -m helpers chat``: talk to a model, streamed — the base model, a fine-tuned run, or both side by side.

With a task (``--task``, or the run's own) a message is answered as the task's rows are (the task's prompt, then
``[gMASK] <sop>``, greedy), which is what a fine-tuned run learned; without one it is ChatGLM's own chat layout
(``chat``/``stream_chat``, sampling). Side by side, one model serves both answers: the fine-tuned one as it is and
the base one through :func:`helpers.run.artifacts.as_base_model` (adapters off, prefix off, base values back).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterable, Iterator

import torch

from .errors import UserError
from .run.artifacts import as_base_model, load_finetuned
from .tasks import Task, get_task, prompt_ids


class Session:
    """A loaded model and how it answers: in a task's layout (``task``) or as a chat."""

    def __init__(self, model, tokenizer, task: Task | None, max_new_tokens: int | None = None) -> None:
        self.model, self.tokenizer, self.task = model.eval(), tokenizer, task
        self.max_new_tokens = max_new_tokens
        self.history: list[tuple[str, str]] = []

    def stream(self, message: str, base: bool = False) -> Iterator[str]:
        """The answer to ``message`` piece by piece (``base``: as the base model would answer)."""
        context = as_base_model(self.model) if base else contextlib.nullcontext()
        with context, torch.no_grad():
            if self.task is None:
                yield from self._chat_answer(message, keep=not base)
            else:
                yield from self._task_answer(message)

    def _chat_answer(self, message: str, keep: bool) -> Iterator[str]:
        limit = self.model.config.max_sequence_length
        if self.max_new_tokens:  # chat counts prompt and answer together
            prompt = self.model.build_chat_prompt(message, self.history)
            limit = min(limit, len(self.tokenizer(prompt)["input_ids"]) + self.max_new_tokens)
        previous, history = "", self.history
        for answer, history in self.model.stream_chat(self.tokenizer, message, self.history, max_length=limit):
            yield answer[len(previous):]
            previous = answer
        if keep:  # the conversation goes on with the fine-tuned model's answers
            self.history = history

    def _task_answer(self, text: str) -> Iterator[str]:
        from transformers import TextIteratorStreamer

        ids = torch.tensor([prompt_ids(self.tokenizer, self.task, text)], device=self.model.device)
        budget = self.max_new_tokens or self.task.max_target_length + 1
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        errors: list[BaseException] = []

        def generate() -> None:
            try:
                self.model.generate(input_ids=ids, max_new_tokens=budget, do_sample=False, streamer=streamer,
                                    eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id)
            except BaseException as error:  # shown in this thread below
                errors.append(error)
                streamer.end()

        worker = threading.Thread(target=generate, daemon=True)
        worker.start()
        yield from streamer
        worker.join()
        if errors:
            raise errors[0]


def open_session(model: str | None, run: str | None, task: str | None, device: str | None, dtype: str | None,
                 max_new_tokens: int | None = None, side_by_side: bool = False) -> Session:
    """Load the base model (``model``) or a run (``run``, on its recorded base or on ``model``) for chatting."""
    from .models import load_model

    if side_by_side and not run:
        raise UserError("--side-by-side compares a fine-tuned run with its base model: give --run R")
    if run:
        from .run.record import RunRecord

        record = RunRecord.load(run)
        task = task or record.task
        loaded, tokenizer = load_finetuned(run, device=device, dtype=dtype, model=model, keep_base=side_by_side)
    else:
        loaded, tokenizer = load_model(model or "tiny", device=device, dtype=dtype)
    _warm_up(loaded, tokenizer)
    return Session(loaded, tokenizer, get_task(task) if task else None, max_new_tokens)


def _warm_up(model, tokenizer) -> None:
    """One short forward pass before the first message: on a CPU in bf16 the quantized layers repack their weights
    for the int4pack kernels at first use (about 15 s at full size), so that wait comes with loading, not with the
    first answer."""
    started = time.perf_counter()
    with torch.no_grad():
        model(input_ids=torch.tensor([[tokenizer.gmask_token_id, tokenizer.bos_token_id]], device=model.device))
    if time.perf_counter() - started > 2:
        print(f"ready (the first pass took {time.perf_counter() - started:.0f} s: the weights were prepared for the "
              "fast path)")


def messages(prompt: str | None, stream=None) -> Iterable[str]:
    """The messages to answer: ``prompt`` alone, or one per line read from the terminal (or a pipe) until EOF."""
    if prompt is not None:
        yield prompt
        return
    stream = stream or sys.stdin
    interactive = stream.isatty()
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = stream.readline()
        if not line:
            return
        if line.strip():
            yield line.strip()


def converse(session: Session, prompts: Iterable[str], side_by_side: bool = False, out=None) -> None:
    """Answer every message, streamed, with the time each answer took (base first when side by side)."""
    out = out or sys.stdout
    for message in prompts:
        for label, base in ((("base", True), ("fine-tuned", False)) if side_by_side else (("model", False),)):
            print(f"{label}> ", end="", file=out, flush=True)
            started, first = time.perf_counter(), None
            for piece in session.stream(message, base=base):
                first = first or time.perf_counter() - started
                print(piece, end="", file=out, flush=True)
            total = time.perf_counter() - started
            timing = f"first words after {first:.1f} s, {total:.1f} s in all" if first else f"{total:.1f} s"
            print(f"\n  ({timing})", file=out, flush=True)
