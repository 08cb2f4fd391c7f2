"""Triton kernels for the element-wise chains of the model's forward on CUDA: RMSNorm, rotary, the SwiGLU gate.

In eager PyTorch each of these chains is several kernels, each reading and writing the whole activation (RMSNorm in
float32: seven passes), which on a 32k-token prefill costs about a quarter of the time. Each kernel here reads its
inputs once and writes its output once, and rounds where eager rounds: every intermediate that eager stores in the
activation dtype is rounded to it here too, so the results are those of the eager chain (RMSNorm's mean may differ
in its last bit: its sum runs in another order). They serve inference (no autograd); elsewhere, under autograd or
torch.compile (which fuses the chains itself), the eager chain runs.
"""

from __future__ import annotations

import os

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
