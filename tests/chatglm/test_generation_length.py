"""Generation never runs past the model's max_sequence_length: ``generate`` refuses, ``chat`` drops old rounds."""

import pytest
import torch

from tests.conftest import glm_ids, model_for, random_model

LIMIT = 32
PROMPT = glm_ids([10, 11, 12, 13, 14])  # 7 tokens


@pytest.fixture(scope="module")
def model():
    return random_model(seed=3, eos_token_id=299, max_sequence_length=LIMIT)  # an eos greedy decoding never hits


def test_generate_up_to_the_limit_runs(model):
    out = model.generate(torch.tensor([PROMPT]), max_new_tokens=LIMIT - len(PROMPT), do_sample=False)
    assert out.shape == (1, LIMIT)


@pytest.mark.parametrize("option", [{"max_new_tokens": LIMIT - len(PROMPT) + 1}, {"max_length": LIMIT + 1}])
def test_generate_past_the_limit_is_refused_naming_the_numbers(model, option):
    with pytest.raises(ValueError) as error:
        model.generate(torch.tensor([PROMPT]), do_sample=False, **option)
    message = str(error.value)
    (name, value), = option.items()
    assert f"{name}={value}" in message and f"max_sequence_length {LIMIT}" in message
    assert f"{len(PROMPT)} tokens" in message and f"at most {LIMIT - len(PROMPT)}" in message


def test_max_new_tokens_of_the_generation_config_counts(model):
    model.generation_config.max_new_tokens = LIMIT
    try:
        with pytest.raises(ValueError, match=f"max_new_tokens={LIMIT}"):
            model.generate(torch.tensor([PROMPT]), do_sample=False)
    finally:
        model.generation_config.max_new_tokens = None


def test_a_prompt_longer_than_the_model_is_refused(model):
    with pytest.raises(ValueError, match="shorten the prompt"):
        model.generate(torch.tensor([list(range(20, 20 + LIMIT)) + PROMPT]), max_new_tokens=1, do_sample=False)


def test_chat_drops_the_oldest_rounds_that_do_not_fit(small_tokenizer):
    chat_model = model_for(small_tokenizer, seed=0, max_sequence_length=96).eval()
    history = [("今天天气很好，我们一起去公园散步吧", "好的，我们下午三点出发")] * 4
    with pytest.warns(UserWarning, match=r"dropped the oldest \d of 4 round"):
        answer, kept = chat_model.chat(small_tokenizer, "你好", history=history, do_sample=False)
    assert 0 < len(kept) - 1 < 4 and kept[-1] == ("你好", answer)
    prompt = chat_model.build_chat_prompt("你好", kept[:-1])
    assert len(small_tokenizer(prompt)["input_ids"]) < 96
    longer = chat_model.build_chat_prompt("你好", history[-len(kept):])  # one more round would not have fit
    assert len(small_tokenizer(longer)["input_ids"]) >= 96


def test_chat_refuses_a_max_length_beyond_the_model_and_a_query_that_cannot_fit(small_tokenizer):
    chat_model = model_for(small_tokenizer, seed=0, max_sequence_length=24).eval()
    with pytest.raises(ValueError, match="max_length=48 is more than this model's max_sequence_length 24"):
        chat_model.chat(small_tokenizer, "你好", max_length=48, do_sample=False)
    with pytest.raises(ValueError, match="the query alone"):
        chat_model.chat(small_tokenizer, "今天天气很好，我们一起去公园散步吧" * 4, do_sample=False)
    answer, history = chat_model.chat(small_tokenizer, "你好", do_sample=False)  # default: up to the model's limit
    assert history == [("你好", answer)]
