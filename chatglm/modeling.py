"""ChatGLM-6B: a GLM decoder with 2D rotary positions and a prefix-LM attention mask.

Numerically this follows THUDM's original ChatGLM-6B code; the layout follows ``transformers`` (hidden states
are ``[batch, seq, hidden]``, caches are ``transformers`` ``Cache`` objects, ``labels`` give a ``loss``).

One forward pass, in words:
  tokens ``prompt [gMASK] <sop> answer`` -> word embeddings -> N x GLM block -> final LayerNorm -> tied LM head.
  Positions are two rows: row 0 counts tokens up to ``<sop>`` and then stays at the ``[gMASK]`` position,
  row 1 is 0 over the context and counts 1, 2, 3 ... from ``<sop>``. Each head rotates its first half with
  row 0 and its second half with row 1. Tokens before ``<sop>`` see each other (bidirectional); from
  ``<sop>`` on attention is causal.
  A GLM block is DeepNorm-like: ``x = LN(x); x = x * alpha + Attention(x); y = LN(x); out = y * alpha + MLP(y)``
  with ``alpha = sqrt(2 * 28)`` (the 6B depth, used by the original for every configuration).
  P-Tuning v2 adds learned keys/values (a prefix) in front of every layer's attention.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .checkpoint import remove_weight_files, save_bin_checkpoint
from .configuration import ChatGLMConfig
from .generation import ChatGLMGenerationMixin
from .layout import check_bool_mask, glm_blocked_mask, glm_position_ids
from .quantization import QUANTIZABLE_LINEARS, QuantizedLinear, quantize_linears, quantize_weight

PREFIX_DROPOUT = 0.1  # dropout on the P-Tuning v2 prefix keys/values while training, as in the original
MASKED_SCORE = -10000.0  # value the original writes into blocked attention scores
# The original builds every block with its default depth of 28 (the model never passes num_layers on), so the
# residual scale is sqrt(2 * 28) whatever the configured number of layers; the same holds here.
RESIDUAL_DEPTH = 28


# --------------------------------------------------------------------------------------------------------------
# Rotary position encoding
# --------------------------------------------------------------------------------------------------------------


def rotary_inv_freq(rotary_dim: int) -> torch.Tensor:
    """Inverse frequencies of the rotary encoding, rounded to fp16 as in the original (returned as fp32)."""
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim
    return (1.0 / (10000**exponent)).half().float()


def _rotate_pairs(x: torch.Tensor, chunks: int) -> torch.Tensor:
    """``rotate_half`` applied to each of ``chunks`` equal slices of the last dim: [a, b] -> [-b, a]."""
    parts = x.unflatten(-1, (chunks, 2, -1))
    return torch.stack((-parts[..., 1, :], parts[..., 0, :]), dim=-2).flatten(-3)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the given position ids, computed once per forward and shared by all layers.

    The inverse frequencies are a buffer that follows ``model.half()/.float()`` like the original's, and the
    angles are computed in that dtype, so fp32 and fp16 models reproduce the original bit for bit. For bf16 the
    angles are computed in fp32 and rounded once (the original would round the positions themselves).
    """

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        head_dim = config.hidden_size // config.num_attention_heads
        self.two_d = config.position_encoding_2d
        self.rotary_dim = head_dim // 2 if self.two_d else head_dim
        inv_freq = rotary_inv_freq(self.rotary_dim).to(torch.get_default_dtype())
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = self.inv_freq.dtype
        compute = torch.float32 if dtype == torch.bfloat16 else dtype
        freqs = positions.to(compute)[..., None] * self.inv_freq.to(compute)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [b, 1, s, head_dim] (both position rows side by side in 2D mode)."""
        if self.two_d:
            cos0, sin0 = self._angles(position_ids[:, 0])
            cos1, sin1 = self._angles(position_ids[:, 1])
            cos, sin = torch.cat((cos0, cos1), dim=-1), torch.cat((sin0, sin1), dim=-1)
        else:
            cos, sin = self._angles(position_ids)
        return cos[:, None], sin[:, None]

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return x * cos + _rotate_pairs(x, 2 if self.two_d else 1) * sin


# --------------------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------------------


class AttentionMask:
    """The attention pattern of one forward pass, built once and shared by all layers.

    ``blocked`` [b, 1, q, k] (True = blocked) is what the original masks with -10000; ``allowed`` is the
    SDPA form. Rows with every key blocked (padding queries) get uniform attention in the original; for SDPA
    they are opened (to avoid NaN) and their output replaced by the mean of the values (``dead_rows``).
    """

    def __init__(self, blocked: torch.Tensor | None) -> None:
        self.blocked = blocked if blocked is not None and bool(blocked.any()) else None
        self.allowed = self.dead_rows = None
        if self.blocked is not None:
            allowed = ~self.blocked
            dead = ~allowed.any(dim=-1, keepdim=True)
            if bool(dead.any()):
                self.dead_rows = dead
                allowed = allowed | dead
            self.allowed = allowed


def _linear(config: ChatGLMConfig, in_features: int, out_features: int) -> nn.Module:
    """A layer matrix: quantized directly when the config says so, so no floating copy is ever built."""
    if config.quantization_bit:
        return QuantizedLinear(in_features, out_features, config.quantization_bit)
    return nn.Linear(in_features, out_features)


class SelfAttention(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query_key_value = _linear(config, config.hidden_size, 3 * config.hidden_size)
        self.dense = _linear(config, config.hidden_size, config.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: RotaryEmbedding,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: AttentionMask,
        prefix_key: torch.Tensor | None = None,
        prefix_value: torch.Tensor | None = None,
        cache: Cache | None = None,
        eager: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, s, _ = hidden_states.shape
        # The fused projection is laid out per head: [q | k | v] of head 0, then head 1, ...
        qkv = self.query_key_value(hidden_states).view(b, s, self.num_heads, 3 * self.head_dim)
        q, k, v = qkv.transpose(1, 2).split(self.head_dim, dim=-1)
        q = rotary.rotate(q, cos, sin).to(v.dtype)
        k = rotary.rotate(k, cos, sin).to(v.dtype)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        elif prefix_key is not None:
            k = torch.cat((prefix_key.to(k.dtype), k), dim=2)
            v = torch.cat((prefix_value.to(v.dtype), v), dim=2)
        if eager:
            context, probs = self._eager_attention(q, k, v, mask)
        else:
            context, probs = self._sdpa_attention(q, k, v, mask), None
        context = context.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)
        return self.dense(context), probs

    def _sdpa_attention(self, q, k, v, mask: AttentionMask) -> torch.Tensor:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.allowed, scale=1.0 / math.sqrt(self.head_dim))
        if mask.dead_rows is not None:
            out = torch.where(mask.dead_rows, v.mean(dim=-2, keepdim=True), out)
        return out

    def _eager_attention(self, q, k, v, mask: AttentionMask) -> tuple[torch.Tensor, torch.Tensor]:
        """The original's arithmetic step by step: scores are scaled down by (layer + 1) in the compute dtype,
        blocked entries set to -10000, then scaled back up in fp32 before the softmax."""
        coeff = float(self.layer_idx + 1)
        scores = torch.matmul(q / (math.sqrt(self.head_dim) * coeff), k.transpose(-1, -2))
        if mask.blocked is not None:
            scores = scores.masked_fill(mask.blocked, MASKED_SCORE)
        probs = torch.softmax(scores.float() * coeff, dim=-1).to(v.dtype)
        return torch.matmul(probs, v), probs


class MLP(nn.Module):
    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = _linear(config, config.hidden_size, config.inner_hidden_size)
        self.dense_4h_to_h = _linear(config, config.inner_hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))


class GLMBlock(GradientCheckpointingLayer):
    def __init__(self, config: ChatGLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = SelfAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = MLP(config)
        self.alpha = (2 * RESIDUAL_DEPTH) ** 0.5

    def forward(
        self,
        hidden_states: torch.Tensor,
        prefix_key: torch.Tensor | None = None,
        prefix_value: torch.Tensor | None = None,
        *,
        rotary: RotaryEmbedding,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: AttentionMask,
        cache: Cache | None = None,
        eager: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attention_input = self.input_layernorm(hidden_states)
        attention_output, probs = self.attention(
            attention_input, rotary, cos, sin, mask, prefix_key, prefix_value, cache=cache, eager=eager
        )
        hidden_states = attention_input * self.alpha + attention_output
        mlp_input = self.post_attention_layernorm(hidden_states)
        return mlp_input * self.alpha + self.mlp(mlp_input), probs


class PrefixEmbedding(nn.Embedding):
    """The prefix vectors; initialised N(0, 1) like a default torch embedding, as the original's were."""


class PrefixEncoder(nn.Module):
    """P-Tuning v2 prefix: ``pre_seq_len`` learned vectors turned into keys and values for every layer.

    Without projection ``embedding`` holds them directly ([pre, 2 * layers * hidden]); with projection a
    smaller embedding [pre, hidden] goes through Linear -> tanh -> Linear.
    """

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        width = 2 * config.num_layers * config.hidden_size
        self.prefix_projection = config.prefix_projection
        if self.prefix_projection:
            self.embedding = PrefixEmbedding(config.pre_seq_len, config.hidden_size)
            self.trans = nn.Sequential(
                nn.Linear(config.hidden_size, config.hidden_size), nn.Tanh(), nn.Linear(config.hidden_size, width)
            )
        else:
            self.embedding = PrefixEmbedding(config.pre_seq_len, width)

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        out = self.embedding(prefix)
        return self.trans(out) if self.prefix_projection else out


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------


class ChatGLMPreTrainedModel(PreTrainedModel):
    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock"]
    _supports_sdpa = True
    _keep_in_fp32_modules = ["prefix_encoder"]
    # The public files hold one inv_freq per layer; it is recomputed, so those keys are not loaded.
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]

    def __init__(self, config: ChatGLMConfig, *args, **kwargs) -> None:
        config.validate_architecture()
        super().__init__(config, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = 0.02
        if isinstance(module, PrefixEmbedding):
            init.normal_(module.weight, mean=0.0, std=1.0)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, QuantizedLinear):
            if not getattr(module.weight, "_is_hf_initialized", False):
                random = torch.randn(module.out_features, module.in_features, device=module.weight.device) * std
                q, scale = quantize_weight(random, module.bits)
                module.weight.copy_(q)
                module.weight_scale.copy_(scale.to(module.weight_scale.dtype))
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, RotaryEmbedding):
            init.copy_(module.inv_freq, rotary_inv_freq(module.rotary_dim))


class ChatGLMModel(ChatGLMPreTrainedModel):
    """The GLM decoder stack without the LM head; returns hidden states [b, s, hidden]."""

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary_emb = RotaryEmbedding(config)
        self.layers = nn.ModuleList(GLMBlock(config, i) for i in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        if config.pre_seq_len is not None:
            # As in the original: with a prefix, only the prefix encoder is meant to train.
            for param in self.parameters():
                param.requires_grad_(False)
            self.prefix_encoder = PrefixEncoder(config)
            self.prefix_dropout = nn.Dropout(PREFIX_DROPOUT)
        self.post_init()

    def add_prefix_encoder(self, pre_seq_len: int, prefix_projection: bool = False) -> PrefixEncoder:
        """Give a loaded model a fresh (fp32, randomly initialised) P-Tuning v2 prefix; freezes the rest."""
        if getattr(self, "prefix_encoder", None) is not None:
            raise ValueError("the model already has a prefix encoder")
        if pre_seq_len <= 0:
            raise ValueError(f"pre_seq_len must be positive, got {pre_seq_len}")
        self.config.pre_seq_len, self.config.prefix_projection = pre_seq_len, prefix_projection
        for param in self.parameters():
            param.requires_grad_(False)
        with torch.device(self.word_embeddings.weight.device):  # built in place (no memory on "meta")
            self.prefix_encoder = PrefixEncoder(self.config).float()
        self.prefix_encoder.apply(self._init_weights)
        self.prefix_dropout = nn.Dropout(PREFIX_DROPOUT)
        return self.prefix_encoder

    def get_input_embeddings(self) -> nn.Embedding:
        return self.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.word_embeddings = value

    def _compute_dtype(self) -> torch.dtype:
        """The dtype the layers compute in: that of the (frozen) first attention projection."""
        projection = self.layers[0].attention.query_key_value
        projection = getattr(projection, "base_layer", projection)  # under a LoRA wrapper
        if isinstance(projection, QuantizedLinear):
            return (projection.bias if projection.bias is not None else projection.weight_scale).dtype
        return projection.weight.dtype

    def prefix_key_values(self, batch_size: int, device: torch.device, dtype: torch.dtype):
        """Per-layer (key, value) of the P-Tuning v2 prefix, each [b, heads, pre_seq_len, head_dim]."""
        config = self.config
        tokens = torch.arange(config.pre_seq_len, device=device).expand(batch_size, -1)
        out = self.prefix_encoder(tokens).to(dtype)
        head_dim = config.hidden_size // config.num_attention_heads
        out = out.view(batch_size, config.pre_seq_len, 2 * config.num_layers, config.num_attention_heads, head_dim)
        out = self.prefix_dropout(out).permute(2, 0, 3, 1, 4)  # [2L, b, heads, pre, head_dim]
        return [(out[2 * i], out[2 * i + 1]) for i in range(config.num_layers)]

    def _attention_mask(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        query_length: int,
        past_length: int,
        prefix_length: int,
    ) -> AttentionMask:
        batch = input_ids.shape[0] if input_ids is not None else None
        if attention_mask is not None and attention_mask.dim() == 4:
            blocked = check_bool_mask(attention_mask)
        elif attention_mask is not None and attention_mask.dim() == 2:
            if past_length == 0:
                blocked = glm_blocked_mask(input_ids, self.config, attention_mask)
            else:
                # New tokens follow <sop>: causal among themselves, padding columns blocked.
                real = attention_mask.bool()
                total = real.shape[1]
                key = torch.arange(total, device=real.device)
                query = torch.arange(past_length, past_length + query_length, device=real.device)
                causal = key[None, :] <= query[:, None]
                visible = causal[None] & real[:, None, :] & real[:, past_length:, None]
                blocked = (~visible)[:, None]
        elif attention_mask is None and past_length == 0:
            if input_ids is None:
                raise ValueError("with inputs_embeds, pass position_ids and attention_mask explicitly")
            blocked = glm_blocked_mask(input_ids, self.config)
        else:
            blocked = None  # one new token with a cache sees every cached key
        if blocked is not None and prefix_length:
            shape = (blocked.shape[0] if batch is None else batch, 1, blocked.shape[2], prefix_length)
            blocked = torch.cat((blocked.new_zeros(shape), blocked.expand(shape[0], -1, -1, -1)), dim=-1)
        return AttentionMask(blocked)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        config = self.config
        cache = cache if cache is not None else past_key_values
        output_attentions = output_attentions if output_attentions is not None else config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        )
        use_cache = use_cache if use_cache is not None else config.use_cache
        return_dict = return_dict if return_dict is not None else config.return_dict
        if self.training and torch.is_grad_enabled() and self.layers[0].gradient_checkpointing:
            use_cache = False  # recomputed layers must not append to the cache twice
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        batch, seq = inputs_embeds.shape[:2]
        if isinstance(cache, (tuple, list)):
            raise TypeError("tuple caches are not supported; pass a transformers Cache (e.g. DynamicCache)")
        if use_cache and cache is None:
            cache = DynamicCache()
        if not use_cache:
            cache = None

        prefix_length = config.pre_seq_len or 0
        cached = cache.get_seq_length() if cache is not None else 0
        prefix = None
        if prefix_length and cached == 0:
            prefix = self.prefix_key_values(batch, inputs_embeds.device, inputs_embeds.dtype)
            if cache is not None:
                for i, (key, value) in enumerate(prefix):
                    cache.update(key, value, i)
                prefix = None
        past_length = max(cached - prefix_length, 0)

        if position_ids is None:
            if past_length or input_ids is None:
                raise ValueError(
                    "position_ids are required with a cache or inputs_embeds: for ChatGLM they depend on the "
                    "[gMASK]/<sop> layout of the whole sequence (generate() computes them)"
                )
            padding = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
            position_ids = glm_position_ids(input_ids, config, padding)
        mask = self._attention_mask(input_ids, attention_mask, seq, past_length, prefix_length)
        cos, sin = self.rotary_emb(position_ids)
        eager = output_attentions or config._attn_implementation == "eager"

        # Fine-tuning keeps trained tensors in fp32; the layers compute in the base dtype (a no-op otherwise).
        hidden_states = inputs_embeds.to(self._compute_dtype())
        all_hidden, all_attentions = [], []
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden.append(hidden_states)
            prefix_key, prefix_value = prefix[i] if prefix is not None else (None, None)
            hidden_states, probs = layer(
                hidden_states, prefix_key, prefix_value,
                rotary=self.rotary_emb, cos=cos, sin=sin, mask=mask, cache=cache, eager=eager,
            )
            if output_attentions:
                all_attentions.append(probs)
        hidden_states = self.final_layernorm(hidden_states)
        if output_hidden_states:
            all_hidden.append(hidden_states)

        out = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            cache=cache,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attentions) if output_attentions else None,
        )
        return out if return_dict else out.to_tuple()


class ChatGLMForConditionalGeneration(ChatGLMPreTrainedModel, ChatGLMGenerationMixin):
    """ChatGLM with its (tied) LM head: logits, ``loss`` from ``labels``, ``generate``, ``chat``, ``stream_chat``."""

    _tied_weights_keys = {"lm_head.weight": "transformer.word_embeddings.weight"}
    accepts_loss_kwargs = False  # the loss is the mean over the batch's labelled tokens, as in the original

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__(config)
        self.transformer = ChatGLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _labelled_loss(self, hidden_states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy (fp32) of the next-token predictions at labelled positions only."""
        targets = labels[:, 1:].to(hidden_states.device)
        keep = targets != -100
        logits = self.lm_head(hidden_states[:, :-1][keep])
        loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
        return loss / keep.sum() if bool(keep.any()) else loss * 0.0

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """``logits_to_keep=N`` > 0 (without ``labels``) projects only the last N positions: ``generate`` passes 1,
        so the prompt's forward pass never holds [batch, prompt, vocab] logits."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        out = self.transformer(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden_states = out.last_hidden_state
        loss = logits = None
        if labels is not None and self.training and torch.is_grad_enabled():
            # Training only needs the loss: project just the positions that predict a label (the answer), which
            # skips most of the 130k-way output layer and never holds logits for the prompt.
            loss = self._labelled_loss(hidden_states, labels)
        else:
            keep = logits_to_keep if labels is None and logits_to_keep else 0
            logits = self.lm_head(hidden_states[:, -keep:] if keep else hidden_states)
            if labels is not None:
                labels = labels.to(logits.device)
                loss = F.cross_entropy(
                    logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
                )
        result = CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states, attentions=out.attentions
        )
        return result if return_dict else result.to_tuple()

    # ---- quantization and saving ------------------------------------------------------------------------------

    def quantize(self, bits: int) -> ChatGLMForConditionalGeneration:
        """Quantize the floating matrices of every layer to INT8/INT4 in place (checkpoint format); returns self."""
        if self.config.quantization_bit and self.config.quantization_bit != bits:
            raise ValueError(f"the model is already quantized to {self.config.quantization_bit} bits")
        quantize_linears(self.transformer.layers, bits)
        self.config.quantization_bit = bits
        return self

    def save_pretrained(self, save_directory: str | os.PathLike, *args, safe_serialization: bool = True, **kwargs):
        """Save in the public layout: both ``lm_head.weight`` and the embedding, and each layer's ``inv_freq``.

        ``safe_serialization=False`` writes ``pytorch_model.bin`` like the public checkpoints (sharded with an
        index past ``max_shard_size``); the default writes ``model.safetensors`` with the same keys.
        """
        self._check_consistent_quantization()
        state = self.public_state_dict(copy_tied=safe_serialization)  # safetensors cannot share storage
        if safe_serialization:
            remove_weight_files(save_directory, keep="safetensors")
            return super().save_pretrained(save_directory, *args, state_dict=state, **kwargs)
        os.makedirs(save_directory, exist_ok=True)
        remove_weight_files(save_directory, keep="bin")
        self.config.save_pretrained(save_directory)
        if self.generation_config is not None:
            self.generation_config.save_pretrained(save_directory)
        save_bin_checkpoint(state, save_directory, max_shard_size=kwargs.get("max_shard_size", "10GB"))

    def public_state_dict(self, copy_tied: bool = False) -> dict[str, torch.Tensor]:
        """The state dict with the key set of the public checkpoints: ``lm_head.weight`` next to the embedding
        (the same storage, stored once by ``torch.save``, unless ``copy_tied``) and each layer's ``inv_freq``."""
        state = dict(self.state_dict())
        if copy_tied:
            state["lm_head.weight"] = state["lm_head.weight"].clone()
        inv_freq = self.transformer.rotary_emb.inv_freq.detach().to(torch.float16)
        for i in range(self.config.num_layers):
            state[f"transformer.layers.{i}.attention.rotary_emb.inv_freq"] = inv_freq.clone()
        return state

    def _check_consistent_quantization(self) -> None:
        bits = self.config.quantization_bit
        for name, module in self.transformer.layers.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in QUANTIZABLE_LINEARS or not isinstance(module, (nn.Linear, QuantizedLinear)):
                continue
            is_quantized = isinstance(module, QuantizedLinear)
            if bool(bits) != is_quantized or (is_quantized and module.bits != bits):
                raise ValueError(
                    f"layer {name} does not match quantization_bit={bits} (after merging LoRA into an INT4 model, "
                    f"call model.quantize({bits}) again before saving)"
                )
