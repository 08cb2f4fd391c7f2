"""Quantized linear layers and their configs. Loaders swap nn.Linear for a quantized module (bnb.py); the
model code never asks which kind it holds. bitsandbytes itself is imported only when a model is quantized."""

from .config import BitsAndBytesConfig

__all__ = ["BitsAndBytesConfig"]
