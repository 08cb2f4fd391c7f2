"""Tokenizers with the transformers API: fast tokenizers on `tokenizers`, chat templates, MistralCommonBackend."""

from .auto import AutoTokenizer
from .batch import BatchEncoding
from .chat_template import get_json_schema
from .fast import PreTrainedTokenizerFast
from .gguf import tokenizer_from_gguf
from .mistral_common import MistralCommonBackend

__all__ = ["AutoTokenizer", "BatchEncoding", "MistralCommonBackend", "PreTrainedTokenizerFast", "get_json_schema",
           "tokenizer_from_gguf"]
