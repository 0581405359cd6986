"""Task data: readers for the public and bundled files, clear errors, the training layout, padding, downloads."""

import hashlib
import json

import pytest
import torch

from helpers import data
from helpers.data import DataError, Example, encode_example, get_task, read_examples
from tests.conftest import SHARED, require_shared

PUBLIC_ROWS = {  # file -> (task, rows)
    "ie/spo_train.jsonl": ("ie", 1441),
    "ie/spo_test.jsonl": ("ie", 50),
    "gen/d2q_train.jsonl": ("gen", 3143),
    "gen/d2q_test.jsonl": ("gen", 20),
    "cls/tnews_train.jsonl": ("cls", 1185),
    "cls/tnews_test.jsonl": ("cls", 2010),
}


@pytest.mark.parametrize("name", sorted(PUBLIC_ROWS))
def test_every_public_row_parses(name):
    path = require_shared(SHARED / "data" / name)
    task, rows = PUBLIC_ROWS[name]
    examples = read_examples(path, task, group_references=True)
    assert len(examples) == rows
    assert all(e.text.strip() for e in examples)
    if task == "cls":
        assert {e.answer for e in examples} <= set(data.CLS_NAMES)


def test_public_label_file_matches_the_bundled_one():
    path = require_shared(SHARED / "data" / "cls" / "tnews_labels.json")
    assert data.read_labels(path) == data.CLS_LABELS


@pytest.mark.parametrize("task", ["ie", "gen", "cls"])
def test_bundled_samples_are_large_enough(task):
    assert len(data.load_split(task, "train")) >= 100
    assert len(data.load_split(task, "test")) >= 30


def test_doc2query_test_rows_keep_all_references():
    examples = data.load_split("gen", "test")
    assert all(len(e.targets) >= 2 for e in examples)


def test_instruction_input_output_layout_is_read(tmp_path):
    path = tmp_path / "spo.jsonl"
    row = {"instruction": "任意说明", "input": "刹车时方向盘抖动。", "output": "方向盘_部件故障_抖动"}
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    (example,) = read_examples(path, "ie")
    assert (example.text, example.answer) == ("刹车时方向盘抖动。", "方向盘_部件故障_抖动")


def test_user_field_mapping(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"doc": "多喝水有益健康。", "q": "喝水有什么好处？"}, ensure_ascii=False) + "\n")
    (example,) = read_examples(path, "gen", text_field="doc", answer_field="q")
    assert example.answer == "喝水有什么好处？" and example.where.endswith("mine.jsonl:1")


@pytest.mark.parametrize(
    "task,lines,message",
    [
        ("gen", ['{"text": "a", "answer": "b"}', "{not json"], r"bad\.jsonl:2: not valid JSON"),
        ("gen", ['{"text": "a"}'], r"bad\.jsonl:1: missing field 'answer'"),
        ("gen", ['{"text": "a", "answer": "  "}'], r"bad\.jsonl:1: field 'answer' is empty"),
        ("gen", ['{"text": "", "answer": "b"}'], r"bad\.jsonl:1: field 'text' is empty"),
        ("gen", ['{"text": 3, "answer": "b"}'], r"bad\.jsonl:1: field 'text' must be str"),
        ("gen", ["[1, 2]"], r"bad\.jsonl:1: expected a JSON object"),
        ("cls", ['{"sentence": "标题", "label": 105}'], r"bad\.jsonl:1: unknown label 105"),
        ("cls", ['{"sentence": "标题"}'], r"bad\.jsonl:1: missing field 'label'"),
        ("ie", ['{"text": "t", "answer": "发动机-异响"}'], r"bad\.jsonl:1: .* is not a triple"),
        ("ie", ['{"text": "t", "answer": "发动机_坏了_异响"}'], r"bad\.jsonl:1: .* no known relation"),
    ],
)
def test_bad_input_names_file_and_line(tmp_path, task, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=message):
        read_examples(path, task)


def test_unreadable_files_raise_data_errors(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        read_examples(tmp_path / "missing.jsonl", "ie")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"text": "café", "answer": "x_y_z"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        read_examples(latin, "ie")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        read_examples(empty, "ie")


def test_ie_allows_an_empty_answer_meaning_no_triples(tmp_path):
    path = tmp_path / "none.jsonl"
    path.write_text('{"text": "一切正常。", "answer": ""}\n', encoding="utf-8")
    assert read_examples(path, "ie")[0].answer == ""


def test_training_layout_by_hand(small_tokenizer):
    tok = small_tokenizer
    task = get_task("gen")
    row = encode_example(tok, task, Example("多喝水。", "为什么？"))
    prompt = tok.convert_tokens_to_ids(tok.tokenize(task.prompt))
    text = tok.convert_tokens_to_ids(tok.tokenize("多喝水。"))
    answer = tok.convert_tokens_to_ids(tok.tokenize("为什么？"))
    expected = prompt + text + [tok.gmask_token_id, tok.bos_token_id] + answer + [tok.eos_token_id]
    assert row["input_ids"] == expected
    context = len(prompt) + len(text) + 1  # index of <sop>
    assert row["labels"] == [-100] * context + expected[context:]


def test_truncation_keeps_the_layout(small_tokenizer):
    tok = small_tokenizer
    task = get_task("gen")
    row = encode_example(tok, task, Example("发动机" * 200, "发动机_部件故障_异响" * 50), max_source_length=80,
                         max_target_length=10)
    ids = row["input_ids"]
    prompt = len(tok.tokenize(task.prompt))
    source = max(80, prompt)  # prompt + text fill 80 tokens; the prompt itself is never cut
    assert ids.index(tok.bos_token_id) == source + 1 and ids[source] == tok.gmask_token_id
    assert len(ids) == source + 2 + 10 + 1 and ids[-1] == tok.eos_token_id


def test_seed_layout_matches_the_original_course(request):
    """The record of the original's training layout (real vocabulary) is reproduced by encode_example."""
    folder = require_shared(SHARED / "tokenizer")
    from chatglm import ChatGLMTokenizer

    tok = ChatGLMTokenizer.from_pretrained(folder, num_image_tokens=0)
    record = next(r for r in map(json.loads, (folder / "expected_public.jsonl").open()) if r["kind"] == "seed_layout")
    task = get_task("ie")
    assert task.prompt == record["prompt"]
    row = encode_example(tok, task, Example(record["text"], record["answer"]))
    assert row["input_ids"] == record["input_ids"]
    assert row["labels"] == record["labels"]


def test_collator_right_pads_and_left_pad_for_generation():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = data.Collator(pad_token_id=3)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    left = data.left_pad([[5, 6, 7], [8]], 3)
    assert left["input_ids"].tolist() == [[5, 6, 7], [3, 3, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left["input_ids"].dtype == torch.long


def test_registry_entries_are_complete():
    for name, entry in data.registry().items():
        assert entry["task"] in data.TASKS
        assert set(entry["files"]) == {"train", "test"}
        for spec in entry["files"].values():
            assert spec["url"].startswith("https://") and spec["rows"] > 0 and spec["filename"].endswith(".jsonl")


def test_download_verifies_and_never_leaves_partial_files(tmp_path, monkeypatch):
    source = tmp_path / "source.jsonl"
    source.write_text('{"text": "a", "answer": "b"}\n', encoding="utf-8")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    entry = {"task": "gen", "files": {"train": {"url": source.as_uri(), "filename": "t.jsonl", "rows": 1,
                                                "sha256": digest}}}
    monkeypatch.setattr(data, "registry", lambda: {"toy": entry})
    paths = data.download("toy", tmp_path / "out")
    assert paths["train"].read_bytes() == source.read_bytes()
    entry["files"]["train"].update(filename="u.jsonl", sha256="0" * 64)
    with pytest.raises(DataError, match="differs from the file this course was tested with"):
        data.download("toy", tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["t.jsonl"]  # nothing half-written
    assert data.download("toy", tmp_path / "out", verify=False)["train"].exists()
    with pytest.raises(ValueError, match="unknown dataset"):
        data.download("nope")
