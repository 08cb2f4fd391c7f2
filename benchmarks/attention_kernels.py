"""Attention kernels on a sliding-window prefill, at Mistral-7B's heads, one GPU, bfloat16: maestrale's banded
Triton kernel (models/kernels.py window_attention) beside the kernels that ship with torch.

    PYTHONPATH=src python3 benchmarks/attention_kernels.py [--window 4096] [--chunks 1024 2048 4096 8192 16384]
                                                           [--prompt 32768] [--head-dim 128] [--sweep]

For each chunk of queries that follows a full window of cached keys (what generate()'s chunked prefill runs):
maestrale's kernel (its table's configuration) and torch's FA2 build (`aten._flash_attention_forward` with its
window), and cuDNN's and the memory-efficient SDPA kernels with the window as a mask; then maestrale's kernel,
flash and cuDNN on plain causal squares (no window), and maestrale's kernel, FA2 and compiled FlexAttention on the
whole prompt in one call. Times are medians of 10 CUDA-event timings; TFLOP/s count the useful work, 4 x heads x
head_dim per attended (query, key) pair. 32 query heads, 8 key/value heads.

--sweep times maestrale's kernel in every configuration (blocks, warps, stages, one program per head or per group
of heads, then TMA loads on the fastest plain ones) on chunks of 2,048 and 8,192 after a
full window, prints TFLOP/s per configuration and the fastest, and stops (about 2-3 minutes on an H200).
"""

from __future__ import annotations

import argparse
import itertools
import os

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from maestrale.models.kernels import AttentionConfig, attention_config, window_attention

HEADS, KV_HEADS = 32, 8
HEAD_DIM = 128  # --head-dim sets it
SWEEP_CHUNKS = (2048, 8192)  # queries after a full window: the prefill chunks of sdpa and flash_attention_2


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
                                                   scale=HEAD_DIM**-0.5, window_size_left=window - 1,
                                                   window_size_right=0)[0]


def ours(q, k, v, window: int | None, config: AttentionConfig | None = None):
    return window_attention(q, k, v, HEAD_DIM**-0.5, window, config)


def difference(out, reference) -> float:
    return (out.float() - reference.float()).abs().max().item()


def sweep_configs():
    """The plain configurations: 128 queries a block on 8 warps (two warp groups) or 64 on 4, 32-128 keys, 2-4
    stages, per head or per group of heads. Left out as ptxas builds them for sm_90 (spilled registers): 128 queries
    on 4 warps, and 64 queries against 128 keys."""
    for (m, warps), n, stages, group in itertools.product(((128, 8), (64, 4)), (32, 64, 128), (2, 3, 4),
                                                          (False, True)):
        if m == 128 or n < 128:
            yield AttentionConfig(m, n, group, warps, stages)


def label(config: AttentionConfig) -> str:
    extras = [name for name in ("group_heads", "tma") if getattr(config, name)]
    return (f"block_m {config.block_m:3d} block_n {config.block_n:3d} warps {config.warps} stages {config.stages} "
            + " ".join(extras))


def sweep(window: int) -> None:
    inputs = {}
    for chunk in SWEEP_CHUNKS:
        q = randn(1, chunk, HEADS, HEAD_DIM)
        k, v = (randn(1, window + chunk, KV_HEADS, HEAD_DIM) for _ in range(2))
        inputs[chunk] = q, k, v, flash(q, k, v, window)
        report(f"FA2, chunk {chunk} after {window} keys", median_ms(lambda: flash(q, k, v, window)), chunk * window)

    def measure(config):
        rates = []
        for chunk, (q, k, v, reference) in inputs.items():
            off = difference(ours(q, k, v, window, config), reference)
            if off > 0.05:
                raise RuntimeError(f"differs from FA2 by {off:.3g}")
            ms = median_ms(lambda: ours(q, k, v, window, config))
            rates.append(4 * HEADS * HEAD_DIM * chunk * window / ms / 1e9)
        return rates

    results = []

    def run(config):
        try:
            rates = measure(config)
        except Exception as e:  # a config the compiler or the device refuses: reported, the sweep goes on
            print(f"{label(config):64s} failed: {str(e).splitlines()[0][:100] if str(e) else type(e).__name__}")
            return
        results.append((sum(rates) / len(rates), config))
        print(f"{label(config):64s} " + " ".join(f"{r:6.1f}" for r in rates) + " TFLOP/s (chunks "
              + ", ".join(map(str, SWEEP_CHUNKS)) + ")", flush=True)

    for config in sweep_configs():
        run(config)
    best_plain = [config for _, config in sorted(results, key=lambda r: -r[0])[:3]]
    for config in best_plain:
        run(config._replace(tma=True))
    rate, best = max(results, key=lambda r: r[0])
    print(f"fastest: {label(best)} at {rate:.1f} TFLOP/s (mean of the chunks), {best}; the table's: "
          f"{label(attention_config(HEAD_DIM))}")


def randn(*shape):
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)


def main() -> None:
    global HEAD_DIM
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--prompt", type=int, default=32768)
    parser.add_argument("--head-dim", type=int, default=HEAD_DIM)
    parser.add_argument("--sweep", action="store_true", help="time every configuration of maestrale's kernel")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("attention_kernels.py times CUDA kernels: run it on a GPU machine")
    HEAD_DIM, window = args.head_dim, args.window
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, "
          f"triton {triton.__version__}; window {window}, head_dim {HEAD_DIM}; load average "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    if args.sweep:
        return sweep(window)
    for chunk in args.chunks:
        q = randn(1, chunk, HEADS, HEAD_DIM)
        k, v = (randn(1, window + chunk, KV_HEADS, HEAD_DIM) for _ in range(2))
        reference = flash(q, k, v, window)
        report(f"maestrale's kernel, chunk {chunk} after {window} keys",
               median_ms(lambda: ours(q, k, v, window)), chunk * window,
               f"(max difference from FA2 {difference(ours(q, k, v, window), reference):.3g})")
        report(f"FA2, chunk {chunk} after {window} keys", median_ms(lambda: flash(q, k, v, window)), chunk * window)
        groups = HEADS // KV_HEADS
        qh = q.transpose(1, 2).contiguous()
        kh, vh = (t.transpose(1, 2).repeat_interleave(groups, dim=1).contiguous() for t in (k, v))
        query = torch.arange(chunk, device="cuda")[:, None]
        key = torch.arange(window + chunk, device="cuda")[None]
        allowed = ((key > query) & (key <= window + query))[None, None]
        for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            run = lambda: F.scaled_dot_product_attention(  # noqa: E731
                qh, kh, vh, attn_mask=allowed, scale=HEAD_DIM**-0.5)
            try:
                with sdpa_kernel(backend):
                    ms, out = median_ms(run), run()
            except RuntimeError as e:
                print(f"{backend.name}, chunk {chunk}: {str(e).splitlines()[0][:120]}", flush=True)
                continue
            report(f"{backend.name} with the window as a mask, chunk {chunk}", ms, chunk * window,
                   f"(max difference from FA2 {difference(out.transpose(1, 2), reference):.3g})")
    for size in (window, 2 * window):
        q, k, v = (randn(1, HEADS, size, HEAD_DIM) for _ in range(3))
        q_, k_, v_ = (t.transpose(1, 2) for t in (q, k, v))
        report(f"maestrale's kernel, plain causal square of {size}", median_ms(lambda: ours(q_, k_, v_, None)),
               size * (size + 1) / 2)
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            with sdpa_kernel(backend):
                ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
            report(f"{backend.name}, plain causal square of {size}", ms, size * (size + 1) / 2)
    tokens = args.prompt
    q = randn(1, tokens, HEADS, HEAD_DIM)
    k, v = (randn(1, tokens, KV_HEADS, HEAD_DIM) for _ in range(2))
    pairs = window * (window + 1) / 2 + (tokens - window) * window
    report(f"maestrale's kernel, the whole {tokens} in one call", median_ms(lambda: ours(q, k, v, window)), pairs,
           f"(max difference from FA2 {difference(ours(q, k, v, window), flash(q, k, v, window)):.3g})")
    report(f"FA2, the whole {tokens} in one call", median_ms(lambda: flash(q, k, v, window)), pairs)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    mask = create_block_mask(lambda b, h, i, j: (j <= i) & (i - j < window), None, None, tokens, tokens,
                             device="cuda")
    kernel = torch.compile(flex_attention)
    qh, kh, vh = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    report(f"FlexAttention compiled, the whole {tokens}, the window a Python int",
           median_ms(lambda: kernel(qh, kh, vh, block_mask=mask, scale=HEAD_DIM**-0.5, enable_gqa=True)), pairs)


if __name__ == "__main__":
    main()
