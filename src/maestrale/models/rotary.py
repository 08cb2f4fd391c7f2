"""Rotary position embeddings: default, linear, dynamic (NTK), yarn and longrope (Phi-3)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..configs import PretrainedConfig
from . import kernels


def _base_exponents(dim: int) -> torch.Tensor:
    return torch.arange(0, dim, 2, dtype=torch.int64).float() / dim


def _yarn_inv_freq(params: dict, base: float, dim: int) -> tuple[torch.Tensor, float]:
    factor = params["factor"]
    original = params["original_max_position_embeddings"]

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        if params.get("mscale") and params.get("mscale_all_dim"):
            attention_factor = mscale(factor, params["mscale"]) / mscale(factor, params["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(params.get("beta_fast") or 32), correction_dim(params.get("beta_slow") or 1)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a division by zero in the ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** _base_exponents(dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    # Low frequencies (ramp -> 1) are interpolated, high ones kept as trained.
    return interpolation * ramp + extrapolation * (1 - ramp), float(attention_factor)


class RotaryEmbedding(nn.Module):
    """Turns position ids into the (cos, sin) tables that rotate queries and keys."""

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        params = config.rope_parameters
        self.rope_type = params["rope_type"]
        self.dim = config.rotary_dim
        base = params["rope_theta"]
        self.attention_scaling = 1.0
        pos_freqs = base ** _base_exponents(self.dim)
        inv_freq = 1.0 / pos_freqs
        if self.rope_type == "linear":
            inv_freq = inv_freq / params["factor"]
        elif self.rope_type == "yarn":
            inv_freq, self.attention_scaling = _yarn_inv_freq(params, base, self.dim)
        elif self.rope_type == "dynamic":
            self.base, self.factor = base, params["factor"]
            self.max_position_embeddings = config.max_position_embeddings
        elif self.rope_type == "longrope":
            original = params["original_max_position_embeddings"]
            factor = params.get("factor") or config.max_position_embeddings / original
            scaling = params.get("attention_factor")
            if scaling is None:
                scaling = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
            self.attention_scaling = scaling
            self.original_max_position_embeddings = original
            long_factor, short_factor = (torch.tensor(params[k], dtype=torch.float32) for k in ("long_factor", "short_factor"))
            self.register_buffer("long_inv_freq", 1.0 / (long_factor * pos_freqs), persistent=False)
            inv_freq = 1.0 / (short_factor * pos_freqs)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _frequencies(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Inverse frequencies for this call; dynamic and longrope depend on the longest position, on device."""
        if self.rope_type == "dynamic":
            seq_len = (position_ids.max() + 1).clamp(min=self.max_position_embeddings).float()
            scale = self.factor * seq_len / self.max_position_embeddings - (self.factor - 1)
            base = self.base * scale ** (self.dim / (self.dim - 2))
            return 1.0 / base ** _base_exponents(self.dim).to(position_ids.device)
        if self.rope_type == "longrope":
            is_long = position_ids.max() + 1 > self.original_max_position_embeddings
            return torch.where(is_long, self.long_inv_freq, self.inv_freq)
        return self.inv_freq

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self._frequencies(position_ids).to(x.device, torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            freqs = position_ids[..., None].float() * inv_freq
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (batch, heads, seq, head_dim); with a partial rotary dim the tail passes through."""
    if kernels.fused(x, cos, sin) and x.stride(-1) == 1 and cos.stride(-1) == 1 and sin.stride() == cos.stride():
        return kernels.rotary(x, cos, sin)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    dim = cos.shape[-1]
    if dim == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    rot, rest = x[..., :dim], x[..., dim:]
    return torch.cat((rot * cos + _rotate_half(rot) * sin, rest), dim=-1)
