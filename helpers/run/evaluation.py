"""Evaluation: batched greedy generation, the task's metrics, label ranking, and perplexity on held-out text.

:func:`evaluate` runs a model over test examples and scores the answers with the task's metrics
(:mod:`helpers.tasks.metrics`). Generation stops at ``<eop>``; its token budget comes from the training answers
(:func:`answer_token_budget`). :func:`heldout_perplexity` is the forgetting check: perplexity of held-out plain text
before and after fine-tuning. :func:`evaluate_recipe` is the one evaluation of a run, for the command line, the
pipeline and the notebooks alike.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..files import DATA_DIR, write_json, write_text
from ..methods import mixed_precision
from ..tasks import IGNORE_INDEX, Collator, Example, Task, encode_example, get_task, left_pad, load_split
from ..tasks.metrics import cls_scores, gen_scores, ie_scores, repetition_rate
from ..tasks.rows import as_examples
from ..tasks.tokens import encode_prompts

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def _task(task: str | Task) -> Task:
    return get_task(task) if isinstance(task, str) else task


def _device(model) -> torch.device:
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


def _token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text)) if text else []


@contextlib.contextmanager
def eval_mode(model):
    """Eval mode without gradients (and autocast for mixed dtypes); restores the training flag afterwards."""
    was_training = model.training
    with torch.no_grad(), mixed_precision(model):  # fp32 trained tensors in a bf16/fp16 model
        model.eval()
        try:
            yield model
        finally:
            model.train(was_training)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


def generate_answers(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, task: str | Task, texts: Sequence[str],
                     batch_size: int = 8, max_new_tokens: int | None = None, progress: bool = True) -> list[str]:
    """Greedy answers for ``texts`` in the task's prompt layout, batched with left padding, in input order.

    Texts are sorted by length before batching (less padding); each row gives what it would give alone.
    """
    task = _task(task)
    max_new_tokens = max_new_tokens or task.max_target_length + 1
    prompts = encode_prompts(tokenizer, task, texts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    answers: list[str] = [""] * len(prompts)
    device = _device(model)
    eos = tokenizer.eos_token_id
    with eval_mode(model), _progress(len(prompts), f"generate {task.name}", progress) as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = left_pad([prompts[i] for i in rows], tokenizer.pad_token_id)
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


def answer_token_budget(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], margin: float = 0.25,
                        cap: int | None = None) -> int:
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


def _sequence_log_probs(model, rows: list[dict[str, list[int]]], pad_token_id: int) -> tuple[list[float], list[int]]:
    """Sum of log-probabilities of the labelled tokens of each row, and their count (one right-padded batch)."""
    batch = Collator(pad_token_id)(rows)
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
    with eval_mode(model), _progress(len(rows), desc, progress) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            chunk_sums, chunk_counts = _sequence_log_probs(model, [rows[i] for i in chunk], pad_token_id)
            for i, s, c in zip(chunk, chunk_sums, chunk_counts):
                sums[i], counts[i] = s, c
            bar.update(len(chunk))
    return sums, counts


def answer_row(tokenizer: PreTrainedTokenizerBase, task: str | Task, text: str, answer: str) -> dict[str, list[int]]:
    """The training row of (text, answer) with labels on the answer tokens and ``<eop>`` only (not ``<sop>``)."""
    row = encode_example(tokenizer, _task(task), Example(text, answer))
    labels = list(row["labels"])
    labels[labels.index(tokenizer.bos_token_id)] = IGNORE_INDEX
    return {"input_ids": row["input_ids"], "labels": labels}


def label_log_probs(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, task: str | Task, texts: Sequence[str],
                    labels: Sequence[str], batch_size: int = 16, progress: bool = False) -> list[list[float]]:
    """For each text, the summed log-probability of every label (its tokens then ``<eop>``) after the prompt."""
    rows = [answer_row(tokenizer, task, text, label) for text in texts for label in labels]
    sums, _ = _score_rows(model, rows, tokenizer.pad_token_id, batch_size, progress, "rank labels")
    return [sums[i * len(labels) : (i + 1) * len(labels)] for i in range(len(texts))]


def rank_labels(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, task: str | Task, texts: Sequence[str],
                labels: Sequence[str], batch_size: int = 16, progress: bool = False) -> list[str]:
    """Classify by likelihood: for each text the label whose answer (tokens + ``<eop>``) is most probable."""
    scores = label_log_probs(model, tokenizer, task, texts, labels, batch_size, progress)
    return [labels[max(range(len(labels)), key=row.__getitem__)] for row in scores]


def perplexity(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], batch_size: int = 8,
               max_length: int = 256, progress: bool = False) -> float:
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
    lines = (DATA_DIR / "corpus" / "heldout.txt").read_text(encoding="utf-8").splitlines()
    texts = [line.strip() for line in lines if line.strip()]
    return texts[:limit] if limit else texts


def heldout_perplexity(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, limit: int | None = None) -> float:
    """Perplexity on the bundled held-out plain text: compare before and after fine-tuning to see forgetting."""
    return perplexity(model, tokenizer, heldout_texts(limit))


def evaluate(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, task: str | Task, examples: Sequence[Example],
             out_dir: str | os.PathLike | None = None, batch_size: int = 8, max_new_tokens: int | None = None,
             limit: int | None = None, progress: bool = True, rank: bool = True, save_metrics: bool = True,
             train_examples: Sequence[Example] | None = None) -> dict[str, Any]:
    """Generate answers for ``examples`` and score them with the task's metrics; optionally save both.

    ``max_new_tokens`` defaults to :func:`answer_token_budget` of ``train_examples`` (the task's bundled training
    split when not given), capped at the task's ``max_target_length``. With ``out_dir``: ``metrics.json`` and
    ``predictions.jsonl`` (text, prediction, references per example); ``save_metrics=False`` writes only the
    predictions.
    """
    task = _task(task)
    examples = as_examples(examples[:limit] if limit else examples, task.name, group_references=True)
    if not examples:
        raise UserError("no examples to evaluate: examples is empty; give at least one (helpers.load_split(task, "
                        "'test'))")
    if max_new_tokens is None:
        train_examples = load_split(task.name, "train") if train_examples is None else train_examples
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
        raise ValueError(f"no metrics for task {task.name!r}")
    metrics["repetition_rate"] = repetition_rate(predictions, tokenizer)
    metrics = {"task": task.name, "main_metric": task.main_metric, **metrics,
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


def evaluate_recipe(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, recipe, out_dir: str | os.PathLike,
                    perplexity_before: float | None = None, save_metrics: bool = False,
                    progress: bool = True) -> dict[str, Any]:
    """The evaluation of a run: the recipe's test split with its settings; predictions go to ``out_dir``.

    With ``perplexity_before`` (the base model's held-out perplexity) the model's own is measured too, so the
    metrics show what fine-tuning made it forget. ``save_metrics`` also writes ``metrics.json`` (a run's record writes
    it itself when it finishes).
    """
    examples = load_split(recipe.task, "test", recipe.test_file, limit=recipe.eval_limit)
    metrics = evaluate(model, tokenizer, recipe.task_spec(), examples, out_dir=out_dir, save_metrics=False,
                       batch_size=recipe.eval_batch_size, max_new_tokens=recipe.max_new_tokens, progress=progress,
                       train_examples=load_split(recipe.task, "train", recipe.train_file))
    if perplexity_before is not None:
        metrics.update(perplexity_before=perplexity_before, perplexity_after=heldout_perplexity(model, tokenizer))
    if save_metrics:
        write_json(Path(out_dir) / "metrics.json", metrics)
    return metrics
