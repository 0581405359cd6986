"""Training throughput, peak memory and model FLOPs of each method (``python -m bench train``)."""

from __future__ import annotations

import torch
from torch import nn

from chatglm.quantization import QuantizedLinear
from helpers.methods import apply_method

from .common import (
    current_rss,
    gemm_throughput,
    gib,
    glm_batch,
    gpu_peak_flops,
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


def _matmuls(model: nn.Module):
    """(name, module, in_features, out_features, weight trainable) of every matrix multiply of the model."""
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            yield name, module, module.in_features, module.out_features, False
        elif isinstance(module, nn.Linear):
            yield name, module, module.in_features, module.out_features, module.weight.requires_grad


def _block_index(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


def train_flops_per_step(model: nn.Module, config, seq: int, batch: int, labelled: int) -> dict[str, float]:
    """Model FLOPs of one training step, counted from the model's own matrices (recomputation not counted).

    Forward: 2 FLOPs per weight per row through it (``batch * seq`` rows for the blocks, the labelled rows only
    for the output layer, ``batch * pre_seq_len`` for the P-Tuning prefix encoder). Backward: 2 more per weight
    for the input gradient where the gradient has to flow (from the first block holding or fed by a trainable
    tensor up to the loss), and 2 more for the weight gradient of trainable matrices. Attention (QK^T and PV):
    4 * keys * hidden per token and block forward, twice that backward. INT4 unpacking is overhead, not a FLOP.
    """
    trainable_blocks = [_block_index(n) for n, p in model.named_parameters() if p.requires_grad]
    first = 0 if any(i is None for i in trainable_blocks) else min(trainable_blocks, default=config.num_layers)
    tokens = batch * seq
    prefix = config.pre_seq_len or 0
    forward = backward = 0.0
    for name, _, fan_in, fan_out, trainable in _matmuls(model):
        block = _block_index(name)
        if "prefix_encoder" in name:
            rows = batch * prefix
        elif block is None:  # the output layer
            rows = labelled
        else:
            rows = tokens
        weights = fan_in * fan_out
        forward += 2 * weights * rows
        needs_input_grad = block is None and "prefix_encoder" not in name or block is not None and block >= first
        backward += (2 * weights * rows if needs_input_grad else 0) + (2 * weights * rows if trainable else 0)
    attention = 4 * tokens * (seq + prefix) * config.hidden_size
    forward += attention * config.num_layers
    backward += 2 * attention * (config.num_layers - first)
    return {"forward_flops": forward, "backward_flops": backward, "flops": forward + backward}


def bench_train(size: str, method: str, seq: int, batch: int, steps: int, device: str, dtype: torch.dtype,
                attention: str = "sdpa", gradient_checkpointing: bool = False, options: dict | None = None,
                warmup: int = 2, roofline: bool = False) -> dict:
    """Median step time, tokens/s, peak memory and model FLOP/s (MFU on a known GPU) of one configuration.

    On CPU ``baseline_rss`` is the process's resident memory before the model is built, so ``peak_bytes -
    baseline_rss`` is what the model and its training take. The optimizer is fused AdamW, as the course's
    ``Trainer`` uses (``adamw_torch_fused``). ``roofline`` (CPU) measures fp32 ``torch.mm`` at the layer shapes
    right after the steps, under the same load, and reports the model FLOP/s as a share of it (``cpu_mfu``).
    """
    baseline = current_rss()
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
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    batch_data = glm_batch(config, batch, seq, device)
    labelled = int((batch_data["labels"][:, 1:] != -100).sum())
    ready = current_rss()  # model built and method applied, before the first step
    on_gpu = device.startswith("cuda")
    autocast = torch.autocast(device_type="cuda" if on_gpu else "cpu", dtype=dtype, enabled=dtype != torch.float32)

    def step() -> None:
        with autocast:
            loss = model(**batch_data).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    reset_peak(device)
    times = timed(step, device, repeat=steps, warmup=warmup)
    peak, kind = peak_memory(device)
    seconds = median(times)
    tokens = batch * seq / seconds
    flops = train_flops_per_step(model, config, seq, batch, labelled)
    result = {"size": size, "method": method, "options": setup.options, "seq": seq, "batch": batch,
              "attention": attention, "gradient_checkpointing": gradient_checkpointing, "step_s": seconds,
              "step_times_s": times, "tokens_per_s": tokens, "peak_bytes": peak, "peak_kind": kind,
              "baseline_rss": baseline if not on_gpu else 0,
              "ready_rss": ready if not on_gpu else 0, "trainable_params": setup.trainable_params,
              **flops, "flops_per_s": flops["flops"] / seconds}
    peak_flops = gpu_peak_flops(device)
    if peak_flops:
        result["mfu"] = result["flops_per_s"] / peak_flops
    if roofline and not on_gpu:
        del model, optimizer, setup
        gemm = gemm_throughput(batch * seq, threads=torch.get_num_threads())
        result.update(gemm_flops_per_s=gemm["flops_per_s"], cpu_mfu=result["flops_per_s"] / gemm["flops_per_s"])
    if on_gpu:
        torch.cuda.empty_cache()
    return result


def format_train(result: dict) -> str:
    mfu = f"  MFU {100 * result['mfu']:.1f}%" if "mfu" in result else ""
    above = result["peak_bytes"] - result.get("baseline_rss", 0)
    net = f" = {gib(above)} above start" if result.get("baseline_rss") else ""
    return (f"{result['size']:5s} {result['method']:10s} seq {result['seq']:4d} bs {result['batch']:2d} "
            f"{result['attention']:5s}{' ckpt' if result['gradient_checkpointing'] else '     '}  "
            f"{result['tokens_per_s']:9.1f} tok/s  step {1000 * result['step_s']:8.1f} ms  "
            f"{result['flops_per_s'] / 1e9:8.1f} GFLOP/s  peak {gib(result['peak_bytes'])} ({result['peak_kind']})"
            f"{net}{mfu}")
