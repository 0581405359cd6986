"""The three tasks of the course: what each asks (prompt, token budgets, labels), where its rows come from, and the
metric it is ranked by.

- :mod:`~helpers.tasks.rows`: reading rows from files in every supported layout, with one-line errors;
- :mod:`~helpers.tasks.tokens`: ChatGLM's token layout ``prompt + text [gMASK] <sop> answer <eop>``;
- :mod:`~helpers.tasks.metrics`: triple F1, ROUGE/BLEU/diversity, accuracy/macro-F1, repetition;
- :mod:`~helpers.tasks.download`: the full public datasets; :mod:`~helpers.tasks.augment`: generated IE rows.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..files import DATA_DIR
from .rows import CLS_NAMES, DataError, Example, group_by_text, read_examples


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    prompt: str
    max_source_length: int  # prompt + text tokens
    max_target_length: int  # answer tokens (before <eop>)
    main_metric: str  # what the task's runs are ranked by
    labels: tuple[str, ...] = field(default=())  # classification only


# The IE and generation prompts are the original course's (the IE one holds a literal backslash-n).
IE_PROMPT = (
    '你现在是一个信息抽取模型，请你帮我抽取出关系内容为"性能故障", "部件故障", "组成"和 "检测工具"的相关三元组，'
    '三元组内部用"_"连接，三元组之间用\\n分割。文本：'
)
GEN_PROMPT = "你现在是一个问题生成模型，请根据下面文档生成一个问题，文档："


def cls_prompt(labels: Sequence[str]) -> str:
    return f"你现在是一个新闻分类模型，请判断下面的新闻标题属于哪一类，类别有：{'、'.join(labels)}。新闻标题："


TASKS = {
    "ie": Task("ie", "Information extraction (fault triples)", IE_PROMPT, 450, 300, "f1"),
    "gen": Task("gen", "Question generation from a document", GEN_PROMPT, 400, 64, "rouge_l"),
    "cls": Task("cls", "News title classification (15 classes)", cls_prompt(CLS_NAMES), 120, 8, "accuracy", CLS_NAMES),
}
MAIN_METRIC = {name: task.main_metric for name, task in TASKS.items()}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UserError(f"unknown task {name!r} (--task); choose one of {', '.join(TASKS)}")
    return TASKS[name]


def bundled_path(task: str, split: str) -> Path:
    if split not in ("train", "test"):
        raise UserError(f"split must be 'train' or 'test', got {split!r}")
    return DATA_DIR / get_task(task).name / f"{split}.jsonl"


def load_split(task: str, split: str, path: str | os.PathLike | None = None, limit: int | None = None) -> list[Example]:
    """Examples of a task split: the bundled sample by default, or ``path`` (any supported layout).

    Test splits are grouped by text so that each document keeps all its reference answers.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"limit (--eval-limit) must be a whole number of at least 1 (or left out for all rows), "
                        f"got {limit!r}")
    get_task(task)
    examples = read_examples(path or bundled_path(task, split), task)
    if split == "test":
        examples = group_by_text(examples)
    return examples[:limit] if limit else examples


def check_file(task: str, path: str | os.PathLike | None, split: str, option: str) -> str | None:
    """A user's data file checked before anything loads (exists, parses, holds rows): its absolute path.

    ``None`` stands for the bundled sample (checked too). ``option`` is how the message names the setting, e.g.
    ``train_file (--train-file)``; a bad line raises :class:`DataError` with its file and line.
    """
    if path is None:
        load_split(task, split)
        return None
    file = Path(path).expanduser()
    if not file.exists():
        raise DataError(f"{option} {path}: no such file; give a JSON-lines file with text and answer fields")
    if not file.is_file():
        raise DataError(f"{option} {path}: is a folder, not a file; give a JSON-lines file")
    load_split(task, split, file)  # raises on the first bad line, and on a file without rows
    return str(file.resolve())


def unseen_labels(train: Sequence[Example], test: Sequence[Example]) -> list[str]:
    """Classification labels that test examples expect but no training example shows, in order of appearance."""
    seen = {t for e in train for t in e.targets}
    return list(dict.fromkeys(t for e in test for t in e.targets if t not in seen))


def warn_unseen_labels(train: Sequence[Example], test: Sequence[Example]) -> list[str]:
    """Warn once, naming them, when test labels never occur in training (the model cannot learn them)."""
    unseen = unseen_labels(train, test)
    if unseen:
        count = sum(1 for e in test if any(t in unseen for t in e.targets))
        warnings.warn(f"{count} of {len(test)} test examples have labels that no training example has: "
                      f"{', '.join(unseen)}; the model cannot learn them from this training file", stacklevel=2)
    return unseen


from .tokens import IGNORE_INDEX, Collator, EncodedDataset, encode_example, left_pad, prompt_ids  # noqa: E402

__all__ = ["TASKS", "MAIN_METRIC", "Task", "Example", "DataError", "get_task", "bundled_path", "load_split",
           "check_file", "unseen_labels", "warn_unseen_labels", "IGNORE_INDEX", "Collator", "EncodedDataset",
           "encode_example", "left_pad", "prompt_ids"]
