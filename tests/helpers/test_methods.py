"""The four methods: what each makes trainable on floating and INT4 models, at tiny and full size; their options
checked against the model; one method per model."""

import pytest
import torch
from torch import nn

from chatglm import known_config
from chatglm.quantization import QuantizedLinear
from helpers.cli import main
from helpers.errors import UserError
from helpers.methods import (
    METHOD_DEFAULTS,
    applied_method,
    apply_method,
    embedding,
    freeze,
    lora,
    ptuning_v2,
    resolve_method_options,
    trainable_line,
)
from tests.conftest import random_model, tiny_config

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
    with pytest.raises(UserError, match="already has ptuning_v2 applied"):
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


# ----------------------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------------------


def test_overrides_replace_only_what_they_name():
    options = resolve_method_options("lora", {"r": 4, "dropout": None}, tiny_config())
    assert options == {**METHOD_DEFAULTS["lora"], "r": 4, "target_modules": ["query_key_value"]}
    assert resolve_method_options("embedding", None, tiny_config()) == {}


def test_freeze_default_is_clipped_to_a_small_model_but_an_explicit_value_is_not():
    assert METHOD_DEFAULTS["freeze"]["layers"] > 3
    assert resolve_method_options("freeze", {}, tiny_config())["layers"] == 3  # all three layers of the tiny config
    assert freeze(random_model()).options == {"layers": 3, "dequantize": False}
    with pytest.raises(UserError, match=r"layers \(--layers\) must be an integer between 1 and 3 .* got 5"):
        resolve_method_options("freeze", {"layers": 5}, tiny_config())
    with pytest.raises(UserError, match="got 0"):
        freeze(random_model(), layers=0)


@pytest.mark.parametrize(
    "method,overrides,message",
    [
        ("lora", {"alpha": 0}, r"alpha \(--alpha\) must be greater than 0"),
        ("lora", {"alpha": float("nan")}, r"alpha \(--alpha\) must be a finite number"),
        ("lora", {"r": 0}, r"r \(--r\) must be an integer between 1 and 64"),
        ("lora", {"r": 2.5}, r"r \(--r\) must be an integer"),
        ("lora", {"dropout": 1.0}, r"dropout \(--lora-dropout\) must be at least 0 and below 1"),
        ("lora", {"target_modules": ["qkv"]}, r"no layer 'qkv'; choose from query_key_value, dense"),
        ("lora", {"target_modules": []}, r"target_modules \(--target-modules\) must be one or more layer names"),
        ("ptuning_v2", {"pre_seq_len": 100000}, r"pre_seq_len \(--pre-seq-len\) must be an integer between 1 and 128"),
        ("ptuning_v2", {"prefix_projection": "no"}, r"prefix_projection \(--no-projection\) must be True or False"),
        ("freeze", {"r": 8}, r"freeze has no option 'r'; its options are: layers \(--layers\), dequantize"),
        ("embedding", {"layers": 2}, r"embedding has no option 'layers'; its options are: none"),
        ("adapter", {}, r"unknown method 'adapter' \(--method\); choose one of freeze, embedding"),
    ],
)
def test_bad_options_name_the_option_as_api_and_cli_spell_it(method, overrides, message):
    with pytest.raises(UserError, match=message):
        resolve_method_options(method, overrides, tiny_config())


def test_values_at_the_edges_of_their_ranges_are_accepted():
    config = tiny_config()  # 3 layers, hidden size 64
    lora_options = resolve_method_options("lora", {"r": 64, "alpha": 0.5, "dropout": 0.0}, config)
    assert (lora_options["r"], lora_options["alpha"], lora_options["dropout"]) == (64, 0.5, 0.0)
    assert resolve_method_options("freeze", {"layers": 1}, config)["layers"] == 1
    assert resolve_method_options("freeze", {"layers": 3, "dequantize": True}, config) == {"layers": 3,
                                                                                           "dequantize": True}
    assert resolve_method_options("ptuning_v2", {"pre_seq_len": 1}, config)["pre_seq_len"] == 1


def test_pre_seq_len_limit_at_full_size_and_nothing_is_built_before_the_check():
    with pytest.raises(UserError, match="between 1 and 1024 .* got 100000"):
        resolve_method_options("ptuning_v2", {"pre_seq_len": 100000}, known_config("THUDM/chatglm-6b-int4"))
    model = random_model()
    with pytest.raises(UserError, match="pre_seq_len"):
        ptuning_v2(model, pre_seq_len=100000)
    assert getattr(model.transformer, "prefix_encoder", None) is None and applied_method(model) is None
    assert ptuning_v2(model, pre_seq_len=128).options["pre_seq_len"] == 128  # the limit itself is allowed


def test_method_functions_check_their_options():
    with pytest.raises(UserError, match="alpha"):
        lora(random_model(), alpha=0)
    with pytest.raises(UserError, match="r \\(--r\\)"):
        apply_method(random_model(), "lora", r=0)
    with pytest.raises(UserError, match="has no option 'rank'"):
        apply_method(random_model(), "lora", rank=4)


def test_target_modules_by_short_or_full_name_or_comma_list():
    options = resolve_method_options("lora", {"target_modules": "dense, mlp.dense_4h_to_h,dense"}, tiny_config())
    assert options["target_modules"] == ["dense", "mlp.dense_4h_to_h"]
    setup = lora(random_model(), r=2, target_modules=options["target_modules"])
    adapted = {n.split(".lora_")[0] for n, p in setup.model.named_parameters() if p.requires_grad}
    assert {n.split(".layers.2.")[-1] for n in adapted if ".layers.2." in n} == {"attention.dense", "mlp.dense_4h_to_h"}


@pytest.mark.parametrize("method", ["freeze", "embedding", "ptuning_v2", "lora"])
def test_recorded_options_rebuild_the_same_setup(method):
    """What a run records (setup.options) is valid input again, as when a finished run is reloaded."""
    first = apply_method(random_model(), method)
    again = apply_method(random_model(), method, **first.options)
    assert again.options == first.options and again.trainable == first.trainable


# ----------------------------------------------------------------------------------------------------------
# One method per model
# ----------------------------------------------------------------------------------------------------------

PAIRS = [("freeze", "lora"), ("ptuning_v2", "embedding"), ("lora", "lora"), ("embedding", "freeze"),
         ("lora", "ptuning_v2"), ("freeze", "freeze"), ("ptuning_v2", "lora"), ("lora", "embedding")]


@pytest.mark.parametrize("first,second", PAIRS)
def test_a_second_method_is_refused_and_changes_nothing(first, second):
    model = random_model(bits=4)
    setup = apply_method(model, first)
    before = {n: p.requires_grad for n, p in setup.model.named_parameters()}
    for target in {id(model): model, id(setup.model): setup.model}.values():  # the base and the peft wrapper
        with pytest.raises(UserError, match=f"already has {first} applied; load the base model again "
                                            rf"\(helpers.load_model\(...\)\) before applying {second}"):
            apply_method(target, second)
    assert {n: p.requires_grad for n, p in setup.model.named_parameters()} == before
    assert applied_method(model) == first


def test_a_model_built_with_a_prefix_trains_that_prefix_once():
    model = random_model(pre_seq_len=4)  # a prefix from the config, no method applied yet
    assert applied_method(model) == "ptuning_v2"
    with pytest.raises(UserError, match="already has ptuning_v2 applied"):
        lora(model)
    with pytest.raises(UserError, match=r"already has a prefix \(pre_seq_len=4"):
        ptuning_v2(model, pre_seq_len=8, prefix_projection=False)
    prefix = model.transformer.prefix_encoder
    setup = ptuning_v2(model, pre_seq_len=4, prefix_projection=False)
    assert model.transformer.prefix_encoder is prefix
    assert setup.trainable == ["transformer.prefix_encoder.embedding.weight"]
    with pytest.raises(UserError, match="already has ptuning_v2 applied"):
        ptuning_v2(model, pre_seq_len=4, prefix_projection=False)
