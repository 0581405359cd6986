"""Batched, KV-cached generation against one by one (``python -m bench eval``); one generate's peak memory
(``python -m bench generate``)."""

from __future__ import annotations

import time

import torch

from helpers.tasks import left_pad

from .common import current_rss, gib, peak_memory, random_model, reset_peak, synchronize


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


def prompt_ids(config, batch: int, prompt: int) -> torch.Tensor:
    """``batch`` seeded random prompts of ``prompt`` tokens, ending ``[gMASK] <sop>`` as ChatGLM's prompts do."""
    generator = torch.Generator().manual_seed(0)
    high = 30000 if config.vocab_size > 30000 else config.vocab_size - 600
    ids = torch.randint(10, high, (batch, prompt - 2), generator=generator)
    return torch.cat((ids, torch.tensor([[config.gmask_token_id, config.bos_token_id]]).expand(batch, -1)), dim=1)


def bench_generate(size: str, prompt: int, new_tokens: int, batch: int, device: str, dtype: torch.dtype) -> dict:
    """Peak memory and time of one greedy ``generate`` of ``new_tokens`` after a ``prompt``-token context."""
    baseline = current_rss()
    model = random_model(size, device, dtype)
    config = model.config
    ids = prompt_ids(config, batch, prompt)
    ready = current_rss()
    reset_peak(device)
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(device), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=config.pad_token_id)
    synchronize(device)
    seconds = time.perf_counter() - start
    peak, kind = peak_memory(device)
    return {"size": size, "prompt": prompt, "new_tokens": new_tokens, "batch": batch, "seconds": seconds,
            "tokens_per_s": batch * new_tokens / seconds, "generated": out.shape[1] - prompt, "peak_bytes": peak,
            "peak_kind": kind, "baseline_rss": baseline if not device.startswith("cuda") else 0,
            "ready_rss": ready if not device.startswith("cuda") else 0}


def format_generate(result: dict) -> str:
    above = f" = {gib(result['peak_bytes'] - result['baseline_rss'])} above start" if result["baseline_rss"] else ""
    return (f"{result['size']:5s} generate bs {result['batch']} x ({result['prompt']} + {result['new_tokens']} "
            f"tokens): {result['seconds']:.2f} s ({result['tokens_per_s']:.2f} tok/s), peak "
            f"{gib(result['peak_bytes'])} ({result['peak_kind']}){above}")


def bench_decode(size: str, batch: int, prompt: int, new_tokens: int, device: str, dtype: torch.dtype) -> dict:
    """Decoding tokens/s of ``batch`` sequences: (time of ``new_tokens`` - time of 1) over ``new_tokens - 1`` steps,
    so the prompt's forward pass is not counted."""
    if new_tokens < 2:
        raise ValueError(f"decoding needs at least 2 new tokens to time a step, got {new_tokens}")
    model = random_model(size, device, dtype)
    config = model.config
    ids = prompt_ids(config, batch, prompt)
    ids = ids.to(device)

    def run(count: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids, max_new_tokens=count, min_new_tokens=count, do_sample=False,
                           pad_token_id=config.pad_token_id)
        synchronize(device)
        return time.perf_counter() - start

    run(2)  # warm-up (and kernel compilation)
    first, full = run(1), run(new_tokens)
    step = max(full - first, 1e-9) / (new_tokens - 1)
    return {"size": size, "batch": batch, "prompt": prompt, "new_tokens": new_tokens, "prefill_s": first,
            "decode_step_s": step, "decode_tokens_per_s": batch / step}
