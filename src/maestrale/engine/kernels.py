"""Triton kernels of the decode step, each beside the plain-torch function it must equal.

Two cache addressings share the kernels. generate()'s static caches are (batch, kv_heads, capacity, head_dim): slot s
of a cache of capacity C holds, at step t (the sequence index of the token being decoded, shared by the rows), the
token t - ((t - s) mod C): a full-attention cache never wraps (C > t, so slot s holds token s), a sliding-window cache
of exactly the window's size is a ring. A slot is read when that token exists (index >= 0) and the padding mask keeps
it. The server's paged pools are (num_blocks, block_size, kv_heads, head_dim): row b's token p sits in block
block_tables[b, p // block_size] at slot p % block_size, t holds each row's own index (-1: a row that is not used),
and a layer reads the last `span` tokens (its window). The kernels see both as blocks of slots: a static cache is one
block per row, read as a ring. `t` lives on the device, so one captured graph serves every step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# triton None on CPU-only installs: the torch versions run
from ..models.kernels import tl, triton, use_triton
from ..models.rotary import apply_rotary


def slot_tokens(t: torch.Tensor, capacity: int) -> torch.Tensor:
    """Sequence index of the token each slot holds at step t; negative for slots not written yet."""
    slots = torch.arange(capacity, device=t.device)
    return t - torch.remainder(t - slots, capacity)


def paged_slots(block_tables: torch.Tensor, block_size: int, tokens: torch.Tensor) -> torch.Tensor:
    """Flat pool slot of each row's token index (tokens: (batch, n), non-negative)."""
    return block_tables.gather(1, tokens // block_size).long() * block_size + tokens % block_size


def rotary_cache_write_torch(qkv, cos, sin, k_cache, v_cache, t, heads: int, block_tables=None):
    """Split one token a row of fused q/k/v (batch, (heads + 2 kv_heads) * head_dim), rotate q and k, store k and v
    at token t's slot (see the module's docstring); returns the rotated q (batch, heads, head_dim). qkv may also be
    partial sums (splits, batch, n), added up first (see partials_sum)."""
    qkv = partials_sum(qkv, k_cache.dtype)
    b, kv_heads, d = qkv.shape[0], k_cache.shape[-2 if block_tables is not None else 1], k_cache.shape[-1]
    q, k, v = qkv.view(b, heads + 2 * kv_heads, 1, d).split([heads, kv_heads, kv_heads], dim=1)
    cos, sin = cos.view(b, 1, -1), sin.view(b, 1, -1)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    if block_tables is None:
        slot = torch.remainder(t, k_cache.shape[2]).reshape(1)
        k_cache.index_copy_(2, slot, k)
        v_cache.index_copy_(2, slot, v)
    else:
        used = t >= 0
        slots = paged_slots(block_tables, k_cache.shape[1], t.clamp(min=0)[:, None])[:, 0][used]
        k_cache.view(-1, kv_heads, d)[slots] = k[used, :, 0]
        v_cache.view(-1, kv_heads, d)[slots] = v[used, :, 0]
    return q[:, :, 0]


def decode_attention_torch(q, k_cache, v_cache, seq_mask, t, scale, block_tables=None, span: int | None = None):
    """q (batch, heads, head_dim) attends to the valid slots of the caches; returns (batch, heads, head_dim)."""
    if block_tables is None:
        tokens = slot_tokens(t, k_cache.shape[2])
        valid = (tokens >= 0) & seq_mask.gather(1, tokens.clamp(min=0).expand(seq_mask.shape[0], -1)).bool()
    else:  # every slot the rows' tables can address, the last `span` tokens up to t valid
        block_size, kv_heads, d = k_cache.shape[1:]
        tokens = torch.arange(block_tables.shape[1] * block_size, device=q.device).expand(q.shape[0], -1)
        slots = paged_slots(block_tables, block_size, tokens)
        valid = (tokens <= t[:, None]) & (tokens > t[:, None] - span)
        k_cache = k_cache.view(-1, kv_heads, d)[slots].transpose(1, 2)
        v_cache = v_cache.view(-1, kv_heads, d)[slots].transpose(1, 2)
    out = F.scaled_dot_product_attention(q[:, :, None], k_cache, v_cache, attn_mask=valid[:, None, None, :],
                                         scale=scale, enable_gqa=True)
    return out[:, :, 0]


def matvec_torch(x, weight, act=None, experts=None, rows_per_x: int = 1):
    """x @ weight.T, optionally gated and per expert, rounded step by step as the model's own layers round.

    act: gate the product's halves, act(gate) * up, weight holding the gate rows then the up rows. experts: weight
    is (experts, out, in) and pair p multiplies row p // rows_per_x of x by weight[experts[p]].
    """
    if experts is None:
        y = F.linear(x, weight)
    else:
        rows = x.repeat_interleave(rows_per_x, dim=0) if rows_per_x > 1 else x
        y = torch.bmm(weight[experts], rows.unsqueeze(-1)).squeeze(-1)
    if act is None:
        return y
    gate, up = y.chunk(2, dim=-1)
    return act(gate) * up


if triton is not None:

    @triton.jit
    def _summed(P, at, keep, s_split, SPLIT: tl.constexpr, dtype: tl.constexpr):
        """The SPLIT partial sums at P + at (s_split apart), added in order in float32 and rounded to dtype."""
        x = tl.load(P + at, mask=keep, other=0.0).to(tl.float32)
        for s in tl.static_range(1, SPLIT):
            x += tl.load(P + s * s_split + at, mask=keep, other=0.0)
        return x.to(dtype)

    @triton.jit
    def _rotary_cache_write_kernel(QKV, COS, SIN, Q, KC, VC, T, t_stride, TABLE, table_stride, BS, s_block, s_slot,
                                   s_head, s_split, HEADS: tl.constexpr, KV_HEADS: tl.constexpr, D: tl.constexpr,
                                   ROT: tl.constexpr, BLOCK_D: tl.constexpr, PAGED: tl.constexpr,
                                   SPLIT: tl.constexpr):
        """One row and one head of the fused projection (the sum of its SPLIT partial sums): rotate a q or k head,
        copy a v head; k and v go to the cache (row b's token t, at slot t mod BS of block b, or of the block its
        table names)."""
        b = tl.program_id(0)
        head = tl.program_id(1)  # q heads, then k heads, then v heads
        d = tl.arange(0, BLOCK_D)
        keep = d < D
        dtype = Q.dtype.element_ty
        at = (b * (HEADS + 2 * KV_HEADS) + head) * D
        x = _summed(QKV, at + d, keep, s_split, SPLIT, dtype)
        if head < HEADS + KV_HEADS:
            in_rot = d < ROT
            partner = tl.where(d < ROT // 2, d + ROT // 2, d - ROT // 2)
            other = _summed(QKV, at + partner, in_rot, s_split, SPLIT, dtype).to(tl.float32)
            cos = tl.load(COS + b * ROT + d, mask=in_rot, other=1.0).to(tl.float32)
            sin = tl.load(SIN + b * ROT + d, mask=in_rot, other=0.0).to(tl.float32)
            rotated = x.to(tl.float32) * cos + tl.where(d < ROT // 2, -other, other) * sin
            x = tl.where(in_rot, rotated, x.to(tl.float32)).to(x.dtype)
        t = tl.load(T + b * t_stride).to(tl.int32)
        token = tl.maximum(t, 0)
        if PAGED:
            block = tl.load(TABLE + b * table_stride + token // BS).to(tl.int64)
        else:
            block = b.to(tl.int64)
        at = block * s_block + (token % BS) * s_slot + d
        if head < HEADS:
            tl.store(Q + (b * HEADS + head) * D + d, x, mask=keep)
        elif head < HEADS + KV_HEADS:
            tl.store(KC + at + (head - HEADS) * s_head, x, mask=keep & (t >= 0))
        else:
            tl.store(VC + at + (head - HEADS - KV_HEADS) * s_head, x, mask=keep & (t >= 0))

    @triton.jit
    def _attention_split_kernel(
        Q, KC, VC, MASK, T, M, L, ACC, scale, span, mask_stride, t_stride, TABLE, table_stride, BS, s_block, s_slot,
        s_head, KV_HEADS: tl.constexpr, GROUPS: tl.constexpr, SPLITS: tl.constexpr, D: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
        PAGED: tl.constexpr, MASKED: tl.constexpr,
    ):
        """One (batch, kv head) and one share of the row's last `span` tokens: running max, sum and weighted values."""
        row = tl.program_id(0)
        split = tl.program_id(1)
        b = row // KV_HEADS
        n = tl.load(T + b * t_stride).to(tl.int32) + 1
        first = tl.maximum(n - span, 0)
        share = tl.cdiv(tl.cdiv(n - first, SPLITS), BLOCK_N) * BLOCK_N
        start = first + split * share
        end = tl.minimum(start + share, n)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        keep_d = d < D
        q = tl.load(Q + (row * GROUPS + g)[:, None] * D + d[None, :],
                    mask=(g < GROUPS)[:, None] & keep_d[None, :], other=0.0)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        head = (row % KV_HEADS) * s_head
        for p0 in range(start, end, BLOCK_N):
            token = p0 + tl.arange(0, BLOCK_N)
            inside = token < end
            valid = inside
            if MASKED:
                valid = inside & (tl.load(MASK + b * mask_stride + token, mask=inside, other=0) != 0)
            if PAGED:
                block = tl.load(TABLE + b * table_stride + token // BS, mask=inside, other=0).to(tl.int64)
            else:
                block = b.to(tl.int64)
            offsets = (block * s_block + (token % BS) * s_slot + head)[:, None] + d[None, :]
            k = tl.load(KC + offsets, mask=inside[:, None] & keep_d[None, :], other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            scores = tl.where(valid[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(scores - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(VC + offsets, mask=inside[:, None] & keep_d[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        out = (row * SPLITS + split) * GROUPS + g
        tl.store(M + out, m_i, mask=g < GROUPS)
        tl.store(L + out, l_i, mask=g < GROUPS)
        tl.store(ACC + out[:, None] * D + d[None, :], acc, mask=(g < GROUPS)[:, None] & keep_d[None, :])

    @triton.jit
    def _attention_combine_kernel(M, L, ACC, OUT, GROUPS: tl.constexpr, SPLITS: tl.constexpr, D: tl.constexpr,
                                  BLOCK_D: tl.constexpr):
        head = tl.program_id(0)  # batch * heads; query head h of batch b uses kv row (b * heads + h) // GROUPS
        row, g = head // GROUPS, head % GROUPS
        sp = tl.arange(0, SPLITS)
        d = tl.arange(0, BLOCK_D)
        at = (row * SPLITS + sp) * GROUPS + g
        m = tl.load(M + at)
        l = tl.load(L + at)
        acc = tl.load(ACC + at[:, None] * D + d[None, :], mask=(d < D)[None, :], other=0.0)
        top = tl.max(m, 0)
        w = tl.where(m == float("-inf"), 0.0, tl.exp(m - tl.where(top == float("-inf"), 0.0, top)))
        total = tl.sum(w * l, 0)
        out = tl.sum(w[:, None] * acc, 0) / tl.where(total == 0.0, 1.0, total)
        tl.store(OUT + head * D + d, out.to(OUT.dtype.element_ty), mask=d < D)

    @triton.jit
    def _matvec_kernel(X, W, E, OUT, N, K, GATED: tl.constexpr, EXPERTS: tl.constexpr, ROWS_PER_X: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """BLOCK_N outputs of one row of x (or one (token, expert) pair): streams BLOCK_N weight rows, twice as many
        with GATED, whose silu(gate) * up is rounded as matvec_torch rounds it."""
        nb = tl.program_id(0)
        row = tl.program_id(1)
        dtype = OUT.dtype.element_ty
        X += (row // ROWS_PER_X) * K
        if EXPERTS:
            if GATED:
                W += tl.load(E + row).to(tl.int64) * 2 * N * K
            else:
                W += tl.load(E + row).to(tl.int64) * N * K
        n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        keep_n = n < N
        rows = W + n[:, None].to(tl.int64) * K
        acc = tl.zeros([BLOCK_N], tl.float32)
        acc_up = tl.zeros([BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            keep_k = k < K
            xk = tl.load(X + k, mask=keep_k, other=0.0).to(tl.float32)[None, :]
            keep = keep_n[:, None] & keep_k[None, :]
            acc += tl.sum(tl.load(rows + k[None, :], mask=keep, other=0.0).to(tl.float32) * xk, 1)
            if GATED:
                acc_up += tl.sum(tl.load(rows + N * K + k[None, :], mask=keep, other=0.0).to(tl.float32) * xk, 1)
        y = acc.to(dtype)
        if GATED:
            gate = y.to(tl.float32)
            y = ((gate * tl.sigmoid(gate)).to(dtype).to(tl.float32) * acc_up.to(dtype).to(tl.float32)).to(dtype)
        tl.store(OUT + row * N + n, y, mask=keep_n)

    @triton.jit
    def _int8_tile(Q, n, keep_n, k0, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """The (BLOCK_N, BLOCK_K) int8 values at weight rows n, inputs k0.., as float32: 2^23 + 128 + q read as a
        float, minus 2^23 + 128, exact and cheaper than a conversion instruction."""
        k = k0 + tl.arange(0, BLOCK_K)
        q = tl.load(Q + n[:, None].to(tl.int64) * K + k[None, :], mask=keep_n[:, None] & (k < K)[None, :],
                    other=0).to(tl.int32)
        return ((q + 128) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0

    @triton.jit
    def _int8_kernel(X, Q, S, OUT, M, N, K, s_row, s_group, GROUP: tl.constexpr, SPLIT_K: tl.constexpr,
                     PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """BLOCK_M rows of x times BLOCK_N int8 weight rows over one of SPLIT_K shares of the inputs: each weight
        tile is read once and dequantized once for all the rows; tensor-core products from 16 rows up, else sums of
        broadcast products (where a tile lies in one group, of the integers, scaled once a row). One share stores
        the rounded outputs, several their float32 partial sums."""
        nb = tl.program_id(0)
        mb = tl.program_id(1)
        split = tl.program_id(2)
        m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        keep_m, keep_n = m < M, n < N
        share = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(split * share, tl.minimum(split * share + share, K), BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(X + m[:, None].to(tl.int64) * K + k[None, :], mask=keep_m[:, None] & (k < K)[None, :],
                        other=0.0)
            v = _int8_tile(Q, n, keep_n, k0, K, BLOCK_N, BLOCK_K)
            if BLOCK_M < 16 and GROUP >= BLOCK_K:  # one scale a weight row in this tile: out of the sums
                scale = tl.load(S + n * s_row + (k0 // GROUP) * s_group, mask=keep_n, other=0.0).to(tl.float32)
                acc += tl.sum(x.to(tl.float32)[:, None, :] * v[None, :, :], 2) * scale[None, :]
            else:
                if GROUP >= BLOCK_K:
                    scale = tl.load(S + n * s_row + (k0 // GROUP) * s_group, mask=keep_n, other=0.0).to(tl.float32)
                    w = v * scale[:, None]
                else:
                    g = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
                    keep = keep_n[:, None] & (g < K // GROUP)[None, :]
                    scale = tl.load(S + n[:, None] * s_row + g[None, :] * s_group, mask=keep, other=0.0)
                    w = tl.reshape(tl.reshape(v, (BLOCK_N, BLOCK_K // GROUP, GROUP)) * scale.to(tl.float32)[:, :, None],
                                   (BLOCK_N, BLOCK_K))
                if BLOCK_M >= 16:
                    acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=PRECISION)
                else:
                    acc += tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], 2)
        at = m[:, None] * N + n[None, :]
        keep = keep_m[:, None] & keep_n[None, :]
        if SPLIT_K == 1:
            tl.store(OUT + at, acc.to(OUT.dtype.element_ty), mask=keep)
        else:
            tl.store(OUT + split * M * N + at, acc, mask=keep)


    @triton.jit
    def _byte(w, ones, P: tl.constexpr):
        """Byte P (0 or 1) of int32 words as exact float32: the byte or'ed into the mantissa of 2^(23 - 8P), which is
        then subtracted; one logic instruction and one subtraction, no shift and no conversion. `ones` (255) is a
        kernel argument, not a literal: a register operand lets the and-or be one LOP3 (it takes one literal)."""
        bits = (w & (ones << (8 * P))) | ((150 - 8 * P) << 23)
        return bits.to(tl.float32, bitcast=True) - (1 << (23 - 8 * P))

    @triton.jit
    def _int8_words(W, n, keep_n, k0, end, s_w, BLOCK_W: tl.constexpr):
        """The (BLOCK_N, BLOCK_W) words of rows n from input k0, each of 4 int8 values offset to unsigned, the same
        shifted by 16 (bytes 2 and 3 below float32's exponent), the words' indices j (1, BLOCK_W) and a mask of j."""
        j = (k0 // 4 + tl.arange(0, BLOCK_W))[None, :]
        keep_j = j < end // 4
        # loads of 2 words a thread, as bfloat16 x's loads of their 4 inputs an int64 are: one layout for both
        w = tl.load(W + n[:, None].to(tl.int64) * s_w + tl.max_contiguous(j, [1, 2]), mask=keep_n[:, None] & keep_j,
                    other=0)
        w = w ^ -2139062144  # 0x80808080: each byte q + 128
        return w, w >> 16, j, keep_j

    @triton.jit
    def _bytes_times_x(X, w, high, j, keep_j, ones):
        """sum over bytes s of u_s * x (the tile's shape, float32) and sum over s of x ((1, BLOCK_W)) for one row of
        x; word j's byte s multiplies input 4j + s. bfloat16 x: word j's 4 inputs are read as one int64 (x's loads then
        have the words' layout, not a stride of 4) and split into float32 by masks and shifts (a bfloat16 is a
        float32's top half)."""
        X64: tl.constexpr = X.dtype.element_ty == tl.bfloat16
        qx = tl.zeros(w.shape, tl.float32)
        xs = tl.zeros(j.shape, tl.float32)
        if X64:
            x64 = tl.load(X.to(tl.pointer_type(tl.int64)) + j, mask=keep_j, other=0)
            halves = (x64.to(tl.int32), (x64 >> 32).to(tl.int32))
        for s in tl.static_range(4):
            if X64:
                if s % 2 == 0:
                    xv = (halves[s // 2] << 16).to(tl.float32, bitcast=True)
                else:
                    xv = (halves[s // 2] & -65536).to(tl.float32, bitcast=True)
            else:
                xv = tl.load(X + 4 * j + s, mask=keep_j, other=0.0).to(tl.float32)
            if s < 2:
                u = _byte(w, ones, s)
            else:
                u = _byte(high, ones, s - 2)
            qx += u * xv
            xs += xv
        return qx, xs

    @triton.jit
    def _int8_scales(S, n, keep, group, s_row, s_group):
        """The scale of rows n at group index `group`, and -128 times it (the zero of the offset bytes)."""
        scale = tl.load(S + n[:, None] * s_row + group * s_group, mask=keep, other=0.0).to(tl.float32)
        return scale, -128.0 * scale

    @triton.jit
    def _int8_row(X, W, S, n, keep_n, start, end, s_w, s_row, s_group, ones, GROUP: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """One row of x times int8 weight rows n over inputs start..end: (BLOCK_N,) float32 sums, a weight being
        u * scale - 128 * scale for the offset byte u and the scale of its group of GROUP inputs (1 << 30: one a row,
        applied once at the end). The tile is read as sub-tiles of one group each (all loaded before any is used),
        whose row sums take their scales; x's sums are scalars. Triton then keeps x and the tile in one layout and
        converts only (BLOCK_N, 1) tensors between layouts, and loads x once (a scale tile of the words' shape had
        made it move the whole tile between layouts, and load x twice)."""
        ONE: tl.constexpr = GROUP >= (1 << 30)
        SUB: tl.constexpr = BLOCK_K if ONE or BLOCK_K <= GROUP else GROUP
        if ONE:
            scale, zero = _int8_scales(S, n, keep_n[:, None], 0, s_row, s_group)
        acc = tl.zeros([BLOCK_N, SUB // 4], tl.float32)  # ONE: summed across once, at the end
        x_acc = tl.zeros([1, SUB // 4], tl.float32)
        row_acc = tl.zeros([BLOCK_N, 1], tl.float32)
        for k0 in range(start, end, BLOCK_K):
            for sub in tl.static_range(BLOCK_K // SUB):
                w, high, j, keep_j = _int8_words(W, n, keep_n, k0 + sub * SUB, end, s_w, SUB // 4)
                qx, xs = _bytes_times_x(X, w, high, j, keep_j, ones)
                if ONE:
                    acc += qx
                    x_acc += xs
                else:
                    inside = (k0 + sub * SUB) < end
                    scale, zero = _int8_scales(S, n, keep_n[:, None] & inside, (k0 + sub * SUB) // GROUP, s_row,
                                               s_group)
                    row_acc += tl.sum(qx, 1, keep_dims=True) * scale + tl.sum(tl.sum(xs, 1), 0) * zero
        if ONE:
            row_acc = tl.sum(acc, 1, keep_dims=True) * scale + tl.sum(tl.sum(x_acc, 1), 0) * zero
        return tl.sum(row_acc, 1)

    @triton.jit
    def _int8_row_kernel(X, W, S, OUT, E, N, K, s_w, s_row, s_group, ones, expert_rows, GROUP: tl.constexpr,
                         GATED: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         EXPERTS: tl.constexpr, ROWS_PER_X: tl.constexpr):
        """One row of x times BLOCK_N weight rows of int8 values read as int32 words, by fused multiply-adds, over
        one of SPLIT_K shares of the inputs. GATED: the weight holds the gate rows then the up rows, read in one tile
        (gate row i beside up row i), and the kernel stores silu(gate) * up, rounded as matvec_torch rounds it. One
        share stores the rounded outputs, several their float32 partial sums. EXPERTS: the weight stacks experts of
        expert_rows rows each, and program (., ., i) is output row i: expert E[i] times x's row i // ROWS_PER_X."""
        nb = tl.program_id(0)
        split = tl.program_id(1)
        pair = tl.program_id(2)
        X += (pair // ROWS_PER_X) * K
        OUT += pair * N
        if EXPERTS:
            expert = tl.load(E + pair).to(tl.int64)
            W += expert * expert_rows * s_w
            S += expert * expert_rows * s_row
        dtype = OUT.dtype.element_ty
        n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        keep_n = n < N
        share = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
        start = split * share
        end = tl.minimum(start + share, K)
        if GATED:  # twice the weight in flight
            r = tl.arange(0, 2 * BLOCK_N)
            half = nb * BLOCK_N + r // 2
            both = _int8_row(X, W, S, half + (r % 2) * N, half < N, start, end, s_w, s_row, s_group, ones, GROUP,
                             2 * BLOCK_N, BLOCK_K)
            gate, up = tl.split(tl.reshape(both, (BLOCK_N, 2)))
            gate = gate.to(dtype).to(tl.float32)
            acc = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32) * up.to(dtype).to(tl.float32)
        else:
            acc = _int8_row(X, W, S, n, keep_n, start, end, s_w, s_row, s_group, ones, GROUP, BLOCK_N, BLOCK_K)
        if SPLIT_K == 1:
            tl.store(OUT + n, acc.to(dtype), mask=keep_n)
        else:
            tl.store(OUT + split * tl.num_programs(2) * N + n, acc, mask=keep_n)

    def _pairs_ptx(bf16: bool) -> str:
        """PTX that turns an int4 word ($4) into 4 registers of two halves each, $f holding q - 8 of fields f (low
        half) and f + 4 (high). A field pair (bits 4f.. and 16 + 4f..) is or'ed by one lop3 into the mantissas of two
        halves 2^e + field * ulp, which one fma.rn.x2 turns into q - 8, exactly: float16 takes 1024 + q (fields at
        bits 0..3 of a half: times 1, minus 1032) and 1024 + 16q (bits 4..7: times 1/16, minus 72), one shift a word;
        bfloat16, with 7 mantissa bits, 128 + q (times 1, minus 136), each field shifted to bits 0..3."""
        code = [".reg .b32 s, one, low, sixteenth, high;"]
        if bf16:
            code += ["mov.b32 one, 0x3F803F80;", "mov.b32 low, 0xC308C308;"]
        else:
            code += ["mov.b32 one, 0x3C003C00;", "mov.b32 low, 0xE408E408;", "mov.b32 sixteenth, 0x2C002C00;",
                     "mov.b32 high, 0xD480D480;"]
        for f in range(4):
            q = f"${f}"
            if bf16:
                if f:
                    code.append(f"shr.u32 s, $4, {4 * f};")
                code += [f"lop3.b32 {q}, {'$4' if f == 0 else 's'}, 0x000F000F, 0x43004300, 0xea;",
                         f"fma.rn.bf16x2 {q}, {q}, one, low;"]
            else:
                if f == 2:
                    code.append("shr.u32 s, $4, 8;")
                mask, scale, offset = ("0x00F000F0", "sixteenth", "high") if f % 2 else ("0x000F000F", "one", "low")
                code += [f"lop3.b32 {q}, {'$4' if f < 2 else 's'}, {mask}, 0x64006400, 0xea;",
                         f"fma.rn.f16x2 {q}, {q}, {scale}, {offset};"]
        return "{\n" + "\n".join(code) + "\n}"

    _PAIRS_F16, _PAIRS_BF16 = tl.constexpr(_pairs_ptx(False)), tl.constexpr(_pairs_ptx(True))

    @triton.jit
    def _split_sum_kernel(PART, OUT, MN, N, SPLIT: tl.constexpr, GATED: tl.constexpr, BLOCK: tl.constexpr):
        """OUT (m, n) = the sum of the SPLIT float32 partial products PART (SPLIT, m, n), rounded to OUT's dtype, in
        one launch; GATED: PART's rows hold n gate columns then n up columns, and OUT is silu(gate) * up, rounded as
        matvec_torch rounds it."""
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        keep = i < MN
        width: tl.constexpr = 2 if GATED else 1
        at = (i // N) * (width * N) + i % N
        dtype = OUT.dtype.element_ty
        acc = _summed(PART, at, keep, width * MN, SPLIT, tl.float32)
        if GATED:
            up = _summed(PART, at + N, keep, width * MN, SPLIT, tl.float32)
            gate = acc.to(dtype).to(tl.float32)
            acc = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32) * up.to(dtype).to(tl.float32)
        tl.store(OUT + i, acc.to(dtype), mask=keep)


    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2

    @gluon.jit
    def _index(n: gl.constexpr, dim: gl.constexpr, layout: gl.constexpr):
        """arange(n) along dimension `dim` of a rank-4 (dim < 4) or rank-3 layout, expanded to its rank."""
        if layout.rank == 3:
            if dim == 0:
                return gl.expand_dims(gl.expand_dims(gl.arange(0, n, gl.SliceLayout(1, gl.SliceLayout(2, layout))), 1), 2)
            elif dim == 1:
                return gl.expand_dims(gl.expand_dims(gl.arange(0, n, gl.SliceLayout(0, gl.SliceLayout(2, layout))), 0), 2)
            else:
                return gl.expand_dims(gl.expand_dims(gl.arange(0, n, gl.SliceLayout(0, gl.SliceLayout(1, layout))), 0), 1)
        else:
            if dim == 0:
                i = gl.arange(0, n, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, layout))))
                return gl.expand_dims(gl.expand_dims(gl.expand_dims(i, 1), 2), 3)
            elif dim == 1:
                i = gl.arange(0, n, gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, layout))))
                return gl.expand_dims(gl.expand_dims(gl.expand_dims(i, 0), 2), 3)
            elif dim == 2:
                i = gl.arange(0, n, gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, layout))))
                return gl.expand_dims(gl.expand_dims(gl.expand_dims(i, 0), 1), 3)
            else:
                i = gl.arange(0, n, gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, layout))))
                return gl.expand_dims(gl.expand_dims(gl.expand_dims(i, 0), 1), 2)

    @gluon.jit
    def _group_weights(W, at, keep_w, at_s, keep_r, ok):
        """One group's words and its rows' scales and zeros (zero where not ok: past the share's last group)."""
        scale = gl.load(at_s, mask=keep_r & ok, other=0.0).to(gl.float32)
        zero = gl.load(at_s + 1, mask=keep_r & ok, other=0.0).to(gl.float32)
        return gl.load(W + at, mask=keep_w & ok, other=0), gl.expand_dims(scale, 1), gl.expand_dims(zero, 1)

    @gluon.jit
    def _mma_tile_sums(w, xv, PAIRS: gl.constexpr, A_L: gl.constexpr, MMA: gl.constexpr):
        """The (BLOCK_N, BLOCK_M) products (q - 8) . x of one group: its words w become the tensor-core operand in
        registers, two values an instruction (_pairs_ptx), with no move between threads."""
        RT: gl.constexpr = w.shape[0]
        KH: gl.constexpr = w.shape[1]
        V: gl.constexpr = w.shape[3]
        p0, p1, p2, p3 = gl.inline_asm_elementwise(PAIRS, "=r,=r,=r,=r,r,r", [gl.join(w, w)],
                                                   dtype=(xv.dtype,) * 4, is_pure=True, pack=2)
        t = gl.reshape(gl.join(gl.join(p0, p1), gl.join(p2, p3)), [RT, KH, 8, 4, V, 2, 2, 2])  # tile, kh, g, t, v, e, b, c
        a = gl.reshape(gl.permute(t, [0, 6, 2, 1, 4, 7, 3, 5]), [16 * RT, 16 * KH * V])
        return mma_v2(gl.convert_layout(a, A_L, assert_trivial=True), xv,
                      gl.zeros([16 * RT, xv.shape[1]], gl.float32, MMA))

    @gluon.jit
    def _int4_mma_kernel(X, W, S, OUT, E, M, N, K, UP, s_row, s_group, expert_rows, GROUP: gl.constexpr,
                         V: gl.constexpr, WARPS: gl.constexpr, TILES: gl.constexpr, SPLIT_K: gl.constexpr,
                         AHEAD: gl.constexpr, GATED: gl.constexpr, BLOCK_M: gl.constexpr, XL: gl.constexpr,
                         EXPERTS: gl.constexpr, ROWS_PER_X: gl.constexpr):
        """BLOCK_M rows of 16-bit x times 16 * WARPS * TILES int4 weight rows (int4_mma_words' layout: each thread's
        word is its share of a 16 x 16 tensor-core tile), over one of SPLIT_K shares of the groups, on mma.sync with
        the weight as the left operand and x's rows as the columns (8 a block: one row of x wastes 7). A group's
        integer products take its scale, and x's sums (by the same tensor cores, from a tile of ones) its zero.
        GATED: rows UP.. are the up rows of gate rows 0..N, and the kernel stores silu(gate) * up rounded as
        matvec_torch rounds it. One share stores the rounded outputs, several their float32 partial sums. AHEAD:
        each group's weights are loaded before the previous group's products, so that they overlap (x, from L2, is
        loaded where it is used: carried to the next iteration, its pairs would be packed again). EXPERTS: the
        weight stacks experts of expert_rows rows each, and program (., i, .) is output row i: expert E[i] times x's
        row i // ROWS_PER_X (one row a block)."""
        MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, 8])
        A_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
        B_L: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
        WL: gl.constexpr = gl.BlockedLayout([1, 1, 1, V], [1, 1, 32, 1], [WARPS, 1, 1, 1], [3, 2, 1, 0])
        PAIRS: gl.constexpr = _PAIRS_BF16 if X.dtype.element_ty == gl.bfloat16 else _PAIRS_F16
        RT: gl.constexpr = WARPS * TILES
        KH: gl.constexpr = GROUP // (16 * V)
        BLOCK_N: gl.constexpr = 16 * RT
        dtype = OUT.dtype.element_ty
        nb = gl.program_id(0)
        split = gl.program_id(2)
        if EXPERTS:
            pair = gl.program_id(1)
            expert = gl.load(E + pair).to(gl.int64)
            W += expert * expert_rows * (K // 8)
            S += expert * expert_rows * s_row
            m0 = pair // ROWS_PER_X
            end = m0 + 1  # x's rows this block reads
            o0 = pair  # its first output row
        else:
            m0 = gl.program_id(1) * BLOCK_M
            end = M
            o0 = m0
        groups = K // GROUP
        share = gl.cdiv(groups, SPLIT_K)
        g0 = split * share
        g1 = gl.minimum(g0 + share, groups)
        tile = nb * RT + _index(RT, 0, WL)
        keep_w = tile < gl.cdiv(N, 16)
        at = tile.to(gl.int64) * (2 * K) + _index(KH, 1, WL) * (32 * V) + _index(32, 2, WL) * V + _index(V, 3, WL)
        # x's rows are read in the inputs' order permuted within a group, as int4_mma_words lays out the weight: each
        # thread's share of a group is contiguous (16-byte loads)
        m_x = m0 + _index(BLOCK_M, 2, XL)
        xat = m_x.to(gl.int64) * K + _index(4, 0, XL) * (GROUP // 4) + _index(GROUP // 4, 1, XL)
        keep_x = m_x < end
        rows = nb * BLOCK_N + gl.arange(0, BLOCK_N, gl.SliceLayout(1, MMA))
        keep_r = rows < N
        ones = gl.full([BLOCK_N, GROUP], 1.0, X.dtype.element_ty, A_L)
        out = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, MMA)
        up = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, MMA)
        STEP: gl.constexpr = KH * 32 * V
        at_s = S + rows * s_row
        if GATED:
            at_up, at_s_up = at + UP.to(gl.int64) * (K // 8), at_s + UP * s_row
        if AHEAD:
            w, scale, zero = _group_weights(W, at + g0 * STEP, keep_w, at_s + g0 * s_group, keep_r, g0 < g1)
            if GATED:
                w_up, scale_up, zero_up = _group_weights(W, at_up + g0 * STEP, keep_w, at_s_up + g0 * s_group, keep_r,
                                                         g0 < g1)
        for gi in range(g0, g1):
            if AHEAD:
                w_next, scale_next, zero_next = _group_weights(W, at + (gi + 1) * STEP, keep_w,
                                                               at_s + (gi + 1) * s_group, keep_r, gi + 1 < g1)
                if GATED:
                    w_up_next, scale_up_next, zero_up_next = _group_weights(
                        W, at_up + (gi + 1) * STEP, keep_w, at_s_up + (gi + 1) * s_group, keep_r, gi + 1 < g1)
            else:
                w, scale, zero = _group_weights(W, at + gi * STEP, keep_w, at_s + gi * s_group, keep_r, True)
                if GATED:
                    w_up, scale_up, zero_up = _group_weights(W, at_up + gi * STEP, keep_w, at_s_up + gi * s_group,
                                                             keep_r, True)
            xr = gl.load(X + xat + gi * GROUP, mask=keep_x, other=0.0)
            xr = gl.permute(gl.reshape(xr, [4, GROUP // 16, 2, 2, BLOCK_M]), [1, 2, 0, 3, 4])
            xv = gl.convert_layout(gl.reshape(xr, [GROUP, BLOCK_M]), B_L, assert_trivial=True)
            x_sums = mma_v2(ones, xv, gl.zeros([BLOCK_N, BLOCK_M], gl.float32, MMA))
            out += _mma_tile_sums(w, xv, PAIRS, A_L, MMA) * scale + x_sums * zero
            if GATED:
                up += _mma_tile_sums(w_up, xv, PAIRS, A_L, MMA) * scale_up + x_sums * zero_up
            if AHEAD:
                w, scale, zero = w_next, scale_next, zero_next
                if GATED:
                    w_up, scale_up, zero_up = w_up_next, scale_up_next, zero_up_next
        if GATED:
            gate = out.to(dtype).to(gl.float32)
            out = (gate / (1.0 + gl.exp(-gate))).to(dtype).to(gl.float32) * up.to(dtype).to(gl.float32)
        m = gl.arange(0, BLOCK_M, gl.SliceLayout(0, MMA))
        at_o = gl.expand_dims(o0 + m, 0) * N + gl.expand_dims(rows, 1)
        keep = gl.expand_dims(m0 + m < end, 0) & gl.expand_dims(keep_r, 1)
        if SPLIT_K == 1:
            gl.store(OUT + at_o, out.to(dtype), mask=keep)
        else:
            gl.store(OUT + split * M * N + at_o, out, mask=keep)


def _split_sum(partials: torch.Tensor, dtype: torch.dtype, gated: bool = False) -> torch.Tensor:
    """The (m, n) result of a split product's float32 partials (splits, m, n; gated: n gate then n up columns)."""
    splits, m, width = partials.shape
    n = width // 2 if gated else width
    out = partials.new_empty(m, n, dtype=dtype)
    block = 1024
    _split_sum_kernel[(triton.cdiv(m * n, block),)](partials, out, m * n, n, SPLIT=splits, GATED=gated, BLOCK=block)
    return out


def _result(out: torch.Tensor, dtype: torch.dtype, gated: bool, summed: bool) -> torch.Tensor:
    """A product's result from its kernel's output (m, n), or (splits, m, width) float32 partials: the (m, n) product
    in dtype, or with summed=False (no gate) partial sums (splits, m, n) for the consumer to add up (partials_sum,
    or a kernel that reads them): one launch fewer."""
    if out.dim() == 3 and (summed or gated):
        out = _split_sum(out, dtype, gated)
    return out if summed or out.dim() == 3 else out[None]


def partials_sum(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A product's (m, n) result in dtype from its summed=False partial sums (splits, m, n), added in order (as
    _split_sum adds them); (m, n) as it is. Element-wise adds, not a sum over the first dimension, so that
    torch.compile fuses them into the kernel that reads the result (a reduction would be a kernel of its own)."""
    if out.dim() == 2:
        return out
    total = out[0]
    for part in out[1:]:
        total = total + part
    return total.to(dtype)


def _as_blocks(k_cache, v_cache, t, block_tables):
    """The kernels' view of either addressing: (k, v) as (blocks, slots, kv_heads, head_dim), t's row stride, the
    table (a dummy for static caches: row b is block b) and its row stride."""
    if block_tables is None:
        return k_cache.transpose(1, 2), v_cache.transpose(1, 2), 0, t, 0
    return k_cache, v_cache, t.stride(0), block_tables, block_tables.stride(0)


def rotary_cache_write(qkv, cos, sin, k_cache, v_cache, t, heads: int, block_tables=None):
    """rotary_cache_write_torch in one kernel launch, which also adds up a split product's partial sums: qkv may be
    (splits, batch, n), float32 (a product's summed=False result), rounded to the cache's dtype once summed."""
    if not use_triton(qkv):
        return rotary_cache_write_torch(qkv, cos, sin, k_cache, v_cache, t, heads, block_tables)
    k_blocks, v_blocks, t_stride, table, table_stride = _as_blocks(k_cache, v_cache, t, block_tables)
    parts = (qkv if qkv.dim() == 3 else qkv[None]).contiguous()
    (split, b, _), (_, block_size, kv_heads, d) = parts.shape, k_blocks.shape
    q = parts.new_empty(b, heads, d, dtype=k_cache.dtype)
    _rotary_cache_write_kernel[(b, heads + 2 * kv_heads)](
        parts, cos.contiguous(), sin.contiguous(), q, k_blocks, v_blocks, t, t_stride, table, table_stride,
        block_size, *k_blocks.stride()[:3], parts.stride(0), HEADS=heads, KV_HEADS=kv_heads, D=d, ROT=cos.shape[-1],
        BLOCK_D=triton.next_power_of_2(d), PAGED=block_tables is not None, SPLIT=split)
    return q


def attention_splits(batch: int, kv_heads: int) -> int:
    """Key-range shares per (batch, kv head): enough programs to cover the GPU's multiprocessors twice."""
    programs = torch.cuda.get_device_properties().multi_processor_count * 2 if torch.cuda.is_available() else 264
    return min(32, triton.next_power_of_2(max(1, -(-programs // (batch * kv_heads)))))


def decode_attention(q, k_cache, v_cache, seq_mask, t, scale, block_tables=None, span: int | None = None,
                     config: tuple[int, int, int, int] | None = None):
    """Flash-decoding: SPLITS programs per kv head read disjoint shares of the valid slots, a second kernel merges.
    Static caches take the padding mask `seq_mask` (and read the whole ring); paged pools take `span`. config:
    (SPLITS, BLOCK_N, num_warps, num_stages), by default attention_splits' shares of 32-token tiles on 4 warps."""
    if not use_triton(q):
        return decode_attention_torch(q, k_cache, v_cache, seq_mask, t, scale, block_tables, span)
    k_blocks, v_blocks, t_stride, table, table_stride = _as_blocks(k_cache, v_cache, t, block_tables)
    batch, heads, d = q.shape
    block_size, kv_heads = k_blocks.shape[1], k_blocks.shape[2]
    splits, block_n, warps, stages = config or (attention_splits(batch, kv_heads), 32, 4, 3)
    if splits & (splits - 1) or block_n & (block_n - 1):
        raise ValueError(f"decode_attention: SPLITS and BLOCK_N must be powers of 2, got {splits} and {block_n}")
    groups = heads // kv_heads
    m = q.new_empty(batch * kv_heads, splits, groups, dtype=torch.float32)
    l, acc = torch.empty_like(m), q.new_empty(batch * kv_heads, splits, groups, d, dtype=torch.float32)
    block_d = triton.next_power_of_2(d)
    masked = seq_mask is not None
    _attention_split_kernel[(batch * kv_heads, splits)](
        q.contiguous(), k_blocks, v_blocks, seq_mask if masked else t, t, m, l, acc, scale,
        block_size if block_tables is None else span, seq_mask.stride(0) if masked else 0, t_stride, table,
        table_stride, block_size, *k_blocks.stride()[:3], KV_HEADS=kv_heads, GROUPS=groups, SPLITS=splits, D=d,
        BLOCK_G=max(16, triton.next_power_of_2(groups)), BLOCK_N=block_n, BLOCK_D=block_d,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", PAGED=block_tables is not None, MASKED=masked,
        num_warps=warps, num_stages=stages,
    )
    out = torch.empty_like(q)
    _attention_combine_kernel[(batch * heads,)](m, l, acc, out, GROUPS=groups, SPLITS=splits, D=d, BLOCK_D=block_d)
    return out


def matvec_config(rows: int, k: int, gated: bool) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) of matvec's kernel for a weight of rows x k, the fastest of
    benchmarks/gpu_kernels.py --sweep on an H200 (the dense layers of Mistral-7B, Ministral-8B and Phi-3-mini): one
    weight row a program (with `gated`, a gate row and its up row), in 4096-wide tiles where the rows are 4096 or 8192
    long, 2048-wide past that (down products); two rows in 1024-wide tiles for Phi-3's 3072. Rows shorter than 1024
    (small test models) take 32 a program, so that the programs stay few."""
    if k < 1024:
        return 16 if gated else 32, triton.next_power_of_2(k), 4, 1
    if k % 4096 == 0 and k <= 8192:
        return 1, 4096, 8, 1
    if k > 8192:
        return 1, 2048, 4, 1
    return 2, 1024, 4, 3


def matvec(x, weight, act=None, experts=None, rows_per_x: int = 1,
           config: tuple[int, int, int, int] | None = None):
    """matvec_torch in one launch, for few rows: each row streams the weight rows it uses once (with experts,
    straight from the stacked weight: no gathered copy, no host sync). The kernel gates with silu only."""
    if not use_triton(x) or act not in (None, F.silu):
        return matvec_torch(x, weight, act, experts, rows_per_x)
    rows, k = weight.shape[-2:]
    n = rows // 2 if act is not None else rows
    out = x.new_empty(x.shape[0] if experts is None else experts.numel(), n)
    block_n, block_k, warps, stages = config or matvec_config(rows, k, act is not None)
    _matvec_kernel[(triton.cdiv(n, block_n), out.shape[0])](
        x.contiguous(), weight, experts, out, n, k, GATED=act is not None, EXPERTS=experts is not None,
        ROWS_PER_X=rows_per_x, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return out


def int8_config(m: int, n: int, k: int, group: int) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) of int8_matmul's kernel for m rows of x and an
    n x k weight with groups of `group` inputs, the fastest of benchmarks/gpu_kernels.py --quant on an H200 for
    Mistral-7B's decode products: one row as broadcast sums over 4 weight rows of 1024-wide tiles a program, more
    rows as tensor-core tiles of 64 weight rows by 128 inputs (rows padded to 16); the inputs split in shares while
    there are fewer than 256 programs."""
    if m == 1:
        block_m, block_n, block_k, warps = 1, 4, 1024, 4
    else:
        block_m, block_n, block_k, warps = min(64, max(16, triton.next_power_of_2(m))), 64, 128, 8
    block_k = min(block_k, max(group, 32, triton.next_power_of_2(k)))  # short rows: tiles not mostly masked
    split, programs = 1, triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    while programs * split < 256 and k // (block_k * split * 2) >= 4:
        split *= 2
    return block_m, block_n, block_k, split, warps, 3


def int8_matmul(x: torch.Tensor, values: torch.Tensor, scale: torch.Tensor,
                config: tuple[int, int, int, int, int, int] | None = None, summed: bool = True) -> torch.Tensor:
    """x @ w.T in x's dtype, (m, k) by an (n, k) int8 weight w = q * scale, scale (n, groups) of any strides. For any
    m: the weight is read once per BLOCK_M rows of x. summed=False: partial sums (see _result)."""
    (m, k), (n, groups) = x.shape, scale.shape
    if tuple(values.shape) != (n, k):
        raise ValueError(f"int8_matmul: x of {k} inputs against int8 values {tuple(values.shape)} and {n} rows of "
                         f"scales: the weight is not ({n}, {k})")
    group = k // groups
    block_m, block_n, block_k, split, warps, stages = config or int8_config(m, n, k, group)
    if groups == 1:  # one scale a row: every tile lies in the row's group
        group = max(k, block_k)
    elif block_k % group and group % block_k:
        raise ValueError(f"int8_matmul: BLOCK_K {block_k} neither holds whole groups of {group} nor divides one")
    x = x.contiguous()
    out = x.new_empty(m, n) if split == 1 else x.new_empty(split, m, n, dtype=torch.float32)
    _int8_kernel[(triton.cdiv(n, block_n), triton.cdiv(m, block_m), split)](
        x, values, scale, out, m, n, k, *scale.stride(), GROUP=group, SPLIT_K=split,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=warps, num_stages=stages)
    return _result(out, x.dtype, False, summed)



def int8_row_config(n: int, k: int, gated: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) of int8_row_matmul's kernel for an n x k weight (n outputs;
    with `gated`, 2n weight rows), the fastest of benchmarks/gpu_kernels.py --one-row on an H200 (BENCHMARKS.md,
    2026-12-04): gate/up 16 rows by 256 inputs in 2 shares on 4 warps (the partials of the gate's rows and the up's,
    gated as they are summed), so that enough of the weight is in flight; heads (more than 16,384 rows) 8 by 512 on
    one warp; others 8 by 1024 on two."""
    block_n, block_k, split, warps = ((16, 256, 2, 4) if gated else (8, 512, 1, 1) if n > 16384 else (8, 1024, 1, 2))
    block_k = min(block_k, max(64, triton.next_power_of_2(k)))  # short rows: tiles not mostly masked
    while split > 1 and k // (block_k * split) < 2:  # shares of at least two tiles
        split //= 2
    return block_n, block_k, split, warps, 1


def int8_row_matmul(x: torch.Tensor, values: torch.Tensor, scales: torch.Tensor, n: int, act=None,
                    config: tuple[int, int, int, int, int] | None = None, summed: bool = True,
                    experts: torch.Tensor | None = None, rows_per_x: int = 1) -> torch.Tensor:
    """x @ w.T in x's dtype for one row x (1, k) and the first n rows of an int8 weight w = q * scale: values (rows,
    k) int8, rows contiguous and k a multiple of 4 (read as int32 words), scales (rows, groups). act=F.silu: the
    weight is the gate's n rows then the up's n rows, and the result silu(gate) * up. config: int8_row_config's
    tuple. summed=False: partial sums (see _result). experts (pairs,): x may have several rows, the weight stacks
    equal experts, and output row i is expert experts[i] times x's row i // rows_per_x, as matvec's experts."""
    (m, k), groups = x.shape, scales.shape[1]
    if m != 1 and experts is None:
        raise ValueError(f"int8_row_matmul takes one row of x, got {m}: int8_matmul takes any")
    if values.shape[1] != k:
        raise ValueError(f"int8_row_matmul: x of {k} inputs against values {tuple(values.shape)}: the weight does not "
                         f"have {k} inputs")
    if values.dtype != torch.int8 or values.stride(1) != 1 or k % 4:
        raise ValueError(f"int8_row_matmul reads int8 values with contiguous rows of a multiple of 4 inputs as int32 "
                         f"words, got {values.dtype} values of strides {values.stride()} and {k} inputs")
    gated = act is not None
    if gated and act is not F.silu:
        raise ValueError(f"int8_row_matmul gates with F.silu only, got {act}")
    expert_rows = 2 * n if gated else n
    if experts is not None and values.shape[0] % expert_rows:
        raise ValueError(f"int8_row_matmul: {values.shape[0]} weight rows do not stack experts of {expert_rows} rows "
                         "each")
    block_n, block_k, split, warps, stages = config or int8_row_config(n, k, gated)
    group = k // groups if groups > 1 else 1 << 30  # one scale a row: one kernel for every row length
    x = x.contiguous()
    pairs = 1 if experts is None else experts.numel()
    # split and gated: the partials of the gate's rows and the up's (2n outputs), gated as they are summed
    width = 2 * n if gated and split > 1 else n
    out = x.new_empty(pairs, n) if split == 1 else x.new_empty(split, pairs, width, dtype=torch.float32)
    words = values.view(torch.int32)
    _int8_row_kernel[(triton.cdiv(width, block_n), split, pairs)](
        x, words, scales, out, experts, width, k, words.stride(0), *scales.stride(), 255, expert_rows, GROUP=group,
        GATED=gated and split == 1, SPLIT_K=split, BLOCK_N=block_n, BLOCK_K=block_k, EXPERTS=experts is not None,
        ROWS_PER_X=rows_per_x, num_warps=warps, num_stages=stages)
    return _result(out, x.dtype, gated, summed)


def int4_mma_config(m: int, n: int, k: int, group: int) -> tuple[int, int, int, int, bool]:
    """(BLOCK_M, num_warps, TILES, SPLIT_K, AHEAD) of int4_mma_matmul for m rows of x and an n x k weight, from
    benchmarks/gpu_kernels.py --mma on an H100 (BENCHMARKS.md, 2026-12-06): x's rows in blocks of 8 up to 64, on 4
    warps of 2 tiles of 16 weight rows; from 16,384 rows 4 tiles (8 warps at one row; past 8 rows of x, where those up
    to 8 start in 2 shares); the groups split in shares of at least two until there are 224 programs, 512 at one row
    below 16,384 rows (partial sums cost little where the consumer adds them up: summed=False); the weights loaded a
    group ahead up to 8 rows of x, in 1 or 2 tiles a warp and shares of 4 groups or more."""
    block_m = min(64, max(8, triton.next_power_of_2(m)))
    big = n >= 16384
    warps = 8 if big and m == 1 else 4
    tiles = 4 if big and (m == 1 or block_m > 8) else 2
    split = 2 if big and m > 1 and block_m == 8 else 1
    programs = triton.cdiv(n, 16 * warps * tiles) * triton.cdiv(m, block_m)
    while programs * split < (512 if m == 1 and not big else 224) and k // group // (split * 2) >= 2:
        split *= 2
    return block_m, warps, tiles, split, block_m == 8 and tiles <= 2 and k // group // split >= 4


def _x_layout(block_m: int, group: int, warps: int):
    """int4_mma_matmul's layout of x's (4, group / 4, BLOCK_M) tile: a thread's group / 4 inputs contiguous in
    registers, lanes over the 4 quarters and 8 rows, x's other rows in registers, every warp a copy."""
    def log2(v: int) -> int:
        return v.bit_length() - 1
    return gl.DistributedLinearLayout(
        reg_bases=[[0, 1 << i, 0] for i in range(log2(group // 4))] + [[0, 0, 8 << i] for i in range(log2(block_m // 8))],
        lane_bases=[[1, 0, 0], [2, 0, 0], [0, 0, 1], [0, 0, 2], [0, 0, 4]], warp_bases=[[0, 0, 0]] * log2(warps),
        block_bases=[], shape=[4, group // 4, block_m])


def int4_mma_matmul(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, n: int, group: int, act=None,
                    config: tuple[int, int, int, int, bool] | None = None, summed: bool = True,
                    experts: torch.Tensor | None = None, rows_per_x: int = 1) -> torch.Tensor:
    """x @ w.T in x's dtype (float16 or bfloat16, m <= 64 rows) for the first n rows of an int4 weight in
    int4_mma_words' layout (rows padded to 16), w = (q - 8) * scale + zero with scales (groups, rows, 2) of scales and
    zeros, on tensor cores. act=F.silu: the weight is the gate's n rows then the up's n rows (n a multiple of 16), and
    the result silu(gate) * up. config: int4_mma_config's tuple. summed=False: partial sums (see _result). experts
    (pairs,): the weight stacks equal experts (each a multiple of 16 rows), and output row i is expert experts[i]
    times x's row i // rows_per_x, as matvec's experts (no host sync)."""
    (m, k), rows = x.shape, words.shape[0]
    if x.dtype not in (torch.float16, torch.bfloat16) or words.dtype != torch.int32 or words.shape[1] * 8 != k \
            or rows % 16 or k % group or not words.is_contiguous():
        raise ValueError(f"int4_mma_matmul: x {tuple(x.shape)} {x.dtype} against words {tuple(words.shape)} "
                         f"{words.dtype}: x must be float16 or bfloat16 of k inputs, the words contiguous int32 of k / 8 "
                         f"a row, rows a multiple of 16, k a multiple of the group ({group})")
    gated = act is not None
    if gated and (act is not F.silu or n % 16):
        raise ValueError(f"int4_mma_matmul gates with F.silu on gate rows a multiple of 16, got {act}, {n} rows")
    expert_rows = 2 * n if gated else n
    pairs = m if experts is None else experts.numel()
    if experts is not None and rows % expert_rows:
        raise ValueError(f"int4_mma_matmul: {rows} weight rows do not stack experts of {expert_rows} rows each")
    block_m, warps, tiles, split, ahead = config or int4_mma_config(m if experts is None else 1, expert_rows, k, group)
    x = x.contiguous()
    # split and gated: the gate's and the up's partials, gated as summed
    width = expert_rows if gated and split > 1 else n
    out = x.new_empty(pairs, n) if split == 1 else x.new_empty(split, pairs, width, dtype=torch.float32)
    blocks = triton.cdiv(m, block_m) if experts is None else pairs
    _int4_mma_kernel[(triton.cdiv(width, 16 * warps * tiles), blocks, split)](
        x, words, scales, out, experts, pairs, width, k, n, scales.stride(1), scales.stride(0),
        expert_rows, GROUP=group, V=2 if group == 32 else 4, WARPS=warps,
        TILES=tiles, SPLIT_K=split, AHEAD=ahead, GATED=gated and split == 1, BLOCK_M=block_m,
        XL=_x_layout(block_m, group, warps), EXPERTS=experts is not None, ROWS_PER_X=rows_per_x, num_warps=warps)
    return _result(out, x.dtype, gated, summed)
