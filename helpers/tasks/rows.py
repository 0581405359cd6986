"""Reading a task's rows from JSON-lines files, in every layout the course accepts, with one-line errors.

Every task accepts the public formats (SPO / doc2query JSON lines in both their ``text/answer`` and
``instruction/input/output`` forms; FewCLUE TNEWS for classification) and a user's own JSON lines with a field
mapping, in UTF-8 with or without a byte-order mark. Bad input raises :class:`DataError` (a
:class:`~helpers.errors.UserError`) naming the file and line and what to fix.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..files import DATA_DIR

KIND_NAMES = {str: "a text", int: "a label id", list: "a list"}
IE_RELATIONS = ("性能故障", "部件故障", "组成", "检测工具")


class DataError(UserError):
    """A problem in a data file; the message names the file, the line and what to fix."""


@dataclass(frozen=True)
class Example:
    """One row: the input text, the training answer, and every acceptable reference for evaluation."""

    text: str
    answer: str
    references: tuple[str, ...] = ()
    where: str = ""  # "file:line", for messages

    @property
    def targets(self) -> tuple[str, ...]:
        return self.references or (self.answer,)

JSON_LINES_SUFFIXES = (".jsonl", ".json", ".ndjson")


def _not_json_lines(path: Path, where: str, number: int, line: str, problem: str) -> DataError:
    """The message for a line that is not one JSON object, with a hint when the whole file has another format."""
    hint = "each line must be one JSON object, e.g. {\"text\": \"...\", \"answer\": \"...\"}"
    if number == 1 and line.strip() in ("[", "{"):
        hint = "the file looks like pretty-printed JSON; write one JSON object per line (JSON lines, .jsonl)"
    elif number == 1 and line.lstrip().startswith("["):
        hint = "the file is one JSON array; write one JSON object per line instead (JSON lines, .jsonl)"
    elif path.suffix.lower() not in JSON_LINES_SUFFIXES:
        hint = f"the file is {path.suffix or 'without extension'}, not JSON lines; give a .jsonl file"
    return DataError(f"{where}: {problem}; {hint}")


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[str, dict]]:
    """Yield ("file:line", object) for every non-empty line; malformed lines raise :class:`DataError`.

    UTF-8 with or without a byte-order mark; a line that is not UTF-8 is named by its number.
    """
    path = Path(path)
    try:
        handle = path.open("rb")
    except OSError as error:
        raise DataError(f"{path}: cannot read the file ({error.strerror or error})") from error
    with handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{where}: not UTF-8 text ({error.reason} at byte {error.start + 1}); "
                                "save the file as UTF-8") from error
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                problem = f"not valid JSON ({error.msg} at column {error.colno})"
                raise _not_json_lines(path, where, number, line, problem) from error
            if not isinstance(row, dict):
                problem = f"expected a JSON object per line, got {type(row).__name__}"
                raise _not_json_lines(path, where, number, line, problem)
            yield where, row


def _kind(value) -> str:
    """What a JSON value is, for messages: ``a number (42)``, ``an object``, ``null``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"true/false ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    return {dict: "an object", list: "a list", str: "a text"}.get(type(value), type(value).__name__)


def _field(row: dict, name: str, where: str, kinds=(str,)):
    if name not in row:
        raise DataError(f"{where}: missing field {name!r} (fields present: {', '.join(row) or 'none'})")
    value = row[name]
    if not isinstance(value, kinds):
        raise DataError(f"{where}: field {name!r} must be {' or '.join(KIND_NAMES[k] for k in kinds)}, "
                        f"got {_kind(value)}")
    return value


def _text(value: str, name: str, where: str) -> str:
    if not value.strip():
        raise DataError(f"{where}: field {name!r} is empty")
    return value


def _check_triples(answer: str, where: str) -> None:
    for line in answer.split("\n"):
        parts = line.split("_")
        if len(parts) < 3 or not all(p.strip() for p in (parts[0], parts[-1])):
            raise DataError(f"{where}: answer line {line!r} is not a triple 'subject_relation_object'")
        if not any(f"_{r}_" in line for r in IE_RELATIONS):
            raise DataError(f"{where}: answer line {line!r} has no known relation ({', '.join(IE_RELATIONS)})")


def read_labels(path: str | os.PathLike) -> dict[str, str]:
    """TNEWS label file (JSON lines ``label``, ``label_desc``, ``label_zh``) -> {label id: Chinese name}.

    Tolerates the stray spaces some published copies have in their keys (``" label_zh"``).
    """
    names = {}
    for where, row in read_jsonl(path):
        row = {str(k).strip(): v for k, v in row.items()}
        missing = [k for k in ("label", "label_zh") if k not in row]
        if missing:
            raise DataError(f"{where}: label row lacks {', '.join(missing)}; expected label, label_desc, label_zh")
        names[str(row["label"])] = str(row["label_zh"]).strip()
        if row.get("label_desc"):
            names[str(row["label_desc"]).strip()] = names[str(row["label"])]
    return names


CLS_LABELS = read_labels(DATA_DIR / "cls" / "labels.json")
CLS_NAMES = tuple(dict.fromkeys(CLS_LABELS.values()))

LAYOUTS = "text/answer, instruction/input/output, or FewCLUE TNEWS sentence/label (cls)"


def cls_label(value, where: str, name: str = "label") -> str:
    """The Chinese class name for a TNEWS label id (102), its ``label_desc`` (news_culture) or the name itself."""
    key = str(value).strip()
    label = CLS_LABELS.get(key, key if key in CLS_NAMES else None)
    if label is None:
        raise DataError(f"{where}: unknown label {value!r} in field {name!r}; expected one of the 15 TNEWS labels "
                        f"(ids 100-116, e.g. 103 or news_sports) or their Chinese names ({', '.join(CLS_NAMES)})")
    return label


def _layout(row: dict, task: str, text_field: str | None, answer_field: str | None, where: str) -> tuple[str, str]:
    """(text field, answer field) of one row: the user's mapping, else the first known layout the row has."""
    if text_field is not None and answer_field is not None:
        return text_field, answer_field
    tnews_label = "label_desc" if "label_desc" in row else "label"
    if "text" in row:
        layout = ("text", tnews_label if task == "cls" and "answer" not in row and tnews_label in row else "answer")
    elif "input" in row or "output" in row:
        layout = ("input", "output")
    elif "sentence" in row or task == "cls" and ("label" in row or "label_desc" in row):
        if task != "cls":
            raise DataError(f"{where}: a TNEWS classification row (sentence/label) in a {task} file; "
                            f"use --task cls for it, or give {task} rows with text and answer fields")
        layout = ("sentence", tnews_label)
    elif text_field is not None:
        layout = (text_field, "answer")
    else:
        raise DataError(f"{where}: missing field 'text' (fields present: {', '.join(row) or 'none'}); "
                        f"accepted layouts: {LAYOUTS}")
    return text_field or layout[0], answer_field or layout[1]


def read_examples(path: str | os.PathLike, task: str, text_field: str | None = None, answer_field: str | None = None,
                  group_references: bool = False) -> list[Example]:
    """Read a JSON-lines file of ``task`` into examples.

    Every task accepts every layout, detected per row: ``text``/``answer`` (SPO, doc2query),
    ``instruction``/``input``/``output`` (later releases of the same data; the instruction is dropped because the
    task adds its own prompt) and, for ``cls``, TNEWS (``sentence``/``label`` or ``label_desc``); a classification
    answer may be a TNEWS id, its ``label_desc`` or the Chinese name. ``text_field``/``answer_field`` map a user's
    own field names. An answer may be a list (several references, e.g. all questions of a document); training
    uses each as its own example unless ``group_references`` is set (evaluation), which keeps one example with
    every reference.
    """
    examples = examples_from_rows(read_jsonl(path), task, text_field, answer_field, group_references)
    if not examples:
        raise DataError(f"{path}: no rows found; the file is empty (give JSON lines in one of the layouts: "
                        f"{LAYOUTS})")
    return examples


def examples_from_rows(rows: Iterable[tuple[str, dict]], task: str, text_field: str | None = None,
                       answer_field: str | None = None, group_references: bool = False) -> list[Example]:
    """Examples from ``(where, row)`` pairs, each row a dict in one of :func:`read_examples`' layouts."""
    if task not in ("ie", "gen", "cls"):
        raise UserError(f"unknown task {task!r} (--task); choose one of ie, gen, cls")
    examples: list[Example] = []
    for where, row in rows:
        text_key, answer_key = _layout(row, task, text_field, answer_field, where)
        text = _text(_field(row, text_key, where), text_key, where)
        kinds = (str, int, list) if task == "cls" else (str, list)
        answer = _field(row, answer_key, where, kinds)
        answers = answer if isinstance(answer, list) else [answer]
        wrong = next((a for a in answers if not isinstance(a, (str, int) if task == "cls" else str)), None)
        if wrong is not None:
            what = "a label or a list of labels" if task == "cls" else "a text or a list of texts"
            got = f"a list holding {_kind(wrong)}" if isinstance(answer, list) else _kind(wrong)
            raise DataError(f"{where}: field {answer_key!r} must be {what}, got {got}")
        if task == "cls":
            if not answers:
                raise DataError(f"{where}: field {answer_key!r} is empty; give the class label")
            answers = [cls_label(a, where, answer_key) for a in answers]
        # For IE an empty answer is meaningful: the text holds no triple (the public data has such rows).
        elif not answers or not all(a.strip() or task == "ie" and a == "" for a in answers):
            raise DataError(f"{where}: field {answer_key!r} is empty; give the expected output text")
        if task == "ie":
            for one in answers:
                if one:
                    _check_triples(one, where)
        if group_references:
            examples.append(Example(text, answers[0], tuple(answers), where))
        else:
            examples.extend(Example(text, a, (), where) for a in answers)
    return examples


def as_examples(items: Iterable[Example | dict], task: str, group_references: bool = False) -> list[Example]:
    """Examples as given, with dicts (``{"text": ..., "answer": ...}`` or another layout of :func:`read_examples`)
    read into examples; anything else is refused in one line."""
    if isinstance(items, (str, os.PathLike)):
        raise UserError(f"examples: got the file name {str(items)!r}; read the file first: "
                        f"helpers.load_split({task!r}, 'train', path={str(items)!r})")
    items = list(items)
    wrong = next((item for item in items if not isinstance(item, (Example, dict))), None)
    if wrong is not None:
        raise UserError("examples must be helpers.Example rows (helpers.load_split) or dicts with text and answer "
                        f"fields; got {_kind(wrong)}")
    examples: list[Example] = []
    for number, item in enumerate(items, 1):
        if isinstance(item, Example):
            examples.append(item)
        else:
            examples += examples_from_rows([(f"example {number}", item)], task, group_references=group_references)
    return examples


def group_by_text(examples: Sequence[Example]) -> list[Example]:
    """Merge rows that share a text into one example with all their answers as references (evaluation)."""
    grouped: dict[str, list[Example]] = {}
    for example in examples:
        grouped.setdefault(example.text, []).append(example)
    return [
        Example(text, rows[0].answer, tuple(dict.fromkeys(t for r in rows for t in r.targets)), rows[0].where)
        for text, rows in grouped.items()
    ]
