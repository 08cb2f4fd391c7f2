"""matvec's Triton kernel against cuBLAS (F.linear) on the batch-1 decode products of the dense families; with
--quant, the weight-only int4 and int8 products on Mistral-7B's decode products; with --attention, the server's
paged decode attention.

    PYTHONPATH=src python benchmarks/gpu_kernels.py [--sweep | --quant | --one-row | --mma | --attention]

The question it answers: can a Triton matrix-vector kernel stream a dense layer's weights faster than cuBLAS's
batch-1 products (which the decode step uses today), and with which blocks? Each product runs as a CUDA graph of calls
over enough distinct weight copies (>= 512 MB) that no weight is served from L2, as in a real step; the time is the
median replay over the calls, and TB/s counts the weight bytes read. The gate_up rows time cuBLAS's bare product
against matvec with the silu gate fused. The device's read and copy bandwidths are printed first. --sweep times every
block configuration and prints the fastest per shape; without it, matvec_config's choice is timed.

--quant: Mistral-7B's products at 1, 8 and 32 rows (gate/up as the decode step runs it: cuBLAS and tinygemm bare,
matvec and packed_matmul with the silu gate fused): bfloat16 cuBLAS and matvec (one row), torch's int4 tinygemm
(_weight_int4pack_mm) at group 128, maestrale's packed_matmul on int4 words (what Int4Weight runs on CUDA) and on int8
values viewed as words (Int8Weight at one row), and int8_matmul (Int8Weight at more rows): us, TB/s of the bytes each
reads (values, scales, zeros) and the speed-up over cuBLAS bfloat16. Each Triton kernel is the fastest of a sweep of
configurations (its own choice, packed_config / int8_config, first, whose time is printed too), each checked against
the float64 product of the weight first. At more rows the int4 kernel is timed twice: dequantized in float32
(`packed float32`, first packed_config's choice for float32 x, which is what bfloat16 x ran before HALF) and HALF
(`packed halves`: tensor-core tiles of the integers in x's dtype, packed_config's choice first); at one row, its
float32 products and HALF's tiles with x's row padded to 16. One command, about 3 minutes on an H200.

--one-row: packed_matmul at one row of x (batch-1 decode) on Mistral-7B's products, int4 g128 and int8, over a grid
of configurations: float32 products with 16 or 32 weight words a thread, and (int4) HALF's tensor-core tiles with x's
row padded to 16 (in at most 1,100 programs), each grid point in at least 400 programs and at most 4,400; gated
products split too (summed and gated by one more kernel). The grid is compiled first in parallel processes (Triton's
cache on disk), then timed one configuration at a time as --quant times them; the fastest few per product are printed
beside packed_config's own choice.

--mma: int4_mma_matmul (int4 g128 on tensor cores, int4_mma_words' layout) on Mistral-7B's products at 1, 8 and 32
rows, its own choice (int4_mma_config) and the fastest of a grid of (warps, tiles a warp, shares, weights a group
ahead or not), compiled first in parallel processes, beside bfloat16 cuBLAS, tinygemm and packed_matmul's own choice
on int4_words of the same values.

--attention: the server's paged decode attention (decode_attention over 16-token blocks in shuffled block tables) at
Mistral-7B's heads (32 queries, 8 KV heads of 128) for batches of 1 to 256 rows of 400 and 2,000 tokens: us and TB/s
of the keys and values each call reads, its default config (attention_splits' shares of 32-token tiles on 4 warps)
against the fastest of a sweep of (SPLITS, BLOCK_N, num_warps, num_stages), each checked against
decode_attention_torch first.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
import torch.nn.functional as F
import triton

from maestrale.engine.kernels import (attention_splits, decode_attention, decode_attention_torch, int4_mma_config,
                                     int4_mma_matmul, int8_config, int8_matmul, matvec, matvec_config, matvec_torch,
                                     packed_config, packed_matmul)
from maestrale.quantization.weight_only import int4_mma_words, int4_words

# (name, outputs, inputs, gated): batch-1 decode products of each model's layers and head.
SHAPES = {
    "mistral-7b": [("qkv", 6144, 4096, False), ("o", 4096, 4096, False), ("gate_up", 14336, 4096, True),
                   ("down", 4096, 14336, False), ("lm_head", 32000, 4096, False)],
    "ministral-8b": [("gate_up", 12288, 4096, True), ("down", 4096, 12288, False), ("lm_head", 131072, 4096, False)],
    "phi3-mini": [("qkv", 9216, 3072, False), ("o", 3072, 3072, False), ("gate_up", 8192, 3072, True),
                  ("down", 3072, 8192, False), ("lm_head", 32064, 3072, False)],
}
CONFIGS = [(bn, bk, w, s) for bn, bk in [(1, 2048), (1, 4096), (2, 1024), (2, 2048), (4, 512), (4, 1024),
                                         (4, 2048), (8, 256), (8, 512), (8, 1024), (16, 256), (16, 512)]
           for w in (4, 8) for s in (1, 3)]


def graph_time(fn, calls: int) -> float:
    """Median seconds per call of `calls` calls captured in one CUDA graph (fn(i) makes call i)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(calls):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(15):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(times)


def bandwidths() -> tuple[float, float]:
    """Bytes per second of a 4 GiB read (a sum) and of a 2 GiB copy (read plus write)."""
    src = torch.randn(2**30, device="cuda")
    out = torch.empty((), device="cuda")
    read = 4 * src.numel() / graph_time(lambda i: torch.sum(src, dim=0, out=out), 4)
    half = src[: 2**29]
    dst = torch.empty_like(half)
    copy = 8 * half.numel() / graph_time(lambda i: dst.copy_(half), 4)
    return read, copy


QUANT_SHAPES = [("qkv", 6144, 4096, False), ("o", 4096, 4096, False), ("gate_up", 14336, 4096, True),
                ("down", 4096, 14336, False), ("lm_head", 32000, 4096, False)]
QUANT_ROWS = (1, 8, 32)
# (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) tried per row count, beside the kernels' own choice
# (int8_config, packed_config); BLOCK_K counts inputs. packed_matmul's take a seventh element, HALF (int4 at more
# rows: tensor-core tiles of the integers in x's dtype).
INT8_CONFIGS = {
    1: [(1, 1, 4096, 1, 8, 1), (1, 4, 2048, 1, 8, 3)],
    8: [(16, 32, 128, 2, 4, 3), (16, 64, 128, 4, 8, 3)],
    32: [(32, 32, 128, 1, 4, 3), (32, 64, 256, 2, 8, 3)],
}
DOT_CONFIGS = [(64, 128, 1, 4, 3), (128, 128, 1, 4, 3), (64, 256, 1, 4, 3), (32, 128, 1, 4, 3), (64, 128, 2, 4, 3),
               (128, 128, 1, 8, 3)]
# One row, float32 products: the fastest of 2026-12-03's sweep (q/k/v, o, down; the head; gate/up), then others
INT4_FLOAT32 = [(1, 64, 128, 8, 1, 1), (1, 128, 256, 4, 2, 1), (1, 16, 1024, 1, 2, 1), (1, 64, 256, 4, 1, 1),
                (1, 64, 128, 8, 1, 3), (1, 16, 1024, 1, 2, 3)]  # the last two pipelined (num_stages 3)
# more rows, HALF: tensor-core tiles of the integers, within a group (BLOCK_K <= 128); 2026-12-03's fastest among them
DOT_HALF = [(64, 128, 1, 4, 3), (128, 128, 8, 4, 3), (128, 128, 1, 8, 3), (256, 128, 1, 8, 3), (128, 128, 2, 4, 3)]
INT4_CONFIGS = {  # group 128: one-row tiles are read in sub-tiles of one group; gated, of 2 * BLOCK_N rows
    # one row also as HALF's tiles of 16 rows (x's one row padded), which at 8 rows beat the one-row products on o
    # and down (11.8 and 27.3 us against 13.7 and 34.7)
    1: [(*c, False) for c in INT4_FLOAT32] + [(16, *c, True) for c in DOT_HALF[:2]] + [(16, 64, 128, 4, 4, 3, True)],
    8: [(16, *c, False) for c in DOT_CONFIGS[:3]] + [(16, *c, True) for c in DOT_HALF],
    32: [(32, *c, False) for c in DOT_CONFIGS[:3]] + [(32, *c, True) for c in DOT_HALF],
}
PACKED8_CONFIGS = {
    1: [(1, 8, 1024, 1, 4, 1, False), (1, 4, 2048, 1, 4, 1, False), (1, 16, 512, 2, 4, 1, False),
        (1, 16, 1024, 1, 4, 1, False), (1, 32, 256, 4, 2, 1, False), (1, 8, 2048, 2, 8, 1, False),
        (1, 8, 1024, 1, 4, 3, False), (1, 4, 2048, 1, 4, 3, False)],  # the last two pipelined
    8: [(16, *c, False) for c in DOT_CONFIGS[:3]],
    32: [(32, *c, False) for c in DOT_CONFIGS[:3]],
}


def copies_of(size: int) -> int:
    """Distinct weight copies so that one pass reads >= 512 MB: none is served from L2."""
    return max(2, -(-(512 << 20) // size))


def tinygemm_int4(values: torch.Tensor, group: int, scale_and_zeros: torch.Tensor):
    """torch's own CUDA int4 layout (_convert_weight_to_int4pack: byte pairs, 8 inner k-tiles) and its product."""
    pairs = (values[:, ::2] << 4 | values[:, 1::2]).to(torch.uint8)
    packed = torch.ops.aten._convert_weight_to_int4pack(pairs.contiguous(), 8)
    return lambda x: torch.ops.aten._weight_int4pack_mm(x, packed, group, scale_and_zeros)


def packed_bytes(rows: int, k: int, bits: int, group: int) -> int:
    """Bytes a product reads of a packed weight: its values, and int4's bfloat16 scale and zero a group or int8's scale
    a row."""
    return rows * k * bits // 8 + (4 * rows * k // group if bits == 4 else 2 * rows)


def int4_weights(rows: int, k: int, group: int, copies: int, g=None):
    """`copies` random int4 weights (rows, k): their values, their int4_words, the (groups, rows, 2) bfloat16 scales
    and zeros they share, and copy 0 as float64."""
    values = [torch.randint(0, 16, (rows, k), device="cuda", dtype=torch.int32, generator=g) for _ in range(copies)]
    scale = (torch.rand(rows, k // group, device="cuda", generator=g) * 2e-3 + 1e-3).bfloat16()
    zero = (torch.randn(rows, k // group, device="cuda", generator=g) * 1e-3).bfloat16()
    scale_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
    weight = ((values[0].double() - 8) * scale.double().repeat_interleave(group, 1)
              + zero.double().repeat_interleave(group, 1))
    return values, [int4_words(v, group) for v in values], scale_and_zeros, weight


def int8_weights(rows: int, k: int, copies: int, g=None):
    """`copies` random int8 weights (rows, k), the (rows, 1) bfloat16 scales they share, and copy 0 as float64."""
    values = [torch.randint(-128, 128, (rows, k), device="cuda", dtype=torch.int8, generator=g) for _ in range(copies)]
    scales = (torch.rand(rows, 1, device="cuda", generator=g) * 2e-4 + 1e-4).bfloat16()
    return values, scales, values[0].double() * scales.double()


def sweep(fn, configs, reference, copies: int, label: str):
    """The fastest of `configs` for fn(i, config) (call i reads copy i), each checked against `reference` (float64)
    first: (seconds of the first config, the kernel's own choice; best seconds; best config)."""
    timed = []
    for config in configs:
        try:
            error = ((fn(0, config).double() - reference).norm() / reference.norm()).item()
        except Exception as e:  # a config the compiler refuses: reported, the sweep goes on
            print(f"    {label} {config}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        assert error < 1e-2, (label, config, error)
        timed.append((graph_time(lambda i: fn(i, config), copies), config))
    best, config = min(timed)
    return timed[0][0] if timed[0][1] == configs[0] else None, best, config


def quant() -> None:
    """Per Mistral-7B product and row count: a line per kernel, the figures of the docstring."""
    g = torch.Generator(device="cuda").manual_seed(0)
    group = 128
    for name, n, k, gated in QUANT_SHAPES:
        rows = 2 * n if gated else n
        act = F.silu if gated else None
        bf16_size, int4_size, int8_size = rows * k * 2, packed_bytes(rows, k, 4, group), packed_bytes(rows, k, 8, k)
        weights = [torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, generator=g) / k**0.5
                   for _ in range(copies_of(bf16_size))]
        values, words, scale_and_zeros, weight4 = int4_weights(rows, k, group, copies_of(int4_size), g)
        tiny = [tinygemm_int4(v, group, scale_and_zeros) for v in values]
        int8, scales8, weight8 = int8_weights(rows, k, copies_of(int8_size), g)
        for m in QUANT_ROWS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
            cublas = graph_time(lambda i: F.linear(x, weights[i % len(weights)]), len(weights))
            line = [f"m={m:<2} {name:8} {rows:5}x{k:5}" + (" (gated: silu(gate) * up where fused)" if gated else "")]

            def show(label, seconds, size, config=None, chosen=None):
                line.append(f"{label:20} {seconds * 1e6:7.1f} us {size / seconds / 1e12:.2f} TB/s "
                            f"({cublas / seconds:.2f}x)" + (f" best {config}" if config else "")
                            + (f"; own choice {chosen * 1e6:.1f} us" if chosen else ""))

            show("bf16 cuBLAS", cublas, bf16_size)
            if m == 1:
                show("bf16 matvec", graph_time(lambda i: matvec(x, weights[i % len(weights)], act), len(weights)),
                     bf16_size)
            show(f"tinygemm int4 g{group}", graph_time(lambda i: tiny[i](x), len(tiny)), int4_size)
            chosen4 = [packed_config(m, n, k, 4, group, gated, dtype) for dtype in (x.dtype, torch.float32)]
            configs = list(dict.fromkeys(chosen4 + INT4_CONFIGS[m]))
            reference4 = matvec_torch(x.double(), weight4, act)
            for kind in sorted({c[-1] for c in configs}):  # float32 dequantization, then HALF (more rows)
                chosen, best, config = sweep(
                    lambda i, c: packed_matmul(x, words[i], scale_and_zeros, n, group, 4, True, act, config=c),
                    [c for c in configs if c[-1] == kind], reference4, len(words), f"int4 {name} m={m}")
                show(f"int4 g{group} packed" + (" halves" if kind else " float32"), best, int4_size, config, chosen)
            reference8 = matvec_torch(x.double(), weight8, act)
            if not gated:
                chosen, best, config = sweep(lambda i, c: int8_matmul(x, int8[i], scales8, config=c),
                                             list(dict.fromkeys([int8_config(m, n, k, k)] + INT8_CONFIGS[m])),
                                             reference8, len(int8), f"int8 {name} m={m}")
                show("int8 int8_matmul", best, int8_size, config, chosen)
            configs = list(dict.fromkeys([packed_config(m, n, k, 8, k, gated, x.dtype)] + PACKED8_CONFIGS[m]))
            chosen, best, config = sweep(
                lambda i, c: packed_matmul(x, int8[i].view(torch.int32), scales8, n, k, 8, False, act, config=c),
                configs, reference8, len(int8), f"int8 words {name} m={m}")
            show("int8 packed", best, int8_size, config, chosen)
            print(line[0] + "\n" + "\n".join("    " + part for part in line[1:]), flush=True)
        del weights, values, words, tiny, int8
        torch.cuda.empty_cache()


def one_row_grid(n: int, k: int, gated: bool, bits: int) -> list[tuple]:
    """packed_matmul configurations for one row of x (see the docstring)."""
    per, configs = 32 // bits, []
    for block_n in (8, 16, 32, 64, 128, 256):
        for block_k in (64, 128, 256, 512, 1024):
            for split in (1, 2, 4, 8, 16, 32):
                programs = -(-n // block_n) * split
                if k // (block_k * split) < 2 or not 400 <= programs <= 4400:
                    continue
                for warps in (1, 2, 4, 8):
                    words = (2 if gated else 1) * block_n * block_k // per // (32 * warps)
                    if block_k >= 128 and words in (16, 32):
                        configs.append((1, block_n, block_k, split, warps, 1, False))
                    if bits == 4 and block_k <= 128 and block_n >= 32 and warps >= 2 and programs <= 1100:
                        configs.append((16, block_n, block_k, split, warps, 3, True))
    return configs


def _one_row_inputs(n: int, k: int, gated: bool, bits: int, group: int, copies: int, g=None):
    """x (one row), the product's weight as float64, and run(i, config): packed_matmul of x by weight copy i."""
    rows = 2 * n if gated else n
    if bits == 4:
        _, words, scales, weight = int4_weights(rows, k, group, copies, g)
    else:
        values, scales, weight = int8_weights(rows, k, copies, g)
        words, group = [v.view(torch.int32) for v in values], k
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16, generator=g)
    run = lambda i, c: packed_matmul(x, words[i], scales, n, group, bits, bits == 4, F.silu if gated else None,  # noqa: E731
                                     config=c)
    return x, weight, run


def _compile_share(share: list) -> int:
    """Compile (run once) each (shape, bits, config) of `share` in this process; how many compiled."""
    done = 0
    for (name, n, k, gated), bits, config in share:
        try:
            _one_row_inputs(n, k, gated, bits, 128, 1)[2](0, config)
            done += 1
        except Exception:  # the timing pass reports it
            pass
    torch.cuda.synchronize()
    return done


def one_row() -> None:
    """--one-row: the grid of each product, compiled in parallel, then timed; the fastest five printed."""
    import concurrent.futures
    import multiprocessing

    points = [(shape, bits, c) for shape in QUANT_SHAPES for bits in (4, 8) for c in
              dict.fromkeys([packed_config(1, shape[1], shape[2], bits, 128 if bits == 4 else shape[2], shape[3],
                                           torch.bfloat16)] + one_row_grid(shape[1], shape[2], shape[3], bits))]
    workers = max(1, min(12, (os.cpu_count() or 2) - 2))
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        compiled = sum(pool.map(_compile_share, [points[i::workers] for i in range(workers)]))
    print(f"{len(points)} configurations, {compiled} compiled in {workers} processes", flush=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    for shape in QUANT_SHAPES:
        name, n, k, gated = shape
        rows = 2 * n if gated else n
        bf16_size = rows * k * 2
        weights = [torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, generator=g) / k**0.5
                   for _ in range(copies_of(bf16_size))]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16, generator=g)
        cublas = graph_time(lambda i: F.linear(x, weights[i % len(weights)]), len(weights))
        print(f"m=1  {name:8} {rows:5}x{k:5}  bf16 cuBLAS {cublas * 1e6:.1f} us {bf16_size / cublas / 1e12:.2f} TB/s",
              flush=True)
        del weights
        for bits in (4, 8):
            size = packed_bytes(rows, k, bits, 128 if bits == 4 else k)
            configs = [c for s, b, c in points if s == shape and b == bits]
            copies = copies_of(size)
            x, weight, run = _one_row_inputs(n, k, gated, bits, 128, copies, g)
            reference = matvec_torch(x.double(), weight, F.silu if gated else None)
            timed = []
            for config in configs:
                try:
                    error = ((run(0, config).double() - reference).norm() / reference.norm()).item()
                except Exception as e:
                    print(f"    {config}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                    continue
                assert error < 1e-2, (name, bits, config, error)
                timed.append((graph_time(lambda i: run(i, config), copies), config))
            own = timed[0] if timed and timed[0][1] == configs[0] else None
            print(f"    int{bits}: own choice " + (f"{own[0] * 1e6:.1f} us {size / own[0] / 1e12:.2f} TB/s "
                                                  f"({cublas / own[0]:.2f}x) {own[1]}" if own else "failed")
                  + "; fastest of " + str(len(timed)) + ": " + ", ".join(
                      f"{t * 1e6:.1f} us {size / t / 1e12:.2f} TB/s {c}" for t, c in sorted(timed)[:5]), flush=True)
            del run
            torch.cuda.empty_cache()


def mma_grid(m: int, n: int, k: int) -> list[tuple]:
    """int4_mma_matmul configurations for m rows of x (see the docstring)."""
    block_m = min(64, max(8, triton.next_power_of_2(m)))
    warps_, splits = ((4, 8), (1, 2, 4, 8, 16)) if m == 1 else ((4, 8), (1, 2))
    return [(block_m, warps, tiles, split, ahead) for warps in warps_ for tiles in (1, 2, 4) for split in splits
            for ahead in (False, True) if k // 128 >= split and 64 <= -(-n // (16 * warps * tiles)) * split <= 4400]


def _mma_inputs(m: int, n: int, k: int, gated: bool, copies: int, g=None):
    """x, the weight as float64, and on copy i: run(i, config) of int4_mma_matmul, packed(i) of packed_matmul and
    tiny(i) of tinygemm (bare where gated)."""
    rows, act = (2 * n if gated else n), (F.silu if gated else None)
    values, words, scales, weight = int4_weights(rows, k, 128, copies, g)
    mma_words = [int4_mma_words(v, 128) for v in values]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
    run = lambda i, c: int4_mma_matmul(x, mma_words[i], scales, n, 128, act, config=c)  # noqa: E731
    packed = lambda i: packed_matmul(x, words[i], scales, n, 128, 4, True, act)  # noqa: E731
    tiny = [tinygemm_int4(v, 128, scales) for v in values] if copies > 1 else []
    return x, weight, run, packed, lambda i: tiny[i](x)


def _compile_mma(share: list) -> int:
    done = 0
    for (name, n, k, gated), m, config in share:
        try:
            _mma_inputs(m, n, k, gated, 1)[2](0, config)
            done += 1
        except Exception:  # the timing pass reports it
            pass
    torch.cuda.synchronize()
    return done


def mma() -> None:
    """--mma: per product and row count, cuBLAS, tinygemm, packed_matmul and int4_mma_matmul's choice and fastest."""
    import concurrent.futures
    import multiprocessing

    points = [(shape, m, c) for shape in QUANT_SHAPES for m in QUANT_ROWS for c in dict.fromkeys(
        [int4_mma_config(m, 2 * shape[1] if shape[3] else shape[1], shape[2], 128)] + mma_grid(m, *shape[1:3]))]
    workers = max(1, min(12, (os.cpu_count() or 2) - 2))
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        compiled = sum(pool.map(_compile_mma, [points[i::workers] for i in range(workers)]))
    print(f"{len(points)} configurations, {compiled} compiled in {workers} processes", flush=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    for shape in QUANT_SHAPES:
        name, n, k, gated = shape
        rows = 2 * n if gated else n
        act = F.silu if gated else None
        bf16_size, size = rows * k * 2, packed_bytes(rows, k, 4, 128)
        weights = [torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, generator=g) / k**0.5
                   for _ in range(copies_of(bf16_size))]
        copies = copies_of(size)
        for m in QUANT_ROWS:
            x, weight, run, packed, tiny = _mma_inputs(m, n, k, gated, copies, g)
            cublas = graph_time(lambda i: F.linear(x, weights[i % len(weights)]), len(weights))
            tinygemm = graph_time(tiny, copies)
            reference = matvec_torch(x.double(), weight, act)
            own_packed = graph_time(packed, copies)
            configs = [c for s, mm, c in points if s == shape and mm == m]
            chosen, best, config = sweep(run, configs, reference, copies, f"mma {name} m={m}")
            print(f"m={m:<2} {name:8} {rows:5}x{k:5}  bf16 cuBLAS {cublas * 1e6:6.1f} us  tinygemm {tinygemm * 1e6:6.1f}"
                  f"  packed_matmul {own_packed * 1e6:6.1f}  int4_mma own "
                  + (f"{chosen * 1e6:6.1f} us {size / chosen / 1e12:.2f} TB/s ({cublas / chosen:.2f}x) {configs[0]}"
                     if chosen else "failed")
                  + f"; fastest of {len(configs)} {best * 1e6:6.1f} us {size / best / 1e12:.2f} TB/s "
                    f"({cublas / best:.2f}x) {config}", flush=True)
            del run, packed, tiny
        del weights
        torch.cuda.empty_cache()


def attention() -> None:
    heads, kv_heads, d, block_size = 32, 8, 128, 16
    for tokens in (400, 2000):
        for batch in (1, 32, 96, 176, 256):
            blocks = -(-tokens // block_size)
            size = batch * tokens * kv_heads * d * 2 * 2  # the keys and values a call reads
            copies = max(2, -(-(512 << 20) // size))
            pool = [torch.randn(copies * batch * blocks, block_size, kv_heads, d, device="cuda", dtype=torch.bfloat16)
                    for _ in range(2)]
            # call i's rows own blocks [i * batch * blocks, (i + 1) * batch * blocks), shuffled as a server's are
            tables = [(i * batch * blocks + torch.randperm(batch * blocks, device="cuda")).view(batch, blocks)
                      for i in range(copies)]
            q = torch.randn(batch, heads, d, device="cuda", dtype=torch.bfloat16)
            t = torch.full((batch,), tokens - 1, device="cuda")
            span = blocks * block_size
            reference = decode_attention_torch(q.double(), pool[0].double(), pool[1].double(), None, t, d**-0.5,
                                               tables[0], span)
            default = attention_splits(batch, kv_heads)
            configs = [(default, 32, 4, 3)] + [(s, n, w, st) for s in sorted({max(1, default // 2), default,
                                                                               min(64, default * 2)})
                                               for n in (32, 64, 128) for w in (4, 8) for st in (2, 3)]
            chosen, best, config = sweep(lambda i, c: decode_attention(q, pool[0], pool[1], None, t, d**-0.5,
                                                                       tables[i], span, config=c),
                                         list(dict.fromkeys(configs)), reference, copies, f"attention b{batch}")
            print(f"attention {batch:3} rows x {tokens:4} tokens  default {chosen * 1e6:7.1f} us "
                  f"{size / chosen / 1e12:.2f} TB/s   best {best * 1e6:7.1f} us {size / best / 1e12:.2f} TB/s "
                  f"({chosen / best:.2f}x) {config}", flush=True)
            del pool, tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--sweep", action="store_true")
    mode.add_argument("--quant", action="store_true")
    mode.add_argument("--one-row", action="store_true")
    mode.add_argument("--mma", action="store_true")
    mode.add_argument("--attention", action="store_true")
    args = parser.parse_args()
    read, copy = bandwidths()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, load average "
          f"{os.getloadavg()[0]:.2f}; "
          f"read {read / 1e12:.2f} TB/s, copy {copy / 1e12:.2f} TB/s")
    if args.quant:
        return quant()
    if args.attention:
        return attention()
    if args.one_row:
        return one_row()
    if args.mma:
        return mma()
    for model, shapes in SHAPES.items():
        for name, n, k, gated in shapes:
            rows = 2 * n if gated else n
            size = rows * k * 2
            copies = max(2, -(-(512 << 20) // size))
            weights = [torch.randn(rows, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            act = F.silu if gated else None
            cublas = graph_time(lambda i: F.linear(x, weights[i]), copies)
            ref = matvec_torch(x.double(), weights[0].double(), act)
            configs = CONFIGS if args.sweep else [matvec_config(rows, k, gated)]
            timed = []
            for config in configs:
                error = ((matvec(x, weights[0], act, config=config).double() - ref).norm() / ref.norm()).item()
                assert error < 1e-2, (model, name, config, error)
                timed.append((graph_time(lambda i: matvec(x, weights[i], act, config=config), copies), config))
            best, config = min(timed)
            print(f"{model:13} {name:8} {n:6}x{k:5}  cuBLAS {cublas * 1e6:7.1f} us {size / cublas / 1e12:.2f} TB/s   "
                  f"matvec {best * 1e6:7.1f} us {size / best / 1e12:.2f} TB/s ({cublas / best:.2f}x) {config}",
                  flush=True)
            if args.sweep:
                print("    next: " + ", ".join(f"{c} {size / t / 1e12:.2f}" for t, c in sorted(timed)[1:5]))
            del weights

if __name__ == "__main__":
    main()
