"""Batched, KV-cached generation against answering prompts one by one (``python -m bench eval``)."""

from __future__ import annotations

import time

import torch

from helpers.data import left_pad

from .common import random_model, synchronize


def bench_eval(size: str, prompts: int, new_tokens: int, batch: int, device: str, dtype: torch.dtype) -> dict:
    model = random_model(size, device, dtype)
    config = model.config
    generator = torch.Generator().manual_seed(0)
    rows = []
    for i in range(prompts):
        length = 24 + (i * 7) % 40  # varied prompt lengths, as in a real test split
        ids = torch.randint(10, 30000 if config.vocab_size > 30000 else config.vocab_size - 600, (length,),
                            generator=generator).tolist()
        rows.append(ids + [config.gmask_token_id, config.bos_token_id])
    options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   pad_token_id=config.pad_token_id)

    def run(chunk: list[list[int]]) -> None:
        inputs = left_pad(chunk, config.pad_token_id)
        with torch.no_grad():
            model.generate(input_ids=inputs["input_ids"].to(device), attention_mask=inputs["attention_mask"].to(device),
                           **options)

    run(rows[:2])  # warm-up
    synchronize(device)
    start = time.perf_counter()
    for row in rows:
        run([row])
    synchronize(device)
    one_by_one = time.perf_counter() - start
    start = time.perf_counter()
    for first in range(0, len(rows), batch):
        run(rows[first:first + batch])
    synchronize(device)
    batched = time.perf_counter() - start
    generated = prompts * new_tokens
    return {"size": size, "prompts": prompts, "new_tokens": new_tokens, "batch": batch,
            "one_by_one_s": one_by_one, "batched_s": batched, "speedup": one_by_one / batched,
            "tokens_per_s_batched": generated / batched, "tokens_per_s_one_by_one": generated / one_by_one}


def format_eval(result: dict) -> str:
    return (f"{result['size']:5s} {result['prompts']} prompts x {result['new_tokens']} new tokens: one by one "
            f"{result['one_by_one_s']:.2f} s ({result['tokens_per_s_one_by_one']:.0f} tok/s), batched (bs "
            f"{result['batch']}) {result['batched_s']:.2f} s ({result['tokens_per_s_batched']:.0f} tok/s): "
            f"{result['speedup']:.1f}x")
