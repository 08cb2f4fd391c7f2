"""maestrale's banded flash-attention kernel (models/kernels.py window_attention) against float32 SDPA on the dense
window mask, and flash_attention_2's routing to it.

Runs on CUDA, or on CPU under Triton's interpreter (TRITON_INTERPRET=1 with triton installed, small shapes and
blocks); skipped otherwise.
"""

import pytest
import torch
import torch.nn.functional as F

from maestrale.models import attention, kernels
from maestrale.models.kernels import AttentionConfig

if torch.cuda.is_available() and kernels.triton is not None:
    DEVICE, SCALE, DTYPES = "cuda", 4, [torch.float16, torch.bfloat16]  # sequences 4x longer
    CONFIGS = [None, AttentionConfig(64, 32, warps=4), AttentionConfig(group_heads=True)]
    if torch.cuda.get_device_capability() >= (9, 0):
        CONFIGS.append(AttentionConfig(tma=True))
elif kernels.use_triton(torch.empty(0)):
    DEVICE, SCALE, DTYPES = "cpu", 1, [torch.float16]  # the interpreter's tl.dot multiplies bfloat16's raw bits
    CONFIGS = [AttentionConfig(32, 16), AttentionConfig(32, 16, group_heads=True), AttentionConfig(16, 16, tma=True)]
else:
    pytest.skip("the Triton kernels need CUDA, or TRITON_INTERPRET=1 with triton installed", allow_module_level=True)

TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 2e-2}  # a few units of the last place of outputs near 1


def reference(q, k, v, scaling, window):
    """float32 SDPA with the dense mask: key j visible to query i when i - window < j <= i, the queries being the
    last positions of the keys; (batch, tokens, heads, head_dim) in and out."""
    queries, keys, groups = q.shape[1], k.shape[1], q.shape[2] // k.shape[2]
    qh = q.float().transpose(1, 2)
    kh, vh = (t.float().transpose(1, 2).repeat_interleave(groups, dim=1) for t in (k, v))
    pos = torch.arange(queries, device=q.device)[:, None] + keys - queries
    key = torch.arange(keys, device=q.device)[None]
    allowed = (key <= pos) & (key > pos - (window if window is not None else keys + 1))
    return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed, scale=scaling).transpose(1, 2)


def inputs(queries, keys, heads, kv_heads, head_dim, dtype, seed=0, batch=2):
    generator = torch.Generator(DEVICE).manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, device=DEVICE, generator=generator).to(dtype)  # noqa: E731
    return (randn(batch, queries, heads, head_dim), randn(batch, keys, kv_heads, head_dim),
            randn(batch, keys, kv_heads, head_dim))


SHAPES = {  # (queries, keys, window): no length a multiple of the blocks
    "causal-square": (37, 37, None),
    "window-shorter": (45, 45, 13),
    "window-longer-than-keys": (30, 30, 100),
    "chunk-after-cached-window": (40, 59, 20),
    "keys-longer-no-window": (21, 60, None),
    "window-of-one": (19, 25, 1),
}


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_equals_float32_reference_on_odd_shapes(shape, config):
    queries, keys, window = (n * SCALE if n is not None and n != 1 else n for n in SHAPES[shape])
    q, k, v = inputs(queries, keys, 8, 2, 64, torch.float16)
    out = kernels.window_attention(q, k, v, 0.125, window, config)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    torch.testing.assert_close(out.float(), reference(q, k, v, 0.125, window), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("config", [None, AttentionConfig(group_heads=True)], ids=["table", "group-heads"])
def test_full_size_blocks_on_a_chunk_after_a_cached_window(config):
    """Blocks of 128 queries and 64 keys: two query blocks, each with masked edges and unmasked blocks between."""
    queries, window = 200 * SCALE, 256 * SCALE
    q, k, v = inputs(queries, queries + window - 1, 8, 2, 128, torch.float16, batch=1)
    out = kernels.window_attention(q, k, v, 128**-0.5, window, config)
    torch.testing.assert_close(out.float(), reference(q, k, v, 128**-0.5, window), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 96, 128])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)], ids=["groups1", "groups4"])
def test_head_dims_groups_and_dtypes_in_the_attentions_layout(head_dim, heads, kv_heads, dtype):
    """q, k, v as the attention block hands them over: (batch, heads, tokens, head_dim) views of (batch, tokens,
    heads, head_dim) projections, and keys from a cache buffer longer than the keys used."""
    queries, keys, window = 33 * SCALE, 50 * SCALE, 24 * SCALE
    q, k, v = inputs(queries, keys, heads, kv_heads, head_dim, dtype, seed=head_dim)
    buffers = torch.zeros(2, 2, kv_heads, keys + 5, head_dim, device=DEVICE, dtype=dtype)
    buffers[0, :, :, :keys], buffers[1, :, :, :keys] = k.transpose(1, 2), v.transpose(1, 2)
    buffer_k, buffer_v = buffers[:, :, :, :keys].transpose(2, 3)
    out = kernels.window_attention(q, buffer_k, buffer_v, head_dim**-0.5, window, CONFIGS[0])
    expected = reference(q, k, v, head_dim**-0.5, window)
    torch.testing.assert_close(out.float(), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("case", ["prefill", "decode", "padded", "needs-grad"])
def test_flash_attention_2_runs_it_for_unpadded_inference_prefill_only(case, monkeypatch):
    """flash_attention_2: more than one query, no padding, no gradient -> this kernel; else torch's flash kernel."""
    calls = []
    window_attention, flash_kernel = kernels.window_attention, attention._flash_kernel
    monkeypatch.setattr(kernels, "window_attention", lambda *a: calls.append("ours") or window_attention(*a))
    monkeypatch.setattr(attention, "_flash_kernel", lambda *a: calls.append("fa2") or flash_kernel(*a))
    monkeypatch.setattr(attention, "_flash_attn_usable", lambda q: True)
    if DEVICE == "cpu":  # no flash kernel on CPU: the float32 reference stands in for it (one row: packed = dense)
        monkeypatch.setattr(attention, "_flash_kernel", lambda q, k, v, cu_q, *a: calls.append("fa2") or reference(
            *(t if cu_q is None else t[None] for t in (q, k, v)), a[-2], a[-1]).to(q.dtype).view_as(q))
    queries = 1 if case == "decode" else 20
    q, k, v = inputs(queries, 26, 8, 2, 64, torch.float16, batch=1)
    q.requires_grad_(case == "needs-grad")
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    padding = torch.ones(1, 26, dtype=torch.bool, device=DEVICE) if case == "padded" else None
    mask = attention.AttentionMask(padding, 1, 26 - queries, queries, 0, 9, torch.device(DEVICE))
    out, _ = attention.flash_attention(q, k, v, mask, 0.125, 0.0, False)
    assert calls == (["ours"] if case == "prefill" else ["fa2"])
    expected = reference(*(t.transpose(1, 2) for t in (q, k, v)), 0.125, 9).transpose(1, 2)
    torch.testing.assert_close(out.float(), expected, atol=2e-3, rtol=2e-3)


def test_chunked_prefill_of_a_model_on_it_equals_the_dense_mask(monkeypatch):
    """A model's prompt in chunks after cached keys (the rolling cache's buffers as the keys): the first logits of
    flash_attention_2 on the kernel, and of sdpa on the dense mask, agree in float16."""
    from maestrale import MistralConfig, MistralForCausalLM

    monkeypatch.setattr(attention, "_flash_attn_usable", lambda q: True)  # on CPU too, under the interpreter
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=128, hidden_size=128, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=8 * SCALE)
    model = MistralForCausalLM(config).to(DEVICE, torch.float16).eval()
    model.set_attn_implementation("flash_attention_2")
    ids = torch.randint(0, 128, (1, 40 * SCALE), device=DEVICE)
    kwargs = dict(max_new_tokens=1, do_sample=False, prefill_chunk_size=16 * SCALE, cache_implementation="dynamic",
                  output_logits=True, return_dict_in_generate=True)
    calls = []
    window_attention = kernels.window_attention
    monkeypatch.setattr(kernels, "window_attention", lambda *a: calls.append(1) or window_attention(*a))
    ours = model.generate(ids, **kwargs).logits[0]
    assert len(calls) == 3 * 2  # every chunk of every layer
    model.set_attn_implementation("sdpa")
    dense = model.generate(ids, **kwargs).logits[0]
    assert len(calls) == 6
    torch.testing.assert_close(ours, dense, atol=2e-2, rtol=2e-2)
