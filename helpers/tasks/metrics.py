"""The metrics of the tasks: triple F1 for IE, BLEU / ROUGE-L / diversity for question generation, accuracy /
macro-F1 for classification, and for every task the share of answers that loop (:func:`repetition_rate`).

Generation metrics count characters (whitespace dropped): the answers are Chinese, and the tiny model's vocabulary
differs from the real one's, so characters are the unit both share.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def repeats_ngram(tokens: Sequence[str], n: int = 3, times: int = 3) -> bool:
    """Whether some ``n``-gram of ``tokens`` occurs at least ``times`` times (overlapping occurrences count)."""
    counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    return any(count >= times for count in counts.values())


def is_repetitive(prediction: str, tokenizer: PreTrainedTokenizerBase | None = None, n: int = 3,
                  times: int = 3) -> bool:
    """Whether an answer loops: some ``n``-token n-gram occurs ``times`` times within one line, or a line does.

    Tokens are the tokenizer's pieces (characters, whitespace dropped, without a tokenizer). N-grams are taken
    line by line because an IE answer is one triple per line and a relation name rightly recurs across lines
    (with the tiny model's vocabulary 19 % of the bundled IE training answers would count as loops otherwise);
    a line repeated ``times`` times is a loop of its own.
    """
    lines = [line.strip() for line in prediction.split("\n") if line.strip()]
    if any(count >= times for count in Counter(lines).values()):
        return True
    for line in lines:
        tokens = tokenizer.tokenize(line) if tokenizer is not None else characters(line)
        if repeats_ngram(tokens, n, times):
            return True
    return False


def repetition_rate(predictions: Sequence[str], tokenizer: PreTrainedTokenizerBase | None = None, n: int = 3,
                    times: int = 3) -> float:
    """Share of predictions that loop (:func:`is_repetitive`): a degenerate model scores near 1, a good one 0."""
    return _ratio(sum(is_repetitive(p, tokenizer, n, times) for p in predictions), len(predictions))


def _check_lengths(predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} references; "
                         "give one reference entry per prediction")


def _ratio(part: float, whole: float) -> float:
    return part / whole if whole else 0.0


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def triples(text: str) -> set[str]:
    """The set of triples of an IE answer: its non-empty lines, stripped."""
    return {line.strip() for line in text.split("\n") if line.strip()}


def ie_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """Triple precision/recall/F1: micro over all triples, and the original course's per-sample mean.

    Micro: triples are the non-empty lines, compared as sets per example; no triple anywhere gives 0.
    Per-sample (the original ``predict_*.py``): predicted triples are the lines with exactly three ``_``-parts,
    gold triples are *all* lines, so an empty gold answer counts as one unmatchable triple and that example
    scores 0 whatever the prediction; no predicted triple gives P = 0; F1 = 2PR/(P+R) or 0; mean over examples.
    ``char_f1`` is a soft score for weak models: the F1 of the characters shared by answer and gold (as bags).
    """
    _check_lengths(predictions, references)
    hits = predicted = gold = 0
    sample_p, sample_r, sample_f = [], [], []
    char_f = [char_f1(p, r) for p, r in zip(predictions, references)]
    for prediction, reference in zip(predictions, references):
        pred, ref = triples(prediction), triples(reference)
        hits += len(pred & ref)
        predicted += len(pred)
        gold += len(ref)
        pred_lines = {line for line in prediction.split("\n") if len(line.split("_")) == 3}
        gold_lines = set(reference.split("\n"))
        same = len(pred_lines & gold_lines)
        p, r = _ratio(same, len(pred_lines)), _ratio(same, len(gold_lines))
        sample_p.append(p)
        sample_r.append(r)
        sample_f.append(_f1(p, r))
    n = len(predictions)
    precision, recall = _ratio(hits, predicted), _ratio(hits, gold)
    return {
        "precision": precision,
        "recall": recall,
        "f1": _f1(precision, recall),
        "sample_precision": _ratio(sum(sample_p), n),
        "sample_recall": _ratio(sum(sample_r), n),
        "sample_f1": _ratio(sum(sample_f), n),
        "char_f1": _ratio(sum(char_f), n),
        "n": n,
    }


def char_f1(prediction: str, reference: str) -> float:
    """F1 of the characters two texts share, counted as bags (whitespace ignored); 1.0 when both are empty."""
    pred, ref = Counter(characters(prediction)), Counter(characters(reference))
    if not pred and not ref:
        return 1.0
    common = sum((pred & ref).values())
    return _f1(_ratio(common, sum(pred.values())), _ratio(common, sum(ref.values())))


def characters(text: str) -> list[str]:
    """Character tokens of a text, whitespace dropped (the unit of every generation metric)."""
    return [c for c in text if not c.isspace()]


class _CharTokenizer:
    """A rouge-score tokenizer that splits into characters."""

    def tokenize(self, text: str) -> list[str]:
        return characters(text)


def distinct_n(predictions: Sequence[str], n: int) -> float:
    """Distinct character n-grams / all character n-grams over every prediction (0 when there are none)."""
    grams: Counter = Counter()
    for prediction in predictions:
        chars = characters(prediction)
        grams.update(tuple(chars[i : i + n]) for i in range(len(chars) - n + 1))
    return _ratio(len(grams), sum(grams.values()))


def duplicate_rate(predictions: Sequence[str]) -> float:
    """Share of predictions that are exactly equal to some other prediction (both copies count)."""
    counts = Counter(predictions)
    return _ratio(sum(c for c in counts.values() if c > 1), len(predictions))


def gen_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Character-level BLEU-4 (sacrebleu, corpus) and ROUGE-L F (best reference, averaged), distinct-1/2, duplicates.

    Each example may have several references (ragged lists are fine); scores are on a 0..1 scale.
    """
    import sacrebleu
    from rouge_score import rouge_scorer

    _check_lengths(predictions, references)
    references = [[r] if isinstance(r, str) else list(r) for r in references]
    if any(not refs for refs in references):
        raise ValueError("every prediction needs at least one reference")
    n = len(predictions)
    if n == 0:
        return {"bleu": 0.0, "rouge_l": 0.0, "distinct_1": 0.0, "distinct_2": 0.0, "duplicate_rate": 0.0, "n": 0}
    # sacrebleu wants reference streams (the k-th reference of every example); None marks a missing one.
    width = max(len(refs) for refs in references)
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]
    bleu = sacrebleu.corpus_bleu(list(predictions), streams, tokenize="char").score / 100
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_CharTokenizer())
    rouge = sum(scorer.score_multi(refs, p)["rougeL"].fmeasure for p, refs in zip(predictions, references)) / n
    return {
        "bleu": bleu,
        "rouge_l": rouge,
        "distinct_1": distinct_n(predictions, 1),
        "distinct_2": distinct_n(predictions, 2),
        "duplicate_rate": duplicate_rate(predictions),
        "n": n,
    }


def cls_scores(predictions: Sequence[str], references: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 and the share of predictions outside ``labels`` (which count as wrong).

    Macro-F1 averages the per-label F1 over the labels that occur among the references or predictions.
    """
    _check_lengths(predictions, references)
    label_set = set(labels)
    unknown = sorted(set(references) - label_set)
    if unknown:
        raise ValueError(f"reference label {unknown[0]!r} is not among the labels ({', '.join(labels)})")
    predictions = [p.strip() for p in predictions]
    n = len(predictions)
    pairs = list(zip(predictions, references))
    present = [label for label in labels if label in set(references) | set(predictions)]
    f1s = []
    for label in present:
        tp = sum(p == label and r == label for p, r in pairs)
        fp = sum(p == label and r != label for p, r in pairs)
        fn = sum(p != label and r == label for p, r in pairs)
        f1s.append(_ratio(2 * tp, 2 * tp + fp + fn))
    return {
        "accuracy": _ratio(sum(p == r for p, r in pairs), n),
        "macro_f1": _ratio(sum(f1s), len(f1s)),
        "invalid_rate": _ratio(sum(p not in label_set for p in predictions), n),
        "n": n,
    }
