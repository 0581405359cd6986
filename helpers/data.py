"""The three tasks of the course: their files, prompts, and ChatGLM's training layout.

A row becomes ``prompt + text [gMASK] <sop> answer <eop>``; labels are -100 up to (not including) ``<sop>``,
so the loss covers exactly the answer and its end token, as in the original course.

Readers accept, for every task, the public formats (SPO / doc2query JSON lines in both their ``text/answer`` and
``instruction/input/output`` forms; FewCLUE TNEWS for classification) and a user's own JSON lines with a field
mapping, in UTF-8 with or without a byte-order mark. Bad input raises :class:`DataError` (a
:class:`~helpers.errors.UserError`) naming the file and line and what to fix; rows cut to the token limits and
classification test labels never seen in training each give one warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UserError
from .paths import DATA_DIR, cache_root

IE_RELATIONS = ("性能故障", "部件故障", "组成", "检测工具")
IGNORE_INDEX = -100


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


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    prompt: str
    max_source_length: int  # prompt + text tokens
    max_target_length: int  # answer tokens (before <eop>)
    labels: tuple[str, ...] = field(default=())  # classification only


# The IE and generation prompts are the original course's (the IE one holds a literal backslash-n).
IE_PROMPT = (
    '你现在是一个信息抽取模型，请你帮我抽取出关系内容为"性能故障", "部件故障", "组成"和 "检测工具"的相关三元组，'
    '三元组内部用"_"连接，三元组之间用\\n分割。文本：'
)
GEN_PROMPT = "你现在是一个问题生成模型，请根据下面文档生成一个问题，文档："


def cls_prompt(labels: Sequence[str]) -> str:
    return f"你现在是一个新闻分类模型，请判断下面的新闻标题属于哪一类，类别有：{'、'.join(labels)}。新闻标题："


# ----------------------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------------------


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


def _field(row: dict, name: str, where: str, kinds=(str,)):
    if name not in row:
        raise DataError(f"{where}: missing field {name!r} (fields present: {', '.join(row) or 'none'})")
    value = row[name]
    if not isinstance(value, kinds):
        raise DataError(f"{where}: field {name!r} must be {' or '.join(k.__name__ for k in kinds)}, "
                        f"got {type(value).__name__}")
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

TASKS = {
    "ie": Task("ie", "Information extraction (fault triples)", IE_PROMPT, 450, 300),
    "gen": Task("gen", "Question generation from a document", GEN_PROMPT, 400, 64),
    "cls": Task("cls", "News title classification (15 classes)", cls_prompt(CLS_NAMES), 120, 8, CLS_NAMES),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UserError(f"unknown task {name!r} (--task); choose one of {', '.join(TASKS)}")
    return TASKS[name]


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


def read_examples(
    path: str | os.PathLike,
    task: str,
    text_field: str | None = None,
    answer_field: str | None = None,
    group_references: bool = False,
) -> list[Example]:
    """Read a JSON-lines file of ``task`` into examples.

    Every task accepts every layout, detected per row: ``text``/``answer`` (SPO, doc2query),
    ``instruction``/``input``/``output`` (later releases of the same data; the instruction is dropped because the
    task adds its own prompt) and, for ``cls``, TNEWS (``sentence``/``label`` or ``label_desc``); a classification
    answer may be a TNEWS id, its ``label_desc`` or the Chinese name. ``text_field``/``answer_field`` map a user's
    own field names. An answer may be a list (several references, e.g. all questions of a document); training
    uses each as its own example unless ``group_references`` is set (evaluation), which keeps one example with
    every reference.
    """
    get_task(task)
    examples: list[Example] = []
    for where, row in read_jsonl(path):
        text_key, answer_key = _layout(row, task, text_field, answer_field, where)
        text = _text(_field(row, text_key, where), text_key, where)
        kinds = (str, int, list) if task == "cls" else (str, list)
        answer = _field(row, answer_key, where, kinds)
        answers = answer if isinstance(answer, list) else [answer]
        if not all(isinstance(a, (str, int) if task == "cls" else str) for a in answers):
            raise DataError(f"{where}: field {answer_key!r} must be a text or a list of texts")
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
    if not examples:
        raise DataError(f"{path}: no rows found; the file is empty (give JSON lines in one of the layouts: "
                        f"{LAYOUTS})")
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
    examples = read_examples(path or bundled_path(task, split), task)
    if split == "test":
        examples = group_by_text(examples)
    return examples[:limit] if limit else examples


def check_task_file(task: str, path: str | os.PathLike | None, split: str = "train") -> int:
    """Check a data file of ``task`` without a model or tokenizer (JSON only, fast); returns its example count.

    ``path=None`` checks the bundled file. Raises :class:`UserError` (:class:`DataError`) naming the file and line.
    """
    return len(_checked_split(task, path, split))


def _checked_split(task: str, path: str | os.PathLike | None, split: str) -> list[Example]:
    if path is not None:
        file = Path(path).expanduser()
        if not file.exists():
            raise DataError(f"{path}: no such file; give a JSON-lines file in one of the layouts: {LAYOUTS}")
        if not file.is_file():
            raise DataError(f"{path}: is a folder, not a file; give a JSON-lines file")
    return load_split(task, split, path)


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


def check_task_files(
    task: str, train_file: str | os.PathLike | None = None, test_file: str | os.PathLike | None = None
) -> dict[str, int]:
    """Both splits of ``task`` checked as by :func:`check_task_file` ({split: examples}); for ``cls`` also warns
    about test labels unseen in training."""
    train, test = _checked_split(task, train_file, "train"), _checked_split(task, test_file, "test")
    if task == "cls":
        warn_unseen_labels(train, test)
    return {"train": len(train), "test": len(test)}


# ----------------------------------------------------------------------------------------------------------
# Token layout
# ----------------------------------------------------------------------------------------------------------


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


def encode_prompts(
    tokenizer, task: Task, texts: Sequence[str], max_source_length: int | None = None
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


def encode_example(
    tokenizer,
    task: Task,
    example: Example,
    max_source_length: int | None = None,
    max_target_length: int | None = None,
) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` of one training row (labels -100 before ``<sop>``)."""
    return _encode(tokenizer, task, example, max_source_length, max_target_length)[0]


class EncodedDataset(torch.utils.data.Dataset):
    """Training rows encoded once up front; one warning counts the rows cut to the task's token limits."""

    def __init__(self, tokenizer, task: str | Task, examples: Sequence[Example], max_source_length: int | None = None,
                 max_target_length: int | None = None) -> None:
        self.task = get_task(task) if isinstance(task, str) else task
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


# ----------------------------------------------------------------------------------------------------------
# Public datasets
# ----------------------------------------------------------------------------------------------------------

REGISTRY_FILE = DATA_DIR / "registry.json"


def registry() -> dict:
    """The full public datasets the course knows: name -> task, source, and per split url/sha256/rows."""
    return json.loads(REGISTRY_FILE.read_text(encoding="utf-8"))


def dataset_cache_dir() -> Path:
    return cache_root() / "datasets"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify(path: Path, spec: dict, name: str, where: str) -> None:
    """The file must be what the course was tested with: same sha256 when known, else same row count."""
    hint = f"call download({name!r}, verify=False) to use it anyway"
    if spec.get("sha256"):
        if _sha256(path) != spec["sha256"]:
            raise DataError(f"{where}: differs from the file this course was tested with (sha256 "
                            f"{spec['sha256'][:12]}...); {hint}")
        return
    with path.open(encoding="utf-8", errors="replace") as handle:
        rows = sum(1 for line in handle if line.strip())
    if rows != spec["rows"]:
        raise DataError(f"{where}: has {rows} rows, the course was tested with {spec['rows']}; {hint}")


def download(name: str, folder: str | os.PathLike | None = None, verify: bool = True) -> dict[str, Path]:
    """Fetch a public dataset of the registry (with a progress bar) and return {split: local path}.

    Files are written to a temporary name and moved into place only when complete and checked (sha256 when
    ``verify``), so an interrupted download never leaves a half-written file. Already present files are
    checked and reused.
    """
    from tqdm.auto import tqdm

    entries = registry()
    if name not in entries:
        raise UserError(f"unknown dataset {name!r}; known: {', '.join(entries)}")
    target = Path(folder).expanduser() if folder else dataset_cache_dir() / name
    if target.exists() and not target.is_dir():
        raise UserError(f"--dir {target}: is a file, not a folder; give a folder for the {name} files")
    target.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, spec in entries[name]["files"].items():
        path = target / spec["filename"]
        if not path.exists():
            fd, tmp = tempfile.mkstemp(dir=target, prefix=".download-")
            os.close(fd)
            try:
                try:
                    with urllib.request.urlopen(spec["url"], timeout=60) as response, open(tmp, "wb") as out:
                        total = int(response.headers.get("Content-Length") or 0) or None
                        with tqdm(total=total, unit="B", unit_scale=True, desc=f"{name}/{spec['filename']}") as bar:
                            while block := response.read(1 << 16):
                                out.write(block)
                                bar.update(len(block))
                except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                    reason = getattr(error, "reason", None) or error
                    raise UserError(f"{spec['url']}: download failed ({reason}); check the internet connection and "
                                    f"run it again, or save the file by hand as {path}") from error
                if verify:
                    _verify(Path(tmp), spec, name, spec["url"])
                shutil.move(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        elif verify:
            _verify(path, spec, name, str(path))
        paths[split] = path
    return paths
