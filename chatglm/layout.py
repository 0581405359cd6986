"""ChatGLM's token layout: where ``[gMASK]``/``<sop>`` sit decides positions and the attention mask.

``prompt [gMASK] <sop> answer``: tokens up to ``<sop>`` (the context) see each other; from ``<sop>`` on
attention is causal. Positions have two rows: row 0 counts the context and then stays at the mask token's
position; row 1 is 0 over the context and counts 1, 2, 3 ... from ``<sop>``.
"""

from __future__ import annotations

import torch

from .configuration import ChatGLMConfig

# --------------------------------------------------------------------------------------------------------------


def _first_index(hits: torch.Tensor) -> torch.Tensor:
    """Index of the first True along the last dim (0 where there is none)."""
    return hits.int().argmax(dim=-1)


def glm_layout(
    input_ids: torch.Tensor, config: ChatGLMConfig, padding_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token index, context length and mask position of each row of ``input_ids`` [b, s].

    Without ``padding_mask`` every token counts (the original model's view). With an HF padding mask
    [b, s] (1 = token, 0 = padding) indices count only real tokens, so a left-padded row is laid out exactly
    like the same row alone. The context ends at the first ``<sop>`` (bos); the mask position is that of the
    first ``[gMASK]`` if the row has one, else of the first ``[MASK]``.
    """
    if padding_mask is None:
        token_index = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        real = torch.ones_like(input_ids, dtype=torch.bool)
    else:
        real = padding_mask.bool()
        token_index = torch.cumsum(real.long(), dim=-1) - 1
    is_bos = (input_ids == config.bos_token_id) & real
    is_gmask = (input_ids == config.gmask_token_id) & real
    is_mask = (input_ids == config.mask_token_id) & real
    has_gmask = is_gmask.any(dim=-1)
    missing_bos = ~is_bos.any(dim=-1)
    missing_mask = ~(has_gmask | is_mask.any(dim=-1))
    if bool(missing_bos.any()) or bool(missing_mask.any()):
        row = int(torch.nonzero(missing_bos | missing_mask)[0, 0])
        raise ValueError(
            f"row {row} of input_ids has no "
            f"{'<sop> (bos, id %d)' % config.bos_token_id if missing_bos[row] else '[gMASK]/[MASK] token'}: "
            "ChatGLM needs the layout `prompt [gMASK] <sop> ...` to place positions and the attention mask. "
            "Encode text with the ChatGLM tokenizer (it appends [gMASK] <sop>), or pass position_ids and "
            "a 4D attention_mask yourself."
        )
    bos_at = _first_index(is_bos)
    mask_at = torch.where(has_gmask, _first_index(is_gmask), _first_index(is_mask))
    context_length = token_index.gather(1, bos_at[:, None])[:, 0]
    mask_position = token_index.gather(1, mask_at[:, None])[:, 0]
    return token_index, context_length, mask_position


def glm_position_ids(
    input_ids: torch.Tensor, config: ChatGLMConfig, padding_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Position ids for a whole sequence: [b, 2, s] with 2D positions, else [b, s]; zeros on padding."""
    token_index, ctx, mask_pos = glm_layout(input_ids, config, padding_mask)
    in_answer = token_index >= ctx[:, None]
    if config.position_encoding_2d:
        absolute = torch.where(in_answer, mask_pos[:, None], token_index)
        block = torch.where(in_answer, token_index - ctx[:, None] + 1, torch.zeros_like(token_index))
        positions = torch.stack((absolute, block), dim=1)
        if padding_mask is not None:
            positions = positions * padding_mask.bool()[:, None, :]
        return positions
    positions = token_index.clone()
    if padding_mask is not None:
        positions = positions * padding_mask.bool()
    return positions


def glm_blocked_mask(
    input_ids: torch.Tensor, config: ChatGLMConfig, padding_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Prefix-LM mask [b, 1, s, s], True = blocked: causal, plus every query sees the context (before <sop>).

    With a padding mask, padding columns are blocked for every query and padding rows are fully blocked,
    as in the original tokenizer's padded batches.
    """
    token_index, ctx, _ = glm_layout(input_ids, config, padding_mask)
    query, key = token_index[:, :, None], token_index[:, None, :]
    visible = (key <= query) | (key < ctx[:, None, None])
    if padding_mask is not None:
        real = padding_mask.bool()
        visible = visible & real[:, None, :] & real[:, :, None]
    return (~visible)[:, None]


def check_bool_mask(mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype != torch.bool:
        raise TypeError(
            f"a 4D attention_mask must be boolean with True = blocked (as the ChatGLM tokenizer returns it), "
            f"got {mask.dtype}; pass a 2D padding mask [batch, seq] with 1 = token instead"
        )
    return mask
