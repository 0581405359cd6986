"""Shared pieces of the benchmarks: synthetic models, batches in ChatGLM's layout, timing and memory."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from chatglm import ChatGLMConfig, ChatGLMForConditionalGeneration, known_config
from chatglm.quantization import QuantizedLinear

# A small ChatGLM for CPU figures: the 6B architecture with fewer, narrower layers and a 32k vocabulary.
SMALL = dict(vocab_size=32000, hidden_size=512, num_layers=4, num_attention_heads=8, inner_hidden_size=2048,
             bos_token_id=31004, eos_token_id=31005, mask_token_id=31000, gmask_token_id=31001, pad_token_id=3)
# Dense bf16/fp16 tensor-core peak of the GPUs the course meets, for model FLOPs utilisation.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "T4": 65e12}


def model_config(name: str, bits: int = 4, **overrides) -> ChatGLMConfig:
    if name == "6b":
        return known_config("THUDM/chatglm-6b-int4" if bits == 4 else "THUDM/chatglm-6b", quantization_bit=bits,
                            **overrides)
    if name == "small":
        return ChatGLMConfig(**SMALL, quantization_bit=bits, **overrides)
    raise ValueError(f"unknown model size {name!r}; use small or 6b")


@torch.no_grad()
def random_model(name: str, device: str, dtype: torch.dtype, bits: int = 4, seed: int = 0,
                 **overrides) -> ChatGLMForConditionalGeneration:
    """A model of the given size with random weights built directly on ``device`` (packed INT4 stays packed)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        model = ChatGLMForConditionalGeneration(model_config(name, bits, **overrides))
    model.to_empty(device=device)
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.weight.copy_(torch.randint(-128, 128, module.weight.shape, generator=generator, device=device,
                                              dtype=torch.int16).to(torch.int8))
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
    model.tie_weights()
    return model.to(dtype).eval()


def glm_batch(config: ChatGLMConfig, batch: int, seq: int, device: str, answer_fraction: float = 0.5,
              seed: int = 0) -> dict[str, torch.Tensor]:
    """Random rows ``context [gMASK] <sop> answer`` of exactly ``seq`` tokens, labels on the answer."""
    generator = torch.Generator().manual_seed(seed)
    context = max(1, int(seq * (1 - answer_fraction)) - 2)
    ids = torch.randint(10, min(config.vocab_size, 30000), (batch, seq), generator=generator)
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


def reset_peak(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory(device: str) -> tuple[int, str]:
    """Peak bytes since :func:`reset_peak`: CUDA max allocated, or the process's peak RSS."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated(), "cuda max allocated"
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024, "peak RSS"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS"


def gpu_peak_flops(device: str) -> float | None:
    if not str(device).startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


def matmul_params(model: nn.Module) -> tuple[int, int]:
    """(frozen, trainable) weight counts that take part in matrix multiplies, counted per logical element.

    Packed INT4 bytes count as the two weights they hold; the tied output layer counts once more (it is a
    separate multiply with the embedding matrix). The P-Tuning prefix encoder runs once per row, not per token,
    so it is left out.
    """
    frozen = trainable = 0
    for name, module in model.named_modules():
        if "prefix_encoder" in name:
            continue
        if isinstance(module, QuantizedLinear):
            frozen += module.in_features * module.out_features
        elif isinstance(module, nn.Linear):
            if module.weight.requires_grad:
                trainable += module.weight.numel()
            else:
                frozen += module.weight.numel()
    return frozen, trainable


def gib(value: float) -> str:
    return f"{value / (1 << 30):.2f} GiB"
