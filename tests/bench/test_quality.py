"""The tuning split never mixes a text into both sides, and the quality table reports mean and range correctly."""

import json

import pytest

from bench.quality import _text_of, format_table, validation_split
from helpers.tasks import bundled_path


@pytest.mark.parametrize("task", ["ie", "gen", "cls"])
def test_validation_split_holds_out_a_fifth_of_the_texts_and_is_deterministic(task, tmp_path):
    train, val = validation_split(task, tmp_path / "a")
    rows = [line for line in bundled_path(task, "train").read_text(encoding="utf-8-sig").splitlines() if line]
    kept = train.read_text(encoding="utf-8").splitlines()
    held = val.read_text(encoding="utf-8").splitlines()
    assert sorted(kept + held) == sorted(rows)  # every row on exactly one side
    kept_texts = {_text_of(task, json.loads(line)) for line in kept}
    held_texts = {_text_of(task, json.loads(line)) for line in held}
    assert not kept_texts & held_texts
    distinct = len(kept_texts | held_texts)
    assert len(held_texts) == int(distinct * 0.2)
    again_train, again_val = validation_split(task, tmp_path / "b")
    assert again_val.read_bytes() == val.read_bytes() and again_train.read_bytes() == train.read_bytes()
    other_train, other_val = validation_split(task, tmp_path / "c", seed=1)
    assert other_val.read_bytes() != val.read_bytes()


def test_quality_table_gives_mean_and_range_over_models():
    measured = [(0.1, 0.0, 20), (0.4, 0.5, 30), (0.25, 0.1, 40)]
    rows = [{"model": f"m{i}", "task": "ie", "method": "lora", "lr": 0.005, "steps": 150, "main_metric": "f1",
             "main": v, "repetition_rate": r, "train_s": t} for i, (v, r, t) in enumerate(measured)]
    rows.append({"model": "m0", "task": "cls", "method": "embedding", "lr": 0.006, "steps": 150,
                 "main_metric": "accuracy", "main": 0.5, "repetition_rate": 0.0, "train_s": 10.4})
    table = format_table(rows)
    assert ("| ie | lora | 0.005 | 150 | f1 0.250 (0.100–0.400) | 0.20 (0.00–0.50) | 30 (20–40) "
            "| 0.100 / 0.400 / 0.250 |") in table
    assert "| cls | embedding | 0.006 | 150 | accuracy 0.500 | 0.00 | 10 | 0.500 / - / - |" in table
    assert "3 model(s): m0, m1, m2" in table


def test_quality_table_averages_each_model_over_its_seeds_and_keeps_one_model_tables_narrow():
    rows = [{"model": model, "seed": seed, "task": "gen", "method": "lora", "lr": 0.002, "steps": 150,
             "main_metric": "rouge_l", "main": value, "repetition_rate": 0.0, "train_s": 20}
            for model, seed, value in [("b", 42, 0.2), ("a", 42, 0.3), ("b", 43, 0.4), ("a", 43, 0.5)]]
    table = format_table(rows)
    # b first: the order given
    assert "| rouge_l 0.350 (0.200–0.500) | 0.00 (0.00–0.00) | 20 (20–20) | 0.300 / 0.400 |" in table
    assert "2 model(s): b, a; fine-tuning seeds [42, 43]" in table
    single = format_table([row for row in rows if row["model"] == "a"])
    assert single.splitlines()[0].count("|") == 8
    assert "| rouge_l 0.400 (0.300–0.500) | 0.00 (0.00–0.00) | 20 (20–20) |" in single
