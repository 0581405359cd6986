"""Position ids and the prefix-LM attention mask, on hand-derived sequences."""

import pytest
import torch

from chatglm.layout import glm_blocked_mask, glm_position_ids
from tests.conftest import BOS, GMASK, MASK, PAD, glm_ids, random_model, tiny_config


def test_single_sequence_positions_and_mask():
    config = tiny_config()
    ids = torch.tensor([glm_ids([10, 11, 12], [20, 21])])  # a b c [gMASK] <sop> x y
    positions = glm_position_ids(ids, config)
    assert positions.tolist() == [[[0, 1, 2, 3, 3, 3, 3], [0, 0, 0, 0, 1, 2, 3]]]
    blocked = glm_blocked_mask(ids, config)[0, 0]
    expected = [[j >= 4 and j > i for j in range(7)] for i in range(7)]  # context visible, causal after <sop>
    assert blocked.tolist() == expected


def test_mask_token_used_when_no_gmask():
    config = tiny_config()
    ids = torch.tensor([[10, MASK, 11, BOS, 20]])
    assert glm_position_ids(ids, config).tolist() == [[[0, 1, 2, 1, 1], [0, 0, 0, 1, 2]]]
    # [gMASK] wins over an earlier [MASK]
    ids = torch.tensor([[MASK, 10, GMASK, BOS]])
    assert glm_position_ids(ids, config)[0, 0].tolist() == [0, 1, 2, 2]


def test_left_padded_batch_matches_rows_alone():
    config = tiny_config()
    short = glm_ids([10], [20])
    long = glm_ids([10, 11, 12], [20])
    ids = torch.tensor([[PAD, PAD] + short, long])
    padding = torch.tensor([[0, 0] + [1] * len(short), [1] * len(long)])
    positions = glm_position_ids(ids, config, padding)
    assert positions[0].tolist() == [[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 2]]
    assert positions[1].tolist() == glm_position_ids(torch.tensor([long]), config)[0].tolist()
    blocked = glm_blocked_mask(ids, config, padding)[:, 0]
    assert blocked[0, :2].all()  # padding rows see nothing
    assert blocked[0, :, :2].all()  # nobody sees padding
    alone = glm_blocked_mask(torch.tensor([short]), config)[0, 0]
    assert torch.equal(blocked[0, 2:, 2:], alone)


def test_missing_layout_tokens_raise_clear_error():
    model = random_model()
    with pytest.raises(ValueError, match="<sop>"):
        model(torch.tensor([[10, 11, GMASK, 12]]))
    with pytest.raises(ValueError, match=r"\[gMASK\]"):
        model(torch.tensor([[10, 11, BOS, 12]]))


def test_prefix_columns_are_visible_to_every_query():
    model = random_model(pre_seq_len=3)
    ids = torch.tensor([glm_ids([10, 11], [20])])
    mask = model.transformer._attention_mask(ids, None, ids.shape[1], past_length=0, prefix_length=3)
    assert mask.blocked.shape == (1, 1, 5, 8)
    assert not mask.blocked[..., :3].any()
    assert torch.equal(mask.blocked[..., 3:], glm_blocked_mask(ids, model.config))


def test_prefix_does_not_shift_positions():
    """With a prefix the token positions are those of the plain sequence (prefix keys are not rotated)."""
    model = random_model(pre_seq_len=2)
    ids = torch.tensor([glm_ids([10, 11], [20, 21])])
    seen = {}

    def record(module, args, output):
        seen["pos"] = args[0]

    hook = model.transformer.rotary_emb.register_forward_hook(record)
    model(ids)
    hook.remove()
    assert torch.equal(seen["pos"], glm_position_ids(ids, model.config))


def test_residual_scale_is_the_originals_for_any_depth():
    """The original never passes num_layers to its blocks, so all use sqrt(2 * 28)."""
    for layers in (2, 3):
        model = random_model(num_layers=layers)
        assert all(block.alpha == 56**0.5 for block in model.transformer.layers)


def test_fused_projection_is_split_per_head():
    """query_key_value output is [q|k|v] per head: with one token, attention returns that head's v slice."""
    model = random_model()
    attention = model.transformer.layers[0].attention
    hidden = torch.randn(1, 1, 64)
    heads, head_dim = attention.num_heads, attention.head_dim
    qkv = attention.query_key_value(hidden).view(1, 1, heads, 3 * head_dim)
    v = qkv[..., 2 * head_dim:].reshape(1, 1, heads * head_dim)
    rotary = model.transformer.rotary_emb
    cos, sin = rotary(torch.zeros(1, 2, 1, dtype=torch.long))
    from chatglm.modeling import AttentionMask  # noqa: PLC0415

    out, _ = attention(hidden, rotary, cos, sin, AttentionMask(None))
    assert torch.allclose(out, attention.dense(v), atol=1e-6)


def test_rotary_frequencies_are_rounded_to_fp16():
    model = random_model()
    inv_freq = model.transformer.rotary_emb.inv_freq
    exact = 1.0 / (10000 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8))
    assert torch.equal(inv_freq, exact.half().float())
    assert not torch.equal(inv_freq.double(), exact)
