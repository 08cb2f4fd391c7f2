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
@pytest.mark.parametrize("paged", [False, True])
def test_rotary_cache_write_adds_partial_sums(paged, dtype):
    """q/k/v given as float32 partial sums (splits, batch, n), a split product's summed=False result: the kernel adds
    them in order, rounds to the cache's dtype, then rotates and stores exactly what the summed row gives."""
    skip_interpreted_bfloat16(dtype)
    heads, kv_heads, head_dim, batch = 4, 2, 64, 3
    parts = torch.randn(3, batch, (heads + 2 * kv_heads) * head_dim, device=DEVICE)
    qkv = (parts[0] + parts[1] + parts[2]).to(dtype)
    angles = torch.rand(batch, head_dim, device=DEVICE) * 6
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    t = torch.tensor([5, 9, 2], device=DEVICE) if paged else torch.tensor(5, device=DEVICE)
    tables = torch.arange(2 * batch, device=DEVICE, dtype=torch.int32).view(batch, 2).flip(0) if paged else None
    shape = (2 * batch, 8, kv_heads, head_dim) if paged else (batch, kv_heads, 16, head_dim)
    caches = [torch.zeros(shape, device=DEVICE, dtype=dtype) for _ in range(4)]
    q = kernels.rotary_cache_write(parts, cos, sin, *caches[:2], t, heads, tables)
    q_summed = kernels.rotary_cache_write(qkv, cos, sin, *caches[2:], t, heads, tables)
    assert q.dtype == dtype and torch.equal(q, q_summed)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3]) and caches[1].any()


def paged_pool(lengths, kv_heads, head_dim, block_size, dtype, seed=0):
    """A pool of shuffled blocks holding each row's keys and values at its block table's slots, the same tokens as
    contiguous (row, kv_heads, length, head_dim) tensors, and the (rows, width) tables."""
    gen = torch.Generator().manual_seed(seed)
    width = max(-(-n // block_size) for n in lengths) + 1  # a spare column the rows never reach
    num_blocks = len(lengths) * width + 3
    order = torch.randperm(num_blocks, generator=gen)
    tables = order[: len(lengths) * width].view(len(lengths), width).to(torch.int32)
    pools = [torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen, dtype=dtype) for _ in range(2)]
    seqs = []
    for pool in pools:
        flat, rows = pool.view(-1, kv_heads, head_dim), []
        for row, n in enumerate(lengths):
            slots = tables[row, torch.arange(n) // block_size].long() * block_size + torch.arange(n) % block_size
            rows.append(flat[slots].transpose(0, 1))
        seqs.append(rows)
    return [p.to(DEVICE) for p in pools], seqs, tables.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size,span,config", [(16, 1 << 30, None), (16, 20, None), (8, 5, None),
                                                    (16, 1 << 30, (4, 64, 8, 2)), (8, 20, (1, 16, 2, 4))])
def test_paged_decode_attention(block_size, span, config, dtype):
    """Each row attends to its last `span` tokens, found through its block table, as SDPA over its contiguous keys;
    also in other shares, tiles and warps than the default (config)."""
    if DEVICE == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter computes bfloat16 dot products wrongly")
    heads, kv_heads, head_dim = 8, 2, 64
    lengths = [1, 37, 16, 70]
    (k_pool, v_pool), (keys, values), tables = paged_pool(lengths, kv_heads, head_dim, block_size, dtype)
    batch = len(lengths) + 1  # the last row is unused (t = -1), as a CUDA graph's padding row
    q = torch.randn(batch, heads, head_dim, device=DEVICE, dtype=dtype)
    t = torch.tensor(lengths + [-1], device=DEVICE) - torch.tensor([1] * len(lengths) + [0], device=DEVICE)
    t = t.repeat_interleave(2)[::2]  # a column of the decoder's input rows is strided
    tables = torch.cat([tables, tables[:1]])
    out = kernels.decode_attention(q, k_pool, v_pool, None, t, 0.125, tables, span, config)
    ref = kernels.decode_attention_torch(q, k_pool, v_pool, None, t, 0.125, tables, span)
    for row, n in enumerate(lengths):
        k, v = keys[row][:, max(0, n - span):].to(DEVICE), values[row][:, max(0, n - span):].to(DEVICE)
        exact = torch.nn.functional.scaled_dot_product_attention(
            q[row, :, None].double(), k.double(), v.double(), scale=0.125, enable_gqa=True)[:, 0]
        tolerance = 1e-5 if dtype == torch.float32 else 1e-2
        assert rel_error(out[row], exact) < tolerance and rel_error(ref[row], exact) < tolerance
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))  # an unused row reads nothing


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_rotary_cache_write(dtype):
    """Row b's k and v land at its token t's slot through its block table; an unused row (t = -1) writes nothing."""
    heads, kv_heads, head_dim, block_size = 6, 2, 64, 16
    lengths = [5, 33, 16]
    (k_pool, v_pool), _, tables = paged_pool(lengths, kv_heads, head_dim, block_size, dtype)
    batch = len(lengths) + 1
    qkv = torch.randn(batch, (heads + 2 * kv_heads) * head_dim, device=DEVICE, dtype=dtype)
    angles = torch.rand(batch, head_dim, device=DEVICE) * 6
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    t = torch.tensor(lengths + [-1], device=DEVICE).repeat_interleave(2)[::2]
    tables = torch.cat([tables, tables[:1]])
    pools, expected = [k_pool.clone(), v_pool.clone()], [k_pool.double(), v_pool.double()]
    q = kernels.rotary_cache_write(qkv, cos, sin, *pools, t, heads, tables)
    q_ref = kernels.rotary_cache_write_torch(qkv.double(), cos.double(), sin.double(), *expected, t, heads, tables)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel_error(q, q_ref) < tolerance
    assert rel_error(pools[0], expected[0]) < tolerance and torch.equal(pools[1].double(), expected[1])
    v = qkv.view(batch, heads + 2 * kv_heads, head_dim)[:, heads + kv_heads:]
    for row, n in enumerate(lengths):  # independently of the torch version: v copied to the slot of token n
        slot = tables[row, n // block_size].long() * block_size + n % block_size
        assert torch.equal(pools[1].view(-1, kv_heads, head_dim)[slot], v[row])
    changed = (pools[1] != v_pool).any(-1).any(-1).flatten().nonzero().flatten().tolist()
    assert len(changed) == len(lengths)  # the unused row wrote no slot


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


def _int8(n, k, group, dtype, seed):
    """Random int8 values and scales a (row, group), and the float64 weight they stand for."""
    g = torch.Generator().manual_seed(seed)
    scale = (torch.rand(n, k // group, generator=g) * 0.02 + 0.001).to(dtype)
    values = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    return values.to(DEVICE), scale.to(DEVICE), values.double() * scale.double().repeat_interleave(group, dim=1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 17, 33])
@pytest.mark.parametrize("n,k,group", [(45, 200, 200), (19, 256, 32), (37, 384, 128)])  # a scale a row, or groups
def test_int8_matmul(n, k, group, m, dtype):
    """int8 weight-only products (broadcast sums for one row, tensor-core tiles for more) equal the float64 product
    of the dequantized weight to float tolerance, for odd rows and outputs."""
    skip_interpreted_bfloat16(dtype)
    values, scale, weight = _int8(n, k, group, dtype, seed=n + k + m)
    x = torch.randn(m, k, device=DEVICE, dtype=dtype)
    out = kernels.int8_matmul(x, values, scale)
    exact = x.double().cpu() @ weight.T
    assert out.dtype == dtype and out.shape == (m, n)
    bound = (x.double().abs().cpu() @ weight.abs().T).max().item()
    tolerance = 2e-3 if dtype == torch.float16 else 1e-2
    torch.testing.assert_close(out.double().cpu(), exact, rtol=0, atol=tolerance * bound)


@pytest.mark.parametrize("m,config", [(1, (1, 2, 64, 4, 4, 1)), (5, (8, 4, 32, 3, 4, 1)), (20, (16, 16, 64, 2, 4, 1))])
@pytest.mark.parametrize("group", [32, 64, 512])
def test_int8_matmul_splits_the_inputs(group, m, config):
    """Shares of the inputs summed in float32 (SPLIT_K > 1; the last share shorter), tiles within one group or
    holding several."""
    n, k = 13, 512
    values, scale, weight = _int8(n, k, group, torch.float16, seed=m)
    x = torch.randn(m, k, device=DEVICE, dtype=torch.float16)
    out = kernels.int8_matmul(x, values, scale, config=config)
    exact = x.double().cpu() @ weight.T
    bound = (x.double().abs().cpu() @ weight.abs().T).max().item()
    torch.testing.assert_close(out.double().cpu(), exact, rtol=0, atol=2e-3 * bound)



def _check(out, x, weight, dtype, act=None):
    exact = kernels.matvec_torch(x.double().cpu(), weight, act)
    assert out.dtype == dtype and out.shape == exact.shape
    bound = (x.double().abs().cpu() @ weight.abs().T).max().item()
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    error = tolerance * bound  # of each product
    if act is not None:  # silu(g) * u moves by up to 1.1 |u| dg + |g| du (silu's slope stays under 1.1)
        gate, up = (x.double().cpu() @ weight.T).chunk(2, dim=-1)
        error *= (1.1 * up.abs() + gate.abs()).max().item() + 1
    torch.testing.assert_close(out.double().cpu(), exact, rtol=0, atol=error)


@pytest.mark.parametrize("m,config", [(1, (1, 2, 64, 4, 4, 1)), (5, (8, 4, 32, 3, 4, 1)), (5, (8, 4, 32, 1, 4, 1))])
def test_int8_matmul_leaves_its_partial_sums(m, config):
    """summed=False: a product split in shares returns their float32 partial sums (splits, m, n), which add up to the
    product (partials_sum); one share returns the product itself as (1, m, n)."""
    n, k, group = 13, 512, 64
    values, scale, weight = _int8(n, k, group, torch.float16, seed=m)
    x = torch.randn(m, k, device=DEVICE, dtype=torch.float16)
    parts = kernels.int8_matmul(x, values, scale, config=config, summed=False)
    split = config[3]
    assert parts.shape == (split, m, n) and parts.dtype == (torch.float32 if split > 1 else torch.float16)
    summed = kernels.int8_matmul(x, values, scale, config=config)
    if split == 1:
        assert torch.equal(parts[0], summed)
    out = kernels.partials_sum(parts, torch.float16)
    assert out.shape == (m, n) and out.dtype == torch.float16
    exact = x.double().cpu() @ weight.T
    bound = (x.double().abs().cpu() @ weight.abs().T).max().item()
    if split > 1:  # float32 partials: their sum is the product to float32's precision
        torch.testing.assert_close(parts.double().sum(0).cpu(), exact, rtol=0, atol=1e-5 * bound)
    torch.testing.assert_close(out.double().cpu(), summed.double().cpu(), rtol=0, atol=2e-3 * bound)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k,group", [(45, 200, 200), (19, 256, 32), (37, 640, 128), (8, 8192, 8192)])
def test_int8_row_matmul(n, k, group, dtype):
    """One row of x against int8 values read as int32 words (4 a word): w = q * scale, a scale a row or a group,
    against the float64 product; bfloat16 x reads 4 inputs an int64. (The interpreter truncates bfloat16 outputs,
    within the tolerance at one row.)"""
    values, scale, weight = _int8(n, k, group, dtype, seed=n + k)
    x = torch.randn(1, k, device=DEVICE, dtype=dtype)
    _check(kernels.int8_row_matmul(x, values, scale, n), x, weight, dtype)


@pytest.mark.parametrize("config", [None, (8, 64, 3, 2, 1), (16, 1024, 1, 4, 3)])
def test_int8_row_matmul_fuses_the_gate(config):
    """act=F.silu: silu(gate) * up of the weight's two halves, rounded as matvec_torch rounds them, the gate's and
    the up's rows in one tile; split in shares of the inputs (the last one shorter), the partials of both halves are
    summed and gated by one more kernel."""
    n, k, group = 21, 256, 64
    values, scales, weight = _int8(2 * n, k, group, torch.float16, seed=n)
    x = torch.randn(1, k, device=DEVICE, dtype=torch.float16)
    out = kernels.int8_row_matmul(x, values, scales, n, act=torch.nn.functional.silu, config=config)
    _check(out, x, weight, torch.float16, torch.nn.functional.silu)


@pytest.mark.parametrize("config", [(2, 64, 3, 4, 1), (16, 1024, 1, 8, 3), (4, 32, 2, 1, 1)])
def test_int8_row_matmul_configs(config):
    """Other blocks: shares of the inputs summed in float32 (the last share shorter), tiles within a group or
    holding several, tiles longer than the rows."""
    n, k, group = 13, 512, 64
    values, scales, weight = _int8(n, k, group, torch.float16, seed=config[0])
    x = torch.randn(1, k, device=DEVICE, dtype=torch.float16)
    _check(kernels.int8_row_matmul(x, values, scales, n, config=config), x, weight, torch.float16)


def _experts_inputs(gated, rows_per_x, k, dtype):
    """x of 3 tokens, the (token, expert) pairs' experts among 4, and the gate."""
    x = torch.randn(3, k, device=DEVICE, dtype=dtype)
    chosen = torch.tensor([3, 0, 3, 2, 1, 1][:3 * rows_per_x], device=DEVICE)
    return x, chosen, torch.nn.functional.silu if gated else None


def _check_experts(out, x, weight, chosen, rows_per_x, act, tolerance):
    """Output row i against the float64 product of expert chosen[i] (weight: the 4 experts' rows stacked) and x's row
    i // rows_per_x, within `tolerance` of the largest product (three times that gated)."""
    experts = weight.view(4, -1, weight.shape[1])
    exact = torch.stack([kernels.matvec_torch(x[i // rows_per_x][None].double().cpu(), experts[e], act)[0]
                         for i, e in enumerate(chosen.tolist())])
    assert out.shape == exact.shape == (len(chosen), experts.shape[1] // (2 if act else 1))
    bound = (x.double().abs().cpu() @ weight.abs().T).max().item()
    torch.testing.assert_close(out.double().cpu(), exact, rtol=0, atol=tolerance * bound * (3 if act else 1))


@pytest.mark.parametrize("rows_per_x,gated,config", [(2, True, None), (2, True, (8, 64, 3, 2, 1)),
                                                     (1, False, None), (1, False, (2, 64, 3, 4, 1))])
def test_int8_row_matmul_experts(rows_per_x, gated, config):
    """experts: the weight stacks 4 experts' int8 rows; each (token, expert) pair reads its expert's rows and its
    token's row of x, gated or not, in one share or as summed partials."""
    n, k, group = 24, 256, 64
    values, scales, weight = _int8(4 * (2 * n if gated else n), k, group, torch.float16, seed=rows_per_x + gated)
    x, chosen, act = _experts_inputs(gated, rows_per_x, k, torch.float16)
    out = kernels.int8_row_matmul(x, values, scales, n, act, config=config, experts=chosen, rows_per_x=rows_per_x)
    _check_experts(out, x, weight, chosen, rows_per_x, act, 2e-3)
    with pytest.raises(ValueError, match="do not stack experts of"):
        kernels.int8_row_matmul(x, values[:-8], scales[:-8], n, act, experts=chosen, rows_per_x=rows_per_x)


def test_int8_row_matmul_refuses_other_inputs():
    """x of another width than the weight's rows, several rows of x, or values that are not int8 words: a ValueError
    naming what is wrong."""
    values, scales, _ = _int8(8, 256, 64, torch.float16, seed=0)
    with pytest.raises(ValueError, match="does not have 128 inputs"):
        kernels.int8_row_matmul(torch.randn(1, 128, device=DEVICE), values, scales, 8)
    with pytest.raises(ValueError, match="one row of x, got 2"):
        kernels.int8_row_matmul(torch.randn(2, 256, device=DEVICE), values, scales, 8)
    with pytest.raises(ValueError, match="got torch.float16 values"):
        kernels.int8_row_matmul(torch.randn(1, 256, device=DEVICE), values.half(), scales, 8)


def test_batch1_decode_step_streams_its_products_through_matvec(monkeypatch):
    """At batch 1 the decode step's products (q/k/v, o, gate/up with the gate fused, down, head) run matvec's kernel,
    and its tokens and logits are the reference path's (float32)."""
    import maestrale

    config = maestrale.MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=None)
    torch.manual_seed(0)
    model = maestrale.MistralForCausalLM(config).eval().to(DEVICE)
    calls = []
    matvec = kernels.matvec
    monkeypatch.setattr("maestrale.engine.decode.matvec",
                        lambda x, w, act=None, **kw: calls.append((tuple(w.shape), act)) or matvec(x, w, act, **kw))
    ids = torch.randint(3, 97, (1, 7), device=DEVICE)
    kwargs = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True)
    ref = model.generate(ids, cache_implementation="dynamic", **kwargs)
    fast = model.generate(ids, cache_implementation="static", **kwargs)
    silu = torch.nn.functional.silu
    per_step = [((128, 64), None), ((64, 64), None), ((192, 64), silu), ((64, 96), None)] * 2 + [((97, 64), None)]
    assert calls[:len(per_step)] == per_step
    assert torch.equal(ref.sequences, fast.sequences)
    for a, b in zip(ref.logits, fast.logits):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_decode_step_reads_quantized_experts_by_expert(tmp_path, monkeypatch):
    """Mixtral's experts quantized to int8 by FqnToConfig: the decode step reads them stacked, by expert
    (int8_row_matmul's experts= at batch 1; each expert once on every row at batch 3, past as many pairs as
    experts), with the tokens and logits of the reference path (each expert on its own rows)."""
    torchao = pytest.importorskip("torchao.quantization", reason="torchao is not installed (test extra)")
    import maestrale

    config = maestrale.MixtralConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, pad_token_id=0, eos_token_id=None)
    torch.manual_seed(0)
    maestrale.MixtralForCausalLM(config).save_pretrained(tmp_path)
    rule = torchao.Int8WeightOnlyConfig()
    quantization = maestrale.TorchAoConfig(torchao.FqnToConfig({"_default": rule, r"re:.*\.experts": rule}))
    model = maestrale.AutoModelForCausalLM.from_pretrained(tmp_path, device_map=DEVICE,
                                                           quantization_config=quantization)
    pairs = []
    row_matmul = kernels.int8_row_matmul
    monkeypatch.setattr(kernels, "int8_row_matmul", lambda *args, experts=None, **kw: pairs.append(
        None if experts is None else experts.numel()) or row_matmul(*args, experts=experts, **kw))
    kwargs = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True)
    for batch in (1, 3):
        ids = torch.randint(3, 97, (batch, 7), device=DEVICE)
        ref = model.generate(ids, cache_implementation="dynamic", **kwargs)
        pairs.clear()
        fast = model.generate(ids, cache_implementation="static", **kwargs)
        # batch 1: gate/up and down of each layer read the 2 chosen experts' rows
        assert (pairs.count(2) >= 2 * 2 * config.num_hidden_layers) == (batch == 1)
        assert torch.equal(ref.sequences, fast.sequences)
        for a, b in zip(ref.logits, fast.logits):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    layer = model.__dict__["_static_decoder"].layers[0]
    assert layer.gate_up.num_experts == 4 and layer.gate_up.shape == (4 * 192, 64)


def _int4_mma(n, k, group, dtype, seed):
    """Random int4 values, scales and zeros a (row, group) in int4_mma_words' layout, rows padded to 16 (zero values,
    scales and zeros), and the float64 weight."""
    from maestrale.quantization.weight_only import int4_mma_words

    g = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 16, (n, k), generator=g)
    scale = (torch.rand(n, k // group, generator=g) * 0.02 + 0.001).to(dtype)
    zero = (torch.randn(n, k // group, generator=g) * 0.05).to(dtype)
    expand = lambda t: t.double().repeat_interleave(group, dim=1)  # noqa: E731
    weight = (values.double() - 8) * expand(scale) + expand(zero)
    pad = -n % 16
    scale_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1)  # (groups, rows, 2)
    scale_and_zeros = torch.nn.functional.pad(scale_and_zeros, (0, 0, 0, pad)).contiguous()
    words = int4_mma_words(torch.nn.functional.pad(values, (0, 0, 0, pad)), group)
    return words.to(DEVICE), scale_and_zeros.to(DEVICE), weight


needs_cuda = pytest.mark.skipif(DEVICE != "cuda", reason="mma.sync through Gluon: CUDA only")


def test_int4_mma_words_round_trip():
    """Word (tile 0, group 1, kh 0, lane 4g + t, v) holds rows g + 8b of inputs t * group / 4 + 4j + 2c + e of group
    1 (j = kh * 4 + v) in field b + 2c + 4e."""
    from maestrale.quantization.weight_only import int4_mma_values, int4_mma_words

    values = torch.randint(0, 16, (32, 256))
    words = int4_mma_words(values, 128)
    assert words.dtype == torch.int32 and words.shape == (32, 32) and (words < 0).any()
    assert torch.equal(int4_mma_values(words, 128), values.to(torch.uint8))
    g, t, v = 3, 2, 1
    word = words.reshape(-1)[(2 * 1) * 128 + (4 * g + t) * 4 + v].item() % (1 << 32)
    assert [(word >> 4 * (b + 2 * c + 4 * e)) & 15 for b in (0, 1) for c in (0, 1) for e in (0, 1)] == [
        values[g + 8 * b, 128 + t * 32 + 4 * v + 2 * c + e].item() for b in (0, 1) for c in (0, 1) for e in (0, 1)]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 5, 8, 19, 64])
@pytest.mark.parametrize("n,k,group", [(45, 256, 32), (19, 384, 64), (37, 640, 128), (16, 512, 256)])
def test_int4_mma_matmul(n, k, group, m, dtype):
    """int4 weights on tensor cores (int4_mma_matmul, int4_mma_config's choice) equal the float64 product of the
    weight they stand for, on odd rows of x and of the weight."""
    words, scale_and_zeros, weight = _int4_mma(n, k, group, dtype, seed=n + k + m)
    x = torch.randn(m, k, device=DEVICE, dtype=dtype)
    _check(kernels.int4_mma_matmul(x, words, scale_and_zeros, n, group), x, weight, dtype)


@needs_cuda
@pytest.mark.parametrize("rows_per_x,gated,config", [(2, True, None), (2, True, (8, 4, 1, 3, True)),
                                                     (1, False, None), (1, False, (8, 4, 2, 4, False))])
def test_int4_mma_matmul_experts(rows_per_x, gated, config):
    """experts: the weight stacks 4 experts' int4 rows (words and scales); each (token, expert) pair reads its
    expert's rows and its token's row of x, gated or not, in one share or as summed partials."""
    n, k, group = 48, 1024, 128
    words, scale_and_zeros, weight = _int4_mma(4 * (2 * n if gated else n), k, group, torch.bfloat16,
                                               seed=rows_per_x + gated)
    x, chosen, act = _experts_inputs(gated, rows_per_x, k, torch.bfloat16)
    out = kernels.int4_mma_matmul(x, words, scale_and_zeros, n, group, act, config=config, experts=chosen,
                                  rows_per_x=rows_per_x)
    _check_experts(out, x, weight, chosen, rows_per_x, act, 1e-2)


@needs_cuda
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("m,config", [(1, (8, 4, 1, 1, False)), (1, (8, 4, 1, 1, True)), (1, (8, 2, 4, 3, True)),
                                      (3, (8, 1, 2, 5, False)), (3, (8, 1, 2, 5, True)), (20, (16, 4, 1, 2, True)),
                                      (33, (32, 8, 1, 1, False))])
def test_int4_mma_matmul_configs(m, config, gated):
    """Other blocks: several tiles a warp, shares of the groups summed in float32 (the last share shorter, a share
    empty), x's rows in several blocks, the weights loaded a group ahead or not; gated, the gate's and up's rows in one
    program or their partials summed and gated by one more kernel."""
    n, k, group = 48, 1024, 128
    words, scale_and_zeros, weight = _int4_mma(2 * n if gated else n, k, group, torch.bfloat16, seed=m)
    x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
    act = torch.nn.functional.silu if gated else None
    out = kernels.int4_mma_matmul(x, words, scale_and_zeros, n, group, act, config=config)
    _check(out, x, weight, torch.bfloat16, act)
    parts = kernels.int4_mma_matmul(x, words, scale_and_zeros, n, group, act, config=config, summed=False)
    if gated or config[3] == 1:  # the gate needs the sums; one share is the product itself
        assert parts.shape == (1, m, n) and torch.equal(parts[0], out)
    else:  # the shares' float32 partial sums, added up by the consumer
        assert parts.shape == (config[3], m, n) and parts.dtype == torch.float32
        _check(kernels.partials_sum(parts, torch.bfloat16), x, weight, torch.bfloat16)
