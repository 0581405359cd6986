"""ChatGLM-6B for current ``transformers``/``peft``: model, INT4/INT8 weight-only quantization, tokenizer.

Importing this package registers the classes for ``model_type="chatglm"`` with the ``Auto*`` factories, so
``AutoModelForCausalLM.from_pretrained("THUDM/chatglm-6b-int4")`` runs this code with no remote code.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration import ChatGLMConfig, known_config, known_config_names
from .modeling import ChatGLMForConditionalGeneration, ChatGLMModel, ChatGLMPreTrainedModel
from .quantization import QuantizedLinear, dequantize_weight, pack_int4, quantize_weight, unpack_int4
from .tokenization import ChatGLMTokenizer, register_auto_tokenizer

AutoConfig.register(ChatGLMConfig.model_type, ChatGLMConfig, exist_ok=True)
# As in the public auto_map, AutoModel gives the model with its LM head (what `model.chat(...)` needs).
AutoModel.register(ChatGLMConfig, ChatGLMForConditionalGeneration, exist_ok=True)
AutoModelForCausalLM.register(ChatGLMConfig, ChatGLMForConditionalGeneration, exist_ok=True)
register_auto_tokenizer()

__all__ = [
    "ChatGLMConfig",
    "ChatGLMForConditionalGeneration",
    "ChatGLMModel",
    "ChatGLMPreTrainedModel",
    "ChatGLMTokenizer",
    "QuantizedLinear",
    "dequantize_weight",
    "known_config",
    "known_config_names",
    "pack_int4",
    "quantize_weight",
    "unpack_int4",
]
