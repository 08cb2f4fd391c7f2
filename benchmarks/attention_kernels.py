"""The attention kernels that ship with torch on a sliding-window prefill, at Mistral-7B's heads, one GPU, bfloat16.

    python3 benchmarks/attention_kernels.py [--window 4096] [--chunks 1024 2048 4096 8192] [--prompt 32768]

For each chunk of queries that follows a full window of cached keys (what generate()'s chunked prefill runs): torch's
FA2 build (`aten._flash_attention_forward` with its window), and cuDNN's and the memory-efficient SDPA kernels with
the window as a mask; then both flash and cuDNN on plain causal squares (no window), and FA2 and compiled
FlexAttention on the whole prompt in one call. Times are medians of 10 CUDA-event timings; TFLOP/s count the useful
work, 4 x heads x head_dim per attended (query, key) pair. 32 query heads, 8 key/value heads, head_dim 128.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
SCALE = HEAD_DIM**-0.5


def median_ms(fn, runs: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[runs // 2]


def report(name: str, ms: float, pairs: float, note: str = "") -> None:
    print(f"{name:64s} {ms:8.3f} ms {4 * HEADS * HEAD_DIM * pairs / ms / 1e9:7.1f} TFLOP/s {note}", flush=True)


def flash(q, k, v, window: int):
    """(batch, tokens, heads, head_dim) tensors, causal aligned to the bottom right, within `window` keys."""
    return torch.ops.aten._flash_attention_forward(q, k, v, None, None, q.shape[1], k.shape[1], 0.0, True, False,
                                                   scale=SCALE, window_size_left=window - 1, window_size_right=0)[0]


def randn(*shape):
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--prompt", type=int, default=32768)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("attention_kernels.py times CUDA kernels: run it on a GPU machine")
    window = args.window
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}; "
          f"window {window}", flush=True)
    for chunk in args.chunks:
        q = randn(1, chunk, HEADS, HEAD_DIM)
        k, v = (randn(1, window + chunk, KV_HEADS, HEAD_DIM) for _ in range(2))
        reference = flash(q, k, v, window)
        report(f"FA2, chunk {chunk} after {window} keys", median_ms(lambda: flash(q, k, v, window)), chunk * window)
        groups = HEADS // KV_HEADS
        qh = q.transpose(1, 2).contiguous()
        kh, vh = (t.transpose(1, 2).repeat_interleave(groups, dim=1).contiguous() for t in (k, v))
        query = torch.arange(chunk, device="cuda")[:, None]
        key = torch.arange(window + chunk, device="cuda")[None]
        allowed = ((key > query) & (key <= window + query))[None, None]
        for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            run = lambda: F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed, scale=SCALE)  # noqa: E731
            try:
                with sdpa_kernel(backend):
                    ms, out = median_ms(run), run()
            except RuntimeError as e:
                print(f"{backend.name}, chunk {chunk}: {str(e).splitlines()[0][:120]}", flush=True)
                continue
            difference = (out.transpose(1, 2).float() - reference.float()).abs().max().item()
            report(f"{backend.name} with the window as a mask, chunk {chunk}", ms, chunk * window,
                   f"(max difference from FA2 {difference:.3g})")
    for size in (window, 2 * window):
        q, k, v = (randn(1, HEADS, size, HEAD_DIM) for _ in range(3))
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            with sdpa_kernel(backend):
                ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
            report(f"{backend.name}, plain causal square of {size}", ms, size * (size + 1) / 2)
    tokens = args.prompt
    q = randn(1, tokens, HEADS, HEAD_DIM)
    k, v = (randn(1, tokens, KV_HEADS, HEAD_DIM) for _ in range(2))
    pairs = window * (window + 1) / 2 + (tokens - window) * window
    report(f"FA2, the whole {tokens} in one call", median_ms(lambda: flash(q, k, v, window)), pairs)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    mask = create_block_mask(lambda b, h, i, j: (j <= i) & (i - j < window), None, None, tokens, tokens,
                             device="cuda")
    kernel = torch.compile(flex_attention)
    qh, kh, vh = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    report(f"FlexAttention compiled, the whole {tokens}, the window a Python int",
           median_ms(lambda: kernel(qh, kh, vh, block_mask=mask, scale=SCALE, enable_gqa=True)), pairs)


if __name__ == "__main__":
    main()
