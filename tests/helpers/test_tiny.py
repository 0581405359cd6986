"""The embedded tiny model: public INT4 layout, loaded through the real path, deterministic, cached by recipe."""

import dataclasses
import hashlib
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatglm import ChatGLMForConditionalGeneration, ChatGLMTokenizer
from helpers import tiny
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


def test_pretraining_lowers_the_loss(tiny_checkpoint):
    summary = json.loads((tiny_checkpoint / "tiny_recipe.json").read_text())
    assert summary["last_loss"] < summary["first_loss"]
