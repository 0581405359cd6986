"""ChatGLM-6B configuration, with the field names of the public ``config.json`` files.

The public THUDM/chatglm-6b(-int4) folders carry an ``auto_map`` pointing at remote code; this class
reads those files unchanged (unknown keys such as ``auto_map`` are kept as plain attributes) so that
``AutoConfig`` resolves ``model_type="chatglm"`` to our code after ``import chatglm``.
"""

from __future__ import annotations

import copy

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig


@strict
class ChatGLMConfig(PreTrainedConfig):
    """Hyper-parameters of a ChatGLM-6B style GLM decoder.

    Defaults are those of the original configuration class (the earliest 150k-vocabulary release);
    public ``config.json`` files set every field that matters explicitly.
    """

    model_type = "chatglm"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {"num_hidden_layers": "num_layers", "max_position_embeddings": "max_sequence_length"}

    vocab_size: int = 150528
    hidden_size: int = 4096
    num_layers: int = 28
    num_attention_heads: int = 32
    inner_hidden_size: int = 16384
    layernorm_epsilon: float = 1e-5
    max_sequence_length: int = 2048
    position_encoding_2d: bool = True
    use_cache: bool = True
    bos_token_id: int | None = 150004
    eos_token_id: int | None = 150005
    mask_token_id: int | None = 150000
    gmask_token_id: int | None = 150001
    pad_token_id: int | None = 0
    pre_seq_len: int | None = None
    prefix_projection: bool = False
    quantization_bit: int = 0
    quantization_embeddings: bool = False
    tie_word_embeddings: bool = True

    def validate_architecture(self) -> None:
        """Fail early, with a message naming the field, on shapes the model cannot build."""
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        head_dim = self.hidden_size // self.num_attention_heads
        if self.position_encoding_2d and head_dim % 4:
            raise ValueError(f"with position_encoding_2d the head size ({head_dim}) must be a multiple of 4")
        if self.quantization_bit not in (0, 4, 8):
            raise ValueError(f"quantization_bit must be 0, 4 or 8, got {self.quantization_bit}")
        if self.quantization_embeddings:
            raise NotImplementedError(
                "quantization_embeddings=True (the chatglm-6b-int4-qe checkpoint) is not supported; "
                "use THUDM/chatglm-6b-int4, whose embeddings stay in fp16"
            )
        if self.pre_seq_len is not None and self.pre_seq_len <= 0:
            raise ValueError(f"pre_seq_len must be a positive integer or None, got {self.pre_seq_len}")


def vocabulary_fields(tokenizer) -> dict[str, int]:
    """The config fields a model takes from its tokenizer: vocabulary size and special token ids."""
    return {
        "vocab_size": len(tokenizer.get_vocab()),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "mask_token_id": tokenizer.mask_token_id,
        "gmask_token_id": tokenizer.gmask_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


MODEL_AUTO_MAP = {
    "AutoConfig": "configuration_chatglm.ChatGLMConfig",
    "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
}

# The config.json files of the public checkpoints (v1.1 vocabulary layout), as published.
_CHATGLM_6B = {
    "architectures": ["ChatGLMModel"],
    "auto_map": MODEL_AUTO_MAP,
    "bos_token_id": 130004,
    "eos_token_id": 130005,
    "mask_token_id": 130000,
    "gmask_token_id": 130001,
    "pad_token_id": 3,
    "hidden_size": 4096,
    "inner_hidden_size": 16384,
    "layernorm_epsilon": 1e-05,
    "max_sequence_length": 2048,
    "model_type": "chatglm",
    "num_attention_heads": 32,
    "num_layers": 28,
    "position_encoding_2d": True,
    "torch_dtype": "float16",
    "transformers_version": "4.27.1",
    "use_cache": True,
    "vocab_size": 130528,
}
_KNOWN = {
    "chatglm-6b": {**_CHATGLM_6B, "_name_or_path": "THUDM/chatglm-6b"},
    "chatglm-6b-int8": {
        **_CHATGLM_6B,
        "_name_or_path": "THUDM/chatglm-6b-int8",
        "quantization_bit": 8,
        "quantization_embeddings": False,
    },
    "chatglm-6b-int4": {
        **_CHATGLM_6B,
        "_name_or_path": "THUDM/chatglm-6b-int4",
        "quantization_bit": 4,
        "quantization_embeddings": False,
    },
}
KNOWN_ORGS = ("THUDM", "zai-org")


def known_config_names() -> list[str]:
    """Hub names whose configuration ships with this package (usable offline)."""
    return [f"{org}/{name}" for org in KNOWN_ORGS for name in _KNOWN]


def known_config_dict(name: str) -> dict | None:
    """The public ``config.json`` content of a known hub name, or ``None`` if the name is not known."""
    org, _, model = name.strip().rstrip("/").partition("/")
    if not model or org not in KNOWN_ORGS or model.lower() not in _KNOWN:
        return None
    return copy.deepcopy(_KNOWN[model.lower()])


def known_config(name: str, **overrides) -> ChatGLMConfig:
    """Configuration of a public ChatGLM-6B checkpoint (THUDM/... or zai-org/...), without the hub.

    Lets a full-size model be built on the ``meta`` device to count parameters or plan memory.
    """
    raw = known_config_dict(name)
    if raw is None:
        raise KeyError(f"unknown model name {name!r}; known offline: {', '.join(known_config_names())}")
    raw.update(overrides)
    return ChatGLMConfig(**raw)
