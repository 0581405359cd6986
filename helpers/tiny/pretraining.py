"""The tiny model's pretraining data: plain continuation plus instruction-style exercises made from the corpus.

The real ChatGLM-6B reads a text, copies spans out of it and follows an instruction before it is ever fine-tuned;
fine-tuning only adapts those skills. The tiny stand-in gets them in miniature from exercises generated out of the
bundled general corpus (never from the three tasks' files): continue a text, repeat it, find the sentence that
starts with given characters, split a text into its clauses one per line, write ``subject_relation_object``
lines for the relations an instruction names (the relation word itself, or a label for it from a list, as a
task's schema names relations), pick the option of a list that the text mentions, and ask a question about a
passage. Texts are made new before they are copied from: clauses shuffled and spans replaced by random pieces of
the vocabulary, so that the model must read its input and every piece is seen and copied. Every exercise is
``instruction + text [gMASK] <sop> answer <eop>`` with the loss on the answer, the layout of the course's tasks.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

SENTENCE_END = re.compile(r"(?<=[。！？!?])")
CLAUSE = re.compile(r"[^，。；：、！？,.;:!?“”‘’（）()《》「」\s]+")
# Relation words of the triple exercise: frequent verbs of the corpus, each a relation of its own.
RELATION_WORDS = ("包括", "需要", "可以", "导致", "出现", "组成", "属于", "影响", "变得", "是", "有", "用", "能")
# In half of the triple exercises the middle of a triple is not copied but named, the way a task's schema names
# its relations: each relation word stands for one of these labels, and the instruction lists the labels asked.
RELATION_LABELS = {"包括": "包含", "组成": "包含", "需要": "需求", "导致": "因果", "影响": "因果", "可以": "能力",
                   "能": "能力", "出现": "变化", "变得": "变化", "属于": "类属", "是": "类属", "有": "拥有",
                   "用": "用途"}


@dataclass(frozen=True)
class Corpus:
    """The lines exercises are made from, and what novel spans are drawn from: the vocabulary's pieces when given
    (so that every piece, however rare in the corpus, is read and copied in pretraining), else the corpus's
    characters (with repeats)."""

    lines: Sequence[str]
    characters: str
    pieces: Sequence[str] = ()

    @classmethod
    def of(cls, lines: Sequence[str], pieces: Sequence[str] = ()) -> Corpus:
        usable = tuple(p for p in pieces if CLAUSE.fullmatch(p) and "_" not in p)  # "_" separates triples
        return cls(lines, "".join(CLAUSE.findall("".join(lines))), usable)

    def fresh_span(self, rng: random.Random, size: int) -> str:
        """A random span to put into a text: one or two vocabulary pieces, else ``size`` corpus characters."""
        if self.pieces:
            return "".join(rng.choice(self.pieces) for _ in range(rng.randint(1, 2)))
        return "".join(rng.choice(self.characters) for _ in range(size))


@dataclass(frozen=True)
class Exercise:
    """One pretraining row before tokenization: ``instruction`` and ``text`` are the source, ``answer`` the target."""

    kind: str
    instruction: str
    text: str
    answer: str


def sentences(line: str) -> list[str]:
    return [s for s in SENTENCE_END.split(line) if s.strip()]


def clauses(text: str) -> list[str]:
    """The runs of text between punctuation marks (the unit the exercises copy)."""
    return CLAUSE.findall(text)


def window(line: str, rng: random.Random, max_chars: int) -> str:
    """A random run of whole sentences of ``line``, at most ``max_chars`` characters (a long sentence is cut)."""
    parts = sentences(line)
    start = rng.randrange(len(parts))
    text = parts[start]
    for part in parts[start + 1 :]:
        if len(text) + len(part) > max_chars:
            break
        text += part
    return text[:max_chars]


def novel(text: str, rng: random.Random, corpus: Corpus) -> str:
    """``text`` made new: its clauses shuffled, and in most of them a span of 2-4 characters replaced by a random
    one (:meth:`Corpus.fresh_span`).

    A model that has memorized the corpus still has to read such a text to copy from it, as it must read a
    task's input.
    """
    pieces = re.split(f"({CLAUSE.pattern})", text)
    slots = [i for i, piece in enumerate(pieces) if CLAUSE.fullmatch(piece)]
    shuffled = [pieces[i] for i in slots]
    rng.shuffle(shuffled)
    for i, clause in zip(slots, shuffled):
        if len(clause) >= 3 and rng.random() < 0.7:
            size = rng.randint(2, min(4, len(clause)))
            start = rng.randint(0, len(clause) - size)
            fresh = corpus.fresh_span(rng, size)
            clause = clause[:start] + fresh + clause[start + size :]
        pieces[i] = clause
    return "".join(pieces)


def continuation(line: str, rng: random.Random, corpus: Corpus) -> Exercise | None:
    text = line[:240]
    cut = rng.randint(0, max(0, len(text) - 8))
    return Exercise("continue", "", text[:cut], text[cut:])


def repeat(line: str, rng: random.Random, corpus: Corpus) -> Exercise | None:
    text = novel(window(line, rng, rng.randint(20, 90)), rng, corpus)
    instruction = rng.choice(("请原样重复下面这段话：", "把下面的文字抄写一遍：", "请复述："))
    return Exercise("repeat", instruction, text, text)


def find_clause(line: str, rng: random.Random, corpus: Corpus) -> Exercise | None:
    text = novel(window(line, rng, rng.randint(40, 140)), rng, corpus)
    parts = [c for c in clauses(text) if len(c) >= 4]
    starts = [c[:2] for c in parts]
    unique = [c for c in parts if starts.count(c[:2]) == 1]
    if not unique:
        return None
    clause = rng.choice(unique)
    instruction = rng.choice((f"下面文字中以“{clause[:2]}”开头的短句是什么？请照原文写出。文字：",
                              f"请找出文中由“{clause[:2]}”开始、到标点为止的那一句。文本："))
    return Exercise("find", instruction, text, clause)


def split_clauses(line: str, rng: random.Random, corpus: Corpus) -> Exercise | None:
    text = novel(window(line, rng, rng.randint(30, 100)), rng, corpus)
    parts = clauses(text)[:8]
    if len(parts) < 2:
        return None
    instruction = rng.choice(("请把下面的文字按标点拆成短句，每行一个：", "逐行列出这段话里的每一个短句。文本："))
    return Exercise("split", instruction, text, "\n".join(parts))


def relation_triples(line: str, rng: random.Random, corpus: Corpus) -> Exercise | None:
    """``subject_relation_object`` for the clauses holding a named relation word: the clause before it, the rest after.

    Only clauses whose two sides are short (2-8 and 2-10 characters) count, so the spans are word-like.
    """
    text = novel(window(line, rng, rng.randint(50, 150)), rng, corpus)
    present = [w for w in RELATION_WORDS if w in text]
    if not present or "_" in text:  # "_" is the separator of the answer
        return None
    asked = rng.sample(present, min(len(present), rng.randint(1, 3)))
    decoys = rng.sample([w for w in RELATION_WORDS if w not in present], rng.randint(0, 2))
    listed = asked + decoys
    rng.shuffle(listed)
    pattern = re.compile("|".join(sorted(asked, key=len, reverse=True)))
    named = rng.random() < 0.5  # the middle is a label of RELATION_LABELS, not the word itself
    middle = RELATION_LABELS.get if named else str
    triples = []
    for clause in clauses(text):
        match = pattern.search(clause)
        if match and 2 <= match.start() <= 8 and 2 <= len(clause) - match.end() <= 10:
            triples.append(f"{clause[: match.start()]}_{middle(match.group())}_{clause[match.end():]}")
    if not triples:
        return None
    if named:
        names = list(dict.fromkeys(RELATION_LABELS[w] for w in listed))
        names = ", ".join(f'"{w}"' for w in names[:-1]) + f'和 "{names[-1]}"' if len(names) > 1 else f'"{names[0]}"'
        instruction = rng.choice((
            f'请抽取出关系内容为{names}的相关三元组，三元组内部用"_"连接，三元组之间换行。文本：',
            f'下面的句子里有哪些{names}关系？按“前面的词_关系名_后面的词”每行写一个。句子：',
        ))
    else:
        names = ", ".join(f'"{w}"' for w in listed)
        instruction = rng.choice((
            f'请抽取文本中关系为{names}的三元组，三元组内部用"_"连接，三元组之间换行。文本：',
            f'找出下面句子里的{names}关系，按“前面的词_关系_后面的词”每行写一个。句子：',
        ))
    return Exercise("triples", instruction, text, "\n".join(dict.fromkeys(triples)))


def pick_option(line: str, rng: random.Random, corpus: Corpus) -> Exercise | None:
    """Which option of a list (2-character words, 4 to 15 of them) the text mentions."""
    text = novel(window(line, rng, rng.randint(15, 80)), rng, corpus)
    words = [c[i : i + 2] for c in clauses(text) for i in range(0, len(c) - 1, 2)]
    if not words:
        return None
    answer = rng.choice(words)
    decoys: list[str] = []
    for _ in range(60):
        if len(decoys) >= rng.randint(3, 14):
            break
        other = clauses(rng.choice(corpus.lines))
        if other:
            piece = rng.choice(other)
            if len(piece) >= 2:
                start = rng.randrange(len(piece) - 1)
                word = piece[start : start + 2]
                if word not in text and word not in decoys:
                    decoys.append(word)
    options = decoys + [answer]
    rng.shuffle(options)
    instruction = rng.choice((f"下面这段话提到了哪一个词？选项有：{'、'.join(options)}。这段话：",
                              f"请判断文本中出现的是哪个词，候选词：{'、'.join(options)}。文本："))
    return Exercise("pick", instruction, text, answer)


def ask_question(line: str, rng: random.Random, corpus: Corpus) -> Exercise | None:
    """A question whose words come from the passage: the corpus's own document/question lines, else a template."""
    if line.startswith("文档：") and "问题：" in line:
        text, answer = line[3:].split("问题：", 1)
    else:
        text = novel(window(line, rng, rng.randint(40, 160)), rng, corpus)
        parts = [c for c in clauses(text) if 5 <= len(c) <= 16 and not c.endswith(("吗", "呢"))]
        if not parts:
            return None
        clause = rng.choice(parts)
        templates = {"是": "{head}是什么？", "可以": "{head}可以做什么？", "需要": "{head}需要注意什么？",
                     "会": "{head}会怎么样？", "有": "{head}有什么？"}
        word = next((w for w in templates if w in clause[2:-1]), None)
        if word:
            answer = templates[word].format(head=clause[: clause.index(word, 2)])
        else:
            answer = rng.choice(("为什么说{c}？", "{c}是怎么回事？", "文中为什么提到{c}？")).format(c=clause)
    instruction = rng.choice(("请根据下面这段话提一个问题，这段话：", "读完下文，写一个可以用它回答的问题。下文："))
    return Exercise("question", instruction, text, answer)


# Share of each kind in a pass over the corpus (an exercise that does not fit a line falls back to continuation).
MIX: dict[str, tuple[float, Callable]] = {
    "continue": (0.20, continuation),
    "repeat": (0.10, repeat),
    "find": (0.10, find_clause),
    "split": (0.10, split_clauses),
    "triples": (0.25, relation_triples),
    "pick": (0.10, pick_option),
    "question": (0.15, ask_question),
}


def exercises(lines: Sequence[str], rng: random.Random, pieces: Sequence[str] = ()) -> list[Exercise]:
    """One pass over ``lines``: one exercise per line, its kind drawn by :data:`MIX`; deterministic in ``rng``.

    ``pieces`` (the vocabulary's, :func:`helpers.tiny.span_pieces`) are what novel spans are made of.
    """
    kinds = list(MIX)
    weights = [MIX[k][0] for k in kinds]
    corpus = Corpus.of(lines, pieces)
    rows = []
    for line in lines:
        kind = rng.choices(kinds, weights)[0]
        row = MIX[kind][1](line, rng, corpus)
        if row is None or not row.answer.strip():
            row = continuation(line, rng, corpus)
        rows.append(row)
    return rows
