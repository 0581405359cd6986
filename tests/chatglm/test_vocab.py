"""Small ChatGLM-compatible vocabularies: layout, determinism and the folder files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb

from chatglm.tokenization import (
    PUBLIC_AUTO_MAP,
    SPECIAL_PIECES,
    ChatGLMTokenizer,
    public_tokenizer_config,
    whitespace_pieces,
)
from chatglm.vocab import byte_pieces, train_compatible_vocab, write_tokenizer_files


def _texts(seed: int = 7, lines: int = 300) -> list[str]:
    rng = random.Random(seed)
    zh = "天气 公园 散步 学习 模型 语言 数据 训练 北京 朋友 时间 问题 回答 生成".split()
    en = "the model reads text and writes answers with care for every token".split()
    return [
        "".join(rng.choices(zh, k=5)) + " " + " ".join(rng.choices(en, k=6)) + f" {rng.randint(0, 9999)}\n下一行"
        for _ in range(lines)
    ]


def _proto(path: Path) -> pb.ModelProto:
    model = pb.ModelProto()
    model.ParseFromString(path.read_bytes())
    return model


def test_training_is_deterministic(tmp_path: Path) -> None:
    first = train_compatible_vocab(_texts(), tmp_path / "a" / "ice_text.model", vocab_size=300, seed=3)
    second = train_compatible_vocab(_texts(), tmp_path / "b" / "ice_text.model", vocab_size=300, seed=3)
    assert first.read_bytes() == second.read_bytes()
    other = train_compatible_vocab(_texts(seed=8), tmp_path / "c" / "ice_text.model", vocab_size=300, seed=3)
    assert other.read_bytes() != first.read_bytes()


def test_layout_matches_chatglm(tmp_path: Path) -> None:
    path = train_compatible_vocab(_texts(), tmp_path / "ice_text.model", vocab_size=300)
    model = _proto(path)
    kinds = pb.ModelProto.SentencePiece
    head = [(p.piece, p.type) for p in model.pieces[:5]]
    assert head == [("<unk>", kinds.UNKNOWN), ("<s>", kinds.CONTROL), ("</s>", kinds.CONTROL),
                    ("<pad>", kinds.CONTROL), ("<n>", kinds.USER_DEFINED)]
    tail = [(p.piece, p.type) for p in model.pieces[-(8 + 80 + 256):]]
    want = ([(p, kinds.CONTROL) for p in SPECIAL_PIECES] + [(p, kinds.USER_DEFINED) for p in whitespace_pieces()]
            + [(p, kinds.BYTE) for p in byte_pieces()])
    assert tail == want
    trained = model.pieces[5 : -len(want)]
    assert trained and all(p.type == kinds.NORMAL for p in trained)
    assert model.trainer_spec.byte_fallback and model.trainer_spec.split_digits and model.trainer_spec.pad_id == 3
    assert model.trainer_spec.vocab_size == len(model.pieces) - len(want) <= 300
    assert not model.trainer_spec.input and not model.trainer_spec.model_prefix  # nothing about the machine
    assert model.normalizer_spec.name == "nmt_nfkc" and model.normalizer_spec.add_dummy_prefix
    sp = spm.SentencePieceProcessor(model_file=str(path))
    assert sp.encode("😀", out_type=str)[-4:] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]


def test_fixed_pieces_win_over_learned_ones(tmp_path: Path) -> None:
    texts = [f"[MASK] <sop> {t}" for t in _texts(lines=200)]
    path = train_compatible_vocab(texts, tmp_path / "ice_text.model", vocab_size=300)
    pieces = [p.piece for p in _proto(path).pieces]
    assert len(pieces) == len(set(pieces))
    tok = ChatGLMTokenizer(vocab_file=path, num_image_tokens=0)
    assert tok.convert_ids_to_tokens(tok.mask_token_id) == "[MASK]"


def test_write_tokenizer_files(tmp_path: Path) -> None:
    model = train_compatible_vocab(_texts(), tmp_path / "src.model", vocab_size=300)
    folder = write_tokenizer_files(model, tmp_path / "plain", num_image_tokens=20000)
    assert (folder / "ice_text.model").read_bytes() == model.read_bytes()
    assert json.loads((folder / "tokenizer_config.json").read_text()) == public_tokenizer_config(20000)
    hub_like = write_tokenizer_files(model, tmp_path / "hub", auto_map=True)
    assert json.loads((hub_like / "tokenizer_config.json").read_text()) == {
        **public_tokenizer_config(0), "auto_map": PUBLIC_AUTO_MAP
    }
    # Writing into the folder the model already lives in keeps it.
    again = write_tokenizer_files(folder / "ice_text.model", folder)
    assert (again / "ice_text.model").read_bytes() == model.read_bytes()


def test_needs_text() -> None:
    with pytest.raises(ValueError):
        train_compatible_vocab(["", "   "], "unused.model")
