"""Self-attention with grouped KV heads: masks, the eager and SDPA backends, and the attention block."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import Cache
from .linear import Linear, decode_step, linear, stacked_weight
from .rotary import apply_rotary


def build_mask(
    padding_mask: torch.Tensor | None,
    batch_size: int,
    query_start: int,
    query_len: int,
    key_start: int,
    window: int | None,
    device: torch.device,
) -> torch.Tensor | None:
    """Boolean mask (batch or 1, 1, queries, keys): True where a query may attend to a key.

    Queries are at positions query_start..+query_len, keys at key_start..query_start+query_len; `padding_mask` is the
    user's 2-D attention_mask over all positions. None means plain causal attention over every key.
    """
    key_len = query_start + query_len - key_start
    if padding_mask is None and (window is None or query_start + query_len <= window):
        if query_len == 1 or (query_start == 0 and key_start == 0):
            return None
    q = torch.arange(query_start, query_start + query_len, device=device)[:, None]
    k = torch.arange(key_start, key_start + key_len, device=device)[None, :]
    allowed = k <= q
    if window is not None:
        allowed = allowed & (k > q - window)
    allowed = allowed[None, None]
    if padding_mask is not None:
        allowed = allowed & padding_mask[:, None, None, key_start : key_start + key_len].to(device=device, dtype=torch.bool)
    # A query that may see nothing (a left-padding position) gets what each backend gives, as in transformers:
    # SDPA returns zeros, the eager softmax a uniform average.
    return allowed


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


def eager_attention(q, k, v, mask, scaling: float, dropout: float, training: bool):
    """Explicit softmax(QK^T)V; the only backend that returns attention weights."""
    groups = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling
    if mask is None and q.shape[2] > 1:  # plain causal; mask is None only when queries and keys coincide
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        # Added, not filled: a row with every key masked then averages uniformly, exactly as transformers' eager.
        scores = scores + torch.zeros_like(mask, dtype=scores.dtype).masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    weights = F.dropout(weights, p=dropout, training=training)
    return torch.matmul(weights, v), weights


def sdpa_attention(q, k, v, mask, scaling: float, dropout: float, training: bool):
    """SDPA on the KV heads as stored where it can (the same choices as transformers, so the same rounding)."""
    b, heads, s, d = q.shape
    groups = heads // k.shape[1]
    gqa = {}
    if groups > 1:
        if mask is None:  # every device has GQA kernels without a mask; CUDA's fall back to the slow math one with it
            gqa = {"enable_gqa": True}
        elif s == 1:  # one query a row: the heads of a group become that KV head's queries
            q = q.view(b, heads // groups, groups, d)
        else:
            k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout if training else 0.0, scale=scaling,
        is_causal=mask is None and s > 1, **gqa,
    )
    return out.reshape(b, heads, s, d), None


ATTENTION_BACKENDS: dict[str, Callable] = {"eager": eager_attention, "sdpa": sdpa_attention}


def check_attn_implementation(name: str | None) -> str:
    name = name or "sdpa"
    if name not in ATTENTION_BACKENDS:
        hint = " (flash-attn is not used by maestrale; sdpa picks flash kernels itself on GPUs)" if "flash" in name else ""
        raise ValueError(
            f"attn_implementation={name!r} is not supported{hint}; use one of {sorted(ATTENTION_BACKENDS)}"
        )
    return name


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads and RoPE; Phi-3 stores q, k, v as one fused projection."""

    def __init__(self, config, layer_idx: int, fused_qkv: bool = False):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.resolved_head_dim
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_sliding = config.attention_layer_types[layer_idx] == "sliding_attention"
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.split_sizes = (q_size, kv_size, kv_size)
        if fused_qkv:
            self.qkv_proj = Linear(config.hidden_size, q_size + 2 * kv_size, bias=False)
        else:
            self.q_proj = Linear(config.hidden_size, q_size, bias=False)
            self.k_proj = Linear(config.hidden_size, kv_size, bias=False)
            self.v_proj = Linear(config.hidden_size, kv_size, bias=False)
        self.o_proj = Linear(q_size, config.hidden_size, bias=False)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if hasattr(self, "qkv_proj"):
            return self.qkv_proj(x).split(self.split_sizes, dim=-1)
        if decode_step(x) and (qkv := stacked_weight((self.q_proj, self.k_proj, self.v_proj))) is not None:
            return linear(x, qkv).split(self.split_sizes, dim=-1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: Cache | None,
        backend: str,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, s, _ = x.shape
        q, k, v = (t.view(b, s, -1, self.head_dim).transpose(1, 2) for t in self.project(x))
        cos, sin = rotary
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        dropout = self.config.attention_dropout
        out, weights = ATTENTION_BACKENDS[backend](q, k, v, mask, self.scaling, dropout, self.training)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1)), weights
