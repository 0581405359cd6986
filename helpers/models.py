"""Loading ChatGLM-6B (or the embedded tiny model) for the course, with sensible device and dtype defaults."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import sentencepiece
import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer

import chatglm
from chatglm import ChatGLMConfig, ChatGLMForConditionalGeneration, known_config
from chatglm.checkpoint import BIN_NAME, SAFE_NAME, check_weight_file, weight_files
from chatglm.configuration import known_config_dict
from chatglm.tokenization import VOCAB_FILES_NAMES

from .errors import UserError

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


# What a damaged or mismatched checkpoint makes loading raise (torch, safetensors, pickle, transformers).
_LOAD_ERRORS = (OSError, ValueError, RuntimeError, EOFError, KeyError, pickle.UnpicklingError, SafetensorError)


# The compute dtypes a model can load in, by the names the command line and run records use.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_ALIASES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "half": "fp16"}


def parse_device(device: torch.device | str | None) -> torch.device:
    """``device`` as a torch device (default: the GPU when there is one); a bad or absent one is a UserError."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"device (--device) {device!r} is not a device; use cpu or cuda (cuda:1 for the second GPU)") \
            from None
    if parsed.type not in ("cpu", "cuda"):
        raise UserError(f"device (--device) {device!r}: the course runs on cpu or cuda")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device (--device) {device!r}: no CUDA GPU is visible here; use --device cpu")
        if (parsed.index or 0) >= torch.cuda.device_count():
            raise UserError(f"device (--device) {device!r}: there are only {torch.cuda.device_count()} GPU(s)")
    return parsed


def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX512-BF16 or AMX); an AVX2 laptop or an ARM Mac does not."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def default_dtype(device: torch.device | str, small: bool = True) -> torch.dtype:
    """The compute dtype unless one is asked for: on a GPU bf16 where supported (A100/H100), else fp16 (T4).

    On a CPU fp32, exact (the tiny model, the parity tests) — except ChatGLM-6B on a CPU with native bf16: bf16, where
    PyTorch's int4pack kernels decode about 8x faster than fp32 (``bench/RESULTS.md``); ``dtype="fp32"`` keeps the
    exact path there too.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return torch.bfloat16 if not small and cpu_has_bf16() else torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def dtype_name(dtype: torch.dtype | str | None, device: torch.device | str = "cpu", small: bool = True) -> str:
    """The name (``fp32``, ``fp16``, ``bf16``) of ``dtype``; ``None``: the default for the device and model size."""
    if dtype is None:
        dtype = default_dtype(device, small)
    if isinstance(dtype, torch.dtype):
        return next(name for name, value in DTYPES.items() if value == dtype)
    name = DTYPE_ALIASES.get(str(dtype).lower(), str(dtype).lower())
    if name not in DTYPES:
        raise UserError(f"dtype (--dtype) {dtype!r} is unknown; use one of {', '.join(DTYPES)}")
    return name


TOKENIZER_FILES = ("tokenizer_config.json", VOCAB_FILES_NAMES["vocab_file"])
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
HUB_LOOKUP_TIMEOUT = 10  # seconds; an offline machine must not hang on a typo


def _known_names() -> str:
    return ", ".join(chatglm.known_config_names())


def _json_file(path: Path) -> dict:
    try:
        content = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UserError(f"{path}: not readable JSON ({error}); download it again") from error
    if not isinstance(content, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(content).__name__}; download it again")
    return content


def check_checkpoint_folder(folder: str | os.PathLike) -> Path:
    """Check a local checkpoint folder without loading it: config, weight files (complete), tokenizer files.

    Raises :class:`UserError` naming the missing or broken file; returns the folder.
    """
    folder = Path(folder)
    expected = (f"a ChatGLM checkpoint folder holds config.json, the weights ({SAFE_NAME} or {BIN_NAME}, or shards "
                f"with an index) and the tokenizer ({', '.join(TOKENIZER_FILES)})")
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder}: no config.json; {expected}")
    config = _json_file(folder / "config.json")
    if config.get("model_type") not in (None, "chatglm"):
        raise UserError(f"{folder / 'config.json'}: model_type is {config['model_type']!r}, not 'chatglm'; "
                        "this course loads ChatGLM-6B checkpoints")
    try:
        for path in weight_files(folder):
            check_weight_file(path)
    except (OSError, ValueError) as error:
        raise UserError(f"{error}" if str(folder) in str(error) else f"{folder}: {error}") from error
    for name in TOKENIZER_FILES:
        if not (folder / name).is_file():
            raise UserError(f"{folder}: no {name} (a tokenizer file); {expected}")
    _json_file(folder / "tokenizer_config.json")
    vocabulary = folder / VOCAB_FILES_NAMES["vocab_file"]
    try:
        sentencepiece.SentencePieceProcessor(model_proto=vocabulary.read_bytes())
    except Exception as error:  # sentencepiece raises RuntimeError or a protobuf DecodeError
        raise UserError(f"{vocabulary}: not a valid sentencepiece model, truncated or corrupt "
                        f"({type(error).__name__}); download it again") from error
    return folder


def _hub_lookup(name: str) -> str | None:
    """Why ``name`` cannot be used as a hub model (None if it can): cached, or found on the hub."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(huggingface_hub.try_to_load_from_cache(name, "config.json"), str):
        return None
    if constants.HF_HUB_OFFLINE:
        return "not in the local hub cache, and HF_HUB_OFFLINE is set"
    try:
        huggingface_hub.model_info(name, timeout=HUB_LOOKUP_TIMEOUT)
    except GatedRepoError:
        return "a gated hub repository; accept its terms on the hub and log in (hf auth login)"
    except RepositoryNotFoundError:
        return "no model of that name on the hub"
    except Exception as error:  # offline, DNS, timeout, proxy: all mean "cannot be looked up now"
        return f"the hub could not be reached to look it up ({type(error).__name__})"
    return None


def check_model_source(name_or_path: str) -> str:
    """Check what ``--model`` names, cheaply (no weights loaded, nothing downloaded); raises :class:`UserError`.

    Returns ``"tiny"``; the absolute path of a checked local folder; or the hub name (a known ChatGLM-6B name,
    one in the local hub cache, or one the hub confirms within a few seconds).
    """
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise UserError(f"model (--model) must be 'tiny', a checkpoint folder or a hub name, got {name_or_path!r}")
    name = str(name_or_path)
    if name == "tiny":
        return name
    path = Path(name).expanduser()
    if path.is_dir():
        return str(check_checkpoint_folder(path).resolve())
    if path.exists():
        raise UserError(f"{name}: is a file; give the checkpoint folder that holds it (with config.json)")
    if known_config_dict(name) is not None:
        return name
    if _HUB_NAME.match(name) and not name.startswith("."):
        reason = _hub_lookup(name)
        if reason is None:
            return name
        raise UserError(f"no such folder: {name} (and not a known hub name: {reason}); give 'tiny', a checkpoint "
                        f"folder, or one of {_known_names()}")
    raise UserError(f"no such folder: {name}; give 'tiny', a checkpoint folder, or a hub name such as "
                    f"{_known_names()}")


def model_config(name_or_path: str) -> ChatGLMConfig:
    """The configuration of what ``--model`` names, without loading weights (for checking options early)."""
    source = check_model_source(name_or_path)
    if source == "tiny":  # the committed or cached build if there is one; never a build just for the config
        from .tiny import TinyRecipe, shipped_tiny, tiny_dir

        for folder in (shipped_tiny(), tiny_dir()):
            if folder is not None and (folder / "config.json").is_file():
                return _config_from(folder / "config.json")
        recipe = TinyRecipe()
        fields = ("hidden_size", "num_layers", "num_attention_heads", "inner_hidden_size", "max_sequence_length")
        return ChatGLMConfig(**{f: getattr(recipe, f) for f in fields if hasattr(recipe, f)})
    if Path(source).is_dir():
        return _config_from(Path(source) / "config.json")
    if known_config_dict(source) is not None:
        return known_config(source)
    from huggingface_hub import hf_hub_download

    return _config_from(Path(hf_hub_download(source, "config.json")))


def _config_from(path: Path) -> ChatGLMConfig:
    values = {k: v for k, v in _json_file(path).items() if k not in ("model_type", "transformers_version")}
    try:
        return ChatGLMConfig(**values)
    except (ValueError, TypeError, NotImplementedError) as error:
        raise UserError(f"{path}: not a usable ChatGLM configuration ({error})") from error


def resolve_checkpoint(name_or_path: str) -> Path:
    """A local folder holding the checkpoint: ``"tiny"``, an existing folder, or a hub name (downloaded).

    Checked first (:func:`check_model_source`); hub downloads take only weights, config and tokenizer files (never
    remote code) and are checked once downloaded.
    """
    source = check_model_source(name_or_path)
    if source == "tiny":
        from .tiny import ensure_tiny

        folder = ensure_tiny()
        try:
            return check_checkpoint_folder(folder)
        except UserError as error:
            raise UserError(f"the embedded tiny model's cache is damaged ({error}); delete {folder} and it is "
                            "rebuilt on the next use") from error
    if Path(source).is_dir():
        return Path(source)
    import huggingface_hub

    try:
        folder = huggingface_hub.snapshot_download(source, allow_patterns=CHECKPOINT_FILES)
    except Exception as error:  # offline, not cached, gated, interrupted: all mean "not downloaded"
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{source}: could not be downloaded from the hub ({type(error).__name__}: {first_line}); "
                        "check the connection, or download the folder elsewhere and give its path") from error
    return check_checkpoint_folder(folder)


def _load_error(folder: Path, what: str, error: Exception) -> UserError:
    """A :class:`UserError` for a failed load: the broken weight file if a full check finds one, else the folder."""
    if what == "weights":
        try:
            for path in weight_files(folder):
                check_weight_file(path, thorough=True)
        except (OSError, ValueError) as broken:
            return UserError(str(broken))
    first_line = (str(error).strip().splitlines() or [""])[0][:300]
    if str(folder) in first_line and "download it again" in first_line:  # already names the file (our own checks)
        return UserError(first_line)
    if what == "weights" and "mismatch" in str(error).lower():
        return UserError(f"{folder}: config.json does not match the weights (tensor shapes differ, as the load "
                         "report above lists); use the config.json that came with these weights")
    return UserError(f"{folder}: the {what} could not be loaded ({type(error).__name__}: {first_line}); "
                     "if the folder was copied or downloaded only partly, download it again")


def load_model(name_or_path: str = "tiny", quantization_bit: int | None = None,
               device: torch.device | str | None = None, dtype: torch.dtype | str | None = None):
    """(model, tokenizer) in eval mode: the embedded ``"tiny"`` model, a local folder or a hub name.

    ``quantization_bit`` (4 or 8) quantizes a floating checkpoint after loading (on the target device, one
    matrix at a time); an already quantized checkpoint keeps its format. Defaults: GPU if present; the dtype of
    :func:`default_dtype` (bf16/fp16 on a GPU; fp32 on a CPU, bf16 for ChatGLM-6B on a CPU with native bf16).
    """
    if quantization_bit not in (None, 0, 4, 8):
        raise UserError(f"quantization_bit must be 4 or 8 (or left out), got {quantization_bit!r}")
    device = parse_device(device)
    dtype = DTYPES[dtype_name(dtype, device)] if dtype is not None else None
    folder = resolve_checkpoint(name_or_path)
    dtype = dtype or default_dtype(device, is_small_model(folder))
    load_kwargs = {"dtype": dtype}
    if device.type == "cuda":
        load_kwargs["device_map"] = {"": device.index or 0}  # weights go straight to the GPU
    try:
        model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, **load_kwargs)
    except torch.OutOfMemoryError:
        raise
    except _LOAD_ERRORS as error:
        raise _load_error(folder, "weights", error) from error
    # The head may be tied to the embedding; a prefix named in config.json may start fresh (P-Tuning v2 trains it).
    missing = sorted(k for k in info.get("missing_keys", ()) if k != "lm_head.weight" and "prefix_encoder" not in k)
    if missing:
        raise UserError(f"{folder}: the weights lack {len(missing)} of the model's tensors (e.g. {missing[0]}), "
                        "which would start random; the files are incomplete or belong to another model")
    if device.type != "cuda":
        model.to(device)
    if quantization_bit:
        current = model.config.quantization_bit
        if current and current != quantization_bit:
            raise UserError(
                f"{name_or_path} is already quantized to {current} bits; cannot make it {quantization_bit} "
                "(leave quantization_bit out, or load the floating checkpoint)"
            )
        if not current:
            model.quantize(quantization_bit)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except _LOAD_ERRORS as error:
        raise _load_error(folder, "tokenizer", error) from error
    model.config.name_or_path = name_or_path  # what run records and reloads refer to
    return model.eval(), tokenizer


def is_small_model(model) -> bool:
    """Whether ``model`` (``"tiny"``, a checkpoint folder, a config or a loaded model) is a small stand-in, not
    ChatGLM-6B: the one rule that picks the tiny model's defaults."""
    if isinstance(model, (str, Path)):
        if str(model) == "tiny":
            return True
        config = Path(model).expanduser() / "config.json"
        return config.is_file() and json.loads(config.read_text(encoding="utf-8")).get("hidden_size", 0) < 1024
    if not isinstance(model, ChatGLMConfig):
        model = getattr(model, "config", None) or model.get_base_model().config
    return model.hidden_size < 1024


def meta_model(name: str = "THUDM/chatglm-6b-int4", **config_overrides) -> ChatGLMForConditionalGeneration:
    """The model on the ``meta`` device (shapes only, no memory): a known hub name from its offline config, or any
    other ``--model`` (a folder, ``"tiny"``) from its ``config.json``; no weights are read."""
    if known_config_dict(name) is not None:
        config = known_config(name, **config_overrides)
    else:
        folder = resolve_checkpoint(name) if name == "tiny" else None  # the tiny vocabulary is known once built
        config = model_config(str(folder) if folder else name)
        config = ChatGLMConfig(**{**config.to_diff_dict(), **config_overrides})
    with torch.device("meta"):
        return ChatGLMForConditionalGeneration(config)
