"""Quantized linear layers and their configs. Loaders swap nn.Linear for a quantized module (bitsandbytes' in bnb.py;
int8/int4 weight-only ones for TorchAoConfig, GPTQ, AWQ and GGUF blocks in weight_only.py); the model code never asks
which kind it holds. bitsandbytes and torchao are imported only where they are needed."""

from .config import AwqConfig, BitsAndBytesConfig, GPTQConfig, TorchAoConfig

__all__ = ["AwqConfig", "BitsAndBytesConfig", "GPTQConfig", "TorchAoConfig"]
