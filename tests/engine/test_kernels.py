"""Each Triton kernel of the decode step against its plain-torch version, on fresh random inputs.

Runs on CUDA, or on CPU under Triton's interpreter (TRITON_INTERPRET=1 with triton installed); skipped otherwise.
"""

import math

import pytest
import torch

from maestrale.engine import kernels

if torch.cuda.is_available() and kernels.triton is not None:
    DEVICE = "cuda"
elif kernels.use_triton(torch.empty(0)):
    DEVICE = "cpu"
else:
    pytest.skip("the Triton kernels need CUDA, or TRITON_INTERPRET=1 with triton installed", allow_module_level=True)


def skip_interpreted_bfloat16(dtype):
    if DEVICE == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter truncates to bfloat16 instead of rounding")


def rel_error(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 64), (6, 2, 96), (8, 8, 32)])
@pytest.mark.parametrize("capacity,t", [(256, 37), (64, 200), (48, 47)])  # a full cache; a wrapped ring; a full ring
def test_decode_attention(heads, kv_heads, head_dim, capacity, t, dtype):
    if DEVICE == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter computes bfloat16 dot products wrongly")
    batch = 3
    q = torch.randn(batch, heads, head_dim, device=DEVICE, dtype=dtype)
    k_cache = torch.randn(batch, kv_heads, capacity, head_dim, device=DEVICE, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    seq_mask = torch.ones(batch, 512, dtype=torch.int8, device=DEVICE)
    seq_mask[1, :5] = 0  # left padding of row 1
    seq_mask[2, :t // 2] = 0
    step = torch.tensor(t, device=DEVICE)
    scale = head_dim**-0.5
    out = kernels.decode_attention(q, k_cache, v_cache, seq_mask, step, scale)
    ref = kernels.decode_attention_torch(q.double(), k_cache.double(), v_cache.double(), seq_mask, step, scale)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_error(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_decode_attention_reads_only_the_window():
    """Slots of a ring hold the window; entries outside the valid range (never written) must not be read."""
    q = torch.randn(1, 4, 64, device=DEVICE)
    k_cache = torch.randn(1, 2, 256, 64, device=DEVICE)
    v_cache = torch.randn_like(k_cache)
    k_cache[:, :, 20:] = float("nan")  # t = 19: slots past it are unwritten
    v_cache[:, :, 20:] = float("nan")
    seq_mask = torch.ones(1, 256, dtype=torch.int8, device=DEVICE)
    out = kernels.decode_attention(q, k_cache, v_cache, seq_mask, torch.tensor(19, device=DEVICE), 0.125)
    ref = kernels.decode_attention_torch(q, k_cache[:, :, :20], v_cache[:, :, :20], seq_mask,
                                         torch.tensor(19, device=DEVICE), 0.125)
    assert not out.isnan().any()
    assert rel_error(out, ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim,rot", [(6, 2, 64, 64), (4, 4, 96, 48)])
@pytest.mark.parametrize("capacity,t", [(64, 10), (64, 130)])
def test_rotary_cache_write(heads, kv_heads, head_dim, rot, capacity, t, dtype):
    batch = 3
    qkv = torch.randn(batch, (heads + 2 * kv_heads) * head_dim, device=DEVICE, dtype=dtype)
    angles = torch.rand(batch, rot, device=DEVICE) * 6
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    caches = [torch.randn(batch, kv_heads, capacity, head_dim, device=DEVICE, dtype=dtype) for _ in range(2)]
    expected = [c.double() for c in caches]
    step = torch.tensor(t, device=DEVICE)
    q = kernels.rotary_cache_write(qkv, cos, sin, *caches, step, heads)
    q_ref = kernels.rotary_cache_write_torch(qkv.double(), cos.double(), sin.double(), *expected, step, heads)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel_error(q, q_ref) < tolerance
    assert rel_error(caches[0], expected[0]) < tolerance and torch.equal(caches[1].double(), expected[1])
    slot = t % capacity  # the other slots are untouched
    assert torch.equal(caches[0][:, :, slot + 1:].double(), expected[0][:, :, slot + 1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(96, 64), (40, 200), (9000, 32)])  # k not a multiple of the block; n neither
@pytest.mark.parametrize("gated", [False, True])
def test_matvec(n, k, gated, dtype):
    skip_interpreted_bfloat16(dtype)
    x = torch.randn(1, k, device=DEVICE, dtype=dtype) * 3
    weight = torch.randn(2 * n if gated else n, k, device=DEVICE, dtype=dtype) / math.sqrt(k)
    act = torch.nn.functional.silu if gated else None
    out = kernels.matvec(x, weight, act)
    exact = kernels.matvec_torch(x.double(), weight.double(), act)
    assert out.dtype == dtype and out.shape == (1, n)
    assert rel_error(out, exact) < (1e-5 if dtype == torch.float32 else 1e-2)
    # the torch version's rounding steps: the outputs differ by the sums' order, a unit or two of the largest
    units = 1e-6 if dtype == torch.float32 else 2**-7
    ref = kernels.matvec_torch(x, weight, act)
    torch.testing.assert_close(out, ref, rtol=units, atol=2 * units * ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows_per_x,gated,n", [(2, True, 48), (1, False, 96), (2, False, 40000)])
def test_matvec_experts(rows_per_x, gated, n, dtype):
    """Each (token, expert) pair's product with its expert's weight, read from the stacked (experts, out, in)."""
    skip_interpreted_bfloat16(dtype)
    experts, tokens, k = 4, 3, 200 if n < 1000 else 32
    weight = torch.randn(experts, 2 * n if gated else n, k, device=DEVICE, dtype=dtype) / math.sqrt(k)
    x = torch.randn(tokens, k, device=DEVICE, dtype=dtype)
    chosen = torch.randint(0, experts, (tokens * rows_per_x,), device=DEVICE)
    act = torch.nn.functional.silu if gated else None
    out = kernels.matvec(x, weight, act, chosen, rows_per_x)
    ref = kernels.matvec_torch(x.double(), weight.double(), act, chosen, rows_per_x)
    assert out.shape == (tokens * rows_per_x, n)
    assert rel_error(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)
