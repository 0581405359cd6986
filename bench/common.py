"""Shared pieces of the benchmarks: synthetic models, batches in ChatGLM's layout, timing and memory."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from chatglm import ChatGLMConfig, ChatGLMForConditionalGeneration, known_config
from chatglm.quantization import QuantizedLinear
from helpers.run.memory import GIB, current_rss, peak_memory, reset_peak  # noqa: F401  (used by the bench modules)

# A small ChatGLM for CPU figures: the 6B architecture with fewer, narrower layers and a 32k vocabulary.
SMALL = dict(vocab_size=32000, hidden_size=512, num_layers=4, num_attention_heads=8, inner_hidden_size=2048,
             bos_token_id=31004, eos_token_id=31005, mask_token_id=31000, gmask_token_id=31001, pad_token_id=3)
# The dry runs of the GPU check: the same layers at toy sizes, so every code path runs in seconds on a CPU.
TINY = dict(vocab_size=1200, hidden_size=64, num_layers=2, num_attention_heads=4, inner_hidden_size=256,
            bos_token_id=1104, eos_token_id=1105, mask_token_id=1100, gmask_token_id=1101, pad_token_id=3)
SIZES = ("tiny", "small", "6b")
# Dense bf16/fp16 tensor-core peak of the GPUs the course meets, for model FLOPs utilisation.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "T4": 65e12}


def model_config(name: str, bits: int = 4, **overrides) -> ChatGLMConfig:
    if name == "6b":
        return known_config("THUDM/chatglm-6b-int4" if bits == 4 else "THUDM/chatglm-6b", quantization_bit=bits,
                            **overrides)
    if name in ("small", "tiny"):
        return ChatGLMConfig(**(SMALL if name == "small" else TINY), quantization_bit=bits, **overrides)
    raise ValueError(f"unknown model size {name!r}; use one of {', '.join(SIZES)}")


@torch.no_grad()
def random_model(name: str, device: str, dtype: torch.dtype, bits: int = 4, seed: int = 0,
                 **overrides) -> ChatGLMForConditionalGeneration:
    """A model of the given size with random weights built directly on ``device`` (packed INT4 stays packed)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        model = ChatGLMForConditionalGeneration(model_config(name, bits, **overrides))
    model.to_empty(device=device)
    model.tie_weights()  # before filling, so the output layer's untied copy is never written (2 GiB at 6B)
    tied = model.get_input_embeddings().weight
    for module in model.modules():
        if getattr(module, "weight", None) is tied and not isinstance(module, nn.Embedding):
            continue
        if isinstance(module, QuantizedLinear):
            # Random bytes straight into the packed storage: every int8 (INT8) or nibble pair (INT4) is uniform.
            module.weight.view(torch.uint8).random_(0, 256, generator=generator)
            scale = 0.02 / (2 ** (module.bits - 1) - 1) * (module.in_features / 4096) ** -0.5
            module.weight_scale.fill_(scale)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Linear):
            module.weight.normal_(0.0, 0.02, generator=generator)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, 0.02, generator=generator)
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
    model._init_weights(model.transformer.rotary_emb)  # the rotary frequencies
    return model.to(dtype).eval()


def special_ids(config: ChatGLMConfig) -> list[int]:
    """The ids random text must avoid ([MASK], [gMASK], <sop>, <eop>)."""
    return [config.mask_token_id, config.gmask_token_id, config.bos_token_id, config.eos_token_id]


def glm_batch(config: ChatGLMConfig, batch: int, seq: int, device: str, answer_fraction: float = 0.5,
              seed: int = 0) -> dict[str, torch.Tensor]:
    """Random rows ``context [gMASK] <sop> answer`` of exactly ``seq`` tokens, labels on the answer."""
    generator = torch.Generator().manual_seed(seed)
    context = max(1, int(seq * (1 - answer_fraction)) - 2)
    ids = torch.randint(10, min(config.vocab_size, 30000, *special_ids(config)), (batch, seq), generator=generator)
    ids[:, context] = config.gmask_token_id
    ids[:, context + 1] = config.bos_token_id
    labels = ids.clone()
    labels[:, : context + 1] = -100
    return {"input_ids": ids.to(device), "labels": labels.to(device)}


def synchronize(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(step: Callable[[], object], device: str, repeat: int, warmup: int = 2) -> list[float]:
    """Wall-clock seconds of ``step`` after ``warmup`` untimed runs."""
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def gpu_peak_flops(device: str) -> float | None:
    if not str(device).startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


def gemm_throughput(tokens: int, threads: int = 2, repeat: int = 3) -> dict:
    """fp32 ``torch.mm`` FLOP/s at the 6B layer shapes: ``tokens`` rows times each matrix, and the input-gradient
    product (the transposed shape), best of ``repeat``; the total is all eight products' FLOPs over their time."""
    config = model_config("6b")
    h, inner = config.hidden_size, config.inner_hidden_size
    shapes = {"query_key_value": (h, 3 * h), "dense": (h, h), "dense_h_to_4h": (h, inner), "dense_4h_to_h": (inner, h)}
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    rows, flops, seconds = {}, 0.0, 0.0
    try:
        for name, (fan_in, fan_out) in shapes.items():
            weight = torch.randn(fan_in, fan_out, generator=generator)
            for kind, (left, right) in {"forward": ((tokens, fan_in), weight),
                                        "input grad": ((tokens, fan_out), weight.T)}.items():
                x = torch.randn(*left, generator=generator)
                torch.mm(x, right)  # warm-up
                best = float("inf")
                for _ in range(repeat):
                    start = time.perf_counter()
                    torch.mm(x, right)
                    best = min(best, time.perf_counter() - start)
                work = 2 * tokens * fan_in * fan_out
                rows[f"{name} {kind}"] = work / best
                flops += work
                seconds += best
    finally:
        torch.set_num_threads(previous)
    return {"threads": threads, "tokens": tokens, "flops_per_s": flops / seconds, "per_shape": rows}


def gib(value: float) -> str:
    return f"{value / GIB:.2f} GiB"
