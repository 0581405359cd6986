"""ChatGLM's token layout of a task row: ``prompt + text [gMASK] <sop> answer <eop>``.

Labels are -100 up to (not including) ``<sop>``, so the loss covers exactly the answer and its end token, as in the
original course. Prompt and text are tokenized separately (as the original course did) and the text is cut to fit
the token budget; one warning counts the rows cut.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..errors import UserError
from .rows import Example, as_examples

if TYPE_CHECKING:
    from . import Task

IGNORE_INDEX = -100


def _tokens_to_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text)) if text else []


def _source_ids(tokenizer, task: Task, text: str, max_source_length: int | None) -> tuple[list[int], bool]:
    """``prompt + text [gMASK] <sop>`` and whether the text had to be cut to fit."""
    limit = max_source_length or task.max_source_length
    prompt = _tokens_to_ids(tokenizer, task.prompt)
    text_ids = _tokens_to_ids(tokenizer, text)
    room = max(limit - len(prompt), 0)
    return prompt + text_ids[:room] + [tokenizer.gmask_token_id, tokenizer.bos_token_id], len(text_ids) > room


def prompt_ids(tokenizer, task: Task, text: str, max_source_length: int | None = None) -> list[int]:
    """``prompt + text [gMASK] <sop>``: the model input for generation (and the start of a training row).

    Prompt and text are tokenized separately (as the original course did); the text is cut so that both
    together fit ``max_source_length`` tokens.
    """
    return _source_ids(tokenizer, task, text, max_source_length)[0]


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _check_lengths(**lengths: int | None) -> None:
    for name, value in lengths.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{name} ({flag}) must be a whole number of tokens, at least 1, got {value!r}")


def encode_prompts(tokenizer, task: Task, texts: Sequence[str], max_source_length: int | None = None
) -> list[list[int]]:
    """:func:`prompt_ids` of every text, with one warning counting the texts cut to fit (for generation)."""
    _check_lengths(max_source_length=max_source_length)
    encoded = [_source_ids(tokenizer, task, text, max_source_length) for text in texts]
    cut = sum(was_cut for _, was_cut in encoded)
    if cut:
        limit = max_source_length or task.max_source_length
        warnings.warn(f"{task.name}: of {len(texts)} texts to answer, cut {cut} to {limit} tokens with the prompt "
                      "(max_source_length); raise it to keep them whole", stacklevel=2)
    return [ids for ids, _ in encoded]


def _encode(tokenizer, task: Task, example: Example, max_source_length: int | None,
            max_target_length: int | None) -> tuple[dict[str, list[int]], bool, bool]:
    """A training row, whether its text was cut, and whether its answer was cut."""
    source, text_cut = _source_ids(tokenizer, task, example.text, max_source_length)
    answer = _tokens_to_ids(tokenizer, example.answer)
    limit = max_target_length or task.max_target_length
    input_ids = source + answer[:limit] + [tokenizer.eos_token_id]
    context = len(source) - 1  # index of <sop>
    labels = [IGNORE_INDEX] * context + input_ids[context:]
    return {"input_ids": input_ids, "labels": labels}, text_cut, len(answer) > limit


def encode_example(tokenizer, task: Task, example: Example, max_source_length: int | None = None,
                   max_target_length: int | None = None) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` of one training row (labels -100 before ``<sop>``)."""
    return _encode(tokenizer, task, example, max_source_length, max_target_length)[0]


class EncodedDataset(torch.utils.data.Dataset):
    """Training rows encoded once up front; one warning counts the rows cut to the task's token limits."""

    def __init__(self, tokenizer, task: str | Task, examples: Sequence[Example], max_source_length: int | None = None,
                 max_target_length: int | None = None) -> None:
        from . import get_task

        self.task = get_task(task) if isinstance(task, str) else task
        examples = as_examples(examples, self.task.name)
        if not examples:
            raise UserError(f"{self.task.name}: no training examples to encode; give a file with at least one row")
        _check_lengths(max_source_length=max_source_length, max_target_length=max_target_length)
        encoded = [_encode(tokenizer, self.task, e, max_source_length, max_target_length) for e in examples]
        self.rows = [row for row, _, _ in encoded]
        self.texts_cut = sum(text for _, text, _ in encoded)
        self.answers_cut = sum(answer for _, _, answer in encoded)
        if self.texts_cut or self.answers_cut:
            source = max_source_length or self.task.max_source_length
            target = max_target_length or self.task.max_target_length
            parts = []
            if self.texts_cut:
                parts.append(f"{_count(self.texts_cut, 'text')} to {source} tokens with the prompt (max_source_length)")
            if self.answers_cut:
                parts.append(f"{_count(self.answers_cut, 'answer')} to {target} tokens (max_target_length)")
            warnings.warn(f"{self.task.name}: of {len(self.rows)} training rows, cut {' and '.join(parts)}; "
                          "raise the limits to keep them whole", stacklevel=2)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.rows[index]


@dataclass
class Collator:
    """Right-pads ``input_ids`` with the tokenizer's pad id and ``labels`` with -100.

    No attention mask is needed: with right padding, ChatGLM's own layout (from [gMASK]/<sop>) keeps every
    real token blind to the padding after it, exactly as if each row ran alone.
    """

    pad_token_id: int

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        length = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row["input_ids"])] = torch.tensor(row["input_ids"])
            labels[i, : len(row["labels"])] = torch.tensor(row["labels"])
        return {"input_ids": ids, "labels": labels}


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-padded ``input_ids`` and the HF ``attention_mask`` (1 = token) for batched generation."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if seq:
            ids[i, length - len(seq):] = torch.tensor(list(seq))
            mask[i, length - len(seq):] = 1
    return {"input_ids": ids, "attention_mask": mask}


