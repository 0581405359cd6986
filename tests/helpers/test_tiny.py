"""The embedded tiny model: public INT4 layout, loaded through the real path, deterministic, cached by recipe."""

import dataclasses
import hashlib
import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatglm import ChatGLMForConditionalGeneration, ChatGLMTokenizer
from helpers import tasks as data
from helpers.errors import UserError
from helpers.tasks import TASKS, load_split
from helpers.tiny import build as tiny
from helpers.tiny.pretraining import MIX, RELATION_LABELS, Exercise, exercises
from tests.chatglm.test_checkpoint import public_layout
from tests.conftest import fast_tiny_recipe


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tiny_folder_has_the_public_int4_layout(tiny_checkpoint):
    names = sorted(p.name for p in tiny_checkpoint.iterdir())
    assert names == ["config.json", "ice_text.model", "pytorch_model.bin", "tiny_recipe.json", "tokenizer_config.json"]
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_chatglm.ChatGLMForConditionalGeneration"
    assert config["quantization_bit"] == 4 and config["torch_dtype"] == "float16"
    assert json.loads((tiny_checkpoint / "tokenizer_config.json").read_text())["tokenizer_class"] == "ChatGLMTokenizer"
    state = torch.load(tiny_checkpoint / "pytorch_model.bin", weights_only=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    assert type(model) is ChatGLMForConditionalGeneration
    assert {k: (tuple(v.shape), v.dtype) for k, v in state.items()} == public_layout(model.config, 4)
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    assert type(tokenizer) is ChatGLMTokenizer
    for name in ("bos", "eos", "gmask", "mask", "pad"):
        assert getattr(model.config, f"{name}_token_id") == getattr(tokenizer, f"{name}_token_id")


def test_build_is_deterministic(tmp_path, tiny_checkpoint):
    recipe = fast_tiny_recipe()
    tiny.build_tiny(tmp_path / "again", recipe, progress=False)
    for name in ("ice_text.model", "pytorch_model.bin", "config.json"):
        assert digest(tmp_path / "again" / name) == digest(tiny_checkpoint / name), name


def test_cache_is_keyed_by_recipe_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATGLM_COURSE_CACHE", str(tmp_path))
    recipe = dataclasses.replace(fast_tiny_recipe(), steps=2)
    folder = tiny.ensure_tiny(recipe, progress=False)
    assert folder == tmp_path / "tiny" / recipe.key() and (folder / "tiny_recipe.json").exists()
    stamp = (folder / "pytorch_model.bin").stat().st_mtime_ns
    assert tiny.ensure_tiny(recipe, progress=False) == folder
    assert (folder / "pytorch_model.bin").stat().st_mtime_ns == stamp  # not rebuilt
    assert dataclasses.replace(recipe, seed=1).key() != recipe.key()
    assert not any(p.name.startswith(".building-") for p in folder.parent.iterdir())


def test_the_key_follows_every_file_the_build_reads(tmp_path, monkeypatch):
    recipe = fast_tiny_recipe()
    read = {path.relative_to(tiny.DATA_DIR).as_posix() for path in tiny.source_files()}
    assert read == {"corpus/pretrain.txt"} | {f"{task}/{split}.jsonl" for task in TASKS for split in ("train", "test")}
    for name in sorted(read):
        copy = tmp_path / name
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes((tiny.DATA_DIR / name).read_bytes())
    monkeypatch.setattr(tiny, "DATA_DIR", tmp_path)
    monkeypatch.setattr(data, "DATA_DIR", tmp_path)
    before = recipe.key()
    train = tmp_path / "cls" / "train.jsonl"
    train.write_text(train.read_text(encoding="utf-8").replace("老人", "老者", 1), encoding="utf-8")
    assert recipe.key() != before  # a task file feeds the vocabulary, so it is part of the recipe


def test_pretraining_lowers_the_loss(tiny_checkpoint):
    summary = json.loads((tiny_checkpoint / "tiny_recipe.json").read_text())
    assert summary["last_loss"] < summary["first_loss"]


def test_build_tiny_command_writes_snapshots_and_refuses_to_overwrite(tmp_path):
    recipe = fast_tiny_recipe()
    out = tmp_path / "built"
    options = ["--steps", "4", "--hidden-size", str(recipe.hidden_size), "--num-layers", str(recipe.num_layers),
               "--num-attention-heads", str(recipe.num_attention_heads), "--inner-hidden-size",
               str(recipe.inner_hidden_size), "--batch-size", "4", "--seed", "3", "--out", str(out)]
    summary = tiny.main([*options, "--snapshot-every", "2"])
    assert summary["recipe"]["steps"] == 4 and summary["recipe"]["seed"] == 3
    assert json.loads((out / "tiny_recipe.json").read_text())["key"] == summary["key"]
    snapshot = tmp_path / "built-step2"
    assert json.loads((snapshot / "tiny_recipe.json").read_text())["steps_done"] == 2
    assert AutoModelForCausalLM.from_pretrained(snapshot, dtype=torch.float32).config.quantization_bit == 4
    assert not (tmp_path / "built-step4").exists()  # the final model is the folder itself
    with pytest.raises(UserError, match="--force"):
        tiny.main(options)


def test_committed_weights_are_used_when_their_recipe_matches(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATGLM_COURSE_CACHE", str(tmp_path / "cache"))
    recipe = dataclasses.replace(fast_tiny_recipe(), steps=2)
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    monkeypatch.setattr(tiny, "SHIPPED_DIR", shipped)
    (shipped / "tiny_recipe.json").write_text(json.dumps({"key": recipe.key()}))
    assert tiny.ensure_tiny(recipe, progress=False) == shipped
    assert not (tmp_path / "cache").exists()  # nothing built
    other = dataclasses.replace(recipe, seed=5)
    assert tiny.shipped_tiny(other) is None
    assert tiny.ensure_tiny(other, progress=False) == tmp_path / "cache" / "tiny" / other.key()


# ---- pretraining data -------------------------------------------------------------------------------------


def pretraining_text(seeds=(0, 1)) -> str:
    """The corpus and passes of exercises over it, as the build draws them, in one string."""
    lines = tiny._corpus_lines()
    parts = list(lines)
    for seed in seeds:
        for row in exercises(lines, random.Random(seed)):
            parts.extend((row.instruction, row.text, row.answer))
    return "\n".join(parts)


def test_no_task_text_in_the_pretraining_data():
    text = pretraining_text()
    windows = {text[i : i + 12] for i in range(len(text) - 11)}
    for task in TASKS:
        for example in load_split(task, "test"):
            pieces = [example.text] + (list(example.targets) if task != "cls" else [])
            for piece in pieces:
                grams = {piece[i : i + 12] for i in range(len(piece) - 11)} or {piece}
                shared = grams & windows if len(piece) >= 12 else {piece} if piece in text else set()
                assert not shared, f"{task} test text {piece!r} shares {sorted(shared)[0]!r} with the pretraining data"
        for example in load_split(task, "train"):
            assert example.text not in text, f"{task} training row {example.where} is in the pretraining data"


def test_exercises_are_deterministic_and_copy_from_their_text():
    lines = tiny._corpus_lines()
    first, again = exercises(lines, random.Random(0)), exercises(lines, random.Random(0))
    assert first == again and exercises(lines, random.Random(1)) != first
    kinds = {row.kind for row in first}
    assert kinds == set(MIX)
    for row in first:
        if row.kind in ("repeat", "find"):
            assert row.answer in row.text
        if row.kind == "split":
            assert all(part in row.text for part in row.answer.split("\n"))
        if row.kind == "triples":
            for line in row.answer.split("\n"):
                subject, relation, obj = line.split("_")
                words = [relation] + [w for w, label in RELATION_LABELS.items() if label == relation]
                assert any(subject + word + obj in row.text for word in words) and f'"{relation}"' in row.instruction
        if row.kind == "pick":
            assert row.answer in row.text and row.answer in row.instruction


def test_exercise_rows_have_the_task_layout(small_tokenizer):
    tok = small_tokenizer
    row = tiny.encode_exercise(tok, Exercise("repeat", "请复述：", "今天天气很好", "今天天气很好"), max_tokens=64)
    sop = row["input_ids"].index(tok.bos_token_id)
    assert row["input_ids"][sop - 1] == tok.gmask_token_id and row["input_ids"][-1] == tok.eos_token_id
    assert row["labels"][: sop] == [-100] * sop and row["labels"][sop:] == row["input_ids"][sop:]
    answer = tok.decode(row["input_ids"][sop + 1 : -1])
    assert answer.strip() == "今天天气很好"
    long = tiny.encode_exercise(tok, Exercise("repeat", "请复述：", "很长的文字" * 50, "好"), max_tokens=40)
    assert len(long["input_ids"]) <= 40


def test_the_committed_weights_are_the_default_recipe_in_the_public_layout():
    folder = tiny.shipped_tiny()
    assert folder is not None, (f"{tiny.SHIPPED_DIR} is missing or was built from another recipe than TinyRecipe(); "
                                "rebuild it with `python -m helpers build-tiny --out data/tiny --force`")
    assert tiny.ensure_tiny(progress=False) == folder
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["config.json", "ice_text.model", "pytorch_model.bin", "tiny_recipe.json", "tokenizer_config.json"]
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 8 * 2**20
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    recipe = tiny.TinyRecipe()
    assert (model.config.hidden_size, model.config.num_layers, model.config.quantization_bit) == (
        recipe.hidden_size, recipe.num_layers, recipe.quantization_bit)
