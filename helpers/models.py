"""Loading ChatGLM-6B (or the embedded tiny model) for the course, with sensible device and dtype defaults."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import chatglm
from chatglm import ChatGLMForConditionalGeneration, known_config
from chatglm.configuration import known_config_dict

# What a ChatGLM checkpoint folder needs; the remote ``.py`` files of the public repositories are never fetched.
CHECKPOINT_FILES = [
    "config.json",
    "tokenizer_config.json",
    "ice_text.model",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
    "model*.safetensors",
    "model.safetensors.index.json",
]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """fp32 on CPU; on GPU bf16 where supported (A100/H100), else fp16 (T4)."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def _parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}")
    return names[dtype]


def resolve_checkpoint(name_or_path: str) -> Path:
    """A local folder holding the checkpoint: ``"tiny"``, an existing folder, or a hub name (downloaded).

    Hub downloads take only weights, config and tokenizer files (never remote code).
    """
    if name_or_path == "tiny":
        from .tiny import ensure_tiny

        return ensure_tiny()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json; point at a ChatGLM checkpoint folder")
        return path
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/")):
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, allow_patterns=CHECKPOINT_FILES))
    raise FileNotFoundError(
        f"{name_or_path!r} is neither 'tiny', an existing folder, nor a hub name like THUDM/chatglm-6b-int4"
    )


def load_model(
    name_or_path: str = "tiny",
    quantization_bit: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
):
    """(model, tokenizer) in eval mode: the embedded ``"tiny"`` model, a local folder or a hub name.

    ``quantization_bit`` (4 or 8) quantizes a floating checkpoint after loading (on the target device, one
    matrix at a time); an already quantized checkpoint keeps its format. Defaults: GPU if present, bf16/fp16 on
    GPU and fp32 on CPU.
    """
    folder = resolve_checkpoint(name_or_path)
    device = torch.device(device) if device is not None else default_device()
    dtype = _parse_dtype(dtype) or default_dtype(device)
    load_kwargs = {"dtype": dtype}
    if device.type == "cuda":
        load_kwargs["device_map"] = {"": device.index or 0}  # weights go straight to the GPU
    model = AutoModelForCausalLM.from_pretrained(folder, **load_kwargs)
    if device.type != "cuda":
        model.to(device)
    if quantization_bit:
        current = model.config.quantization_bit
        if current and current != quantization_bit:
            raise ValueError(
                f"{name_or_path} is already quantized to {current} bits; cannot make it {quantization_bit}"
            )
        if not current:
            model.quantize(quantization_bit)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model.config.name_or_path = name_or_path  # what run records and reloads refer to
    return model.eval(), tokenizer


def is_small_model(model) -> bool:
    """Whether ``model`` (``"tiny"``, a checkpoint folder, or a loaded model) is a small stand-in, not ChatGLM-6B."""
    if isinstance(model, (str, Path)):
        if str(model) == "tiny":
            return True
        config = Path(model).expanduser() / "config.json"
        return config.is_file() and json.loads(config.read_text(encoding="utf-8")).get("hidden_size", 0) < 1024
    config = getattr(model, "config", None) or model.get_base_model().config
    return config.hidden_size < 1024


def meta_model(name: str = "THUDM/chatglm-6b-int4", **config_overrides) -> ChatGLMForConditionalGeneration:
    """The full-size model on the ``meta`` device (shapes only, no memory), from the offline known config."""
    if known_config_dict(name) is None:
        raise KeyError(f"{name!r} is not a known ChatGLM-6B name; known: {', '.join(chatglm.known_config_names())}")
    with torch.device("meta"):
        return ChatGLMForConditionalGeneration(known_config(name, **config_overrides))
