"""ChatGLM-6B tokenizer for current ``transformers``, with the behaviour of THUDM's original code.

It reads the public ``ice_text.model`` (a sentencepiece unigram model) and ``tokenizer_config.json`` unchanged
and gives the same tokens, ids, padding, masks and decoded text as the original did under transformers 4.30:

* before sentencepiece, ``\\n`` becomes ``<n>``, ``\\t`` becomes ``<|tab|>`` and runs of 2-80 spaces become
  ``<|blank_n|>`` (longest first); decoding maps them back;
* ``encode`` appends ``[gMASK] <sop>``; a pair is ``a [gMASK] <sop> b <eop>``;
* padding is on the left and also yields the GLM prefix-LM ``attention_mask`` ([1, L, L], True = masked)
  and the 2-D ``position_ids`` ([2, L]) the model expects;
* ids below ``num_image_tokens`` are image tokens (the earliest release shifted the text ids by 20000).

The original class cannot be built on transformers >= 4.34 (it asks for the vocabulary before loading it);
this one loads the sentencepiece model first.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm
from transformers import AutoTokenizer
from transformers.tokenization_python import PreTrainedTokenizer
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER, BatchEncoding, EncodedInput
from transformers.utils import PaddingStrategy

VOCAB_FILES_NAMES = {"vocab_file": "ice_text.model"}
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"

NEWLINE_TOKEN = "<n>"
TAB_TOKEN = "<|tab|>"
MAX_BLANK_LENGTH = 80
# Control pieces appended after the trained pieces, in vocabulary order.
SPECIAL_PIECES = ("[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>")
# The pieces sentencepiece itself reserves at ids 0-3 (unknown, then control pieces).
RESERVED_PIECES = ("<unk>", "<s>", "</s>", "<pad>")
IMAGE_TOKENS_EARLIEST = 20000

# What the public checkpoints point `AutoTokenizer` at; kept only to write files that look like the public ones.
PUBLIC_AUTO_MAP = {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}


def blank_token(length: int) -> str:
    """The piece that stands for ``length`` consecutive spaces (2 <= length <= 80)."""
    if length < 2:
        raise ValueError(f"blank pieces cover runs of at least 2 spaces, got {length}")
    return f"<|blank_{length}|>"


def whitespace_pieces(max_blank_length: int = MAX_BLANK_LENGTH) -> list[str]:
    """The tab piece followed by the blank pieces, in vocabulary order."""
    return [TAB_TOKEN] + [blank_token(n) for n in range(2, max_blank_length + 1)]


def public_tokenizer_config(num_image_tokens: int = 0) -> dict[str, Any]:
    """The keys of the public ``tokenizer_config.json`` (without its ``auto_map``), in the public order."""
    return {
        "bos_token": "<sop>",
        "eos_token": "<eop>",
        "end_token": "</s>",
        "gmask_token": "[gMASK]",
        "mask_token": "[MASK]",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "remove_space": False,
        "do_lower_case": False,
        "tokenizer_class": "ChatGLMTokenizer",
        "num_image_tokens": int(num_image_tokens),
    }


class IceTextTokenizer:
    """The text side of the vocabulary: sentencepiece plus the whitespace rewriting, ids shifted past the images.

    Args:
        model_proto: the serialized sentencepiece model (the bytes of ``ice_text.model``).
        num_image_tokens: how many ids come before the text ids.
        max_blank_length: longest run of spaces that has its own piece.
    """

    def __init__(
        self, model_proto: bytes, num_image_tokens: int = 0, max_blank_length: int = MAX_BLANK_LENGTH
    ) -> None:
        self.model_proto = bytes(model_proto)
        self.sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        self.num_image_tokens = int(num_image_tokens)
        self.max_blank_length = int(max_blank_length)

    @property
    def num_text_tokens(self) -> int:
        return self.sp.get_piece_size()

    @property
    def num_tokens(self) -> int:
        return self.num_image_tokens + self.num_text_tokens

    def preprocess(self, text: str, linebreak: bool = True, whitespaces: bool = True) -> str:
        """Rewrite newlines, tabs and space runs into their pieces, as the vocabulary was trained on them."""
        if linebreak:
            text = text.replace("\n", NEWLINE_TOKEN)
        if whitespaces:
            text = text.replace("\t", TAB_TOKEN)
            # Longest runs first, so 85 spaces become <|blank_80|><|blank_5|>.
            for length in range(self.max_blank_length, 1, -1):
                text = text.replace(" " * length, blank_token(length))
        return text

    def postprocess(self, text: str) -> str:
        """Undo :meth:`preprocess` on decoded text."""
        text = text.replace(NEWLINE_TOKEN, "\n").replace(TAB_TOKEN, "\t")
        for length in range(2, self.max_blank_length + 1):
            text = text.replace(blank_token(length), " " * length)
        return text

    def tokenize(
        self, text: str, linebreak: bool = True, whitespaces: bool = True, add_dummy_prefix: bool = True
    ) -> list[str]:
        """Pieces of ``text``; without the dummy prefix the text is encoded after a ``<n>`` that is then dropped."""
        text = self.preprocess(text, linebreak, whitespaces)
        if add_dummy_prefix:
            return self.sp.encode(text, out_type=str)
        # sentencepiece always prefixes "▁"; encoding "<n>" first puts that "▁" on the newline instead.
        return self.sp.encode(NEWLINE_TOKEN + text, out_type=str)[2:]

    def encode(
        self, text: str, linebreak: bool = True, whitespaces: bool = True, add_dummy_prefix: bool = True
    ) -> list[int]:
        """Ids of ``text`` (image offset included); same options as :meth:`tokenize`."""
        text = self.preprocess(text, linebreak, whitespaces)
        if not add_dummy_prefix:
            text = NEWLINE_TOKEN + text
        ids = [i + self.num_image_tokens for i in self.sp.encode(text)]
        return ids if add_dummy_prefix else ids[2:]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; image ids are dropped."""
        text_ids = [int(i) - self.num_image_tokens for i in ids]
        return self.postprocess(self.sp.decode([i for i in text_ids if i >= 0]))

    def decode_tokens(self, tokens: list[str]) -> str:
        """Text of ``tokens`` (sentencepiece drops control pieces and the dummy-prefix space)."""
        return self.postprocess(self.sp.decode_pieces(list(tokens)))

    def __getitem__(self, key: int | str) -> str | int:
        """Id -> piece or piece -> id, with ``<image_N>`` standing for the image ids."""
        if isinstance(key, (int, np.integer)):
            key = int(key)
            if key < self.num_image_tokens:
                return f"<image_{key}>"
            return self.sp.id_to_piece(key - self.num_image_tokens)
        if isinstance(key, str):
            if key.startswith("<image_") and key.endswith(">") and key[7:-1].isdigit():
                return int(key[7:-1])
            return self.sp.piece_to_id(key) + self.num_image_tokens
        raise ValueError(f"expected a token (str) or an id (int), got {type(key).__name__}")


def _read_vocabulary(path: Path, num_image_tokens: int) -> IceTextTokenizer:
    """The sentencepiece model at ``path``; a missing, truncated or corrupt file raises a ValueError naming it.

    (A ValueError, because ``transformers`` replaces OSError and sentencepiece's RuntimeError by generic text.)
    """
    try:
        proto = path.read_bytes()
    except OSError as error:
        raise ValueError(f"{path}: cannot read the tokenizer's vocabulary ({error.strerror or error})") from error
    try:
        return IceTextTokenizer(proto, num_image_tokens=num_image_tokens)
    except Exception as error:  # sentencepiece raises RuntimeError or a protobuf DecodeError
        raise ValueError(f"{path}: not a valid sentencepiece model, truncated or corrupt ({len(proto):,} bytes; "
                         f"{type(error).__name__}); download it again") from error


class ChatGLMTokenizer(PreTrainedTokenizer):
    """Tokenizer of ChatGLM-6B: ``ice_text.model`` with the original's whitespace, special-token and padding rules.

    Args:
        vocab_file: path of ``ice_text.model``.
        do_lower_case: lower-case text before tokenizing.
        remove_space: strip the text and collapse whitespace runs to one space before tokenizing.
        bos_token: starts the answer (``<sop>``); ``bos_token_id``.
        eos_token: ends the answer (``<eop>``); ``eos_token_id``.
        end_token: sentencepiece's end piece (``</s>``); ``end_token_id``.
        mask_token: short-span mask (``[MASK]``).
        gmask_token: generation mask appended to every prompt (``[gMASK]``); never split out of text.
        padding_side: ``"left"``, as generation needs.
        pad_token: ``<pad>``.
        unk_token: ``<unk>``.
        num_image_tokens: ids reserved before the text ids: 0 for the v1.1 files, 20000 for the earliest
            release (also the default when a config does not say, as in the earliest files).
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask", "position_ids"]
    padding_side = "left"

    def __init__(
        self,
        vocab_file: str | os.PathLike,
        do_lower_case: bool = False,
        remove_space: bool = False,
        bos_token: str = "<sop>",
        eos_token: str = "<eop>",
        end_token: str = "</s>",
        mask_token: str = "[MASK]",
        gmask_token: str = "[gMASK]",
        padding_side: str = "left",
        pad_token: str = "<pad>",
        unk_token: str = "<unk>",
        num_image_tokens: int = IMAGE_TOKENS_EARLIEST,
        **kwargs: Any,
    ) -> None:
        if vocab_file is None:
            raise ValueError(f"ChatGLMTokenizer needs vocab_file: no {VOCAB_FILES_NAMES['vocab_file']} (the "
                             "sentencepiece model) was found; put it next to tokenizer_config.json")
        # The public config points at remote code; this class replaces it.
        kwargs.pop("auto_map", None)
        # transformers turns unknown "*_token" config keys into extra special tokens, which would split
        # "[gMASK]" and "</s>" out of text; the original treats them as plain vocabulary pieces.
        model_specific = dict(kwargs.pop("model_specific_special_tokens", None) or {})
        end_token = str(model_specific.pop("end_token", end_token))
        gmask_token = str(model_specific.pop("gmask_token", gmask_token))
        if model_specific:
            kwargs["model_specific_special_tokens"] = model_specific
        # transformers 4.30 cleaned up spaces before punctuation by default; the original relied on it.
        kwargs.setdefault("clean_up_tokenization_spaces", True)

        # The vocabulary must be loaded before the base class asks for it.
        self.vocab_file = str(vocab_file)
        self.sp_tokenizer = _read_vocabulary(Path(vocab_file), num_image_tokens)
        self._text_vocab: dict[str, int] | None = None
        self.do_lower_case = do_lower_case
        self.remove_space = remove_space
        self.end_token = end_token
        self.gmask_token = gmask_token
        self._check_pieces([bos_token, eos_token, end_token, mask_token, gmask_token, pad_token, unk_token])

        super().__init__(
            do_lower_case=do_lower_case,
            remove_space=remove_space,
            padding_side=padding_side,
            bos_token=bos_token,
            eos_token=eos_token,
            mask_token=mask_token,
            pad_token=pad_token,
            unk_token=unk_token,
            num_image_tokens=num_image_tokens,
            **kwargs,
        )
        self.init_kwargs["end_token"] = end_token
        self.init_kwargs["gmask_token"] = gmask_token

    def _check_pieces(self, pieces: Iterable[str]) -> None:
        sp = self.sp_tokenizer.sp
        unk = sp.id_to_piece(sp.unk_id())
        missing = [str(p) for p in pieces if str(p) != unk and sp.piece_to_id(str(p)) == sp.unk_id()]
        if missing:
            raise ValueError(
                f"the vocabulary {self.vocab_file} lacks the pieces {missing}; it is not a ChatGLM vocabulary"
            )

    # ----------------------------------------------------------------- vocabulary

    @property
    def num_image_tokens(self) -> int:
        return self.sp_tokenizer.num_image_tokens

    @property
    def vocab_size(self) -> int:
        """Image ids plus sentencepiece pieces (what the original reports; the model's embedding is larger)."""
        return self.sp_tokenizer.num_tokens

    @property
    def gmask_token_id(self) -> int:
        return self.convert_tokens_to_ids(self.gmask_token)

    @property
    def end_token_id(self) -> int:
        return self.convert_tokens_to_ids(self.end_token)

    def get_vocab(self) -> dict[str, int]:
        if self._text_vocab is None:
            self._text_vocab = {self.sp_tokenizer[i]: i for i in range(self.vocab_size)}
        vocab = dict(self._text_vocab)
        vocab.update(getattr(self, "_added_tokens_encoder", {}))
        return vocab

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp_tokenizer[token]

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp_tokenizer[index]

    # ----------------------------------------------------------------- text -> tokens

    def preprocess_text(self, text: str) -> str:
        """Apply ``remove_space`` and ``do_lower_case``."""
        if self.remove_space:
            text = " ".join(text.strip().split())
        if self.do_lower_case:
            text = text.lower()
        return text

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self.sp_tokenizer.tokenize(self.preprocess_text(text))

    def tokenize(self, text: str, **kwargs: Any) -> list[str]:
        """Tokens of ``text``, splitting out the special/added tokens written in it as the original did.

        The named special tokens (``<sop>``, ``<eop>``, ``<pad>``, ``<unk>``, ``[MASK]``) eat the whitespace on
        both sides, and every text chunk between them gets its own dummy-prefix "▁". ``[gMASK]`` and ``</s>`` are
        not special here and go through sentencepiece as text. Tokens added later keep their own strip flags.
        """
        split_special_tokens = kwargs.pop("split_special_tokens", self.split_special_tokens)
        text, kwargs = self.prepare_for_tokenization(text, **kwargs)
        if split_special_tokens:
            return self._tokenize(text)

        added = self._added_tokens_encoder
        named = set(self.special_tokens_map.values())
        chunks = self.tokens_trie.split(text)
        if self.do_lower_case:
            # Lower-case around the special tokens first, so that e.g. "<SOP>" is found as "<sop>".
            text = "".join(chunk if chunk in added else chunk.lower() for chunk in chunks)
            chunks = self.tokens_trie.split(text)
        # In place and left to right, so a stripped chunk is seen stripped by the next token.
        for i, chunk in enumerate(chunks):
            if chunk not in added:
                continue
            if chunk in named:
                strip_left = strip_right = True
            else:
                token = self._added_tokens_decoder.get(added[chunk])
                strip_left, strip_right = bool(getattr(token, "lstrip", False)), bool(getattr(token, "rstrip", False))
            if strip_right and i + 1 < len(chunks) and chunks[i + 1]:
                chunks[i + 1] = chunks[i + 1].lstrip()
            if strip_left and i > 0 and chunks[i - 1]:
                chunks[i - 1] = chunks[i - 1].rstrip()

        tokens: list[str] = []
        for chunk in chunks:
            if not chunk:
                continue
            if chunk in added:
                tokens.append(chunk)
            else:
                tokens.extend(self._tokenize(chunk))
        return tokens

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        """``a [gMASK] <sop>``, or ``a [gMASK] <sop> b <eop>`` for a pair."""
        ids = list(token_ids_0) + [self.gmask_token_id, self.bos_token_id]
        if token_ids_1 is not None:
            ids += list(token_ids_1) + [self.eos_token_id]
        return ids

    def get_special_tokens_mask(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        mask = [0] * len(token_ids_0) + [1, 1]
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + [1]
        return mask

    # ----------------------------------------------------------------- padding and GLM masks

    def _glm_attention_mask(self, length: int, context_length: int) -> np.ndarray:
        """[1, L, L] booleans, True = masked: the context is visible to every row, the rest is causal."""
        visible = np.tril(np.ones((1, length, length), dtype=bool))
        visible[:, :, :context_length] = True
        return ~visible

    def _glm_position_ids(self, ids: list[int], context_length: int) -> np.ndarray:
        """[2, L]: row 0 counts up to the context then stays at the mask's position; row 1 counts the answer."""
        length = len(ids)
        positions = np.arange(length, dtype=np.int64)
        mask_id = self.mask_token_id if self.mask_token_id in ids else self.gmask_token_id
        if mask_id in ids:
            positions[context_length:] = ids.index(mask_id)
        block_positions = np.concatenate(
            [np.zeros(context_length, dtype=np.int64), np.arange(1, length - context_length + 1, dtype=np.int64)]
        )
        return np.stack([positions, block_positions], axis=0)

    def _pad(
        self,
        encoded_inputs: dict[str, EncodedInput] | BatchEncoding,
        max_length: int | None = None,
        padding_strategy: PaddingStrategy = PaddingStrategy.DO_NOT_PAD,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_attention_mask: bool | None = None,
    ) -> dict:
        """Pad one sequence and add the GLM ``attention_mask``/``position_ids`` when a length is known.

        Masks and positions are computed on the unpadded sequence; padding then adds masked rows/columns
        (True) and zero positions. ``return_attention_mask=False`` leaves the mask out.
        """
        side = padding_side if padding_side is not None else self.padding_side
        ids = list(encoded_inputs[self.model_input_names[0]])
        length = len(ids)

        if padding_strategy == PaddingStrategy.LONGEST:
            max_length = length
        if max_length is not None and pad_to_multiple_of is not None and max_length % pad_to_multiple_of != 0:
            max_length = (max_length // pad_to_multiple_of + 1) * pad_to_multiple_of
        needs_padding = padding_strategy != PaddingStrategy.DO_NOT_PAD and length != max_length

        if max_length is not None:
            context_length = ids.index(self.bos_token_id) if self.bos_token_id in ids else length
            if return_attention_mask is not False and "attention_mask" not in encoded_inputs:
                encoded_inputs["attention_mask"] = self._glm_attention_mask(length, context_length)
            if "position_ids" not in encoded_inputs:
                encoded_inputs["position_ids"] = self._glm_position_ids(ids, context_length)

        if needs_padding:
            extra = max_length - length
            if side not in ("left", "right"):
                raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
            before, after = (extra, 0) if side == "left" else (0, extra)

            def pad_list(values: list, value: Any) -> list:
                return [value] * before + list(values) + [value] * after

            if "attention_mask" in encoded_inputs:
                mask = encoded_inputs["attention_mask"]
                if isinstance(mask, np.ndarray) and mask.ndim == 3:
                    encoded_inputs["attention_mask"] = np.pad(
                        mask, [(0, 0), (before, after), (before, after)], mode="constant", constant_values=True
                    )
                else:
                    encoded_inputs["attention_mask"] = pad_list(mask, 0)
            if "position_ids" in encoded_inputs:
                encoded_inputs["position_ids"] = np.pad(
                    np.asarray(encoded_inputs["position_ids"]), [(0, 0), (before, after)], mode="constant"
                )
            if "token_type_ids" in encoded_inputs:
                encoded_inputs["token_type_ids"] = pad_list(encoded_inputs["token_type_ids"], self.pad_token_type_id)
            if "special_tokens_mask" in encoded_inputs:
                encoded_inputs["special_tokens_mask"] = pad_list(encoded_inputs["special_tokens_mask"], 1)
            encoded_inputs[self.model_input_names[0]] = pad_list(ids, self.pad_token_id)
        return encoded_inputs

    # ----------------------------------------------------------------- ids -> text

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.sp_tokenizer.decode_tokens(tokens)

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        spaces_between_special_tokens: bool = True,
        **kwargs: Any,
    ) -> str:
        """Drop pad ids, decode through the pieces, then clean up spaces before punctuation (4.30's default)."""
        if isinstance(token_ids, (int, np.integer)):
            token_ids = [token_ids]
        ids = [int(i) for i in token_ids]
        if not ids:
            return ""
        pad_id = self.pad_token_id
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        vocab_size = self.vocab_size

        # Tokens added beyond the vocabulary are not sentencepiece pieces: they are joined in as they are.
        parts: list[str] = []
        run: list[str] = []
        for index in ids:
            if index == pad_id or index in skip:
                continue
            if index >= vocab_size and index in self._added_tokens_decoder:
                if run:
                    parts.append(self.convert_tokens_to_string(run))
                    run = []
                parts.append(self._added_tokens_decoder[index].content)
            else:
                run.append(self._convert_id_to_token(index))
        if run:
            parts.append(self.convert_tokens_to_string(run))
        text = (" " if spaces_between_special_tokens else "").join(parts)

        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        return self.clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    # ----------------------------------------------------------------- saving

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        """Write the sentencepiece model, byte for byte as it was loaded."""
        target = Path(save_directory)
        if target.is_dir():
            prefix = f"{filename_prefix}-" if filename_prefix else ""
            target = target / (prefix + VOCAB_FILES_NAMES["vocab_file"])
        target.write_bytes(self.sp_tokenizer.model_proto)
        return (str(target),)

    def tokenizer_config(self) -> dict[str, Any]:
        """``tokenizer_config.json`` in the public form, plus the settings that differ from the defaults."""
        config = public_tokenizer_config(self.num_image_tokens)
        config.update(
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            end_token=self.end_token,
            gmask_token=self.gmask_token,
            mask_token=self.mask_token,
            pad_token=self.pad_token,
            unk_token=self.unk_token,
            remove_space=bool(self.remove_space),
            do_lower_case=bool(self.do_lower_case),
        )
        if self.padding_side != "left":
            config["padding_side"] = self.padding_side
        if self.truncation_side != "right":
            config["truncation_side"] = self.truncation_side
        if not self.clean_up_tokenization_spaces:
            config["clean_up_tokenization_spaces"] = False
        if self.split_special_tokens:
            config["split_special_tokens"] = True
        if self.model_max_length < VERY_LARGE_INTEGER:
            config["model_max_length"] = int(self.model_max_length)
        named = set(self.special_tokens_map.values())
        added = {
            str(index): token.__getstate__()
            for index, token in self.added_tokens_decoder.items()
            if token.content not in named
        }
        if added:
            config["added_tokens_decoder"] = added
        if self._extra_special_tokens:
            config["extra_special_tokens"] = [str(t) for t in self._extra_special_tokens]
        return config

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        legacy_format: bool | None = None,
        filename_prefix: str | None = None,
        push_to_hub: bool = False,
        **kwargs: Any,
    ) -> tuple[str, ...]:
        """Write ``ice_text.model`` and a public-form ``tokenizer_config.json`` (no ``auto_map``)."""
        files = super().save_pretrained(
            save_directory, legacy_format=legacy_format, filename_prefix=filename_prefix, **kwargs
        )
        prefix = f"{filename_prefix}-" if filename_prefix else ""
        config_file = Path(save_directory) / (prefix + TOKENIZER_CONFIG_NAME)
        written = json.loads(config_file.read_text(encoding="utf-8"))
        config = self.tokenizer_config()
        if "chat_template" in written:
            config["chat_template"] = written["chat_template"]
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if push_to_hub:
            repo_id = kwargs.pop("repo_id", str(save_directory).split(os.path.sep)[-1])
            self.push_to_hub(repo_id, **kwargs)
        return files


def register_auto_tokenizer() -> None:
    """Let ``AutoTokenizer`` resolve ``model_type="chatglm"`` and ``tokenizer_class="ChatGLMTokenizer"`` here.

    Idempotent. With it, the public folders load without ``trust_remote_code`` (their ``auto_map`` is ignored).
    """
    from .configuration import ChatGLMConfig

    AutoTokenizer.register(ChatGLMConfig, slow_tokenizer_class=ChatGLMTokenizer, exist_ok=True)
