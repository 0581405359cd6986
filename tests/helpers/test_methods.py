"""The four methods: what each makes trainable on floating and INT4 models, at tiny and full size."""

import pytest
import torch
from torch import nn

from chatglm.quantization import QuantizedLinear
from helpers.cli import main
from helpers.methods import apply_method, embedding, freeze, lora, ptuning_v2, trainable_line
from tests.conftest import random_model

FULL_SIZE = {
    "freeze": "trainable params: 81,920 || all params: 3,355,746,304 || trainable%: 0.0024",
    "embedding": "trainable params: 534,642,688 || all params: 3,355,746,304 || trainable%: 15.9322",
    "ptuning_v2": "trainable params: 956,600,320 || all params: 4,312,346,624 || trainable%: 22.1828",
    "lora": "trainable params: 3,670,016 || all params: 3,359,416,320 || trainable%: 0.1092",
}


@pytest.mark.parametrize("method", sorted(FULL_SIZE))
def test_full_size_parameter_lines_offline(method, capsys):
    assert main(["params", "--model", "THUDM/chatglm-6b-int4", "--method", method]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == FULL_SIZE[method]


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_freeze_on_int4_trains_only_the_last_layers_layernorms():
    model = random_model(bits=4)  # 3 layers
    setup = freeze(model, layers=2)
    expected = {f"transformer.layers.{i}.{ln}.{w}" for i in (1, 2)
                for ln in ("input_layernorm", "post_attention_layernorm") for w in ("weight", "bias")}
    assert trainable(model) == expected == set(setup.trainable)
    assert setup.trainable_params == 2 * 4 * 64


def test_freeze_on_fp_model_trains_whole_blocks():
    model = random_model()
    freeze(model, layers=1)
    names = trainable(model)
    assert names and all(n.startswith("transformer.layers.2.") for n in names)
    assert "transformer.layers.2.mlp.dense_h_to_4h.weight" in names


def test_freeze_dequantize_makes_fp32_linears_that_train():
    model = random_model(bits=4)
    before = model.transformer.layers[2].mlp.dense_h_to_4h.dequantized_weight(torch.float32)
    setup = freeze(model, layers=1, dequantize=True)
    layer = model.transformer.layers[2].mlp.dense_h_to_4h
    assert type(layer) is nn.Linear and layer.weight.dtype == torch.float32 and layer.weight.requires_grad
    assert torch.equal(layer.weight, before)
    assert isinstance(model.transformer.layers[1].mlp.dense_h_to_4h, QuantizedLinear)
    assert setup.trainable_params == sum(p.numel() for p in model.transformer.layers[2].parameters())


def test_freeze_refuses_more_layers_than_the_model_has():
    with pytest.raises(ValueError, match="between 1 and 3"):
        freeze(random_model(), layers=5)


@pytest.mark.parametrize("bits", [0, 4])
def test_embedding_trains_the_shared_embedding_in_fp32(bits):
    model = random_model(bits=bits).half()
    embedding(model)
    assert trainable(model) == {"transformer.word_embeddings.weight"}
    assert model.transformer.word_embeddings.weight.dtype == torch.float32
    assert model.lm_head.weight is model.transformer.word_embeddings.weight


@pytest.mark.parametrize("bits", [0, 4])
def test_ptuning_adds_an_fp32_prefix_and_trains_only_it(bits):
    model = random_model(bits=bits).half()
    setup = ptuning_v2(model, pre_seq_len=4, prefix_projection=False)
    assert trainable(model) == {"transformer.prefix_encoder.embedding.weight"}
    assert model.transformer.prefix_encoder.embedding.weight.dtype == torch.float32
    assert setup.trainable_params == 4 * 2 * 3 * 64
    with pytest.raises(ValueError, match="already has a prefix"):
        ptuning_v2(model, pre_seq_len=8)


@pytest.mark.parametrize("bits", [0, 4])
def test_lora_wraps_the_model_and_trains_only_adapters(bits):
    setup = lora(random_model(bits=bits), r=2, target_modules=("query_key_value", "dense"))
    names = trainable(setup.model)
    assert names and all("lora_" in n for n in names)
    assert any(".attention.dense." in n for n in names)
    assert setup.trainable_params == 3 * (2 * 64 + 192 * 2) + 3 * (2 * 64 + 64 * 2)


def test_unknown_method_and_the_report_line():
    with pytest.raises(ValueError, match="unknown method"):
        apply_method(random_model(), "adapter")
    model = random_model()
    embedding(model)
    total = sum(p.numel() for p in model.parameters())
    assert trainable_line(model) == (
        f"trainable params: {300 * 64:,} || all params: {total:,} || trainable%: {100 * 300 * 64 / total:.4f}"
    )
