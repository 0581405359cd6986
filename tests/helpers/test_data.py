"""Task data: readers for the public and bundled files, clear errors, the training layout, padding, downloads."""

import hashlib
import json
import re
import warnings

import pytest
import torch

from helpers import tasks as data
from helpers.errors import UserError
from helpers.tasks import DataError, EncodedDataset, Example, download, encode_example, get_task, load_split, tokens
from helpers.tasks import rows as row_files
from helpers.tasks.rows import read_examples
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
        assert {e.answer for e in examples} <= set(row_files.CLS_NAMES)


def test_public_label_file_matches_the_bundled_one():
    path = require_shared(SHARED / "data" / "cls" / "tnews_labels.json")
    assert row_files.read_labels(path) == row_files.CLS_LABELS


@pytest.mark.parametrize("task", ["ie", "gen", "cls"])
def test_bundled_samples_are_large_enough(task):
    assert len(data.load_split(task, "train")) >= 100
    assert len(data.load_split(task, "test")) >= 30


@pytest.mark.parametrize("task", ["ie", "gen", "cls"])
def test_bundled_train_and_test_share_no_text(task):
    train = data.load_split(task, "train")
    test_texts = {example.text for example in data.load_split(task, "test")}
    assert not [example.where for example in train if example.text in test_texts]
    assert len({example.text for example in train}) == len(train) or task == "gen"  # gen: a document per question


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
        ("gen", ['{"text": 3, "answer": "b"}'], r"bad\.jsonl:1: field 'text' must be a text, got a number \(3\)"),
        ("gen", ["[1, 2]"], r"bad\.jsonl:1: expected a JSON object per line, got list; the file is one JSON array"),
        ("gen", ["[", '  {"text": "a", "answer": "b"}', "]"], r"bad\.jsonl:1: not valid JSON .* pretty-printed JSON"),
        ("gen", ['{"doc": "a", "q": "b"}'], r"bad\.jsonl:1: missing field 'text' \(fields present: doc, q\); "
                                             "accepted layouts: text/answer, instruction/input/output"),
        ("ie", ['{"instruction": "x", "input": "t"}'], r"bad\.jsonl:1: missing field 'output'"),
        ("gen", ['{"sentence": "标题", "label": 103}'], r"bad\.jsonl:1: a TNEWS classification row .* --task cls"),
        ("cls", ['{"text": "标题", "answer": "天气"}'], r"bad\.jsonl:1: unknown label '天气' in field 'answer'"),
        ("cls", ['{"text": "标题", "answer": []}'], r"bad\.jsonl:1: field 'answer' is empty"),
        ("gen", ['{"text": "a", "answer": ["b", 3]}'], r"bad\.jsonl:1: field 'answer' must be a text or a list of "
                                                          r"texts, got a list holding a number \(3\)"),
        ("gen", ['{"text": "a", "answer": {"q": "b"}}'], r"bad\.jsonl:1: field 'answer' must be a text or a list, got "
                                                         r"an object"),
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
    good, bad = '{"text": "cafe", "answer": "x"}\n', '{"text": "café", "answer": "x"}\n'
    latin.write_bytes(good.encode() * 3 + bad.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.jsonl:4: not UTF-8 text \(invalid continuation byte at byte 14\)"):
        read_examples(latin, "gen")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        read_examples(empty, "ie")
    with pytest.raises(UserError, match="ie: no training examples to encode"):
        EncodedDataset(None, "ie", [])
    with pytest.raises(UserError, match=r"max_target_length \(--max-target-length\) must be a whole number"):
        EncodedDataset(None, "ie", [Example("t", "a")], max_target_length=0)


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
    for name, entry in download.registry().items():
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
    monkeypatch.setattr(download, "registry", lambda: {"toy": entry})
    paths = download.download("toy", tmp_path / "out")
    assert paths["train"].read_bytes() == source.read_bytes()
    entry["files"]["train"].update(filename="u.jsonl", sha256="0" * 64)
    with pytest.raises(DataError, match="differs from the file this course was tested with"):
        download.download("toy", tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["t.jsonl"]  # nothing half-written
    assert download.download("toy", tmp_path / "out", verify=False)["train"].exists()
    with pytest.raises(ValueError, match="unknown dataset"):
        download.download("nope")


def test_download_names_an_unreachable_source_and_a_dir_that_is_a_file(tmp_path, monkeypatch):
    missing = (tmp_path / "nowhere.jsonl").as_uri()  # urlopen raises URLError, as for no network
    entry = {"task": "gen", "files": {"train": {"url": missing, "filename": "t.jsonl", "rows": 1}}}
    monkeypatch.setattr(download, "registry", lambda: {"toy": entry})
    with pytest.raises(UserError, match=rf"^{missing}: download failed \(.*\); check the internet connection and run "
                                        rf"it again, or save the file by hand as .*t.jsonl$"):
        download.download("toy", tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []  # no half-written file
    (tmp_path / "a_file").write_text("keep me")
    with pytest.raises(UserError, match=r"^--dir .*a_file: is a file, not a folder"):
        download.download("toy", tmp_path / "a_file")
    assert (tmp_path / "a_file").read_text() == "keep me"


# ----------------------------------------------------------------------------------------------------------
# Every layout for every task; BOM; odd files
# ----------------------------------------------------------------------------------------------------------

TEXTS = {"ie": "刹车时方向盘抖动。", "gen": "多喝水有益健康。", "cls": "国足晋级亚洲杯八强"}
ANSWERS = {"ie": "方向盘_部件故障_抖动", "gen": "喝水有什么好处？", "cls": "体育"}
LAYOUTS = {
    "text/answer": lambda task: {"text": TEXTS[task], "answer": ANSWERS[task]},
    "instruction/input/output": lambda task: {"instruction": "任意说明", "input": TEXTS[task], "output": ANSWERS[task]},
}


@pytest.mark.parametrize("task", ["ie", "gen", "cls"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_is_read_for_every_task(tmp_path, task, layout):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(LAYOUTS[layout](task), ensure_ascii=False) + "\n", encoding="utf-8")
    (example,) = read_examples(path, task)
    assert (example.text, example.answer) == (TEXTS[task], ANSWERS[task])
    assert data.check_file(task, path, "train", "train_file") == str(path.resolve())


@pytest.mark.parametrize("row", [
    {"sentence": "国足晋级亚洲杯八强", "label": 103},
    {"sentence": "国足晋级亚洲杯八强", "label": "103", "label_desc": "news_sports"},
    {"sentence": "国足晋级亚洲杯八强", "label_desc": "news_sports"},
    {"text": "国足晋级亚洲杯八强", "answer": "news_sports"},
    {"text": "国足晋级亚洲杯八强", "answer": 103},
    {"input": "国足晋级亚洲杯八强", "output": "103"},
    {"text": "国足晋级亚洲杯八强", "label": 103},
])
def test_classification_labels_by_tnews_id_description_or_name(tmp_path, row):
    path = tmp_path / "cls.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    (example,) = read_examples(path, "cls")
    assert (example.text, example.answer) == ("国足晋级亚洲杯八强", "体育")


def test_a_mapped_text_field_keeps_the_layouts_answer_field(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [{"title": "国足晋级亚洲杯八强", "label": 103}, {"title": "股市收涨", "label_desc": "news_finance"}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    assert [e.answer for e in read_examples(path, "cls", text_field="title")] == ["体育", "财经"]
    path.write_text(json.dumps({"doc": "多喝水。", "answer": "为什么？"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_examples(path, "gen", text_field="doc")[0].answer == "为什么？"


def test_utf8_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "bom.jsonl"
    rows = [{"text": "a", "answer": "b"}, {"text": "c", "answer": "d"}]
    path.write_bytes("\n".join(json.dumps(r) for r in rows).encode("utf-8-sig"))
    assert path.read_bytes()[:3] == b"\xef\xbb\xbf"
    assert [(e.text, e.answer) for e in read_examples(path, "gen")] == [("a", "b"), ("c", "d")]


def test_a_csv_file_is_named_as_such(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("text,answer\na,b\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"rows\.csv:1: not valid JSON .* the file is \.csv, not JSON lines"):
        read_examples(path, "gen")


def test_data_errors_are_user_errors_and_files_are_checked(tmp_path):
    assert issubclass(DataError, UserError)
    with pytest.raises(UserError, match="missing.jsonl: no such file"):
        data.check_file("ie", tmp_path / "missing.jsonl", "train", "train_file (--train-file)")
    with pytest.raises(UserError, match="is a folder"):
        data.check_file("ie", tmp_path, "train", "train_file (--train-file)")
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match="empty.jsonl: no rows found; the file is empty"):
        data.check_file("ie", empty, "test", "test_file (--test-file)")
    assert data.check_file("gen", None, "test", "test_file (--test-file)") is None  # the bundled file, checked
    with pytest.raises(UserError, match=r"unknown task 'qa' \(--task\)"):
        data.check_file("qa", None, "train", "train_file (--train-file)")


@pytest.mark.parametrize("limit", [-1, 0, 1.5, True])
def test_limit_below_one_is_refused(limit):
    with pytest.raises(UserError, match=r"limit \(--eval-limit\) must be a whole number of at least 1"):
        load_split("ie", "test", limit=limit)


def test_limit_keeps_the_first_rows():
    everything = load_split("ie", "test")
    assert load_split("ie", "test", limit=2) == everything[:2]
    assert load_split("ie", "test", limit=10**6) == everything


# ----------------------------------------------------------------------------------------------------------
# Warnings: cut rows, unseen labels
# ----------------------------------------------------------------------------------------------------------


def test_one_warning_counts_the_rows_cut_to_the_limits(small_tokenizer):
    tok = small_tokenizer
    task = get_task("gen")
    prompt = len(tok.tokenize(task.prompt))
    examples = [Example("多喝水。" * 40, "为什么？"), Example("多喝水。", "为什么？" * 20),
                Example("多喝水。" * 40, "为什么？" * 20), Example("多喝水。", "为什么？")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = EncodedDataset(tok, task, examples, max_source_length=prompt + 20, max_target_length=10)
    assert (dataset.texts_cut, dataset.answers_cut) == (2, 2)
    (warning,) = [w for w in caught if issubclass(w.category, UserWarning)]
    assert f"of 4 training rows, cut 2 texts to {prompt + 20} tokens" in str(warning.message)
    assert "2 answers to 10 tokens (max_target_length)" in str(warning.message)
    assert len(dataset[2]["input_ids"]) == prompt + 20 + 2 + 10 + 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rows within the limits: no warning at all
        EncodedDataset(tok, task, examples[3:], max_source_length=prompt + 20, max_target_length=10)


def test_prompts_for_generation_warn_once_about_cut_texts(small_tokenizer):
    task = get_task("ie")
    limit = len(small_tokenizer.tokenize(task.prompt)) + 8
    texts = ["发动机异响。" * 30, "动。", "刹车失灵，方向盘抖动，仪表盘报警。" * 5]  # the second fits in 8 tokens
    with pytest.warns(UserWarning) as caught:
        prompts = tokens.encode_prompts(small_tokenizer, task, texts, max_source_length=limit)
    assert len(caught) == 1 and f"of 3 texts to answer, cut 2 to {limit} tokens" in str(caught[0].message)
    assert prompts == [data.prompt_ids(small_tokenizer, task, t, limit) for t in texts]


def test_test_labels_unseen_in_training_give_one_warning(tmp_path):
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("\n".join(json.dumps({"sentence": f"标题{i}", "label": 103}) for i in range(3)) + "\n")
    test.write_text(json.dumps({"sentence": "a", "label": 103}) + "\n" + json.dumps({"sentence": "b", "label": 104})
                    + "\n" + json.dumps({"sentence": "c", "label": "news_finance"}) + "\n" +
                    json.dumps({"sentence": "d", "label": 109}) + "\n")
    with pytest.warns(UserWarning) as caught:
        assert data.warn_unseen_labels(load_split("cls", "train", train), load_split("cls", "test", test)) == [
            "财经", "科技"]
    assert len(caught) == 1
    message = str(caught[0].message)
    assert message.startswith("3 of 4 test examples have labels that no training example has: 财经, 科技")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert data.warn_unseen_labels(load_split("cls", "train", test), load_split("cls", "test", train)) == []


def test_examples_may_be_given_as_dicts_and_other_things_are_one_line(small_tokenizer):
    given = [Example("电池坏了", "电池_部件故障_坏了"),
             {"text": "屏幕碎了", "answer": ["屏幕_部件故障_碎了", "屏幕_组成_玻璃"]}]
    rows = row_files.as_examples(given, "ie")
    assert rows == [given[0], Example("屏幕碎了", "屏幕_部件故障_碎了", (), "example 2"),
                    Example("屏幕碎了", "屏幕_组成_玻璃", (), "example 2")]
    grouped = row_files.as_examples(given, "ie", group_references=True)
    assert grouped[1].references == ("屏幕_部件故障_碎了", "屏幕_组成_玻璃") and len(grouped) == 2
    assert len(EncodedDataset(small_tokenizer, "ie", given)) == 3
    for wrong, named in [([{"text": 1, "answer": "a"}], "example 1: field 'text' must be a text, got a number (1)"),
                         ("train.json", "helpers.load_split('ie', 'train', path='train.json')"),
                         ([("a", "b")], "dicts with text and answer fields; got tuple")]:
        with pytest.raises(UserError, match=re.escape(named)):
            EncodedDataset(small_tokenizer, "ie", wrong)
