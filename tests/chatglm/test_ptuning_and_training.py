"""P-Tuning v2 prefixes, gradients through INT4 layers, loss, gradient checkpointing."""

import pytest
import torch

from tests.conftest import glm_ids, random_model

IDS = torch.tensor([glm_ids([10, 11, 12, 13], [20, 21, 22]), glm_ids([14, 15, 16, 17], [23, 24, 25])])
LABELS = torch.where(torch.arange(IDS.shape[1]) >= 5, IDS, torch.full_like(IDS, -100))  # -100 before <sop>


def test_loss_is_shifted_mean_cross_entropy():
    model = random_model()
    out = model(IDS, labels=LABELS)
    logits = out.logits[:, :-1].float()
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), LABELS[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, expected)
    assert out.loss.dtype == torch.float32


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("bits", [0, 4])
def test_prefix_encoder_alone_trains_through_quantized_layers(projection, bits):
    model = random_model(bits=bits, pre_seq_len=4, prefix_projection=projection)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("transformer.prefix_encoder.") for n in trainable)
    width = 2 * model.config.num_layers * model.config.hidden_size
    encoder = model.transformer.prefix_encoder
    assert encoder.embedding.weight.shape == ((4, 64) if projection else (4, width))
    if projection:
        assert encoder.trans[0].weight.shape == (64, 64) and encoder.trans[2].weight.shape == (width, 64)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(0)
    losses = []
    for _ in range(8):
        loss = model(IDS, labels=LABELS).loss
        loss.backward()
        assert encoder.embedding.weight.grad is not None and encoder.embedding.weight.grad.abs().sum() > 0
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_prefix_cache_path_equals_no_cache_path():
    model = random_model(pre_seq_len=3, prefix_projection=True)
    ids = torch.tensor([glm_ids([10, 11, 12])])
    with torch.no_grad():
        a = model(ids, use_cache=False).logits
        out = model(ids, use_cache=True)
    assert torch.allclose(a, out.logits, atol=1e-6)
    assert out.cache.get_seq_length() == 3 + ids.shape[1]
    generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    seq = ids[0].tolist()
    for _ in range(4):
        with torch.no_grad():
            seq.append(int(model(torch.tensor([seq]), use_cache=False).logits[0, -1].argmax()))
    assert generated[0].tolist() == seq


def test_prefix_dropout_only_in_training():
    model = random_model(pre_seq_len=3)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, model(IDS).logits)
        model.train()
        torch.manual_seed(0)
        a = model(IDS).logits
        torch.manual_seed(1)
        b = model(IDS).logits
    assert not torch.equal(a, b)


@pytest.mark.parametrize("bits,prefix", [(0, None), (4, None), (4, 3)])
def test_gradient_checkpointing_gives_the_same_gradients(bits, prefix):
    grads = []
    for checkpointing in (False, True):
        model = random_model(seed=5, bits=bits, pre_seq_len=prefix)
        for name, p in model.named_parameters():
            p.requires_grad_("layernorm" in name or "prefix_encoder" in name or name.endswith("word_embeddings.weight"))
        if checkpointing:
            model.activation_checkpointing_enable()
        model.train()
        torch.manual_seed(0)  # same prefix dropout in both runs
        model(IDS, labels=LABELS).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_inputs_embeds_need_explicit_layout():
    model = random_model()
    embeds = model.get_input_embeddings()(IDS)
    with pytest.raises(ValueError, match="position_ids"):
        model(inputs_embeds=embeds)
    from chatglm.layout import glm_blocked_mask, glm_position_ids

    out = model(inputs_embeds=embeds, position_ids=glm_position_ids(IDS, model.config),
                attention_mask=glm_blocked_mask(IDS, model.config))
    assert torch.allclose(out.logits, model(IDS).logits, atol=1e-6)


def test_training_loss_skips_unlabelled_positions_but_is_the_same():
    model = random_model(seed=6)
    model.eval()
    with torch.no_grad():
        reference = model(IDS, labels=LABELS)
    model.train()
    out = model(IDS, labels=LABELS)
    assert out.logits is None  # training returns the loss only
    assert torch.allclose(out.loss, reference.loss, atol=1e-6)
    with torch.no_grad():
        assert model(IDS, labels=LABELS).logits is not None  # without gradients, logits as usual
    no_labels = torch.full_like(LABELS, -100)
    assert model(IDS, labels=no_labels).loss.item() == 0.0
