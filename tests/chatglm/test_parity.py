"""Parity with THUDM's original ChatGLM-6B code: outputs it recorded on tiny random models, replayed on ours.

Each ``tests/fixtures/parity/<case>.npz`` holds the inputs and the original's outputs (logits, greedy ids,
per-step generation logits, loss and prefix gradients where recorded). Its ``meta`` entry (JSON) holds the seed,
the config and the original's state-dict key order, from which the weights are regenerated here exactly as they
were for the recording (``PROVENANCE.md`` says how). fp32 cases must agree within 1e-4; the fp16 cases are held
to the size of fp16's own rounding error, measured on the same inputs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from chatglm import ChatGLMConfig, ChatGLMForConditionalGeneration
from chatglm.layout import glm_blocked_mask, glm_position_ids
from chatglm.quantization import QUANTIZABLE_LINEARS, quantize_weight

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "parity"
ATOL = 1e-4  # fp32 agreement required with the original
OUTPUT_GAIN = 8.0  # the block output projections are drawn this much stronger (see random_weights)
FP32_CASES = ["fp32_plain", "fp32_28_layers", "ptuning_v2", "ptuning_v2_projection", "int8", "int4"]
FP16_CASES = {"fp16_plain": "fp32_plain", "int4_fp16": "int4"}  # fp16 case -> the same case recorded in fp32
ALL_CASES = [*FP32_CASES, "left_padded_batch", *FP16_CASES]
ATTENTION = ["eager", "sdpa"]


# ------------------------------------------------------------------------------------------------ fixtures


@functools.cache
def load_case(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of one recorded case."""
    with np.load(FIXTURES / f"{name}.npz", allow_pickle=False) as file:
        meta = json.loads(str(file["meta"]))
        tensors = {key: torch.from_numpy(file[key]) for key in file.files if key != "meta"}
    return meta, tensors


def random_weights(seed: int, keys: list[tuple[str, list[int]]]) -> dict[str, torch.Tensor]:
    """The recording's weights: fp16 values drawn in the order of ``keys`` from one generator seeded with ``seed``.

    Standard normal draws, then: block LayerNorm gains 1 + 0.1 x, the final LayerNorm gain x (zero mean, so the tied
    head does not just repeat the input token), biases 0.1 x, embeddings and prefix vectors x, the block output
    projections x * 8 / sqrt(fan_in) (so the sublayers weigh against the residual's sqrt(2 * 28) scale), every
    other matrix x / sqrt(fan_in). ``inv_freq`` is not drawn; ``lm_head.weight`` is the word embedding (tied).
    """
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in keys:
        if name.endswith("rotary_emb.inv_freq") or name == "lm_head.weight":
            continue
        x = torch.randn(shape, generator=generator, dtype=torch.float32)
        if name == "transformer.final_layernorm.weight":
            pass
        elif "layernorm" in name and name.endswith(".weight"):
            x = 1.0 + 0.1 * x
        elif name.endswith(".bias"):
            x = 0.1 * x
        elif name.endswith(("word_embeddings.weight", "prefix_encoder.embedding.weight")):
            pass
        elif name.endswith((".attention.dense.weight", ".mlp.dense_4h_to_h.weight")):
            x = x * (OUTPUT_GAIN / math.sqrt(shape[1]))
        else:
            x = x / math.sqrt(shape[1])
        state[name] = x.half()
    state["lm_head.weight"] = state["transformer.word_embeddings.weight"]
    return state


def quantized_checkpoint(state: dict[str, torch.Tensor], bits: int) -> dict[str, torch.Tensor]:
    """The public INT8/INT4 checkpoint of ``state``, made with this project's quantizer from the fp16 weights."""
    out = dict(state)
    for name, weight in state.items():
        parts = name.split(".")
        if ".layers." in name and parts[-1] == "weight" and parts[-2] in QUANTIZABLE_LINEARS:
            q, scale = quantize_weight(weight, bits)
            out[name], out[name.removesuffix(".weight") + ".weight_scale"] = q, scale
    return out


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the sorted names, dtypes, shapes and bytes of a state dict (as the recording computed it)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().contiguous().cpu()
        digest.update(f"{name}|{str(tensor.dtype).removeprefix('torch.')}|{list(tensor.shape)}|".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def checkpoint_for(meta: dict) -> dict[str, torch.Tensor]:
    state = random_weights(meta["seed"], meta["weight_keys"])
    bits = meta["config"].get("quantization_bit", 0)
    return quantized_checkpoint(state, bits) if bits else state


def our_model(name: str, attention: str = "sdpa") -> ChatGLMForConditionalGeneration:
    """Our model of a recorded case, with the regenerated checkpoint loaded through the public key layout."""
    meta, _ = load_case(name)
    torch.manual_seed(0)
    model = ChatGLMForConditionalGeneration(ChatGLMConfig(**meta["config"]))
    model.load_state_dict(checkpoint_for(meta), strict=True)
    model = model.to(getattr(torch, meta["dtype"])).eval()
    model.config._attn_implementation = attention
    return model


def generate(model, inputs: torch.Tensor, new_tokens: int, **kwargs):
    out = model.generate(
        inputs,
        max_new_tokens=new_tokens,
        do_sample=False,
        num_beams=1,
        output_logits=True,
        return_dict_in_generate=True,
        **kwargs,
    )
    return out.sequences, torch.stack([step.float() for step in out.logits], dim=1)


def assert_close(ours: torch.Tensor, reference: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(ours.float(), reference.float(), atol=atol, rtol=0)


# ------------------------------------------------------------------------------------------------ weights, layout


@pytest.mark.parametrize("name", ALL_CASES)
def test_weights_regenerate_and_load_in_the_public_layout(name):
    meta, _ = load_case(name)
    checkpoint = checkpoint_for(meta)
    # same bytes as the recording's checkpoint (for INT8/INT4: as the original's quantizer packed them)
    assert state_digest(checkpoint) == meta["checkpoint_sha256"], (
        "the regenerated weights differ from the recorded ones (torch.randn changed?); re-record the fixtures"
    )
    ours = {key: tuple(t.shape) for key, t in our_model(name).public_state_dict().items()}
    original = {key: tuple(shape) for key, shape, _ in meta["original_state_keys"]}
    assert ours == original


@pytest.mark.parametrize("name", ["fp32_plain", "ptuning_v2_projection", "int4"])
def test_a_checkpoint_with_the_original_keys_loads_with_from_pretrained(name, tmp_path):
    """Every key of the original's state dict (per-layer ``inv_freq`` included), as ``pytorch_model.bin``."""
    meta, rec = load_case(name)
    checkpoint = checkpoint_for(meta)
    config = ChatGLMConfig(**meta["config"])
    head_dim = config.hidden_size // config.num_attention_heads
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim // 2, 2).float() / (head_dim // 2))
    for key, _, _ in meta["original_state_keys"]:
        if key.endswith("rotary_emb.inv_freq"):
            checkpoint[key] = inv_freq.half()
    assert {key: list(t.shape) for key, t in checkpoint.items()} == {
        key: shape for key, shape, _ in meta["original_state_keys"]
    }
    torch.save(checkpoint, tmp_path / "pytorch_model.bin")
    public = {**meta["config"], "model_type": "chatglm", "architectures": ["ChatGLMModel"], "torch_dtype": "float16"}
    (tmp_path / "config.json").write_text(json.dumps(public))
    model, info = ChatGLMForConditionalGeneration.from_pretrained(
        tmp_path, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        logits = model.eval()(rec["input_ids"], use_cache=False).logits
    assert_close(logits, rec["logits"])


@pytest.mark.parametrize("name", [case for case in ALL_CASES if case != "left_padded_batch"])
def test_layout_equals_the_original_get_masks_and_position_ids(name):
    meta, rec = load_case(name)
    config = ChatGLMConfig(**meta["config"])
    assert torch.equal(glm_blocked_mask(rec["input_ids"], config), rec["attention_mask"])
    assert torch.equal(glm_position_ids(rec["input_ids"], config), rec["position_ids"])


# ------------------------------------------------------------------------------------------------ fp32


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("name", FP32_CASES)
def test_logits_match_the_original(name, attention):
    _, rec = load_case(name)
    with torch.no_grad():
        logits = our_model(name, attention)(rec["input_ids"], use_cache=False).logits
    assert_close(logits, rec["logits"])


@pytest.mark.parametrize("name", FP32_CASES)
def test_greedy_generation_matches_the_original(name):
    meta, rec = load_case(name)
    ids, step_logits = generate(our_model(name), rec["prompt_ids"], meta["new_tokens"])
    assert ids.tolist() == rec["generated_ids"].tolist()
    assert_close(step_logits, rec["generation_scores"])


@pytest.mark.parametrize("name", ["fp32_plain", "ptuning_v2", "ptuning_v2_projection"])
def test_loss_and_prefix_gradient_match_the_original(name):
    _, rec = load_case(name)
    model = our_model(name)
    with torch.no_grad():
        loss = model(rec["input_ids"], labels=rec["labels"], use_cache=False).loss
    assert_close(loss.reshape(1), rec["loss"])
    # The training path (loss on the labelled positions only) gives the same loss and gradients; the original
    # recorded them in eval mode, so the prefix dropout is switched off here.
    model.train()
    if getattr(model.transformer, "prefix_dropout", None) is not None:
        model.transformer.prefix_dropout.p = 0.0
    loss = model(rec["input_ids"], labels=rec["labels"], use_cache=False).loss
    assert_close(loss.detach().reshape(1), rec["loss"])
    grads = {key.removeprefix("grad.prefix_encoder."): t for key, t in rec.items() if key.startswith("grad.")}
    assert bool(grads) == (name != "fp32_plain")
    loss.backward()
    params = dict(model.transformer.prefix_encoder.named_parameters()) if grads else {}
    for key, reference in grads.items():
        assert_close(params[key].grad, reference)


# ------------------------------------------------------------------------------------------------ padded batch


def test_left_padded_batch_layout_is_the_original_tokenizers():
    meta, rec = load_case("left_padded_batch")
    config = ChatGLMConfig(**meta["config"])
    padding = (rec["input_ids"] != config.pad_token_id).long()
    assert torch.equal(glm_blocked_mask(rec["input_ids"], config, padding), rec["attention_mask"])
    assert torch.equal(glm_position_ids(rec["input_ids"], config, padding), rec["position_ids"])


@pytest.mark.parametrize("attention", ATTENTION)
def test_left_padded_batch_logits_match_the_original(attention):
    meta, rec = load_case("left_padded_batch")
    model = our_model("left_padded_batch", attention)
    padding = (rec["input_ids"] != meta["config"]["pad_token_id"]).long()
    with torch.no_grad():
        tokenizer_form = model(
            rec["input_ids"], attention_mask=rec["attention_mask"], position_ids=rec["position_ids"], use_cache=False
        ).logits
        hf_form = model(rec["input_ids"], attention_mask=padding, use_cache=False).logits
    assert_close(tokenizer_form, rec["logits"])  # padding rows included (uniform attention in both)
    real = padding.bool()
    assert_close(hf_form[real], rec["logits"][real])


def test_left_padded_batch_generation_matches_the_original():
    meta, rec = load_case("left_padded_batch")
    model = our_model("left_padded_batch")
    ids, step_logits = generate(
        model,
        rec["input_ids"],
        meta["new_tokens"],
        attention_mask=rec["attention_mask"],
        position_ids=rec["position_ids"],
    )
    assert ids.tolist() == rec["generated_ids"].tolist()
    assert_close(step_logits, rec["generation_scores"])
    padding = (rec["input_ids"] != meta["config"]["pad_token_id"]).long()
    ids_2d, _ = generate(model, rec["input_ids"], meta["new_tokens"], attention_mask=padding)
    assert ids_2d.tolist() == rec["generated_ids"].tolist()


# ------------------------------------------------------------------------------------------------ fp16


@pytest.mark.parametrize("name", list(FP16_CASES))
def test_fp16_matches_the_original_fp16_within_its_rounding(name):
    meta, rec = load_case(name)
    meta32, rec32 = load_case(FP16_CASES[name])  # same seed, config and inputs, recorded in fp32
    assert meta["config"] == meta32["config"] and torch.equal(rec["input_ids"], rec32["input_ids"])
    model = our_model(name)
    assert model.lm_head.weight.dtype == torch.float16
    with torch.no_grad():
        logits = model(rec["input_ids"], use_cache=False).logits
    ids, step_logits = generate(model, rec["prompt_ids"], meta["new_tokens"])
    assert ids.tolist() == rec["generated_ids"].tolist()
    # Both fp16 runs are within fp16's rounding error of the exact result, so they may differ by up to twice
    # that error; the error itself is measured as the original's fp16 run against its fp32 run.
    for ours, fp16, fp32 in (
        (logits, rec["logits"], rec32["logits"]),
        (step_logits, rec["generation_scores"], rec32["generation_scores"]),
    ):
        rounding = (fp16 - fp32).abs().max().item()
        assert 0 < rounding < 0.5
        assert (ours.float() - fp16).abs().max().item() <= 2 * rounding
