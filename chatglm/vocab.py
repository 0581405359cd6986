"""Small sentencepiece vocabularies laid out like ChatGLM-6B's ``ice_text.model``.

The real vocabulary is a unigram model (nmt_nfkc normalizer, dummy prefix, split digits) whose trained pieces
start with ``<unk> <s> </s> <pad> <n>``, followed by eight control pieces (``[MASK]`` ... ``<dBLOCK>``),
``<|tab|>``, ``<|blank_2|>`` ... ``<|blank_80|>`` and the 256 byte pieces used for byte fallback. A vocabulary
trained here has the same pieces, piece types, order and runtime settings, so :class:`ChatGLMTokenizer` treats it
exactly like the real one; only the learned text pieces (and hence the ids) differ.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from .tokenization import (
    MAX_BLANK_LENGTH,
    NEWLINE_TOKEN,
    PUBLIC_AUTO_MAP,
    RESERVED_PIECES,
    SPECIAL_PIECES,
    TOKENIZER_CONFIG_NAME,
    VOCAB_FILES_NAMES,
    public_tokenizer_config,
    whitespace_pieces,
)

_Piece = sp_pb2.ModelProto.SentencePiece


def byte_pieces() -> list[str]:
    """``<0x00>`` ... ``<0xFF>``, the byte-fallback pieces."""
    return [f"<0x{value:02X}>" for value in range(256)]


def _training_lines(texts: Iterable[str]) -> list[str]:
    # The real vocabulary learned "<n>" as a user-defined piece, so newlines are written as "<n>";
    # tabs and blank runs get fixed pieces afterwards and are left to the normalizer here.
    lines = []
    for text in texts:
        line = str(text).replace("\n", NEWLINE_TOKEN).replace("\t", " ").strip()
        if line:
            lines.append(line)
    if not lines:
        raise ValueError("train_compatible_vocab needs at least one non-empty text")
    return lines


def _compatible_proto(
    trained: bytes, character_coverage: float, reference_model: str | os.PathLike | None = None
) -> sp_pb2.ModelProto:
    """Append the ChatGLM pieces to a freshly trained model and reduce its specs to what the real one carries."""
    model = sp_pb2.ModelProto()
    model.ParseFromString(trained)
    head = [piece.piece for piece in model.pieces[:5]]
    if head != [*RESERVED_PIECES, NEWLINE_TOKEN]:
        raise RuntimeError(f"unexpected first pieces after training: {head}")

    appended = (
        [(piece, _Piece.CONTROL) for piece in SPECIAL_PIECES]
        + [(piece, _Piece.USER_DEFINED) for piece in whitespace_pieces(MAX_BLANK_LENGTH)]
        + [(piece, _Piece.BYTE) for piece in byte_pieces()]
    )
    reserved = {piece for piece, _ in appended}
    # A learned piece that spells one of the fixed pieces would clash with it; the fixed one wins.
    kept = [piece for piece in model.pieces if piece.piece not in reserved]
    del model.pieces[:]
    model.pieces.extend(kept)
    trained_size = len(model.pieces)
    for piece, kind in appended:
        model.pieces.append(_Piece(piece=piece, score=0.0, type=kind))

    # Only the settings the real model states; every other field keeps sentencepiece's default, as there.
    spec = sp_pb2.TrainerSpec(
        vocab_size=trained_size,
        character_coverage=character_coverage,
        split_digits=True,
        user_defined_symbols=[NEWLINE_TOKEN],
        byte_fallback=True,
        pad_id=RESERVED_PIECES.index("<pad>"),
    )
    model.trainer_spec.CopyFrom(spec)
    source = model.normalizer_spec
    if reference_model is not None:
        reference = sp_pb2.ModelProto()
        reference.ParseFromString(Path(reference_model).read_bytes())
        source = reference.normalizer_spec
    normalizer = sp_pb2.NormalizerSpec(name=source.name, precompiled_charsmap=source.precompiled_charsmap)
    model.normalizer_spec.CopyFrom(normalizer)
    model.ClearField("denormalizer_spec")
    return model


def train_compatible_vocab(
    texts: Iterable[str],
    out_file: str | os.PathLike,
    vocab_size: int = 1000,
    seed: int = 0,
    character_coverage: float = 0.9999,
    reference_model: str | os.PathLike | None = None,
) -> Path:
    """Train a small unigram vocabulary compatible with :class:`ChatGLMTokenizer` and write it to ``out_file``.

    Args:
        texts: training texts; newlines are kept as ``<n>``.
        out_file: where to write the model (usually ``.../ice_text.model``).
        vocab_size: at most this many trained pieces (fewer if the texts are small); the fixed ChatGLM pieces
            (8 control, 80 whitespace, 256 bytes) come on top.
        seed: sentencepiece's random seed. Training runs on one thread, so the same texts and seed give a
            byte-identical file.
        character_coverage: share of characters covered by pieces; the rest falls back to bytes.
        reference_model: a model whose normalizer to copy (e.g. the real ``ice_text.model``). By default the
            installed sentencepiece's nmt_nfkc tables are used, which follow a newer Unicode version than the
            real model's and so differ on a few rare characters.

    Returns:
        the path written.
    """
    lines = _training_lines(texts)
    spm.set_random_generator_seed(int(seed))
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buffer,
        model_type="unigram",
        vocab_size=int(vocab_size),
        hard_vocab_limit=False,
        character_coverage=character_coverage,
        normalization_rule_name="nmt_nfkc",
        add_dummy_prefix=True,
        remove_extra_whitespaces=True,
        split_digits=True,
        byte_fallback=False,
        user_defined_symbols=[NEWLINE_TOKEN],
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=1,
        minloglevel=2,
    )
    model = _compatible_proto(buffer.getvalue(), character_coverage, reference_model)
    data = model.SerializeToString(deterministic=True)
    spm.SentencePieceProcessor(model_proto=data)  # fail here, not later, if the result does not load
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return out


def write_tokenizer_files(
    model_file: str | os.PathLike,
    folder: str | os.PathLike,
    num_image_tokens: int = 0,
    auto_map: bool = False,
) -> Path:
    """Put ``ice_text.model`` and a public-form ``tokenizer_config.json`` into ``folder``.

    Args:
        model_file: a sentencepiece model (the real one or one from :func:`train_compatible_vocab`).
        folder: created if missing.
        num_image_tokens: 0 for the v1.1 layout, 20000 for the earliest release's.
        auto_map: also write the public files' ``auto_map`` (remote-code pointer), to mimic them verbatim.

    Returns:
        the folder.
    """
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    vocab_path = target / VOCAB_FILES_NAMES["vocab_file"]
    source = Path(model_file)
    if source.resolve() != vocab_path.resolve():
        vocab_path.write_bytes(source.read_bytes())
    config = public_tokenizer_config(num_image_tokens)
    if auto_map:
        config["auto_map"] = json.loads(json.dumps(PUBLIC_AUTO_MAP))
    text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    (target / TOKENIZER_CONFIG_NAME).write_text(text, encoding="utf-8")
    return target
