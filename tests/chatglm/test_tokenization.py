"""ChatGLMTokenizer: the original's outputs on the real vocabulary, and the same rules on a small trained one."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from transformers import AutoTokenizer

from chatglm.configuration import ChatGLMConfig
from chatglm.tokenization import (
    PUBLIC_AUTO_MAP,
    ChatGLMTokenizer,
    blank_token,
    public_tokenizer_config,
    register_auto_tokenizer,
)
from chatglm.vocab import train_compatible_vocab, write_tokenizer_files

REAL_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "tokenizer"
EXPECTED_FILE = REAL_DIR / "expected_public.jsonl"


def _expected_records() -> list[dict]:
    if not EXPECTED_FILE.is_file():
        return []
    return [json.loads(line) for line in EXPECTED_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]


_RECORDS = _expected_records()
_CASE_IDS = [r["id"] for r in _RECORDS if r["kind"] == "case"] or ["missing"]


@pytest.fixture(scope="module")
def real_dir() -> Path:
    """The real vocabulary and the original's outputs; required in CI, optional on a developer machine."""
    if not (REAL_DIR / "ice_text.model").is_file() or not EXPECTED_FILE.is_file():
        message = f"real tokenizer files not found in {REAL_DIR}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return REAL_DIR


@pytest.fixture(scope="module")
def expected(real_dir: Path) -> dict[str, dict]:
    records = {}
    for record in _RECORDS:
        records[record["id"] if record["kind"] != "meta" else "meta"] = record
    return records


@pytest.fixture(scope="module")
def real_tok(real_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ChatGLMTokenizer:
    # The public folder layout: the model, the public config and its remote-code pointer.
    folder = write_tokenizer_files(real_dir / "ice_text.model", tmp_path_factory.mktemp("real"), 0, auto_map=True)
    return ChatGLMTokenizer.from_pretrained(folder)


# --------------------------------------------------------------------------- the real vocabulary


def test_real_meta(real_tok: ChatGLMTokenizer, expected: dict) -> None:
    meta = expected["meta"]
    assert public_tokenizer_config(0) == meta["tokenizer_config"]
    for piece, index in meta["token_ids"].items():
        assert real_tok.convert_tokens_to_ids(piece) == index, piece
        assert real_tok.convert_ids_to_tokens(index) == piece
    for name in ("bos", "eos", "pad", "unk", "mask", "gmask", "end"):
        assert getattr(real_tok, f"{name}_token_id") == meta[f"{name}_token_id"], name
    assert real_tok.vocab_size == meta["tokenizer_vocab_size"] == len(real_tok) == len(real_tok.get_vocab())
    assert real_tok.sp_tokenizer.num_text_tokens == meta["sentencepiece_pieces"]
    assert real_tok.num_image_tokens == meta["num_image_tokens"]
    assert real_tok.padding_side == meta["padding_side"]
    assert real_tok.clean_up_tokenization_spaces is meta["clean_up_tokenization_spaces"]
    assert "auto_map" not in real_tok.init_kwargs


def test_real_split_tokens(real_tok: ChatGLMTokenizer, expected: dict) -> None:
    """Exactly the original's no-split tokens come out of text whole; [gMASK] and </s> go through sentencepiece."""
    for token in expected["meta"]["no_split_tokens"]:
        assert real_tok.tokenize(f"甲{token}乙").count(token) == 1, token
    for literal in ("[gMASK]", "</s>", "<s>", "[sMASK]"):
        assert literal not in real_tok.tokenize(f"甲{literal}乙"), literal
    # Whitespace (any kind) next to a special token is eaten on both sides.
    assert real_tok.tokenize("你好 \n <sop> \t 世界  <eop>") == real_tok.tokenize("你好<sop>世界<eop>")


@pytest.mark.parametrize("case_id", _CASE_IDS)
def test_real_case(real_tok: ChatGLMTokenizer, expected: dict, case_id: str) -> None:
    case = expected[case_id]
    text = case["text"]
    assert real_tok.tokenize(text) == case["tokenize"]
    ids = real_tok.encode(text)
    assert ids == case["encode"]
    assert real_tok.convert_ids_to_tokens(ids) == case["encode_tokens"]
    plain = real_tok.encode(text, add_special_tokens=False)
    assert plain == case["encode_no_special"]
    assert real_tok.decode(ids) == case["decode"]
    assert real_tok.decode(ids, skip_special_tokens=True) == case["decode_no_special"]
    assert real_tok.decode(plain) == case["decode_no_special"]
    assert real_tok(text)["input_ids"] == case["encode"]


def test_real_pair(real_tok: ChatGLMTokenizer, expected: dict) -> None:
    pair = expected["p-pair"]
    ids_a = real_tok.encode(pair["text_a"], add_special_tokens=False)
    ids_b = real_tok.encode(pair["text_b"], add_special_tokens=False)
    assert ids_a == pair["ids_a"] and ids_b == pair["ids_b"]
    assert real_tok.build_inputs_with_special_tokens(ids_a) == pair["build_inputs_single"]
    assert real_tok.build_inputs_with_special_tokens(ids_a, ids_b) == pair["build_inputs_pair"]
    assert real_tok.encode(pair["text_a"], pair["text_b"]) == pair["encode_pair"]
    assert ids_a == pair["ids_a"]  # building inputs leaves its arguments alone


def test_real_batch(real_tok: ChatGLMTokenizer, expected: dict) -> None:
    batch = expected["p-batch"]
    single = real_tok(batch["texts"][0])
    assert sorted(single.keys()) == batch["call_single_keys"]
    assert single["input_ids"] == batch["call_single_input_ids"]

    out = real_tok(batch["texts"], padding=batch["padding"])
    assert sorted(out.keys()) == batch["keys"]
    assert out["input_ids"] == batch["input_ids"]
    assert [np.asarray(m).tolist() for m in out["attention_mask"]] == batch["attention_mask"]
    assert [np.asarray(p).tolist() for p in out["position_ids"]] == batch["position_ids"]

    pt = real_tok(batch["texts"], padding=True, return_tensors="pt")
    assert pt["attention_mask"].dtype == torch.bool and pt["position_ids"].dtype == torch.int64
    assert pt["input_ids"].tolist() == batch["input_ids"]
    assert pt["attention_mask"].tolist() == batch["attention_mask"]
    assert pt["position_ids"].tolist() == batch["position_ids"]


def test_real_seed_layout(real_tok: ChatGLMTokenizer, expected: dict) -> None:
    seed = expected["p-seed-layout"]
    prompt = real_tok.encode(seed["prompt"], add_special_tokens=False) + real_tok.encode(
        seed["text"], add_special_tokens=False
    )
    answer = real_tok.encode(seed["answer"], add_special_tokens=False)
    ids = real_tok.build_inputs_with_special_tokens(prompt, answer)
    assert ids == seed["input_ids"]
    assert real_tok.convert_ids_to_tokens(ids) == seed["tokens"]
    context_length = ids.index(real_tok.bos_token_id)
    assert context_length == seed["context_length"]
    assert [-100] * context_length + ids[context_length:] == seed["labels"]
    assert real_tok.decode(answer) == seed["decode_answer"]


def test_real_earliest_layout(real_dir: Path, expected: dict, tmp_path: Path) -> None:
    """num_image_tokens=20000 shifts every text id; ids below it are image tokens."""
    folder = write_tokenizer_files(real_dir / "ice_text.model", tmp_path, num_image_tokens=20000)
    tok = ChatGLMTokenizer.from_pretrained(folder)
    assert (tok.gmask_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (150001, 150004, 150005, 20003)
    assert tok.mask_token_id == 150000 and tok.unk_token_id == 20000 and tok.end_token_id == 20002
    assert tok.vocab_size == 20000 + expected["meta"]["sentencepiece_pieces"]
    assert tok.convert_ids_to_tokens(7) == "<image_7>" and tok.convert_tokens_to_ids("<image_7>") == 7
    for case_id in ("p01", "p08", "p15"):
        case = expected[case_id]
        ids = tok.encode(case["text"])
        assert ids == [i + 20000 for i in case["encode"]]
        assert tok.decode(ids) == case["decode"]


def test_real_no_dummy_prefix(real_tok: ChatGLMTokenizer, expected: dict) -> None:
    # "你好" alone is ["▁", "你好"]; without the dummy prefix only the word is left.
    assert expected["p01"]["tokenize"] == ["▁", "你好"]
    assert real_tok.sp_tokenizer.tokenize("你好", add_dummy_prefix=False) == ["你好"]
    assert real_tok.sp_tokenizer.encode("你好", add_dummy_prefix=False) == [expected["p01"]["encode"][1]]


def test_trained_vocab_mirrors_real(real_dir: Path, tmp_path: Path) -> None:
    """Fixed pieces, their types and order, and the runtime specs match the real model."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    real = pb.ModelProto()
    real.ParseFromString((real_dir / "ice_text.model").read_bytes())
    path = train_compatible_vocab(
        _corpus(), tmp_path / "ice_text.model", vocab_size=600, reference_model=real_dir / "ice_text.model"
    )
    small = pb.ModelProto()
    small.ParseFromString(path.read_bytes())
    fixed = 8 + 80 + 256
    assert [(p.piece, p.type) for p in small.pieces[-fixed:]] == [(p.piece, p.type) for p in real.pieces[-fixed:]]
    assert [(p.piece, p.type) for p in small.pieces[:5]] == [(p.piece, p.type) for p in real.pieces[:5]]
    assert small.normalizer_spec == real.normalizer_spec
    for field in ("split_digits", "byte_fallback", "pad_id", "unk_id", "bos_id", "eos_id", "user_defined_symbols",
                  "model_type", "treat_whitespace_as_suffix", "unk_surface"):
        assert getattr(small.trainer_spec, field) == getattr(real.trainer_spec, field), field
    assert small.trainer_spec.vocab_size == len(small.pieces) - fixed


# --------------------------------------------------------------------------- a small trained vocabulary

_ZH = (
    "今天 天气 很好 我们 去 公园 散步 吧 机器 学习 是 人工 智能 的 一个 分支 这是 开源 对话 语言 模型 "
    "请 你 帮 我 写 一首 关于 春天 诗 发动机 水温 高 风扇 始终 低速 转动 信息 抽取 关系 内容 三元组 "
    "文本 故障 现象 工作 空调 中国 北京 上海 学生 老师 朋友 时间 问题 数据 训练 推理 生成 回答"
).split()
_EN = (
    "the quick brown fox jumps over lazy dog hello world how are you language models predict next token "
    "training data is important for learning a good tokenizer we write small tests to check behaviour "
    "python code function return value list string number print import"
).split()
_CODE = (
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n\tprint(i)\n",
    "if x > 0:\n        y = x * 2\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n",
)


def _corpus(seed: int = 1234, lines: int = 400) -> list[str]:
    """Deterministic mixed Chinese/English/code lines."""
    rng = random.Random(seed)
    out = []
    for i in range(lines):
        kind = i % 4
        if kind == 0:
            out.append("".join(rng.choice(_ZH) for _ in range(rng.randint(4, 12))) + "。")
        elif kind == 1:
            out.append(" ".join(rng.choice(_EN) for _ in range(rng.randint(4, 12))).capitalize() + ".")
        elif kind == 2:
            out.append(rng.choice(_CODE))
        else:
            zh = [rng.choice(_ZH) for _ in range(3)]
            out.append(f"{zh[0]}{rng.choice(_EN)} {rng.randint(0, 99999)}，{zh[1]}{zh[2]}")
    return out


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_compatible_vocab(_corpus(), tmp_path_factory.mktemp("vocab") / "ice_text.model", vocab_size=600)


@pytest.fixture(scope="module")
def small_sp(small_model: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(small_model))


@pytest.fixture(scope="module")
def small_tok(small_model: Path, tmp_path_factory: pytest.TempPathFactory) -> ChatGLMTokenizer:
    folder = write_tokenizer_files(small_model, tmp_path_factory.mktemp("small"), 0, auto_map=True)
    return ChatGLMTokenizer.from_pretrained(folder)


def test_small_special_ids_come_from_vocab(
    small_tok: ChatGLMTokenizer, small_sp: spm.SentencePieceProcessor
) -> None:
    pieces = {
        "bos": "<sop>", "eos": "<eop>", "pad": "<pad>", "unk": "<unk>",
        "mask": "[MASK]", "gmask": "[gMASK]", "end": "</s>"
    }
    for name, piece in pieces.items():
        assert getattr(small_tok, f"{name}_token_id") == small_sp.piece_to_id(piece), name
    assert small_tok.gmask_token_id != 130001  # a small vocabulary has its own ids
    assert small_tok.vocab_size == small_sp.get_piece_size() == len(small_tok)


def test_small_whitespace_pieces(small_tok: ChatGLMTokenizer) -> None:
    assert "<n>" in small_tok.tokenize("第一\n第二")
    assert "<|tab|>" in small_tok.tokenize("a\tb")
    for run in (2, 3, 17, 80):
        tokens = small_tok.tokenize("x" + " " * run + "y")
        assert [t for t in tokens if t.startswith("<|blank_")] == [blank_token(run)]
    # Longest first: 85 spaces are 80 + 5; 81 leave one ordinary space that becomes "▁".
    tokens = small_tok.tokenize("x" + " " * 85 + "y")
    assert tokens[tokens.index(blank_token(80)) + 1] == blank_token(5)
    tokens = small_tok.tokenize("x" + " " * 81 + "y")
    assert tokens[tokens.index(blank_token(80)) + 1].startswith("▁")
    assert small_tok.tokenize(" ") == [] and small_tok.tokenize("") == []
    assert small_tok.tokenize("\n") == ["▁", "<n>"]


def test_small_encode_layout(small_tok: ChatGLMTokenizer) -> None:
    gmask, sop, eop = small_tok.gmask_token_id, small_tok.bos_token_id, small_tok.eos_token_id
    a = small_tok.encode("今天天气很好", add_special_tokens=False)
    b = small_tok.encode("我们去公园", add_special_tokens=False)
    assert small_tok.encode("今天天气很好") == a + [gmask, sop]
    assert small_tok.encode("今天天气很好", "我们去公园") == a + [gmask, sop] + b + [eop]
    assert small_tok.encode("") == [gmask, sop]
    assert small_tok.get_special_tokens_mask(a, b) == [0] * len(a) + [1, 1] + [0] * len(b) + [1]


def test_small_literal_special_tokens(small_tok: ChatGLMTokenizer) -> None:
    tok = small_tok
    assert tok.tokenize("你好<sop>世界<eop>") == tok.tokenize("你好") + ["<sop>"] + tok.tokenize("世界") + ["<eop>"]
    assert tok.tokenize("你好  \n<sop>\t 世界") == tok.tokenize("你好<sop>世界")
    for literal in ("<pad>", "<unk>", "[MASK]"):
        assert tok.tokenize(f"a {literal} b") == tok.tokenize("a") + [literal] + tok.tokenize("b")
    for literal in ("[gMASK]", "</s>"):
        assert literal not in tok.tokenize(f"a{literal}b")
    assert tok.tokenize("a<sop>b", split_special_tokens=True) == tok.sp_tokenizer.tokenize("a<sop>b")


def _reference_layout(ids: list[int], bos: int, mask: int, gmask: int, length: int) -> tuple[list, list]:
    """GLM mask and positions for one sequence left-padded to ``length``, written out element by element."""
    n, pad = len(ids), length - len(ids)
    context = ids.index(bos) if bos in ids else n
    marker = mask if mask in ids else gmask
    mask_pos = ids.index(marker) if marker in ids else None
    attention = [[True] * length for _ in range(length)]
    for row in range(n):
        for col in range(n):
            attention[pad + row][pad + col] = not (col < context or col <= row)
    first = [0] * pad + [i if (i < context or mask_pos is None) else mask_pos for i in range(n)]
    second = [0] * pad + [0 if i < context else i - context + 1 for i in range(n)]
    return [attention], [first, second]


def test_small_padded_batch(small_tok: ChatGLMTokenizer) -> None:
    tok = small_tok
    texts = ["你好", "Hello world, how are you?", "机器学习[MASK]人工智能", "def add(a, b):\n    return a + b\n"]
    out = tok(texts, padding=True)
    assert sorted(out.keys()) == ["attention_mask", "input_ids", "position_ids"]
    length = max(len(ids) for ids in out["input_ids"])
    for text, ids, attention, positions in zip(texts, out["input_ids"], out["attention_mask"], out["position_ids"]):
        plain = tok.encode(text)
        assert ids == [tok.pad_token_id] * (length - len(plain)) + plain
        want_attention, want_positions = _reference_layout(
            plain, tok.bos_token_id, tok.mask_token_id, tok.gmask_token_id, length
        )
        assert np.asarray(attention).tolist() == want_attention
        assert np.asarray(positions).tolist() == want_positions
    # [MASK] in the prompt replaces [gMASK] as the position the answer hangs off.
    # (positions count from the unpadded start, so the padding is subtracted.)
    third, third_positions = out["input_ids"][2], np.asarray(out["position_ids"][2])
    padding = third.count(tok.pad_token_id)
    assert third_positions[0][-1] == third.index(tok.mask_token_id) - padding

    pt = tok(texts, padding=True, return_tensors="pt")
    assert pt["input_ids"].shape == (4, length)
    assert pt["attention_mask"].shape == (4, 1, length, length) and pt["attention_mask"].dtype == torch.bool
    assert pt["position_ids"].shape == (4, 2, length) and pt["position_ids"].dtype == torch.int64


def test_small_single_sequence_outputs(small_tok: ChatGLMTokenizer) -> None:
    tok = small_tok
    ids = tok.encode("今天天气很好")
    assert sorted(tok("今天天气很好").keys()) == ["input_ids"]
    # As in the original, a known length (here from truncation) is enough for the masks, even unpadded.
    truncated = tok("今天天气很好", truncation=True, max_length=64)
    assert truncated["input_ids"] == ids
    attention, positions = _reference_layout(ids, tok.bos_token_id, tok.mask_token_id, tok.gmask_token_id, len(ids))
    assert truncated["attention_mask"].tolist() == attention and truncated["position_ids"].tolist() == positions
    padded = tok("今天天气很好", padding="max_length", max_length=len(ids) + 3, return_tensors="pt")
    assert padded["input_ids"].tolist() == [[tok.pad_token_id] * 3 + ids]
    attention, positions = _reference_layout(ids, tok.bos_token_id, tok.mask_token_id, tok.gmask_token_id, len(ids) + 3)
    assert padded["attention_mask"].tolist() == [attention]
    assert padded["position_ids"].tolist() == [positions]
    multiple = tok(["今天", "天气很好"], padding=True, pad_to_multiple_of=8)
    assert all(len(row) % 8 == 0 for row in multiple["input_ids"])
    no_mask = tok(["今天", "天气很好"], padding=True, return_attention_mask=False)
    assert "attention_mask" not in no_mask and "position_ids" in no_mask
    right = tok(["今天", "天气很好"], padding=True, padding_side="right")
    short = tok.encode("今天")
    assert right["input_ids"][0][: len(short)] == short and right["position_ids"][0][:, len(short):].sum() == 0


_ROUND_TRIPS = (
    "今天天气很好。",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n\tprint(i)\n\n",
    "  leading and trailing  ",
    "x" + " " * 85 + "y",
    "emoji 😀👍🏻 and rare 𠀀𪚥",
    "混合 mixed 文本 text 123 456",
    "\n\n",
    "",
)


@pytest.mark.parametrize("text", _ROUND_TRIPS)
def test_small_round_trip(small_tok: ChatGLMTokenizer, text: str) -> None:
    ids = small_tok.encode(text)
    assert small_tok.decode(ids) == text
    assert small_tok.decode(ids, skip_special_tokens=True) == text
    assert small_tok.decode([small_tok.pad_token_id] * 3 + ids) == text


def test_small_decode_details(small_tok: ChatGLMTokenizer) -> None:
    tok = small_tok
    batch = tok(["今天", "Hello world."], padding=True)["input_ids"]
    assert tok.decode(batch) == ["今天", "Hello world."]
    assert tok.batch_decode(torch.tensor(batch)) == ["今天", "Hello world."]
    # transformers 4.30's clean-up of spaces before punctuation is on by default.
    assert tok.decode(tok.encode("Hello , world !")) == "Hello, world!"
    assert tok.decode(tok.encode("Hello , world !"), clean_up_tokenization_spaces=False) == "Hello , world !"
    assert tok.decode(tok.encode("你好<sop>世界<eop>")) == "你好 世界"
    assert tok.decode(tok.unk_token_id, skip_special_tokens=True) == ""
    assert tok.decode([]) == ""


def test_small_image_offset(small_model: Path, small_sp: spm.SentencePieceProcessor, tmp_path: Path) -> None:
    tok = ChatGLMTokenizer.from_pretrained(write_tokenizer_files(small_model, tmp_path, num_image_tokens=20000))
    assert tok.gmask_token_id == small_sp.piece_to_id("[gMASK]") + 20000
    assert tok.pad_token_id == small_sp.piece_to_id("<pad>") + 20000
    text = "今天天气很好\n  ok"
    plain_ids = small_sp.encode(text.replace("\n", "<n>").replace("  ", "<|blank_2|>"))
    assert tok.encode(text, add_special_tokens=False) == [i + 20000 for i in plain_ids]
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == 20000 + small_sp.get_piece_size()


def test_small_save_and_reload(small_tok: ChatGLMTokenizer, small_model: Path, tmp_path: Path) -> None:
    small_tok.save_pretrained(tmp_path)
    assert (tmp_path / "ice_text.model").read_bytes() == small_model.read_bytes()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config == public_tokenizer_config(0)  # public form, no auto_map
    again = ChatGLMTokenizer.from_pretrained(tmp_path)
    for text in _ROUND_TRIPS:
        assert again.encode(text) == small_tok.encode(text)
    assert again.tokenize("a[gMASK]b") == small_tok.tokenize("a[gMASK]b")


def test_small_save_offset_layout(small_model: Path, tmp_path: Path) -> None:
    tok = ChatGLMTokenizer(vocab_file=small_model, num_image_tokens=20000)
    tok.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert saved == public_tokenizer_config(20000)
    assert ChatGLMTokenizer.from_pretrained(tmp_path / "out").gmask_token_id == tok.gmask_token_id


def test_auto_tokenizer_without_remote_code(small_model: Path, small_tok: ChatGLMTokenizer, tmp_path: Path) -> None:
    folder = write_tokenizer_files(small_model, tmp_path, 0, auto_map=True)
    config = {
        "model_type": "chatglm",
        "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig"},
        "vocab_size": small_tok.vocab_size,
        "bos_token_id": small_tok.bos_token_id,
        "eos_token_id": small_tok.eos_token_id,
        "mask_token_id": small_tok.mask_token_id,
        "gmask_token_id": small_tok.gmask_token_id,
        "pad_token_id": small_tok.pad_token_id,
    }
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    assert json.loads((folder / "tokenizer_config.json").read_text())["auto_map"] == PUBLIC_AUTO_MAP
    from transformers import AutoConfig

    AutoConfig.register(ChatGLMConfig.model_type, ChatGLMConfig, exist_ok=True)
    register_auto_tokenizer()
    register_auto_tokenizer()  # idempotent
    tok = AutoTokenizer.from_pretrained(folder)
    assert type(tok) is ChatGLMTokenizer
    assert tok.encode("你好\n世界") == small_tok.encode("你好\n世界")


def test_rejects_foreign_vocabulary(tmp_path: Path) -> None:
    import io

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(lines=80)), model_writer=buffer, vocab_size=200, hard_vocab_limit=False,
        num_threads=1, minloglevel=2,
    )
    (tmp_path / "plain.model").write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match="gMASK"):
        ChatGLMTokenizer(vocab_file=tmp_path / "plain.model", num_image_tokens=0)


def test_padded_batch_drives_generate(small_tok: ChatGLMTokenizer) -> None:
    """``model.generate(**tokenizer(batch, padding=True, return_tensors="pt"))`` runs, each row as if alone."""
    from chatglm import ChatGLMForConditionalGeneration

    tok = small_tok
    torch.manual_seed(0)
    config = ChatGLMConfig(
        vocab_size=tok.vocab_size, hidden_size=64, num_layers=2, num_attention_heads=4, inner_hidden_size=160,
        max_sequence_length=128, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        mask_token_id=tok.mask_token_id, gmask_token_id=tok.gmask_token_id, pad_token_id=tok.pad_token_id,
    )
    model = ChatGLMForConditionalGeneration(config).eval()
    texts = ["你好", "Hello world, how are you?"]
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=4, do_sample=False)
        for row, text in enumerate(texts):
            alone = tok([text], return_tensors="pt", padding=True)
            single = model.generate(**alone, max_new_tokens=4, do_sample=False)
            assert single[0, alone["input_ids"].shape[1]:].tolist() == out[row, batch["input_ids"].shape[1]:].tolist()
