"""Generated IE rows: recombined from the training triples only, stated in the text, held apart from the test file."""

import pytest

from helpers.errors import UserError
from helpers.run.pipeline import training_rows
from helpers.run.recipe import resolve_recipe
from helpers.tasks import Example, load_split
from helpers.tasks.augment import generated_ie_examples, with_generated_rows


def spans_by_relation(examples):
    spans = {}
    for example in examples:
        for line in example.answer.splitlines():
            head, relation, tail = line.split("_")
            spans.setdefault(relation, set()).update({head, tail})
    return spans


def test_generated_rows_state_their_triples_in_order_and_use_only_training_spans():
    train = load_split("ie", "train")
    rows = generated_ie_examples(train, 300, seed=3)
    assert len(rows) == 300 and rows == generated_ie_examples(train, 300, seed=3)
    assert rows != generated_ie_examples(train, 300, seed=4)
    known = spans_by_relation(train)
    every = set().union(*known.values())
    relations = set()
    for row in rows:
        position = 0
        for line in row.answer.splitlines():
            head, relation, tail = line.split("_")
            relations.add(relation)
            assert head in every and tail in every, line
            assert head in row.text and tail in row.text, (line, row.text)
            if relation in ("部件故障", "性能故障"):  # "<component><state>" in the order of the answer
                found = row.text.find(tail, position)
                assert found >= 0, (line, row.text)
                position = found
    assert relations == {"部件故障", "性能故障", "组成", "检测工具"}


def grams(texts, size=12):
    return {text[i : i + size] for text in texts for i in range(len(text) - size + 1)}


def test_generated_rows_bring_no_test_text_the_train_file_does_not_hold():
    """Report headers such as "号汽车故障报告故障现象：" are in both bundled files; nothing else of the test file
    may reach the generated rows."""
    train = load_split("ie", "train")
    generated = grams(row.text for row in generated_ie_examples(train, 600))
    test = grams(example.text for example in load_split("ie", "test"))
    assert not (generated & test) - grams(example.text for example in train)


def test_only_ie_rows_are_added_and_nothing_without_fault_triples():
    train = load_split("ie", "train")[:10]
    assert with_generated_rows("ie", train, 5)[:10] == train and len(with_generated_rows("ie", train, 5)) == 15
    assert with_generated_rows("ie", train, 0) == train
    cls = [Example(text="标题", answer="体育")]
    assert with_generated_rows("cls", cls, 5) == cls
    assert generated_ie_examples([Example(text="a", answer="no triples here")], 5) == []


def test_generated_rows_are_off_by_default_recorded_and_refused_outside_ie(tiny_checkpoint):
    """Off by default: on the validation split they did not help (bench/RESULTS.md)."""
    assert resolve_recipe(str(tiny_checkpoint), "lora", "ie", device="cpu").generated_rows == 0
    on = resolve_recipe(str(tiny_checkpoint), "lora", "ie", device="cpu", generated_rows=50)
    assert on.generated_rows == 50
    assert on.to_dict()["generated_rows"] == 50  # recorded in run.json
    assert len(training_rows(on)) == len(load_split("ie", "train")) + 50  # what the run trains on
    with pytest.raises(UserError, match="only applies to the ie task"):
        resolve_recipe(str(tiny_checkpoint), "lora", "cls", device="cpu", generated_rows=10)
    with pytest.raises(UserError, match="--generated-rows"):
        resolve_recipe(str(tiny_checkpoint), "lora", "ie", device="cpu", generated_rows=-1)
