"""Metrics on hand-computed examples; generation, label ranking and perplexity on a tiny random ChatGLM."""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import tasks as data
from helpers.run import evaluation as ev
from helpers.tasks import Example
from helpers.tasks import metrics as task_metrics
from tests.conftest import model_for

TEXTS = ["故障现象：发动机冷车启动", "空调制冷时好时坏，高速行驶时出风口温度明显升高。", "刹车", "左前大灯时亮时不亮"]
SAME_LENGTH_LABELS = ("体育", "房产", "汽车", "教育", "科技")


def lively_model(tokenizer, seed: int = 0):
    """A tiny random model whose answers depend on the input: untied output layer, sharp attention."""
    model = model_for(tokenizer, seed=seed, tie_word_embeddings=False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("query_key_value.weight"):
                param.mul_(20)
    return model


# ---- IE ---------------------------------------------------------------------------------------------------


def test_ie_scores_micro_and_original_per_sample_convention():
    predictions = [
        "a_性能故障_b\nc_组成_d\nc_组成_d",  # one hit, one wrong, a duplicate line
        "x_部件故障_y",  # gold is empty
        "",  # nothing predicted
        "p_组成_q\n坏行",  # a hit and a malformed line
    ]
    references = ["a_性能故障_b\ne_检测工具_f", "", "g_组成_h", "p_组成_q"]
    scores = task_metrics.ie_scores(predictions, references)
    # micro: hits 1+0+0+1, predicted 2+1+0+2, gold 2+0+1+1
    assert scores["precision"] == pytest.approx(2 / 5)
    assert scores["recall"] == pytest.approx(2 / 4)
    assert scores["f1"] == pytest.approx(2 * 0.4 * 0.5 / 0.9)
    # per sample: (P, R) = (1/2, 1/2), (0, 0) [empty gold], (0, 0) [no prediction], (1, 1) [malformed line dropped]
    assert scores["sample_precision"] == pytest.approx(1.5 / 4)
    assert scores["sample_recall"] == pytest.approx(1.5 / 4)
    assert scores["sample_f1"] == pytest.approx(1.5 / 4)
    assert scores["n"] == 4


def test_ie_empty_gold_scores_zero_per_sample_even_for_an_empty_prediction():
    scores = task_metrics.ie_scores(["", "a_组成_b"], ["", "a_组成_b"])
    assert scores["sample_f1"] == pytest.approx(0.5)  # the original counts "" as an unmatchable gold triple
    assert (scores["precision"], scores["recall"], scores["f1"]) == (1.0, 1.0, 1.0)


def test_ie_per_sample_keeps_only_three_part_lines_but_micro_counts_every_line():
    scores = task_metrics.ie_scores(["a_组成_b_c\na_组成_b"], ["a_组成_b"])
    assert scores["sample_precision"] == 1.0
    assert scores["precision"] == pytest.approx(0.5)


def test_ie_scores_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        task_metrics.ie_scores(["a", "b"], ["a"])


# ---- generation -------------------------------------------------------------------------------------------


def test_gen_scores_identical_and_disjoint():
    same = task_metrics.gen_scores(["今天天气很好", "我们去公园散步吧"], [["今天天气很好"], ["我们去公园散步吧"]])
    assert same["bleu"] == pytest.approx(1.0)
    assert same["rouge_l"] == pytest.approx(1.0)
    other = task_metrics.gen_scores(["甲乙丙丁戊"], [["子丑寅卯辰"]])
    assert other["bleu"] == 0.0
    assert other["rouge_l"] == 0.0


def test_gen_scores_character_level_ignores_whitespace():
    scores = task_metrics.gen_scores(["今天 天气很好"], [["今天天气很好"]])
    assert scores["bleu"] == pytest.approx(1.0)
    assert scores["rouge_l"] == pytest.approx(1.0)


def test_rouge_l_partial_by_hand_and_best_reference():
    # LCS("今天天气好", "今天好") = 3: P = 3/5, R = 3/3, F = 2PR/(P+R) = 0.75
    assert task_metrics.gen_scores(["今天天气好"], [["今天好"]])["rouge_l"] == pytest.approx(0.75)
    assert task_metrics.gen_scores(["今天天气好"], [["完全不同的", "今天好"]])["rouge_l"] == pytest.approx(0.75)


def test_gen_scores_ragged_references():
    references = [["别的问题", "胃食管反流有哪些症状"], ["鸡蛋怎么吃"]]
    scores = task_metrics.gen_scores(["胃食管反流有哪些症状", "鸡蛋怎么吃"], references)
    assert scores["bleu"] == pytest.approx(1.0)
    assert scores["rouge_l"] == pytest.approx(1.0)
    assert scores["n"] == 2


def test_distinct_n_and_duplicate_rate():
    # characters a b a b | a b: 6 unigrams, 2 distinct; bigrams ab ba ab | ab: 4, 2 distinct
    scores = task_metrics.gen_scores(["abab", "a b"], [["x"], ["y"]])
    assert scores["distinct_1"] == pytest.approx(2 / 6)
    assert scores["distinct_2"] == pytest.approx(2 / 4)
    assert task_metrics.duplicate_rate(["x", "x", "y", "z", "z", "z"]) == pytest.approx(5 / 6)
    assert task_metrics.duplicate_rate(["a", "b"]) == 0.0
    assert task_metrics.distinct_n(["a"], 2) == 0.0


# ---- classification ---------------------------------------------------------------------------------------


def test_cls_scores_by_hand_with_an_invalid_prediction():
    labels = ("体育", "财经", "科技", "娱乐")
    scores = task_metrics.cls_scores(["体育", "财经", "财经", "天气"], ["体育", "体育", "财经", "科技"], labels)
    assert scores["accuracy"] == pytest.approx(0.5)
    assert scores["invalid_rate"] == pytest.approx(0.25)
    # F1: 体育 2*1/(2+0+1) = 2/3, 财经 2*1/(2+1+0) = 2/3, 科技 0; 娱乐 never occurs and is left out
    assert scores["macro_f1"] == pytest.approx(4 / 9)
    assert scores["n"] == 4


def test_cls_scores_rejects_a_reference_outside_the_labels():
    with pytest.raises(ValueError, match="天气"):
        task_metrics.cls_scores(["体育"], ["天气"], ("体育",))


# ---- generation on a model --------------------------------------------------------------------------------


class ScriptedModel(torch.nn.Module):
    """Answers each row with a fixed continuation chosen by the row's real length (else just eos)."""

    def __init__(self, continuations: dict[int, list[int]], pad_token_id: int, eos_token_id: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.continuations, self.pad, self.eos = continuations, pad_token_id, eos_token_id
        self.calls: list[dict] = []

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        self.calls.append({"training": self.training, "grad": torch.is_grad_enabled(),
                           "max_new_tokens": max_new_tokens, **kwargs})
        new = torch.full((input_ids.shape[0], max_new_tokens), self.pad)
        for row, length in enumerate(attention_mask.sum(dim=1).tolist()):
            ids = self.continuations.get(length, [self.eos])[:max_new_tokens]
            new[row, : len(ids)] = torch.tensor(ids)
        return torch.cat((input_ids, new), dim=1)


def test_generate_answers_cuts_at_eos_keeps_order_and_restores_training(small_tokenizer):
    tok = small_tokenizer
    task = data.TASKS["ie"]
    answers = ["发动机_部件故障_启动", "空调_部件故障_时好时坏", "刹车_组成_车", "大灯_部件故障_不亮"]
    ids = lambda text: tok.convert_tokens_to_ids(tok.tokenize(text))  # noqa: E731
    lengths = [len(data.prompt_ids(tok, task, t)) for t in TEXTS]
    assert len(set(lengths)) == len(TEXTS)
    script = {n: ids(a) + [tok.eos_token_id] + ids("多余") for n, a in zip(lengths, answers)}
    model = ScriptedModel(script, tok.pad_token_id, tok.eos_token_id).train()
    got = ev.generate_answers(model, tok, "ie", TEXTS, batch_size=3, max_new_tokens=40, progress=False)
    assert got == answers
    assert model.training
    assert len(model.calls) == 2
    call = model.calls[0]
    assert not call["training"] and not call["grad"]
    assert call["do_sample"] is False and call["eos_token_id"] == tok.eos_token_id
    ev.generate_answers(model, tok, "cls", TEXTS[:1], progress=False)
    assert model.calls[-1]["max_new_tokens"] == data.TASKS["cls"].max_target_length + 1


def test_batched_generation_equals_one_by_one(small_tokenizer):
    model = lively_model(small_tokenizer)
    batched = ev.generate_answers(model, small_tokenizer, "ie", TEXTS, batch_size=3, max_new_tokens=8, progress=False)
    alone = [ev.generate_answers(model, small_tokenizer, "ie", [t], batch_size=1, max_new_tokens=8, progress=False)[0]
             for t in TEXTS]
    assert batched == alone
    assert len(set(batched)) > 1  # the answers depend on the text, so the order is really checked


# ---- likelihood -------------------------------------------------------------------------------------------


def direct_log_prob(model, tokenizer, text: str, label: str) -> float:
    """log P(label tokens, <eop> | prompt) from the model's mean loss over exactly those tokens."""
    row = data.encode_example(tokenizer, data.TASKS["cls"], Example(text, label))
    labels = list(row["labels"])
    labels[labels.index(tokenizer.bos_token_id)] = -100  # <sop> is part of the prompt, not of the answer
    count = sum(x != -100 for x in labels)
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([labels])).loss
    return -float(loss) * count


def test_rank_labels_picks_the_most_likely_label(small_tokenizer):
    tok, texts = small_tokenizer, TEXTS[:3]
    model = lively_model(tok, seed=1)
    scores = ev.label_log_probs(model, tok, "cls", texts, SAME_LENGTH_LABELS, batch_size=4)
    for text, row in zip(texts, scores):
        direct = [direct_log_prob(model, tok, text, label) for label in SAME_LENGTH_LABELS]
        assert row == pytest.approx(direct, rel=1e-4, abs=1e-4)
    ranked = ev.rank_labels(model, tok, "cls", texts, SAME_LENGTH_LABELS, batch_size=4)
    best = [SAME_LENGTH_LABELS[max(range(5), key=row.__getitem__)] for row in scores]
    assert ranked == best


def test_perplexity_is_exp_of_token_weighted_mean_loss(small_tokenizer):
    tok = small_tokenizer
    model = lively_model(tok)
    texts = ["傍晚的菜市场最热闹。", "周日下午，我把积攒了一个月的旧报纸和纸箱捆好，送到小区门口的回收站。"]
    total = count = 0.0
    for text in texts:
        ids = [tok.gmask_token_id, tok.bos_token_id, *tok.convert_tokens_to_ids(tok.tokenize(text)), tok.eos_token_id]
        labels = [-100, -100, *ids[2:]]
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
        total += float(loss) * (len(ids) - 2)
        count += len(ids) - 2
    assert ev.perplexity(model, tok, texts, batch_size=2) == pytest.approx(math.exp(total / count), rel=1e-4)
    assert ev.perplexity(model, tok, texts, batch_size=1) == pytest.approx(math.exp(total / count), rel=1e-4)


def test_heldout_texts_are_the_non_empty_corpus_lines():
    texts = ev.heldout_texts()
    assert texts and all(t.strip() == t and t for t in texts)
    assert ev.heldout_texts(limit=3) == texts[:3]


# ---- evaluate ---------------------------------------------------------------------------------------------


def test_evaluate_cls_writes_metrics_and_predictions(small_tokenizer, tmp_path):
    model = lively_model(small_tokenizer).train()
    examples = [Example(t, label) for t, label in zip(TEXTS[:3], ("体育", "汽车", "科技"))]
    metrics = ev.evaluate(model, small_tokenizer, "cls", examples, out_dir=tmp_path / "run", max_new_tokens=3,
                          progress=False)
    assert model.training
    assert metrics["task"] == "cls" and metrics["main_metric"] == "accuracy" and metrics["n"] == 3
    for key in ("accuracy", "macro_f1", "invalid_rate", "rank_accuracy", "rank_macro_f1", "eval_seconds"):
        assert key in metrics
    assert json.loads((tmp_path / "run" / "metrics.json").read_text(encoding="utf-8")) == metrics
    lines = (tmp_path / "run" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["text"] for r in rows] == TEXTS[:3]
    assert [r["references"] for r in rows] == [["体育"], ["汽车"], ["科技"]]
    assert all(isinstance(r["prediction"], str) for r in rows)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.json", "predictions.jsonl"]


def test_evaluate_ie_and_gen_use_their_metrics(small_tokenizer):
    model = lively_model(small_tokenizer)
    ie = ev.evaluate(model, small_tokenizer, "ie", [Example(TEXTS[0], "发动机_部件故障_启动")] * 2,
                     max_new_tokens=3, limit=1, progress=False)
    assert ie["main_metric"] == "f1" and ie["n"] == 1 and "sample_f1" in ie
    gen = ev.evaluate(model, small_tokenizer, "gen", [Example(TEXTS[1], "a", ("问题一？", "问题二？"))],
                      max_new_tokens=3, progress=False)
    assert gen["main_metric"] == "rouge_l" and {"bleu", "distinct_1", "duplicate_rate"} <= gen.keys()


def test_char_f1_by_hand():
    from helpers.tasks.metrics import char_f1, ie_scores

    assert char_f1("", "") == 1.0
    assert char_f1("abc", "") == 0.0
    # "aab" vs "abc": shared bag {a, b} = 2; P = 2/3, R = 2/3
    assert char_f1("aab", "abc") == pytest.approx(2 / 3)
    assert char_f1("a b\nc", "cba") == pytest.approx(1.0)  # whitespace ignored, order ignored
    scores = ie_scores(["发动机_部件故障_异响", ""], ["发动机_部件故障_异响", "灯_部件故障_亮"])
    assert scores["char_f1"] == pytest.approx(0.5)


# ---- loops and decoding budget ----------------------------------------------------------------------------


def test_repetition_rate_on_hand_made_answers():
    predictions = [
        "发动机_部件故障_部件故障_部件故障",  # "部件故" appears 3 times in one line: a loop
        "车车车车车",  # "车车车" at positions 0, 1, 2: a loop
        "a_部件故障_b\nc_部件故障_d\ne_部件故障_f",  # the relation recurs across lines only: not a loop
        "x_组成_y\nx_组成_y\nx_组成_y",  # the same line three times: a loop
        "x_组成_y\nx_组成_y",  # twice is not yet a loop
        "今天天气很好",  # no repeat
    ]
    assert [task_metrics.is_repetitive(p) for p in predictions] == [True, True, False, True, False, False]
    assert task_metrics.repetition_rate(predictions) == pytest.approx(3 / 6)
    assert task_metrics.repetition_rate([]) == 0.0
    # "ab ab ab": the bigram (a, b) occurs 3 times, no trigram does (ab a, b a b, ... twice each)
    assert task_metrics.is_repetitive("ab ab ab", n=2) and not task_metrics.is_repetitive("ab ab ab", n=3)


def test_repetition_rate_counts_tokenizer_pieces(small_tokenizer):
    tok = small_tokenizer
    assert tok.tokenize("的时候" * 3) == ["▁", "的时候", "的时候", "的时候"]  # one piece for the three characters
    # Three copies: as characters "的时候" occurs 3 times (a loop); as pieces the trigram occurs once.
    assert task_metrics.is_repetitive("的时候" * 3) and not task_metrics.is_repetitive("的时候" * 3, tok)
    # Five copies: the trigram of pieces (的时候, 的时候, 的时候) starts at 3 positions.
    assert task_metrics.is_repetitive("的时候" * 5, tok)
    assert task_metrics.repetition_rate(["今天天气很好", "的时候" * 5], tok) == pytest.approx(0.5)


def test_answer_token_budget_from_the_longest_training_answer(small_tokenizer):
    tok = small_tokenizer
    examples = [Example("t", "短"), Example("t", "这是一个比较长的回答"), Example("t", "中等长度")]
    longest = len(tok.tokenize("这是一个比较长的回答"))
    assert ev.answer_token_budget(tok, examples, margin=0.0) == longest + 1
    assert ev.answer_token_budget(tok, examples, margin=0.5) == math.ceil(longest * 1.5) + 1
    assert ev.answer_token_budget(tok, examples, margin=0.5, cap=2) == 3
    with pytest.raises(ValueError, match="at least one"):
        ev.answer_token_budget(tok, [])


class ForcedLogits:
    """A forward hook on the output layer: emit ``token`` until generation step ``stop_at``, then ``<eop>``."""

    def __init__(self, token: int, eos: int, stop_at: int) -> None:
        self.token, self.eos, self.stop_at, self.steps = token, eos, stop_at, 0

    def __call__(self, module, inputs, logits):
        forced = torch.full_like(logits, -1e4)
        forced[..., self.eos if self.steps >= self.stop_at else self.token] = 1e4
        self.steps += 1
        return forced


def test_decoding_stops_at_eop_before_the_budget(small_tokenizer):
    tok = small_tokenizer
    model = model_for(tok)
    token = tok.convert_tokens_to_ids(tok.tokenize("车"))[-1]
    hook = model.lm_head.register_forward_hook(ForcedLogits(token, tok.eos_token_id, stop_at=4))
    try:
        prompt = data.prompt_ids(tok, data.TASKS["ie"], TEXTS[0])
        output = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                                max_new_tokens=40, do_sample=False, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id)
        assert output.shape[1] == len(prompt) + 5  # four tokens, then <eop>, and nothing after it
        assert output[0, -1].item() == tok.eos_token_id
    finally:
        hook.remove()
    hook = model.lm_head.register_forward_hook(ForcedLogits(token, tok.eos_token_id, stop_at=4))
    try:
        answers = ev.generate_answers(model, tok, "ie", TEXTS[:1], max_new_tokens=40, progress=False)
    finally:
        hook.remove()
    assert answers == [tok.decode([token] * 4, skip_special_tokens=True).strip()]


def test_evaluate_budgets_new_tokens_from_the_training_answers(small_tokenizer):
    tok = small_tokenizer
    model = ScriptedModel({}, tok.pad_token_id, tok.eos_token_id)
    train = [Example("t", "今天天气很好"), Example("t", "好")]
    examples = [Example(TEXTS[0], "体育")]
    ev.evaluate(model, tok, "cls", examples, train_examples=train, rank=False, progress=False)
    longest = len(tok.tokenize("今天天气很好"))
    assert model.calls[-1]["max_new_tokens"] == min(math.ceil(longest * 1.25), data.TASKS["cls"].max_target_length) + 1
    ev.evaluate(model, tok, "ie", [Example(TEXTS[0], "a_组成_b")], rank=False, progress=False)
    bundled = ev.answer_token_budget(tok, data.load_split("ie", "train"), cap=data.TASKS["ie"].max_target_length)
    assert model.calls[-1]["max_new_tokens"] == bundled
    ev.evaluate(model, tok, "ie", [Example(TEXTS[0], "a_组成_b")], max_new_tokens=7, progress=False)
    assert model.calls[-1]["max_new_tokens"] == 7
