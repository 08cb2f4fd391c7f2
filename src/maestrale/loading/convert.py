"""Conversions to Hugging Face folders, for the CLI: a .gguf file, or a Mistral native folder."""

from __future__ import annotations

import os

import torch

from .load import load_pretrained


def convert_gguf(src: str | os.PathLike, dst: str | os.PathLike, dtype: torch.dtype | str = torch.float32,
                 max_shard_size: int | str = "5GB") -> None:
    """Dequantize a .gguf file into a Hugging Face folder (config, generation config, safetensors)."""
    _convert(src, dst, dtype, max_shard_size)


def convert_mistral_native(src: str | os.PathLike, dst: str | os.PathLike, dtype: torch.dtype | str = "auto",
                           max_shard_size: int | str = "5GB") -> None:
    """Turn a Mistral native folder (params.json + consolidated weights) into a Hugging Face folder."""
    _convert(src, dst, dtype, max_shard_size)


def _convert(src, dst, dtype, max_shard_size) -> None:
    from ..models import AutoModelForCausalLM

    model = load_pretrained(AutoModelForCausalLM, src, dtype=dtype)
    model.save_pretrained(dst, max_shard_size=max_shard_size)
