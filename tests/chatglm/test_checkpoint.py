"""Checkpoints in the public HF layout: key names, shapes, dtypes; loading through Auto classes; full size on meta;
weight files checked for completeness before loading."""

import json

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from chatglm import ChatGLMConfig, ChatGLMForConditionalGeneration, known_config
from chatglm.checkpoint import check_weight_file, weight_files
from chatglm.configuration import known_config_dict
from tests.conftest import glm_ids, random_model, tiny_config

PUBLIC_AUTO_MAP = {
    "AutoConfig": "configuration_chatglm.ChatGLMConfig",
    "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
}


def public_layout(config: ChatGLMConfig, bits: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """What a public fp16 checkpoint of this config holds, derived from the config alone."""
    h, inner, v = config.hidden_size, config.inner_hidden_size, config.vocab_size
    head = h // config.num_attention_heads
    half = torch.float16
    table = {"transformer.word_embeddings.weight": ((v, h), half), "lm_head.weight": ((v, h), half)}
    for name in ("final_layernorm.weight", "final_layernorm.bias"):
        table[f"transformer.{name}"] = ((h,), half)
    for i in range(config.num_layers):
        p = f"transformer.layers.{i}."
        for ln in ("input_layernorm", "post_attention_layernorm"):
            table[p + ln + ".weight"] = table[p + ln + ".bias"] = ((h,), half)
        table[p + "attention.rotary_emb.inv_freq"] = ((head // 4,), half)
        for name, (out, inp) in {
            "attention.query_key_value": (3 * h, h),
            "attention.dense": (h, h),
            "mlp.dense_h_to_4h": (inner, h),
            "mlp.dense_4h_to_h": (h, inner),
        }.items():
            table[p + name + ".bias"] = ((out,), half)
            if bits:
                table[p + name + ".weight"] = ((out, inp * bits // 8), torch.int8)
                table[p + name + ".weight_scale"] = ((out,), half)
            else:
                table[p + name + ".weight"] = ((out, inp), half)
    return table


@pytest.mark.parametrize("bits", [0, 4, 8])
@pytest.mark.parametrize("safe", [False, True])
def test_saved_files_have_public_layout(tmp_path, bits, safe):
    model = random_model(bits=bits).half()
    model.save_pretrained(tmp_path, safe_serialization=safe)
    if safe:
        state = load_file(tmp_path / "model.safetensors")
        assert not (tmp_path / "pytorch_model.bin").exists()
    else:
        state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
        assert not (tmp_path / "model.safetensors").exists()
    found = {k: (tuple(t.shape), t.dtype) for k, t in state.items()}
    assert found == public_layout(model.config, bits)
    assert torch.equal(state["lm_head.weight"], state["transformer.word_embeddings.weight"])
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "chatglm" and saved.get("quantization_bit", 0) == bits


@pytest.mark.parametrize("bits", [0, 4])
@pytest.mark.parametrize("safe", [False, True])
def test_round_trip_gives_identical_logits(tmp_path, bits, safe):
    model = random_model(bits=bits)
    model.save_pretrained(tmp_path, safe_serialization=safe)
    loaded, info = ChatGLMForConditionalGeneration.from_pretrained(
        tmp_path, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert loaded.lm_head.weight is loaded.transformer.word_embeddings.weight
    ids = torch.tensor([glm_ids([10, 11, 12], [20, 21])])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded.eval()(ids).logits)


def test_sharded_bin_checkpoint_with_index_loads(tmp_path):
    model = random_model()
    model.save_pretrained(tmp_path, safe_serialization=False, max_shard_size="60KB")
    index = json.loads((tmp_path / "pytorch_model.bin.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / s).exists() for s in shards)
    loaded = ChatGLMForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.tensor([glm_ids([10, 11], [20])])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_hand_written_public_checkpoint_loads_through_auto_classes(tmp_path):
    """A folder laid out like THUDM's (auto_map to remote code, torch_dtype, .bin with inv_freq) uses our code."""
    model = random_model(bits=4).half()
    state = model.public_state_dict()
    torch.save(state, tmp_path / "pytorch_model.bin")
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("dtype", "transformers_version")}
    config.update(auto_map=PUBLIC_AUTO_MAP, torch_dtype="float16", architectures=["ChatGLMModel"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert isinstance(AutoConfig.from_pretrained(tmp_path), ChatGLMConfig)
    for factory in (AutoModelForCausalLM, AutoModel):
        loaded, info = factory.from_pretrained(tmp_path, dtype=torch.float32, output_loading_info=True)
        assert type(loaded) is ChatGLMForConditionalGeneration
        assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.tensor([glm_ids([10, 11], [20])])
    with torch.no_grad():
        assert torch.allclose(model.float()(ids).logits, loaded.eval()(ids).logits, atol=1e-6)


def test_known_configs_match_public_files():
    raw = known_config_dict("THUDM/chatglm-6b-int4")
    assert raw["auto_map"]["AutoModel"] == "modeling_chatglm.ChatGLMForConditionalGeneration"
    config = ChatGLMConfig(**raw)
    assert (config.vocab_size, config.hidden_size, config.num_layers, config.quantization_bit) == (130528, 4096, 28, 4)
    ids = (config.bos_token_id, config.eos_token_id, config.gmask_token_id, config.pad_token_id)
    assert ids == (130004, 130005, 130001, 3)
    assert known_config("zai-org/chatglm-6b").quantization_bit == 0
    with pytest.raises(KeyError, match="known offline"):
        known_config("THUDM/chatglm2-6b")


def full_size(name: str, **overrides) -> ChatGLMForConditionalGeneration:
    with torch.device("meta"):
        return ChatGLMForConditionalGeneration(known_config(name, **overrides))


def test_full_size_int4_parameter_count_on_meta():
    model = full_size("THUDM/chatglm-6b-int4")
    assert sum(p.numel() for p in model.parameters()) == 3_355_746_304
    assert not any(type(m) is torch.nn.Linear for m in model.transformer.layers.modules())
    qkv = model.transformer.layers[0].attention.query_key_value
    assert qkv.weight.shape == (12288, 2048) and qkv.weight.dtype == torch.int8


def test_full_size_fp_and_prefix_counts_on_meta():
    assert sum(p.numel() for p in full_size("THUDM/chatglm-6b").parameters()) == 6_173_286_400
    model = full_size("THUDM/chatglm-6b-int4", pre_seq_len=16, prefix_projection=True)
    assert sum(p.numel() for p in model.parameters()) == 4_312_346_624
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 956_600_320


def test_config_validation_messages():
    with pytest.raises(StrictDataclassClassValidationError, match="divisible"):
        tiny_config(num_attention_heads=5)
    with pytest.raises(StrictDataclassClassValidationError, match="quantization_bit"):
        tiny_config(quantization_bit=3)


def test_saving_a_partly_merged_quantized_model_is_refused(tmp_path):
    model = random_model(bits=4)
    layer = model.transformer.layers[0].attention
    layer.query_key_value = layer.query_key_value.to_linear(torch.float32)
    with pytest.raises(ValueError, match="quantize"):
        model.save_pretrained(tmp_path)
    model.quantize(4)
    model.save_pretrained(tmp_path)


@pytest.mark.parametrize("safe", [False, True])
def test_weight_files_are_found_and_a_cut_file_is_caught(tmp_path, safe):
    random_model(bits=4).save_pretrained(tmp_path, safe_serialization=safe)
    name = "model.safetensors" if safe else "pytorch_model.bin"
    assert weight_files(tmp_path) == [tmp_path / name]
    check_weight_file(tmp_path / name, thorough=True)  # a complete file passes
    content = (tmp_path / name).read_bytes()
    for cut in (len(content) - 1, len(content) // 2, 5):
        (tmp_path / name).write_bytes(content[:cut])
        with pytest.raises(ValueError, match=rf"{name}: truncated or corrupt \(.*\); download it again"):
            check_weight_file(tmp_path / name)


def test_a_safetensors_file_longer_than_its_header_says_is_caught(tmp_path):
    random_model().save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    size = path.stat().st_size
    path.write_bytes(path.read_bytes() + b"\0" * 16)
    with pytest.raises(ValueError, match=f"the header describes {size:,} bytes, the file has {size + 16:,}"):
        check_weight_file(path)


def test_thorough_check_catches_a_changed_byte_in_a_bin_file(tmp_path):
    random_model().save_pretrained(tmp_path, safe_serialization=False)
    path = tmp_path / "pytorch_model.bin"
    content = bytearray(path.read_bytes())
    middle = len(content) // 2
    content[middle] ^= 0xFF
    path.write_bytes(bytes(content))
    check_weight_file(path)  # the cheap check sees a complete archive
    with pytest.raises(ValueError, match="truncated or corrupt .*checksum"):
        check_weight_file(path, thorough=True)


def test_weight_files_of_a_sharded_checkpoint_and_missing_ones(tmp_path):
    with pytest.raises(FileNotFoundError, match="no weights file"):
        weight_files(tmp_path)
    random_model().save_pretrained(tmp_path, safe_serialization=False, max_shard_size="100KB")
    shards = sorted(tmp_path.glob("pytorch_model-*.bin"))
    assert len(shards) > 1 and weight_files(tmp_path) == shards
    shards[0].unlink()
    with pytest.raises(FileNotFoundError, match=rf"{shards[0].name}: missing \(1 of the {len(shards)} files"):
        weight_files(tmp_path)
    (tmp_path / "pytorch_model.bin.index.json").write_text("{")
    with pytest.raises(ValueError, match="pytorch_model.bin.index.json: not a valid weights index"):
        weight_files(tmp_path)
