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
matvec, int4_mma_matmul and int8_row_matmul with the silu gate fused): bfloat16 cuBLAS and matvec (one row), torch's
int4 tinygemm (_weight_int4pack_mm) and int4_mma_matmul's own choice (what Int4Weight runs on CUDA, its partial sums
left to the consumer as in the decode step: summed=False) at group 128,
int8_row_matmul (Int8Weight at one row) and int8_matmul (Int8Weight at more rows): us, TB/s of the bytes each reads
(values, scales, zeros) and the speed-up over cuBLAS bfloat16. Each int8 kernel is the fastest of a sweep of
configurations (its own choice, int8_row_config / int8_config, first, whose time is printed too), each checked
against the float64 product of the weight first. One command, a few minutes on an H200.

--one-row: int8_row_matmul on Mistral-7B's products over a grid of configurations with 16 or 32 weight words a
thread, each grid point in at least 400 programs and at most 4,400; gated products split too (summed and gated by one
more kernel). The grid is compiled first in parallel processes (Triton's cache on disk), then timed one configuration
at a time as --quant times them; the fastest few per product are printed beside int8_row_config's own choice.

--mma: int4_mma_matmul (int4 g128 on tensor cores, int4_mma_words' layout) on Mistral-7B's products at 1, 8 and 32
rows (summed=False, as --quant), its own choice (int4_mma_config) and the fastest of a grid of (warps, tiles a warp,
shares, weights a group ahead or not), compiled first in parallel processes, beside bfloat16 cuBLAS and tinygemm on
the same values.

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
                                     int4_mma_matmul, int8_config, int8_matmul, int8_row_config, int8_row_matmul,
                                     matvec, matvec_config, matvec_torch, partials_sum)
from maestrale.quantization.weight_only import int4_mma_words

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
# int8_matmul's (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) tried per row count beside its own choice
INT8_CONFIGS = {
    1: [(1, 1, 4096, 1, 8, 1), (1, 4, 2048, 1, 8, 3)],
    8: [(16, 32, 128, 2, 4, 3), (16, 64, 128, 4, 8, 3)],
    32: [(32, 32, 128, 1, 4, 3), (32, 64, 256, 2, 8, 3)],
}
# int8_row_matmul's (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) beside its own choice; the last two pipelined
ROW8_CONFIGS = [(8, 1024, 1, 4, 1), (4, 2048, 1, 4, 1), (16, 512, 2, 4, 1), (16, 1024, 1, 4, 1), (32, 256, 4, 2, 1),
                (8, 2048, 2, 8, 1), (8, 1024, 1, 4, 3), (4, 2048, 1, 4, 3)]


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
    """`copies` random int4 weights (rows, k): their values, their int4_mma_words, the (groups, rows, 2) bfloat16
    scales and zeros they share, and copy 0 as float64."""
    values = [torch.randint(0, 16, (rows, k), device="cuda", dtype=torch.int32, generator=g) for _ in range(copies)]
    scale = (torch.rand(rows, k // group, device="cuda", generator=g) * 2e-3 + 1e-3).bfloat16()
    zero = (torch.randn(rows, k // group, device="cuda", generator=g) * 1e-3).bfloat16()
    scale_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
    weight = ((values[0].double() - 8) * scale.double().repeat_interleave(group, 1)
              + zero.double().repeat_interleave(group, 1))
    return values, [int4_mma_words(v, group) for v in values], scale_and_zeros, weight


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
            error = ((partials_sum(fn(0, config), torch.float64) - reference).norm() / reference.norm()).item()
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
            _, mma, config = sweep(lambda i, c: int4_mma_matmul(x, words[i], scale_and_zeros, n, group, act, config=c,
                                                                  summed=False),
                                   [int4_mma_config(m, rows, k, group)], matvec_torch(x.double(), weight4, act),
                                   len(words), f"int4 {name} m={m}")
            show(f"int4 g{group} int4_mma", mma, int4_size, config)
            reference8 = matvec_torch(x.double(), weight8, act)
            if not gated:
                chosen, best, config = sweep(lambda i, c: int8_matmul(x, int8[i], scales8, config=c),
                                             list(dict.fromkeys([int8_config(m, n, k, k)] + INT8_CONFIGS[m])),
                                             reference8, len(int8), f"int8 {name} m={m}")
                show("int8 int8_matmul", best, int8_size, config, chosen)
            if m == 1:
                chosen, best, config = sweep(lambda i, c: int8_row_matmul(x, int8[i], scales8, n, act, config=c),
                                             list(dict.fromkeys([int8_row_config(n, k, gated)] + ROW8_CONFIGS)),
                                             reference8, len(int8), f"int8 row {name}")
                show("int8 int8_row_matmul", best, int8_size, config, chosen)
            print(line[0] + "\n" + "\n".join("    " + part for part in line[1:]), flush=True)
        del weights, values, words, tiny, int8
        torch.cuda.empty_cache()


def one_row_grid(n: int, k: int, gated: bool) -> list[tuple]:
    """int8_row_matmul configurations (see the docstring)."""
    configs = []
    for block_n in (8, 16, 32, 64, 128, 256):
        for block_k in (128, 256, 512, 1024):
            for split in (1, 2, 4, 8, 16, 32):
                programs = -(-n // block_n) * split
                if k // (block_k * split) < 2 or not 400 <= programs <= 4400:
                    continue
                for warps in (1, 2, 4, 8):
                    if (2 if gated else 1) * block_n * block_k // 4 // (32 * warps) in (16, 32):  # words a thread
                        configs.append((block_n, block_k, split, warps, 1))
    return configs


def _one_row_inputs(n: int, k: int, gated: bool, copies: int, g=None):
    """x (one row), the product's weight as float64, and run(i, config): int8_row_matmul of x by weight copy i."""
    values, scales, weight = int8_weights(2 * n if gated else n, k, copies, g)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16, generator=g)
    run = lambda i, c: int8_row_matmul(x, values[i], scales, n, F.silu if gated else None, config=c)  # noqa: E731
    return x, weight, run


def _compile_share(inputs, share: list) -> int:
    """Compile (run once) each (arguments, config) of `share` in this process, inputs(*arguments, 1) making the
    product; how many compiled."""
    done = 0
    for arguments, config in share:
        try:
            inputs(*arguments, 1)[2](0, config)
            done += 1
        except Exception:  # the timing pass reports it
            pass
    torch.cuda.synchronize()
    return done


def compile_grid(inputs, points: list) -> None:
    """Compile the (arguments, config) points of a grid in parallel processes (Triton's cache on disk)."""
    import concurrent.futures
    import functools
    import multiprocessing

    workers = max(1, min(12, (os.cpu_count() or 2) - 2))
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        shares = [points[i::workers] for i in range(workers)]
        compiled = sum(pool.map(functools.partial(_compile_share, inputs), shares))
    print(f"{len(points)} configurations, {compiled} compiled in {workers} processes", flush=True)


def one_row() -> None:
    """--one-row: the grid of each product, compiled in parallel, then timed; the fastest five printed."""
    points = [(shape, c) for shape in QUANT_SHAPES for c in
              dict.fromkeys([int8_row_config(*shape[1:])] + one_row_grid(*shape[1:]))]
    compile_grid(_one_row_inputs, [(shape[1:], c) for shape, c in points])
    g = torch.Generator(device="cuda").manual_seed(0)
    for shape in QUANT_SHAPES:
        name, n, k, gated = shape
        rows = 2 * n if gated else n
        bf16_size, size = rows * k * 2, packed_bytes(rows, k, 8, k)
        weights = [torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, generator=g) / k**0.5
                   for _ in range(copies_of(bf16_size))]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16, generator=g)
        cublas = graph_time(lambda i: F.linear(x, weights[i % len(weights)]), len(weights))
        del weights
        configs = [c for s, c in points if s == shape]
        copies = copies_of(size)
        x, weight, run = _one_row_inputs(n, k, gated, copies, g)
        reference = matvec_torch(x.double(), weight, F.silu if gated else None)
        timed = []
        for config in configs:
            try:
                error = ((run(0, config).double() - reference).norm() / reference.norm()).item()
            except Exception as e:
                print(f"    {config}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            assert error < 1e-2, (name, config, error)
            timed.append((graph_time(lambda i: run(i, config), copies), config))
        own = timed[0] if timed and timed[0][1] == configs[0] else None
        print(f"m=1  {name:8} {rows:5}x{k:5}  bf16 cuBLAS {cublas * 1e6:.1f} us {bf16_size / cublas / 1e12:.2f} TB/s; "
              "int8 own choice " + (f"{own[0] * 1e6:.1f} us {size / own[0] / 1e12:.2f} TB/s "
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
    """x, the weight as float64, and on copy i: run(i, config) of int4_mma_matmul and tiny(i) of tinygemm (bare
    where gated)."""
    rows, act = (2 * n if gated else n), (F.silu if gated else None)
    values, words, scales, weight = int4_weights(rows, k, 128, copies, g)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
    run = lambda i, c: int4_mma_matmul(x, words[i], scales, n, 128, act, config=c, summed=False)  # noqa: E731
    tiny = [tinygemm_int4(v, 128, scales) for v in values] if copies > 1 else []
    return x, weight, run, lambda i: tiny[i](x)


def mma() -> None:
    """--mma: per product and row count, cuBLAS, tinygemm and int4_mma_matmul's choice and fastest."""
    points = [(shape, m, c) for shape in QUANT_SHAPES for m in QUANT_ROWS for c in dict.fromkeys(
        [int4_mma_config(m, 2 * shape[1] if shape[3] else shape[1], shape[2], 128)] + mma_grid(m, *shape[1:3]))]
    compile_grid(_mma_inputs, [((m, *shape[1:]), c) for shape, m, c in points])
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
            x, weight, run, tiny = _mma_inputs(m, n, k, gated, copies, g)
            cublas = graph_time(lambda i: F.linear(x, weights[i % len(weights)]), len(weights))
            tinygemm = graph_time(tiny, copies)
            reference = matvec_torch(x.double(), weight, act)
            configs = [c for s, mm, c in points if s == shape and mm == m]
            chosen, best, config = sweep(run, configs, reference, copies, f"mma {name} m={m}")
            print(f"m={m:<2} {name:8} {rows:5}x{k:5}  bf16 cuBLAS {cublas * 1e6:6.1f} us  tinygemm "
                  f"{tinygemm * 1e6:6.1f}  int4_mma own "
                  + (f"{chosen * 1e6:6.1f} us {size / chosen / 1e12:.2f} TB/s ({cublas / chosen:.2f}x) {configs[0]}"
                     if chosen else "failed")
                  + f"; fastest of {len(configs)} {best * 1e6:6.1f} us {size / best / 1e12:.2f} TB/s "
                    f"({cublas / best:.2f}x) {config}", flush=True)
            del run, tiny
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
