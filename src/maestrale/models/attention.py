"""Self-attention with grouped KV heads: masks, the eager, SDPA, flash and flex backends, and the attention block."""

from __future__ import annotations

import functools
import importlib.util
import logging
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import Cache
from . import kernels
from .linear import Linear, decode_step, linear, stacked_weight
from .rotary import apply_rotary

logger = logging.getLogger(__name__)


class AttentionMask:
    """Which keys each query may attend to: causal, within `window`, not padding, inside its own packed sequence.

    Queries are at positions query_start..+query_len, keys at key_start..query_start+query_len; `padding` is the
    user's 2-D attention_mask over all positions; `documents` (batch, tokens) numbers the sequences of packed rows
    (only without past tokens, so queries and keys are the same tokens). Layers of one kind share one mask, so each
    backend's form of it is built once.
    """

    def __init__(self, padding: torch.Tensor | None, batch_size: int, query_start: int, query_len: int,
                 key_start: int, window: int | None, device: torch.device, documents: torch.Tensor | None = None):
        self.padding = None if padding is None else padding.to(device=device, dtype=torch.bool)
        self.documents = None if documents is None else documents.to(device)
        self.rows = batch_size
        self.batch = 1 if padding is None and documents is None else batch_size  # of the mask forms, broadcast
        self.query_start, self.query_len, self.key_start = query_start, query_len, key_start
        self.key_len = query_start + query_len - key_start
        self.window, self.device = window, device
        self._dense = self._block = self._rule_tensors = None

    def allows(self, b, q, k):
        """True where query `q` may see key `k` (indices into this step's queries and keys) of row `b`; works on
        broadcast index tensors (the dense mask) and on FlexAttention's scalar indices alike."""
        padding, documents, query_start, key_start, window = self._rule()
        q_pos, k_pos = q + query_start, k + key_start
        return (k_pos <= q_pos) & (k_pos > q_pos - window) & padding[b, k_pos] & (documents[b, q] == documents[b, k])

    def _rule(self) -> tuple[torch.Tensor, ...]:
        """The rule's inputs, all tensors (no padding: all ones; one sequence a row: all zeros; no window: one longer
        than the positions), so that FlexAttention's compiled kernel, which takes them from `allows`' closure, is the
        same graph for every mask: a closure over None or Python ints makes Dynamo compile one kernel per combination,
        and past its limit of 8 it runs the eager kernel instead, slow and less precise in half precision."""
        if self._rule_tensors is None:
            end = self.query_start + self.query_len
            tensor = functools.partial(torch.tensor, device=self.device)
            padding = self.padding if self.padding is not None else torch.ones(
                self.rows, end, dtype=torch.bool, device=self.device)
            documents = self.documents if self.documents is not None else torch.zeros(
                self.rows, max(self.query_len, self.key_len), dtype=torch.long, device=self.device)
            self._rule_tensors = (padding, documents, tensor(self.query_start), tensor(self.key_start),
                                  tensor(self.window if self.window is not None else end + 1))
        return self._rule_tensors

    @property
    def is_causal(self) -> bool:
        """Plain causal attention over every key: SDPA's is_causal (or no mask for a single query) says it all."""
        if self.padding is not None or self.documents is not None:
            return False
        if self.window is not None and self.query_start + self.query_len > self.window:
            return False
        return self.query_len == 1 or (self.query_start == 0 and self.key_start == 0)

    def dense(self) -> torch.Tensor | None:
        """Boolean (batch or 1, 1, queries, keys), or None for plain causal attention.

        A query that may see nothing (a left-padding position) gets what each backend gives, as in transformers:
        SDPA returns zeros, the eager softmax a uniform average.
        """
        if self._dense is None and not self.is_causal:
            arange = functools.partial(torch.arange, device=self.device)
            self._dense = self.allows(arange(self.batch).view(-1, 1, 1, 1), arange(self.query_len).view(1, 1, -1, 1),
                                      arange(self.key_len).view(1, 1, 1, -1))
        return self._dense

    def block_mask(self):
        """FlexAttention's block mask of the same rule."""
        if self._block is None:
            from torch.nn.attention.flex_attention import create_block_mask

            self._rule()  # built here, not under create_block_mask's vmap
            self._block = create_block_mask(lambda b, h, q, k: self.allows(b, q, k), self.batch, None,
                                            self.query_len, self.key_len, device=self.device)
        return self._block


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


def eager_attention(q, k, v, mask: AttentionMask, scaling: float, dropout: float, training: bool):
    """Explicit softmax(QK^T)V; the only backend that returns attention weights."""
    groups = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling
    allowed = mask.dense()
    if allowed is None and q.shape[2] > 1:  # plain causal; no mask only when queries and keys coincide
        allowed = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    if allowed is not None:
        # Added, not filled: a row with every key masked then averages uniformly, exactly as transformers' eager.
        bias = torch.zeros_like(allowed, dtype=scores.dtype).masked_fill(~allowed, torch.finfo(scores.dtype).min)
        scores = scores + bias
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    weights = F.dropout(weights, p=dropout, training=training)
    return torch.matmul(weights, v), weights


def sdpa_attention(q, k, v, mask: AttentionMask, scaling: float, dropout: float, training: bool):
    """SDPA on the KV heads as stored where it can (the same choices as transformers, so the same rounding)."""
    b, heads, s, d = q.shape
    groups = heads // k.shape[1]
    allowed = mask.dense()
    gqa = {}
    if groups > 1:
        if allowed is None:  # GQA kernels exist on every device without a mask; with one, CUDA's fall back to math
            gqa = {"enable_gqa": True}
        elif s == 1:  # one query a row: the heads of a group become that KV head's queries
            q = q.view(b, heads // groups, groups, d)
        else:
            k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=allowed, dropout_p=dropout if training else 0.0, scale=scaling,
        is_causal=allowed is None and s > 1, **gqa,
    )
    return out.reshape(b, heads, s, d), None


@functools.cache
def _note_once(message: str) -> None:
    logger.warning(message)


@functools.cache
def _flex_kernel(device_type: str) -> Callable:
    from torch.nn.attention.flex_attention import flex_attention as kernel

    # Compiled, FlexAttention is a fused kernel; eager (as on CPU, where compiling costs more than tiny runs
    # gain) it materialises the scores. dynamic=True: the mask's window and offsets are Python ints that the
    # compiled kernel must take as inputs; compiled statically, it kept the first model's window for the next one
    # (seen on an H200: a window-4 model attended with window 3 after a window-3 model had run).
    return torch.compile(kernel, dynamic=True) if device_type == "cuda" else kernel


def flex_attention(q, k, v, mask: AttentionMask, scaling: float, dropout: float, training: bool):
    """torch's FlexAttention over the block mask of `mask`."""
    if dropout and training:
        raise ValueError("FlexAttention (attn_implementation='flex_attention', and 'flash_attention_2' on CUDA "
                         f"without flash-attn) has no attention dropout, but config.attention_dropout={dropout}: "
                         "set it to 0.0 for training, or use attn_implementation='sdpa'")
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if q.device.type == "cpu" and needs_grad:
        _note_once("FlexAttention has no backward on CPU: where gradients are needed there, flex_attention runs "
                   "torch's SDPA on the same mask")
        return sdpa_attention(q, k, v, mask, scaling, dropout, training)
    kernel = _flex_kernel(q.device.type)
    return kernel(q, k, v, block_mask=mask.block_mask(), scale=scaling, enable_gqa=q.shape[1] != k.shape[1]), None


@functools.cache
def _flash_attn_installed() -> bool:
    """Asked once: find_spec scans the import path (~0.1 ms), and every attention call of every layer asks."""
    return importlib.util.find_spec("flash_attn") is not None


def _flash_attn_usable(q: torch.Tensor) -> bool:
    """A flash kernel runs: flash-attn's, or without it torch's own, which computes in half precision only."""
    return q.is_cuda and (_flash_attn_installed() or q.dtype in (torch.float16, torch.bfloat16))


def flash_attention(q, k, v, mask: AttentionMask, scaling: float, dropout: float, training: bool):
    """flash-attn where it is installed and the tensors are on CUDA; elsewhere torch's kernels, same semantics."""
    if _flash_attn_usable(q):
        if not _flash_attn_installed():
            _note_once("flash-attn is not installed: attn_implementation='flash_attention_2' runs maestrale's Triton "
                       "kernel for inference prefill (models/kernels.py window_attention) and otherwise the flash "
                       "attention kernel that ships with torch (aten._flash_attention_forward)")
        return _flash_attn(q, k, v, mask, scaling, dropout if training else 0.0), None
    if q.is_cuda:
        _note_once(f"torch's flash attention kernel computes in float16 or bfloat16 only: "
                   f"attn_implementation='flash_attention_2' in {q.dtype} runs on torch's FlexAttention")
        return flex_attention(q, k, v, mask, scaling, dropout, training)
    _note_once(f"flash-attn runs on CUDA only: attn_implementation='flash_attention_2' on {q.device.type} runs on "
               "torch's SDPA with the same mask")
    return sdpa_attention(q, k, v, mask, scaling, dropout, training)


def _flash_kernel(q, k, v, cu_q, cu_k, max_q: int, max_k: int, dropout: float, scaling: float, window: int | None):
    """One causal flash attention call, bottom-right aligned (the queries are the last keys' positions), on
    (batch, tokens, heads, head_dim) tensors or, with cu_q/cu_k, on variable-length sequences packed back to back.
    flash-attn's kernels where it is installed, else torch's build of the same kernels."""
    left = -1 if window is None else window - 1
    if _flash_attn_installed():
        from flash_attn import flash_attn_func, flash_attn_varlen_func

        if cu_q is None:
            return flash_attn_func(q, k, v, dropout, softmax_scale=scaling, causal=True, window_size=(left, 0))
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout, softmax_scale=scaling, causal=True,
                                      window_size=(left, 0))
    return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout, True, False,
                                                   scale=scaling, window_size_left=left, window_size_right=0)[0]


def _flash_attn(q, k, v, mask: AttentionMask, scaling: float, dropout: float) -> torch.Tensor:
    """Flash attention: padding and packed sequences become its variable-length sequences."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"attn_implementation='flash_attention_2' runs flash-attn, which computes in float16 or "
                         f"bfloat16 only, and this model runs in {q.dtype} on CUDA: load it with dtype=torch.bfloat16 "
                         f"(or torch.float16), or pick attn_implementation='flex_attention' or 'sdpa' for {q.dtype}")
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # flash's layout: (batch, tokens, heads, head_dim)
    b, s, heads, d = q.shape
    if mask.padding is None and mask.documents is None:
        if s > 1 and not dropout and not _flash_attn_installed() and kernels.fused(q, k, v):  # inference prefill
            return kernels.window_attention(q, k, v, scaling, mask.window).transpose(1, 2)
        out = _flash_kernel(q, k, v, None, None, s, k.shape[1], dropout, scaling, mask.window)
        return out.transpose(1, 2)
    # Tokens that attend, back to back; segment = row (padding) or row and packed sequence (documents).
    keep_q = keep_k = segment_q = segment_k = None
    if mask.padding is not None:
        keep_q = mask.padding[:, mask.query_start : mask.query_start + s]
        keep_k = mask.padding[:, mask.key_start :]
        rows = torch.arange(b, device=q.device)[:, None]
        segment_q, segment_k, segments = rows.expand(b, s), rows.expand(b, k.shape[1]), b
    else:  # packed rows: queries and keys are the same tokens
        keep_q = keep_k = torch.ones(b, s, dtype=torch.bool, device=q.device)
        per_row = int(mask.documents.max()) + 1
        segment_q = segment_k = mask.documents + torch.arange(b, device=q.device)[:, None] * per_row
        segments = b * per_row
    lengths_q = torch.bincount(segment_q[keep_q], minlength=segments)
    lengths_k = torch.bincount(segment_k[keep_k], minlength=segments)
    cu_q, cu_k = (F.pad(n.cumsum(0), (1, 0)).to(torch.int32) for n in (lengths_q, lengths_k))
    packed = _flash_kernel(q[keep_q], k[keep_k], v[keep_k], cu_q, cu_k, int(lengths_q.max()), int(lengths_k.max()),
                           dropout, scaling, mask.window)
    out = q.new_zeros(b, s, heads, d)
    out[keep_q] = packed
    return out.transpose(1, 2)


ATTENTION_BACKENDS: dict[str, Callable] = {"eager": eager_attention, "sdpa": sdpa_attention,
                                           "flash_attention_2": flash_attention, "flex_attention": flex_attention}


def check_attn_implementation(name: str | None) -> str:
    name = name or "sdpa"
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attn_implementation={name!r} is not supported; use one of {list(ATTENTION_BACKENDS)}")
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
        mask: AttentionMask,
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
        if hasattr(mask, "attend"):  # a mask that attends itself (the server's packed sequences, engine/runner.py)
            out, weights = mask.attend(q, k, v, self.scaling), None
        else:
            out, weights = ATTENTION_BACKENDS[backend](q, k, v, mask, self.scaling, dropout, self.training)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1)), weights
