"""Chatting with a model: task answers streamed as evaluation generates them, a fine-tuned run next to its base model
(one model, switched back to its base for the base's answers), and the command's one-line errors."""

from __future__ import annotations

import io

import pytest
import torch

from helpers.chat import Session, converse, messages, open_session
from helpers.cli import main
from helpers.methods import apply_method
from helpers.models import load_model
from helpers.run.artifacts import as_base_model, load_finetuned
from helpers.run.evaluation import generate_answers
from helpers.run.training import train
from helpers.tasks import EncodedDataset, get_task, load_split, prompt_ids

OPTIONS = {"freeze": {"layers": 1}, "embedding": {}, "ptuning_v2": {"pre_seq_len": 4}, "lora": {"r": 4}}
TEXT = "发动机抖动，检查发现火花塞积碳。"


@pytest.fixture(scope="module")
def runs(tiny_checkpoint, tmp_path_factory):
    """One short run of each method (3 steps, a large learning rate so that the model really moves)."""
    root = tmp_path_factory.mktemp("chat")
    for method, options in OPTIONS.items():
        model, tokenizer = load_model(str(tiny_checkpoint))
        data = EncodedDataset(tokenizer, "ie", load_split("ie", "train", limit=8), max_source_length=96,
                              max_target_length=32)
        train(apply_method(model, method, **options), tokenizer, data, root / method, steps=3, batch_size=4,
              learning_rate=0.05, progress=False)
    return root


def logits(model, tokenizer):
    ids = torch.tensor([prompt_ids(tokenizer, get_task("ie"), TEXT)])
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("method", list(OPTIONS))
def test_a_fine_tuned_model_switches_back_to_its_base_exactly(runs, tiny_checkpoint, method):
    base, tokenizer = load_model(str(tiny_checkpoint))
    expected_base = logits(base, tokenizer)
    tuned, _ = load_finetuned(runs / method, keep_base=True)
    expected_tuned = logits(load_finetuned(runs / method)[0], tokenizer)
    with as_base_model(tuned):
        assert torch.equal(logits(tuned, tokenizer), expected_base)
    assert torch.equal(logits(tuned, tokenizer), expected_tuned)  # and back again
    assert not torch.equal(expected_tuned, expected_base)  # the run did change the model


def test_task_answers_stream_what_evaluation_generates(runs, tiny_checkpoint):
    model, tokenizer = load_finetuned(runs / "lora")
    session = Session(model, tokenizer, get_task("ie"))
    streamed = "".join(session.stream(TEXT)).strip()
    assert streamed == generate_answers(model, tokenizer, "ie", [TEXT], progress=False)[0]


def test_side_by_side_gives_the_base_answer_then_the_fine_tuned_one(runs, tiny_checkpoint):
    session = open_session(None, str(runs / "embedding"), None, "cpu", None, side_by_side=True)
    out = io.StringIO()
    converse(session, [TEXT], side_by_side=True, out=out)
    lines = out.getvalue().splitlines()
    base = generate_answers(load_model(str(tiny_checkpoint))[0], session.tokenizer, "ie", [TEXT], progress=False)[0]
    tuned = generate_answers(load_finetuned(runs / "embedding")[0], session.tokenizer, "ie", [TEXT], progress=False)[0]
    text = out.getvalue()
    assert lines[0].startswith("base> ") and text.index("base> ") < text.index("fine-tuned> ")
    assert text.split("base> ")[1].split("\n  (")[0].strip() == base
    assert text.split("fine-tuned> ")[1].split("\n  (")[0].strip() == tuned


def test_messages_come_from_the_prompt_or_line_by_line():
    assert list(messages("one")) == ["one"]
    assert list(messages(None, io.StringIO("first\n\n  second  \n"))) == ["first", "second"]


def test_the_chat_command_answers_and_refuses_in_one_line(tiny_checkpoint, capsys):
    assert main(["chat", "--model", str(tiny_checkpoint), "--task", "ie", "--prompt", TEXT, "--max-new-tokens",
                 "4"]) == 0
    out = capsys.readouterr().out
    assert "matmul: pure PyTorch (fp32: exact)" in out and "model> " in out
    assert main(["chat", "--model", str(tiny_checkpoint), "--side-by-side"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --side-by-side compares a fine-tuned run with its base model: "
                                               "give --run R")
    assert main(["chat", "--model", str(tiny_checkpoint), "--prompt", "x", "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens must be at least 1" in capsys.readouterr().err
