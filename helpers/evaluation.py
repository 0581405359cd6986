"""Evaluation: batched greedy generation, the metrics of each task, label ranking and perplexity.

``evaluate`` runs a model over test examples and scores the answers with the task's metrics: triple F1 for
IE, BLEU / ROUGE-L / diversity for question generation, accuracy / macro-F1 for classification, and for every
task the share of answers that loop (``repetition_rate``). Generation stops at ``<eop>``; its token budget
comes from the training answers (:func:`answer_token_budget`). The forgetting check compares the perplexity
of held-out plain text before and after fine-tuning.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from . import data
from .data import IGNORE_INDEX, Example, Task
from .errors import UserError
from .files import write_json, write_text
from .methods import mixed_precision

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

MAIN_METRIC = {"ie": "f1", "gen": "rouge_l", "cls": "accuracy"}


def _task(task: str | Task) -> Task:
    return data.get_task(task) if isinstance(task, str) else task


def _device(model) -> torch.device:
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


def _token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text)) if text else []


class _EvalMode:
    """Eval mode without gradients (and autocast for mixed dtypes); restores the training flag afterwards."""

    def __init__(self, model) -> None:
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.contexts = contextlib.ExitStack()
        self.contexts.enter_context(torch.no_grad())
        self.contexts.enter_context(mixed_precision(self.model))  # fp32 trained tensors in a bf16/fp16 model
        self.model.eval()
        return self.model

    def __exit__(self, *exc) -> None:
        self.model.train(self.was_training)
        self.contexts.close()


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


# ----------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------


def generate_answers(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: str | Task,
    texts: Sequence[str],
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    progress: bool = True,
) -> list[str]:
    """Greedy answers for ``texts`` in the task's prompt layout, batched with left padding, in input order.

    Texts are sorted by length before batching (less padding); each row gives what it would give alone.
    """
    task = _task(task)
    max_new_tokens = max_new_tokens or task.max_target_length + 1
    prompts = [data.prompt_ids(tokenizer, task, text) for text in texts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    answers: list[str] = [""] * len(prompts)
    device = _device(model)
    eos = tokenizer.eos_token_id
    with _EvalMode(model), _progress(len(prompts), f"generate {task.name}", progress) as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = data.left_pad([prompts[i] for i in rows], tokenizer.pad_token_id)
            output = model.generate(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
            )
            new_tokens = output[:, batch["input_ids"].shape[1] :].tolist()
            for i, ids in zip(rows, new_tokens):
                if eos in ids:
                    ids = ids[: ids.index(eos)]
                answers[i] = tokenizer.decode(ids, skip_special_tokens=True).strip()
            bar.update(len(rows))
    return answers


def answer_token_budget(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], margin: float = 0.25, cap: int | None = None
) -> int:
    """``max_new_tokens`` for a task: its longest training answer in tokens, plus ``margin`` of it, plus ``<eop>``.

    Generation stops at ``<eop>``; this budget only bounds a model that never emits it, so that a looping
    answer costs at most a little more than the longest real one. ``cap`` bounds the answer tokens (e.g. the
    task's ``max_target_length``, which training cuts answers to).
    """
    if not examples:
        raise ValueError("answer_token_budget needs at least one training example")
    longest = max(len(_token_ids(tokenizer, answer)) for e in examples for answer in (e.answer, *e.references))
    budget = max(1, math.ceil(longest * (1 + margin)))
    return (min(budget, cap) if cap else budget) + 1


# ----------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# Likelihood scoring
# ----------------------------------------------------------------------------------------------------------


def _sequence_log_probs(model, rows: list[dict[str, list[int]]], pad_token_id: int) -> tuple[list[float], list[int]]:
    """Sum of log-probabilities of the labelled tokens of each row, and their count (one right-padded batch)."""
    batch = data.Collator(pad_token_id)(rows)
    device = _device(model)
    logits = model(input_ids=batch["input_ids"].to(device), use_cache=False).logits
    targets = batch["labels"][:, 1:].to(logits.device)
    log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)
    keep = targets != IGNORE_INDEX
    picked = log_probs.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * keep
    return picked.sum(dim=1).tolist(), keep.sum(dim=1).tolist()


def _score_rows(model, rows, pad_token_id: int, batch_size: int, progress: bool, desc: str):
    """Scores of many rows, batched by length (longest first), returned in input order."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]), reverse=True)
    sums, counts = [0.0] * len(rows), [0] * len(rows)
    with _EvalMode(model), _progress(len(rows), desc, progress) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            chunk_sums, chunk_counts = _sequence_log_probs(model, [rows[i] for i in chunk], pad_token_id)
            for i, s, c in zip(chunk, chunk_sums, chunk_counts):
                sums[i], counts[i] = s, c
            bar.update(len(chunk))
    return sums, counts


def answer_row(tokenizer: PreTrainedTokenizerBase, task: str | Task, text: str, answer: str) -> dict[str, list[int]]:
    """The training row of (text, answer) with labels on the answer tokens and ``<eop>`` only (not ``<sop>``)."""
    row = data.encode_example(tokenizer, _task(task), Example(text, answer))
    labels = list(row["labels"])
    labels[labels.index(tokenizer.bos_token_id)] = IGNORE_INDEX
    return {"input_ids": row["input_ids"], "labels": labels}


def label_log_probs(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: str | Task,
    texts: Sequence[str],
    labels: Sequence[str],
    batch_size: int = 16,
    progress: bool = False,
) -> list[list[float]]:
    """For each text, the summed log-probability of every label (its tokens then ``<eop>``) after the prompt."""
    rows = [answer_row(tokenizer, task, text, label) for text in texts for label in labels]
    sums, _ = _score_rows(model, rows, tokenizer.pad_token_id, batch_size, progress, "rank labels")
    return [sums[i * len(labels) : (i + 1) * len(labels)] for i in range(len(texts))]


def rank_labels(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: str | Task,
    texts: Sequence[str],
    labels: Sequence[str],
    batch_size: int = 16,
    progress: bool = False,
) -> list[str]:
    """Classify by likelihood: for each text the label whose answer (tokens + ``<eop>``) is most probable."""
    scores = label_log_probs(model, tokenizer, task, texts, labels, batch_size, progress)
    return [labels[max(range(len(labels)), key=row.__getitem__)] for row in scores]


def perplexity(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    batch_size: int = 8,
    max_length: int = 256,
    progress: bool = False,
) -> float:
    """Perplexity of plain texts, each laid out ``[gMASK] <sop> text <eop>`` (loss on text and ``<eop>``).

    exp of the token-weighted mean negative log-likelihood over all texts; texts are cut to ``max_length`` tokens
    in all.
    """
    start = [tokenizer.gmask_token_id, tokenizer.bos_token_id]
    rows = []
    for text in texts:
        ids = start + _token_ids(tokenizer, text)[: max(max_length - 3, 0)] + [tokenizer.eos_token_id]
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * 2 + ids[2:]})
    if not rows:
        raise ValueError("perplexity needs at least one text")
    sums, counts = _score_rows(model, rows, tokenizer.pad_token_id, batch_size, progress, "perplexity")
    return math.exp(-sum(sums) / sum(counts))


def heldout_texts(limit: int | None = None) -> list[str]:
    """The non-empty lines of the bundled held-out corpus (plain text the course never trains on)."""
    lines = (data.DATA_DIR / "corpus" / "heldout.txt").read_text(encoding="utf-8").splitlines()
    texts = [line.strip() for line in lines if line.strip()]
    return texts[:limit] if limit else texts


def forgetting(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str] | None = None,
    batch_size: int = 8,
    max_length: int = 256,
    progress: bool = False,
) -> float:
    """Perplexity on held-out plain text (the bundled corpus by default): compare before and after fine-tuning."""
    texts = heldout_texts() if texts is None else texts
    return perplexity(model, tokenizer, texts, batch_size=batch_size, max_length=max_length, progress=progress)


# ----------------------------------------------------------------------------------------------------------
# Whole evaluation
# ----------------------------------------------------------------------------------------------------------


def evaluate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: str | Task,
    examples: Sequence[Example],
    out_dir: str | os.PathLike | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    limit: int | None = None,
    progress: bool = True,
    rank: bool = True,
    save_metrics: bool = True,
    train_examples: Sequence[Example] | None = None,
) -> dict[str, Any]:
    """Generate answers for ``examples`` and score them with the task's metrics; optionally save both.

    ``max_new_tokens`` defaults to :func:`answer_token_budget` of ``train_examples`` (the task's bundled training
    split when not given), capped at the task's ``max_target_length``. With ``out_dir``: ``metrics.json`` and
    ``predictions.jsonl`` (text, prediction, references per example); ``save_metrics=False`` writes only the
    predictions.
    """
    task = _task(task)
    examples = list(examples[:limit] if limit else examples)
    if not examples:
        raise UserError("no examples to evaluate: examples is empty; give at least one (helpers.load_split(task, "
                        "'test'))")
    if max_new_tokens is None:
        train_examples = data.load_split(task.name, "train") if train_examples is None else train_examples
        max_new_tokens = answer_token_budget(tokenizer, train_examples, cap=task.max_target_length)
    started = time.perf_counter()
    texts = [e.text for e in examples]
    predictions = generate_answers(model, tokenizer, task, texts, batch_size, max_new_tokens, progress)
    if task.name == "ie":
        metrics = ie_scores(predictions, [e.targets[0] for e in examples])
    elif task.name == "gen":
        metrics = gen_scores(predictions, [e.targets for e in examples])
    elif task.name == "cls":
        gold = [e.targets[0] for e in examples]
        metrics = cls_scores(predictions, gold, task.labels)
        if rank:
            ranked = rank_labels(model, tokenizer, task, texts, task.labels, batch_size * 2, progress)
            scores = cls_scores(ranked, gold, task.labels)
            metrics.update(rank_accuracy=scores["accuracy"], rank_macro_f1=scores["macro_f1"])
    else:
        raise ValueError(f"no metrics for task {task.name!r}; known tasks: {', '.join(MAIN_METRIC)}")
    metrics["repetition_rate"] = repetition_rate(predictions, tokenizer)
    metrics = {"task": task.name, "main_metric": MAIN_METRIC[task.name], **metrics,
               "eval_seconds": time.perf_counter() - started}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if save_metrics:  # False: the caller (a run record) writes metrics.json once, with more in it
            write_json(out / "metrics.json", metrics)
        lines = (json.dumps({"text": e.text, "prediction": p, "references": list(e.targets)}, ensure_ascii=False)
                 for e, p in zip(examples, predictions))
        write_text(out / "predictions.jsonl", "".join(line + "\n" for line in lines))
    return metrics
