"""Training throughput and peak memory of each method (``python -m bench train``)."""

from __future__ import annotations

import torch

from helpers.methods import apply_method

from .common import (
    gib,
    glm_batch,
    gpu_peak_flops,
    matmul_params,
    median,
    peak_memory,
    random_model,
    reset_peak,
    timed,
)

METHOD_OPTIONS = {
    "freeze": {"layers": 5},
    "embedding": {},
    "ptuning_v2": {"pre_seq_len": 16, "prefix_projection": True},
    "lora": {"r": 8},
}


def train_flops_per_token(model, config, seq: int) -> float:
    """4 FLOPs per frozen and 6 per trainable matmul weight, plus attention (QK^T and PV, forward and backward)."""
    frozen, trainable = matmul_params(model)
    attention = 12 * config.num_layers * seq * config.hidden_size
    return 4 * frozen + 6 * trainable + attention


def bench_train(size: str, method: str, seq: int, batch: int, steps: int, device: str, dtype: torch.dtype,
                attention: str = "sdpa", gradient_checkpointing: bool = False, options: dict | None = None) -> dict:
    """Median step time, tokens/s, peak memory and (on GPU) model FLOPs utilisation of one configuration."""
    model = random_model(size, device, dtype)
    model.config._attn_implementation = attention
    config = model.config
    options = {**METHOD_OPTIONS[method], **(options or {})}
    if method == "freeze":
        options["layers"] = min(options["layers"], config.num_layers)
    setup = apply_method(model, method, **options)
    model = setup.model.train()
    if gradient_checkpointing:
        (model.get_base_model() if hasattr(model, "get_base_model") else model).activation_checkpointing_enable()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=None)
    batch_data = glm_batch(config, batch, seq, device)
    on_gpu = device.startswith("cuda")
    autocast = torch.autocast(device_type="cuda" if on_gpu else "cpu", dtype=dtype, enabled=dtype != torch.float32)

    def step() -> None:
        with autocast:
            loss = model(**batch_data).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    reset_peak(device)
    times = timed(step, device, repeat=steps)
    peak, kind = peak_memory(device)
    seconds = median(times)
    tokens = batch * seq / seconds
    result = {"size": size, "method": method, "seq": seq, "batch": batch, "attention": attention,
              "gradient_checkpointing": gradient_checkpointing, "step_s": seconds, "tokens_per_s": tokens,
              "peak_bytes": peak, "peak_kind": kind, "trainable_params": setup.trainable_params}
    peak_flops = gpu_peak_flops(device)
    if peak_flops:
        result["mfu"] = train_flops_per_token(model, config, seq) * tokens / peak_flops
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return result


def format_train(result: dict) -> str:
    mfu = f"  MFU {100 * result['mfu']:.1f}%" if "mfu" in result else ""
    return (f"{result['size']:5s} {result['method']:10s} seq {result['seq']:4d} bs {result['batch']:2d} "
            f"{result['attention']:5s}{' ckpt' if result['gradient_checkpointing'] else '     '}  "
            f"{result['tokens_per_s']:9.0f} tok/s  step {1000 * result['step_s']:8.1f} ms  "
            f"peak {gib(result['peak_bytes'])} ({result['peak_kind']}){mfu}")
