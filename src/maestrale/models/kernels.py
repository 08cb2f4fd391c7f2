"""Triton kernels for the element-wise chains of the model's forward on CUDA: RMSNorm, rotary, the SwiGLU gate; and
window_attention, a flash-attention forward over a sliding window's band.

In eager PyTorch each of these chains is several kernels, each reading and writing the whole activation (RMSNorm in
float32: seven passes), which on a 32k-token prefill costs about a quarter of the time. Each kernel here reads its
inputs once and writes its output once, and rounds where eager rounds: every intermediate that eager stores in the
activation dtype is rounded to it here too, so the results are those of the eager chain (RMSNorm's mean may differ
in its last bit: its sum runs in another order). They serve inference (no autograd); elsewhere, under autograd or
torch.compile (which fuses the chains itself), the eager chain runs.

window_attention serves unpadded inference prefill in place of torch's FA2 build (about 250-290 TFLOP/s on an H200's
banded chunks): key blocks outside the band are skipped, the band's edge blocks masked, the blocks between run
unmasked; it rounds as a flash kernel does (float32 running max and sum, probabilities in the input dtype).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch versions are used
    triton = tl = None

# Triton's interpreter runs the kernels on CPU tensors (how the kernel tests run without a GPU).
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HALF = (torch.float16, torch.bfloat16)


def use_triton(x: torch.Tensor) -> bool:
    """Whether x's device runs Triton kernels here (the engine's too)."""
    return triton is not None and (x.is_cuda or _INTERPRETED)


def fused(x: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether x's chain runs as one kernel here: half precision on CUDA, all operands of x's dtype, no autograd
    graph to record, not inside torch.compile."""
    return (use_triton(x) and x.dtype in HALF and all(t.dtype == x.dtype for t in others)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, *others)))
            and not torch.compiler.is_compiling())


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(X, W, OUT, x_stride, out_stride, H, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        h = tl.arange(0, BLOCK)
        keep = h < H
        x = tl.load(X + row * x_stride + h, mask=keep, other=0.0).to(tl.float32)
        normed = x * tl.rsqrt(tl.sum(x * x, 0) / H + eps)
        w = tl.load(W + h, mask=keep, other=0.0).to(tl.float32)
        out = w * normed.to(OUT.dtype.element_ty).to(tl.float32)
        tl.store(OUT + row * out_stride + h, out.to(OUT.dtype.element_ty), mask=keep)

    @triton.jit
    def _silu_gate_kernel(G, U, OUT, g_stride, u_stride, N, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        keep = n < N
        dtype = OUT.dtype.element_ty
        g = tl.load(G + row * g_stride + n, mask=keep, other=0.0).to(tl.float32)
        u = tl.load(U + row * u_stride + n, mask=keep, other=0.0).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
        tl.store(OUT + row * N + n, (act * u).to(dtype), mask=keep)

    @triton.jit
    def _rotary_kernel(X, COS, SIN, OUT, s_b, s_h, s_s, o_b, o_h, o_s, cos_b, cos_s, HEADS, SEQ, D: tl.constexpr,
                       ROT: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
        """BLOCK_S positions of one (batch, head): x * cos + rotate_half(x) * sin, each product rounded."""
        bh = tl.program_id(0)
        b, head = bh // HEADS, bh % HEADS
        s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
        d = tl.arange(0, BLOCK_D)
        keep = (s < SEQ)[:, None] & (d < D)[None, :]
        in_rot = (d < ROT)[None, :]
        dtype = OUT.dtype.element_ty
        src = X + b.to(tl.int64) * s_b + head * s_h + s[:, None].to(tl.int64) * s_s
        x = tl.load(src + d[None, :], mask=keep, other=0.0)
        partner = tl.where(d < ROT // 2, d + ROT // 2, d - ROT // 2)
        other = tl.load(src + partner[None, :], mask=keep & in_rot, other=0.0).to(tl.float32)
        other = tl.where((d < ROT // 2)[None, :], -other, other)
        at = b.to(tl.int64) * cos_b + s[:, None].to(tl.int64) * cos_s + d[None, :]
        cos = tl.load(COS + at, mask=keep & in_rot, other=0.0).to(tl.float32)
        sin = tl.load(SIN + at, mask=keep & in_rot, other=0.0).to(tl.float32)
        rotated = ((x.to(tl.float32) * cos).to(dtype).to(tl.float32) + (other * sin).to(dtype).to(tl.float32))
        out = tl.where(in_rot, rotated.to(dtype), x)
        dst = OUT + b.to(tl.int64) * o_b + head * o_h + s[:, None].to(tl.int64) * o_s + d[None, :]
        tl.store(dst, out, mask=keep)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """models.decoder.rms_norm's result in one pass over rows of x (last dim contiguous)."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    hidden = rows.shape[-1]
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(rows.shape[0],)](rows, weight, out, rows.stride(0), out.stride(0), hidden, eps, BLOCK=block,
                                       num_warps=min(16, max(1, block // 256)))
    return out.view(x.shape)


def silu_gate(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, rounded as eager rounds it, for gate and up of rows with a contiguous last dim (as a chunk
    of a fused gate_up output is)."""
    g, u = gate.reshape(-1, gate.shape[-1]), up.reshape(-1, up.shape[-1])
    out = torch.empty(g.shape, dtype=gate.dtype, device=gate.device)
    n, block = g.shape[-1], 1024
    _silu_gate_kernel[(g.shape[0], triton.cdiv(n, block))](g, u, out, g.stride(0), u.stride(0), n, BLOCK=block,
                                                         num_warps=4)
    return out.view(gate.shape)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """models.rotary.apply_rotary's result for x (batch, heads, seq, head_dim) with a contiguous last dim, in x's
    layout (the attention's (batch, seq, heads, head_dim) stays one); cos and sin (batch or 1, seq, rotary dim)."""
    b, heads, seq, d = x.shape
    rot = cos.shape[-1]
    out = torch.empty_like(x)
    cos, sin = cos.expand(b, seq, rot), sin.expand(b, seq, rot)
    block_s = 16
    _rotary_kernel[(b * heads, triton.cdiv(seq, block_s))](
        x, cos, sin, out, *x.stride()[:3], *out.stride()[:3], cos.stride(0), cos.stride(1), heads, seq, D=d,
        ROT=rot, BLOCK_D=triton.next_power_of_2(d), BLOCK_S=block_s, num_warps=4,
        enable_fp_fusion=False)  # a product and the sum contracted into one fma would skip eager's rounding
    return out


class AttentionConfig(NamedTuple):
    """How window_attention tiles the work: queries (rows) and keys a block, whether one program serves all the
    query heads of a key/value head (rows = queries x heads, each K/V tile read once for the group) or one head,
    Triton's warps and pipeline stages, and whether K/V load through TMA descriptors (Hopper). Triton's
    warp-specialized loops were slower on an H200 (318-333 / 391-409 TFLOP/s on the sweep's chunks, against 395 / 492
    for the table's configuration), so they are not a choice."""

    block_m: int = 128
    block_n: int = 64
    group_heads: bool = False
    warps: int = 8
    stages: int = 3
    tma: bool = False


# By head_dim, the fastest of benchmarks/attention_kernels.py --sweep on an H200 (2026-12-03: 395 / 492 TFLOP/s on
# Mistral-7B's chunks of 2,048 / 8,192 queries after a window of keys, where the defaults gave 365 / 407 and torch's
# FA2 273 / 285); other head dims (Phi-3's 96 runs padded to 128) take AttentionConfig's defaults.
ATTENTION_CONFIGS = {128: AttentionConfig(block_m=128, block_n=128, group_heads=True, tma=True)}


def attention_config(head_dim: int) -> AttentionConfig:
    return ATTENTION_CONFIGS.get(head_dim, AttentionConfig())


def _padded_head_dim(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot's smallest inner dimension is 16


if triton is not None:

    @triton.jit
    def _attend(acc, l_i, m_i, q, K, V, k_stride, v_stride, pos, start, stop, keys, window, qk_scale, b, kv_head,
                offs_n, offs_d, D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                MASKED: tl.constexpr, TMA: tl.constexpr, STAGES: tl.constexpr):
        """Online softmax over the key blocks from `start` to `stop`; MASKED: the blocks at the band's edges, where
        key j counts for the query at position p only if p - window < j <= p, and loads stop at `keys`."""
        d_ok = offs_d[None, :] < D
        for n in tl.range(start, stop, BLOCK_N, num_stages=STAGES):
            at = n + offs_n
            if TMA:  # K and V are (batch, keys, kv_heads, head_dim) descriptors; TMA zero-fills past their ends
                k = K.load([b, n, kv_head, 0]).reshape(BLOCK_N, BLOCK_D)
                v = V.load([b, n, kv_head, 0]).reshape(BLOCK_N, BLOCK_D)
            elif MASKED:
                ok = (at < keys)[:, None] & d_ok
                k = tl.load(K + at[:, None].to(tl.int64) * k_stride + offs_d[None, :], mask=ok, other=0.0)
                v = tl.load(V + at[:, None].to(tl.int64) * v_stride + offs_d[None, :], mask=ok, other=0.0)
            else:
                k = tl.load(K + at[:, None].to(tl.int64) * k_stride + offs_d[None, :], mask=d_ok, other=0.0)
                v = tl.load(V + at[:, None].to(tl.int64) * v_stride + offs_d[None, :], mask=d_ok, other=0.0)
            qk = tl.dot(q, tl.trans(k))
            if MASKED:
                seen = (at[None, :] <= pos[:, None]) & (at[None, :] > pos[:, None] - window)
                qk = tl.where(seen, qk * qk_scale, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(qk, 1))
                qk = qk - m_new[:, None]
            else:
                m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
                qk = qk * qk_scale - m_new[:, None]
            p = tl.math.exp2(qk)
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new
        return acc, l_i, m_i

    # The lengths and the window change from prompt to prompt: one compiled kernel for them all, where Triton would
    # compile one per length divisible by 16 or not.
    @triton.jit(do_not_specialize=["QUERIES", "KEYS", "window"])
    def _window_attention_kernel(Q, K, V, OUT, q_b, q_s, q_h, k_b, k_s, k_h, v_b, v_s, v_h, o_b, o_s, o_h,
                                 QUERIES, KEYS, HEADS, GROUPS, window, qk_scale, D: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                                 ROW_HEADS: tl.constexpr, TMA: tl.constexpr, STAGES: tl.constexpr):
        """One block of rows: ROW_HEADS query heads (1, or all of a key/value head's group) x BLOCK_M // ROW_HEADS
        consecutive queries, against the keys in their band."""
        per_block = BLOCK_M // ROW_HEADS
        first = (tl.num_programs(0) - 1 - tl.program_id(0)) * per_block  # the last queries, the most keys, first
        bh = tl.program_id(1)
        b, head0 = bh // (HEADS // ROW_HEADS), bh % (HEADS // ROW_HEADS) * ROW_HEADS
        kv_head = head0 // GROUPS
        rows = tl.arange(0, BLOCK_M)
        query, head = first + rows // ROW_HEADS, head0 + rows % ROW_HEADS
        row_ok = (query < QUERIES) & (rows < per_block * ROW_HEADS)
        offs_n, offs_d = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D)
        d_ok = offs_d[None, :] < D
        q_at = b.to(tl.int64) * q_b + query[:, None].to(tl.int64) * q_s + head[:, None] * q_h + offs_d[None, :]
        q = tl.load(Q + q_at, mask=row_ok[:, None] & d_ok, other=0.0)
        offset = KEYS - QUERIES  # bottom-right aligned: query i sits at key position i + offset
        pos = query + offset
        low_pos = first + offset
        high_pos = tl.minimum(first + per_block, QUERIES) - 1 + offset
        # The band of this block: keys low..high, of which [full_low, full_high) every row sees; the blocks before
        # and after that run masked.
        low = tl.maximum(low_pos - window + 1, 0)
        high = high_pos + 1
        full_low, full_high = tl.maximum(high_pos - window + 1, low), low_pos + 1
        blocks = tl.cdiv(high - low, BLOCK_N)
        edge = tl.minimum(tl.cdiv(full_low - low, BLOCK_N), blocks)
        middle = tl.maximum(full_high - (low + edge * BLOCK_N), 0) // BLOCK_N
        if TMA:
            k_src, v_src = K, V
        else:
            k_src = K + b.to(tl.int64) * k_b + kv_head * k_h
            v_src = V + b.to(tl.int64) * v_b + kv_head * v_h
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: a row's first masked blocks give p = 0, no NaN
        mid_start = low + edge * BLOCK_N
        mid_stop = mid_start + middle * BLOCK_N
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_src, v_src, k_s, v_s, pos, low, mid_start, KEYS, window,
                                qk_scale, b, kv_head, offs_n, offs_d, D, BLOCK_N, BLOCK_D, True, TMA, STAGES)
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_src, v_src, k_s, v_s, pos, mid_start, mid_stop, KEYS, window,
                                qk_scale, b, kv_head, offs_n, offs_d, D, BLOCK_N, BLOCK_D, False, TMA, STAGES)
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_src, v_src, k_s, v_s, pos, mid_stop, low + blocks * BLOCK_N,
                                KEYS, window, qk_scale, b, kv_head, offs_n, offs_d, D, BLOCK_N, BLOCK_D, True, TMA,
                                STAGES)
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # rows past the last query may see no key
        o_at = b.to(tl.int64) * o_b + query[:, None].to(tl.int64) * o_s + head[:, None] * o_h + offs_d[None, :]
        tl.store(OUT + o_at, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, window: int | None,
                     config: AttentionConfig | None = None) -> torch.Tensor:
    """Causal attention within `window` keys (None: all before), bottom-right aligned (the queries are the last
    positions of the keys), grouped KV heads: models.attention._flash_kernel's result without dropout or packed
    sequences. q (batch, queries, heads, head_dim), k and v (batch, keys, kv_heads, head_dim), any strides with a
    contiguous last dim; returns (batch, queries, heads, head_dim), contiguous."""
    b, queries, heads, d = q.shape
    keys, kv_heads = k.shape[1], k.shape[2]
    k_strides, v_strides = k.stride()[:3], v.stride()[:3]
    block_d = _padded_head_dim(d)
    config = config or attention_config(d)
    row_heads = heads // kv_heads if config.group_heads else 1
    out = torch.empty(b, queries, heads, d, dtype=q.dtype, device=q.device)
    if config.tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        k, v = (TensorDescriptor.from_tensor(t, [1, config.block_n, 1, block_d]) for t in (k, v))
    grid = (triton.cdiv(queries, config.block_m // row_heads), b * heads // row_heads)
    _window_attention_kernel[grid](
        q, k, v, out, *q.stride()[:3], *k_strides, *v_strides, *out.stride()[:3], queries, keys, heads,
        heads // kv_heads, keys + 1 if window is None else window, scaling * 1.4426950408889634, D=d,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=block_d, ROW_HEADS=row_heads, TMA=config.tma,
        STAGES=config.stages, num_warps=config.warps)
    return out
