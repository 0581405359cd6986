"""Generation for ChatGLM: ``generate`` with its [gMASK]/<sop> layout, ``chat`` and ``stream_chat``.

At every cached step the new token's positions are [mask position, tokens since <sop>]. They come from the
tokenizer's [b, 2, s] positions when given (extended by one column per step, with the 4D mask), otherwise from
``input_ids`` and the 2D padding mask, as each row alone would have them.

Nothing runs past ``max_sequence_length``: ``generate`` refuses a prompt plus ``max_new_tokens`` (or a
``max_length``) beyond it, naming the numbers; ``chat``/``stream_chat`` drop the oldest rounds of a history that does
not fit, with a warning.
"""

from __future__ import annotations

import queue
import re
import threading
import warnings
from collections.abc import Iterator

import torch
from transformers import GenerationMixin
from transformers.cache_utils import Cache
from transformers.generation.logits_process import LogitsProcessor, LogitsProcessorList
from transformers.generation.streamers import BaseStreamer

from .layout import check_bool_mask, glm_layout


class InvalidScoreLogitsProcessor(LogitsProcessor):
    """If logits hold NaN/inf (an fp16 overflow), replace them by a distribution on one harmless token."""

    def __init__(self, fallback_token_id: int) -> None:
        self.fallback_token_id = fallback_token_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if torch.isnan(scores).any() or torch.isinf(scores).any():
            scores.zero_()
            scores[..., self.fallback_token_id] = 5e4
        return scores


class _TokenQueue(BaseStreamer):
    """Hands the tokens ``generate`` produces to another thread, one step at a time."""

    def __init__(self) -> None:
        self.queue: queue.Queue = queue.Queue()
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        self.queue.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.queue.put(None)


class ChatGLMGenerationMixin(GenerationMixin):
    """``generate`` plumbing and the chat helpers of ``ChatGLMForConditionalGeneration``."""


    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, **kwargs):
        """``transformers`` generation, also fed the ChatGLM tokenizer's padded batch as it comes.

        The tokenizer's 4D boolean mask and [b, 2, s] positions travel under their own keys, because the
        generic code only knows 2D masks and would expand 3D positions along the wrong dimension.
        """
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 4:
            kwargs["glm_attention_mask"] = check_bool_mask(kwargs.pop("attention_mask"))
        if kwargs.get("position_ids") is not None:
            kwargs["glm_position_ids"] = kwargs.pop("position_ids")
        given = (inputs, kwargs.get("input_ids"), kwargs.get("inputs_embeds"))
        prompt = next((t for t in given if t is not None), None)
        if prompt is not None and prompt.dim() >= 2:
            self._check_generation_length(prompt.shape[1], kwargs)
        return super().generate(inputs, **kwargs)

    def _check_generation_length(self, prompt: int, kwargs: dict) -> None:
        """Refuse a generation that could run past ``max_sequence_length``, the longest text the model was made for.

        The length is planned as ``transformers`` plans it: ``max_new_tokens`` (argument or generation config) wins
        over ``max_length``.
        """
        config = kwargs.get("generation_config") or self.generation_config
        max_new = kwargs.get("max_new_tokens", config.max_new_tokens)
        if max_new is not None:
            total, asked = prompt + max_new, f"max_new_tokens={max_new}"
        else:
            total = kwargs.get("max_length", config.max_length)
            asked = f"max_length={total}"
        limit = self.config.max_sequence_length
        if total <= limit:
            return
        advice = (f"shorten the prompt below {limit} tokens" if prompt >= limit else
                  f"lower max_new_tokens to at most {limit - prompt} (or max_length to at most {limit}), or shorten "
                  f"the prompt")
        raise ValueError(f"a prompt of {prompt} tokens with {asked} may reach {total} tokens, more than this model's "
                         f"max_sequence_length {limit}: {advice}")

    def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs):
        return None  # ChatGLM positions come from the [gMASK]/<sop> layout, computed per step below

    def _next_position_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Positions of the last token of ``input_ids`` (used at each cached generation step)."""
        token_index, ctx, mask_pos = glm_layout(input_ids, self.config, attention_mask)
        last = token_index[:, -1]
        if self.config.position_encoding_2d:
            return torch.stack((mask_pos, last - ctx + 1), dim=1)[:, :, None]
        return last[:, None]

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        glm_attention_mask: torch.Tensor | None = None,
        glm_position_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> dict:
        cached = cache is not None and cache.get_seq_length() > 0
        inputs = {"cache": cache, "use_cache": kwargs.get("use_cache", True)}
        if kwargs.get("logits_to_keep"):
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]  # the last position only: no prompt-wide logits
        if not cached:
            if inputs_embeds is not None and is_first_iteration:
                inputs["inputs_embeds"] = inputs_embeds
            else:
                inputs["input_ids"] = input_ids
            inputs["attention_mask"] = glm_attention_mask if glm_attention_mask is not None else attention_mask
            inputs["position_ids"] = glm_position_ids
            return inputs
        inputs["input_ids"] = input_ids[:, -1:]
        if glm_position_ids is not None:
            inputs["position_ids"] = glm_position_ids[..., -1:]
        else:
            inputs["position_ids"] = self._next_position_ids(input_ids, attention_mask)
        if glm_attention_mask is not None:
            inputs["attention_mask"] = glm_attention_mask[:, :, -1:]
        else:
            inputs["attention_mask"] = attention_mask
        return inputs

    def _update_model_kwargs_for_generation(
        self, outputs, model_kwargs: dict, is_encoder_decoder: bool = False, num_new_tokens: int = 1
    ) -> dict:
        if "cache" in outputs:
            model_kwargs["cache"] = outputs["cache"]
        mask = model_kwargs.get("attention_mask")
        if mask is not None:
            model_kwargs["attention_mask"] = torch.cat((mask, mask.new_ones((mask.shape[0], num_new_tokens))), dim=-1)
        mask = model_kwargs.get("glm_attention_mask")
        if mask is not None:
            # New columns: earlier tokens never see the new ones (True = blocked). New rows: a new token sees
            # what the last one saw, plus itself and the new tokens before it.
            mask = torch.cat((mask, mask.new_ones((*mask.shape[:3], num_new_tokens))), dim=3)
            new_rows = mask[:, :, -1:].repeat(1, 1, num_new_tokens, 1)
            new_rows[..., -num_new_tokens:] = torch.ones(
                num_new_tokens, num_new_tokens, dtype=torch.bool, device=mask.device
            ).triu(1)
            model_kwargs["glm_attention_mask"] = torch.cat((mask, new_rows), dim=2)
        positions = model_kwargs.get("glm_position_ids")
        if positions is not None:
            step = torch.arange(1, num_new_tokens + 1, device=positions.device)
            last = positions[..., -1:]
            if self.config.position_encoding_2d:
                new = torch.stack((last[:, 0].expand(-1, num_new_tokens), last[:, 1] + step), dim=1)
            else:
                new = last + step
            model_kwargs["glm_position_ids"] = torch.cat((positions, new), dim=-1)
        return model_kwargs

    @staticmethod
    def process_response(response: str) -> str:
        """Clean a chat answer as the original does: strip, and use full-width punctuation after Chinese."""
        response = response.strip().replace("[[训练时间]]", "2023年")
        for ascii_mark, full_width in ((",", "，"), ("!", "！"), (":", "："), (";", "；"), (r"\?", "？")):
            response = re.sub(r"([\u4e00-\u9fff])%s" % ascii_mark, r"\1%s" % full_width, response)
            response = re.sub(r"%s([\u4e00-\u9fff])" % ascii_mark, r"%s\1" % full_width, response)
        return response

    @staticmethod
    def build_chat_prompt(query: str, history: list[tuple[str, str]] | None = None) -> str:
        """The multi-round prompt of ChatGLM-6B: ``[Round i]\\n问：...\\n答：...``."""
        if not history:
            return query
        prompt = "".join(f"[Round {i}]\n问：{q}\n答：{a}\n" for i, (q, a) in enumerate(history))
        return prompt + f"[Round {len(history)}]\n问：{query}\n答："

    def _chat_inputs(self, tokenizer, query: str, history: list[tuple[str, str]], max_length: int):
        """The tokenized prompt of ``query`` after ``history``, dropping the oldest rounds (with a warning) until it
        leaves room for at least one answer token within ``max_length``; returns (inputs, history kept)."""
        if max_length > self.config.max_sequence_length:
            raise ValueError(f"max_length={max_length} is more than this model's max_sequence_length "
                             f"{self.config.max_sequence_length}: pass at most that, or leave max_length out")
        dropped = 0
        while True:
            inputs = tokenizer([self.build_chat_prompt(query, history[dropped:])], return_tensors="pt")
            length = inputs["input_ids"].shape[1]
            if length < max_length or dropped == len(history):
                break
            dropped += 1
        if length >= max_length:
            raise ValueError(f"the query alone is {length} tokens, which leaves no room for an answer within "
                             f"max_length={max_length}: shorten it")
        if dropped:
            warnings.warn(f"chat: the conversation did not fit max_length={max_length}; dropped the oldest {dropped} "
                          f"of {len(history)} round(s) of history ({length} prompt tokens now)", stacklevel=3)
        return inputs.to(self.device), history[dropped:]

    def _chat_kwargs(self, tokenizer, max_length, do_sample, top_p, temperature, logits_processor, kwargs) -> dict:
        processors = LogitsProcessorList(logits_processor or [])
        processors.append(InvalidScoreLogitsProcessor(tokenizer.convert_tokens_to_ids("▁")))
        return {"max_length": max_length, "do_sample": do_sample, "top_p": top_p, "temperature": temperature,
                "logits_processor": processors, **kwargs}

    @torch.no_grad()
    def chat(
        self,
        tokenizer,
        query: str,
        history: list[tuple[str, str]] | None = None,
        max_length: int | None = None,
        num_beams: int = 1,
        do_sample: bool = True,
        top_p: float = 0.7,
        temperature: float = 0.95,
        logits_processor: LogitsProcessorList | None = None,
        **kwargs,
    ) -> tuple[str, list[tuple[str, str]]]:
        """One chat turn: returns the answer and the updated history.

        ``max_length`` (prompt and answer together; default: the model's ``max_sequence_length``) may not exceed
        ``max_sequence_length``; when the history does not fit, its oldest rounds are dropped, with a warning.
        """
        max_length = max_length or self.config.max_sequence_length
        inputs, history = self._chat_inputs(tokenizer, query, list(history or []), max_length)
        gen = self._chat_kwargs(tokenizer, max_length, do_sample, top_p, temperature, logits_processor, kwargs)
        output = self.generate(**inputs, num_beams=num_beams, **gen)
        response = self.process_response(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:].tolist()))
        return response, history + [(query, response)]

    @torch.no_grad()
    def stream_chat(
        self,
        tokenizer,
        query: str,
        history: list[tuple[str, str]] | None = None,
        max_length: int | None = None,
        do_sample: bool = True,
        top_p: float = 0.7,
        temperature: float = 0.95,
        logits_processor: LogitsProcessorList | None = None,
        **kwargs,
    ) -> Iterator[tuple[str, list[tuple[str, str]]]]:
        """Like :meth:`chat`, but yields (answer so far, history) after every generated token."""
        max_length = max_length or self.config.max_sequence_length
        inputs, history = self._chat_inputs(tokenizer, query, list(history or []), max_length)
        gen = self._chat_kwargs(tokenizer, max_length, do_sample, top_p, temperature, logits_processor, kwargs)
        streamer = _TokenQueue()
        errors: list[BaseException] = []

        def run() -> None:
            try:
                self.generate(**inputs, streamer=streamer, **gen)
            except BaseException as error:  # surfaced in the consuming thread below
                errors.append(error)
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        tokens: list[int] = []
        eos = self.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        while (step := streamer.queue.get()) is not None:
            if step[0] in eos:
                continue
            tokens.extend(step)
            response = self.process_response(tokenizer.decode(tokens))
            yield response, history + [(query, response)]
        worker.join()
        if errors:
            raise errors[0]
