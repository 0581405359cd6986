"""Generation never projects the whole prompt onto the vocabulary: the prompt's pass keeps the last position only."""

import torch

from bench.common import random_model


def test_generate_projects_only_the_last_position_and_keeps_greedy_ids():
    model = random_model("tiny", "cpu", torch.float32)
    config = model.config
    ids = torch.tensor([[20, 21, 22, 23, 24, config.gmask_token_id, config.bos_token_id]])
    shapes = []
    handle = model.lm_head.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.shape)))
    out = model.generate(input_ids=ids, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                         pad_token_id=config.pad_token_id)
    handle.remove()
    assert shapes[0] == (1, 1, config.vocab_size)  # the prompt's pass: one position, not 7
    # the same greedy ids as taking the argmax of full logits without a cache, token by token
    expected = ids
    with torch.no_grad():
        for _ in range(3):
            logits = model(input_ids=expected, use_cache=False).logits
            expected = torch.cat((expected, logits[:, -1:].argmax(-1)), dim=1)
    assert torch.equal(out, expected)


def test_logits_to_keep_is_ignored_when_labels_ask_for_the_loss():
    model = random_model("tiny", "cpu", torch.float32)
    ids = torch.tensor([[20, 21, model.config.gmask_token_id, model.config.bos_token_id, 30, 31]])
    with torch.no_grad():
        full = model(input_ids=ids, labels=ids, use_cache=False)
        kept = model(input_ids=ids, labels=ids, use_cache=False, logits_to_keep=1)
        last = model(input_ids=ids, use_cache=False, logits_to_keep=1)
    assert torch.equal(full.loss, kept.loss) and kept.logits.shape == full.logits.shape
    assert torch.allclose(last.logits[:, -1], full.logits[:, -1], atol=1e-6)
