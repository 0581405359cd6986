"""Shared fixtures: tiny ChatGLM configs and seeded random models, so every test runs in seconds on CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from chatglm import ChatGLMConfig, ChatGLMForConditionalGeneration

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# Special ids of the tiny vocabulary; the model must take them from the config, never from literals.
PAD, MASK, GMASK, BOS, EOS = 3, 250, 251, 254, 255


def tiny_config(**overrides) -> ChatGLMConfig:
    values = dict(
        vocab_size=300,
        hidden_size=64,
        num_layers=3,
        num_attention_heads=4,
        inner_hidden_size=160,
        layernorm_epsilon=1e-5,
        max_sequence_length=256,
        bos_token_id=BOS,
        eos_token_id=EOS,
        mask_token_id=MASK,
        gmask_token_id=GMASK,
        pad_token_id=PAD,
    )
    values.update(overrides)
    return ChatGLMConfig(**values)


def random_model(seed: int = 0, bits: int = 0, **overrides) -> ChatGLMForConditionalGeneration:
    """A tiny model in eval mode with non-trivial LayerNorms, optionally quantized to ``bits``."""
    torch.manual_seed(seed)
    model = ChatGLMForConditionalGeneration(tiny_config(**overrides))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    if bits:
        model.quantize(bits)
    return model.eval()


def glm_ids(context: list[int], answer: list[int] = (), mask_token: int = GMASK) -> list[int]:
    """``context [gMASK] <sop> answer`` as the tokenizer lays it out."""
    return [*context, mask_token, BOS, *answer]


def require_shared(path: Path) -> Path:
    """Shared public files: in CI they must exist (fail), locally a test may skip when they are absent."""
    if path.exists():
        return path
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{path} is missing; CI must provide the shared public files")
    pytest.skip(f"{path} not present on this machine")


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory):
    """A ChatGLM tokenizer over a small vocabulary trained from the bundled corpus (same special pieces)."""
    from chatglm import ChatGLMTokenizer
    from chatglm.vocab import train_compatible_vocab, write_tokenizer_files

    folder = tmp_path_factory.mktemp("small_vocab")
    lines = (REPO / "data" / "corpus" / "pretrain.txt").read_text(encoding="utf-8").splitlines()[:200]
    model_file = train_compatible_vocab(lines, folder / "ice_text.model", vocab_size=2000, seed=0)
    write_tokenizer_files(model_file, folder)
    return ChatGLMTokenizer.from_pretrained(folder)


def model_for(tokenizer, seed: int = 0, bits: int = 0, **overrides) -> ChatGLMForConditionalGeneration:
    """A tiny random model whose vocabulary and special ids are those of ``tokenizer``."""
    from chatglm.configuration import vocabulary_fields

    ids = vocabulary_fields(tokenizer)
    return random_model(seed=seed, bits=bits, **{**ids, **overrides})


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A fast-recipe tiny model written in the public INT4 layout (same build code as the embedded default)."""
    from helpers.tiny import build_tiny

    folder = tmp_path_factory.mktemp("tiny") / "model"
    build_tiny(folder, fast_tiny_recipe(), progress=False)
    return folder


def fast_tiny_recipe():
    from helpers.tiny import TinyRecipe

    return TinyRecipe(steps=8, hidden_size=64, num_layers=2, num_attention_heads=4, inner_hidden_size=128,
                      batch_size=4, vocab_size=3000)
