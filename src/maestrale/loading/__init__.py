"""Checkpoints in and out: Hugging Face folders and the hub, Mistral's native format, GGUF."""

from .convert import convert_gguf, convert_mistral_native
from .gguf import read_gguf, read_gguf_config
from .load import load_pretrained
from ..quantization import BitsAndBytesConfig
from .save import save_pretrained

__all__ = ["BitsAndBytesConfig", "load_pretrained", "save_pretrained", "read_gguf", "read_gguf_config",
           "convert_gguf", "convert_mistral_native"]
