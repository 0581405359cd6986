"""LoRA through peft on floating and INT4 ChatGLM: trains, saves, reloads, merges, re-quantizes."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from chatglm.lora import LoraQuantizedLinear, load_lora, lora_config
from chatglm.quantization import QuantizedLinear
from tests.conftest import glm_ids, random_model

IDS = torch.tensor([glm_ids([10, 11, 12, 13], [20, 21, 22])])
LABELS = torch.where(torch.arange(IDS.shape[1]) >= 5, IDS, torch.full_like(IDS, -100))


def train_a_little(model, steps: int = 5) -> list[float]:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=IDS, labels=LABELS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_plain_lora_config_works_on_the_floating_model():
    model = get_peft_model(random_model(), LoraConfig(r=4, target_modules=["query_key_value"], task_type="CAUSAL_LM"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    losses = train_a_little(model)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("bits", [4, 8])
def test_lora_on_quantized_model_trains_saves_reloads_and_merges(tmp_path, bits):
    model = get_peft_model(random_model(seed=1, bits=bits), lora_config(r=4, lora_alpha=16, lora_dropout=0.0))
    layer = model.base_model.model.transformer.layers[0].attention.query_key_value
    assert isinstance(layer, LoraQuantizedLinear) and isinstance(layer.base_layer, QuantizedLinear)
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_lora == 3 * (4 * 64 + 192 * 4)  # A [r, in] + B [out, r] on each layer's query_key_value
    losses = train_a_little(model)
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        tuned = model(input_ids=IDS).logits

    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    reloaded = load_lora(random_model(seed=1, bits=bits), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=IDS).logits, tuned)

    merged = model.merge_and_unload()
    qkv = merged.transformer.layers[0].attention.query_key_value
    assert type(qkv) is torch.nn.Linear and qkv.weight.dtype == torch.float32
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=IDS).logits, tuned, atol=1e-4)
    merged.quantize(bits)  # back to the checkpoint format; only the merged layers are re-quantized
    assert isinstance(merged.transformer.layers[0].attention.query_key_value, QuantizedLinear)
    with torch.no_grad():
        requantized = merged(input_ids=IDS).logits
    assert (requantized - tuned).abs().max() < 0.5  # quantization noise, not a different model
    merged.save_pretrained(tmp_path / "merged")


def test_unmerge_restores_the_quantized_base():
    model = get_peft_model(random_model(bits=4), lora_config(r=2, lora_dropout=0.0))
    train_a_little(model, steps=2)
    layer = model.base_model.model.transformer.layers[1].attention.query_key_value
    base = layer.base_layer
    model.eval()
    with torch.no_grad():
        before = model(input_ids=IDS).logits
        layer.merge()
        assert type(layer.base_layer) is torch.nn.Linear
        layer.unmerge()
        assert layer.base_layer is base
        assert torch.allclose(model(input_ids=IDS).logits, before, atol=1e-6)


def test_plain_peft_loading_with_registered_config(tmp_path):
    """PeftModel.from_pretrained works when given a config that knows the quantized layer."""
    model = get_peft_model(random_model(bits=4), lora_config(r=2))
    model.save_pretrained(tmp_path)
    config = lora_config(r=2)
    config.inference_mode = True
    again = PeftModel.from_pretrained(random_model(bits=4), tmp_path, config=config)
    assert isinstance(again.base_model.model.transformer.layers[0].attention.query_key_value, LoraQuantizedLinear)


def test_generation_through_lora_model():
    model = get_peft_model(random_model(bits=4), lora_config(r=2)).eval()
    out = model.generate(input_ids=IDS, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, IDS.shape[1] + 3)


def test_unsupported_lora_options_are_refused():
    with pytest.raises(ValueError, match="use_dora"):
        get_peft_model(random_model(bits=4), lora_config(r=2, use_dora=True))
