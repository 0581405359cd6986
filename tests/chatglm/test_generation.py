"""KV-cache generation: cached greedy equals recomputation, padded batches equal rows alone, all decoders run."""

import pytest
import torch

from chatglm.layout import glm_blocked_mask, glm_position_ids
from tests.conftest import PAD, glm_ids, random_model


def greedy_without_cache(model, ids: list[int], steps: int) -> list[int]:
    """Reference decoding: re-run the whole sequence every step (positions/mask recomputed from scratch)."""
    seq = list(ids)
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([seq]), use_cache=False).logits
        seq.append(int(logits[0, -1].argmax()))
    return seq


def tokenizer_style_batch(rows: list[list[int]]):
    """Left-padded ids with the original tokenizer's 4D mask (True = blocked) and [b, 2, L] positions."""
    length = max(map(len, rows))
    ids, masks, positions = [], [], []
    for row in rows:
        pad = length - len(row)
        one = torch.tensor([row])
        m = torch.ones(length, length, dtype=torch.bool)
        m[pad:, pad:] = glm_blocked_mask(one, config=CONFIG)[0, 0]
        p = torch.zeros(2, length, dtype=torch.long)
        p[:, pad:] = glm_position_ids(one, CONFIG)[0]
        ids.append([PAD] * pad + row)
        masks.append(m[None])
        positions.append(p)
    return torch.tensor(ids), torch.stack(masks), torch.stack(positions)


MODEL = random_model(seed=3, eos_token_id=299)  # an eos that greedy decoding of this model never hits
CONFIG = MODEL.config
ROWS = [glm_ids([10, 11, 12, 13, 14]), glm_ids([20, 21]), glm_ids([30, 31, 32], [40])]


def test_cached_greedy_equals_recomputation():
    ids = ROWS[0]
    out = MODEL.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    assert out[0].tolist() == greedy_without_cache(MODEL, ids, 8)


def test_padded_batch_with_hf_mask_equals_rows_alone():
    length = max(map(len, ROWS))
    ids = torch.tensor([[PAD] * (length - len(r)) + r for r in ROWS])
    padding = (ids != PAD).long()
    out = MODEL.generate(input_ids=ids, attention_mask=padding, max_new_tokens=6, do_sample=False)
    for row, generated in zip(ROWS, out):
        alone = MODEL.generate(torch.tensor([row]), max_new_tokens=6, do_sample=False)[0]
        assert generated[length:].tolist() == alone[len(row):].tolist()


def test_padded_batch_with_tokenizer_mask_and_positions_equals_rows_alone():
    ids, mask, positions = tokenizer_style_batch(ROWS)
    out = MODEL.generate(input_ids=ids, attention_mask=mask, position_ids=positions, max_new_tokens=6, do_sample=False)
    for row, generated in zip(ROWS, out):
        assert generated[ids.shape[1]:].tolist() == greedy_without_cache(MODEL, row, 6)[len(row):]


def test_padded_logits_match_between_mask_forms():
    ids, mask, positions = tokenizer_style_batch(ROWS)
    with torch.no_grad():
        a = MODEL(ids, attention_mask=mask, position_ids=positions).logits
        b = MODEL(ids, attention_mask=(ids != PAD).long()).logits
    real = ids != PAD
    assert torch.allclose(a[real], b[real], atol=1e-5)


def test_beam_search_and_sampling_run():
    ids = torch.tensor([ROWS[0]])
    greedy = MODEL.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(MODEL.generate(ids, max_new_tokens=5, num_beams=1, do_sample=False), greedy)
    beams = MODEL.generate(ids, max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False)
    assert beams.shape == (2, len(ROWS[0]) + 5)
    ids2, mask, positions = tokenizer_style_batch(ROWS[:2])
    beams2 = MODEL.generate(input_ids=ids2, attention_mask=mask, position_ids=positions, max_new_tokens=4,
                            num_beams=2, do_sample=False)
    assert beams2.shape == (2, ids2.shape[1] + 4)
    torch.manual_seed(0)
    s1 = MODEL.generate(ids, max_new_tokens=5, do_sample=True, top_p=0.9, temperature=0.8)
    torch.manual_seed(0)
    s2 = MODEL.generate(ids, max_new_tokens=5, do_sample=True, top_p=0.9, temperature=0.8)
    assert torch.equal(s1, s2)


def test_generation_stops_at_eos_from_config():
    model = random_model(seed=3)
    ids = torch.tensor([ROWS[0]])
    with torch.no_grad():
        first = int(model(ids).logits[0, -1].argmax())
    model.config.eos_token_id = first
    model.generation_config.eos_token_id = first
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out[0].tolist() == ROWS[0] + [first]


@pytest.mark.parametrize("bits", [0, 4])
def test_sdpa_equals_eager_attention_including_padding_rows(bits):
    model = random_model(seed=4, bits=bits, pre_seq_len=None)
    ids, mask, positions = tokenizer_style_batch(ROWS)
    with torch.no_grad():
        sdpa = model(ids, attention_mask=mask, position_ids=positions).logits
        model.config._attn_implementation = "eager"
        eager = model(ids, attention_mask=mask, position_ids=positions).logits
        model.config._attn_implementation = "sdpa"
    assert torch.allclose(sdpa, eager, atol=1e-5)  # padding rows too (uniform attention in both)


def test_output_attentions_shapes():
    with torch.no_grad():
        out = MODEL(torch.tensor([ROWS[0]]), output_attentions=True, output_hidden_states=True)
    assert len(out.attentions) == CONFIG.num_layers and out.attentions[0].shape == (1, 4, 7, 7)
    assert len(out.hidden_states) == CONFIG.num_layers + 1
    assert torch.allclose(out.attentions[0].sum(-1), torch.ones(1, 4, 7))
