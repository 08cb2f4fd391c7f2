"""matvec's Triton kernel against cuBLAS (F.linear) on the batch-1 decode products of the dense families; with
--quant, the weight-only int4 and int8 products on Mistral-7B's decode products.

    PYTHONPATH=src python benchmarks/gpu_kernels.py [--sweep | --quant]

The question it answers: can a Triton matrix-vector kernel stream a dense layer's weights faster than cuBLAS's
batch-1 products (which the decode step uses today), and with which blocks? Each product runs as a CUDA graph of calls
over enough distinct weight copies (>= 512 MB) that no weight is served from L2, as in a real step; the time is the
median replay over the calls, and TB/s counts the weight bytes read. The gate_up rows time cuBLAS's bare product
against matvec with the silu gate fused. The device's read and copy bandwidths are printed first. --sweep times every
block configuration and prints the fastest per shape; without it, matvec_config's choice is timed.

--quant: Mistral-7B's products at 1, 8 and 32 rows: bfloat16 cuBLAS and matvec (one row), torch's int4 tinygemm
(_weight_int4pack_mm, which Int4Weight runs on CUDA) at groups 32/64/128, torch's _weight_int8pack_mm and maestrale's
int8_matmul (one scale a row, which Int8Weight runs on CUDA): us, TB/s of the bytes each reads (values, scales,
zeros) and the speed-up over cuBLAS bfloat16. int8_matmul is the fastest of a few configurations (int8_config's
choice among them), each checked against the float64 product of the dequantized weight first; the fastest
configuration is printed.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
import triton

from maestrale.engine.kernels import int8_config, int8_matmul, matvec, matvec_config, matvec_torch

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


QUANT_SHAPES = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336),
                ("lm_head", 32000, 4096)]
# (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) tried per row count, beside int8_config's choice
QUANT_CONFIGS = {
    1: [(1, 1, 4096, 1, 8, 1), (1, 4, 2048, 1, 8, 3), (1, 4, 1024, 1, 4, 3), (1, 16, 256, 1, 4, 3),
        (1, 32, 128, 4, 4, 3), (1, 16, 128, 2, 4, 3)],
    8: [(8, 4, 256, 1, 4, 3), (8, 8, 256, 1, 4, 3), (8, 16, 128, 1, 4, 3), (16, 32, 128, 2, 4, 3),
        (16, 64, 128, 1, 8, 3), (16, 64, 128, 4, 8, 3)],
    32: [(32, 32, 128, 1, 4, 3), (32, 64, 128, 1, 8, 3), (32, 64, 128, 4, 8, 3), (32, 64, 256, 2, 8, 3),
         (16, 64, 128, 2, 8, 3), (32, 128, 128, 1, 8, 3)],
}


def copies_of(size: int) -> int:
    """Distinct weight copies so that one pass reads >= 512 MB: none is served from L2."""
    return max(2, -(-(512 << 20) // size))


def tinygemm_int4(values: torch.Tensor, group: int, scale_and_zeros: torch.Tensor):
    """torch's own CUDA int4 layout (_convert_weight_to_int4pack: byte pairs, 8 inner k-tiles) and its product."""
    pairs = (values[:, ::2] << 4 | values[:, 1::2]).to(torch.uint8)
    packed = torch.ops.aten._convert_weight_to_int4pack(pairs.contiguous(), 8)
    return lambda x: torch.ops.aten._weight_int4pack_mm(x, packed, group, scale_and_zeros)


def quant() -> None:
    """Per shape and row count: a line per kernel, the figures of the docstring."""
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, n, k in QUANT_SHAPES:
        bf16_size = n * k * 2
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) / k**0.5
                   for _ in range(copies_of(bf16_size))]
        # int4 at each group size: values 0..15, a bfloat16 scale and zero per (row, group) as Int4Weight holds them
        values = [torch.randint(0, 16, (n, k), device="cuda", dtype=torch.uint8, generator=g)
                  for _ in range(copies_of(n * k // 2))]
        int8 = [torch.randint(-128, 128, (n, k), device="cuda", dtype=torch.int8, generator=g)
                for _ in range(copies_of(n * k))]
        scales8 = (torch.rand(n, 1, device="cuda", generator=g) * 2e-4 + 1e-4).bfloat16()
        int4 = {}
        for group in (32, 64, 128):
            scale = (torch.rand(n, k // group, device="cuda", generator=g) * 2e-3 + 1e-3).bfloat16()
            zero = (torch.randn(n, k // group, device="cuda", generator=g) * 1e-3).bfloat16()
            scale_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
            size = n * k // 2 + 4 * n * k // group
            int4[group] = ([tinygemm_int4(v, group, scale_and_zeros) for v in values], size)
        for m in (1, 8, 32):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
            cublas = graph_time(lambda i: F.linear(x, weights[i % len(weights)]), len(weights))
            line = [f"m={m:<2} {name:8} {n:5}x{k:5}"]

            def show(label, seconds, size, config=None):
                line.append(f"  {label:18} {seconds * 1e6:7.1f} us {size / seconds / 1e12:.2f} TB/s "
                            f"({cublas / seconds:.2f}x)" + (f" {config}" if config else ""))

            show("bf16 cuBLAS", cublas, bf16_size)
            if m == 1:
                show("bf16 matvec", graph_time(lambda i: matvec(x, weights[i % len(weights)]), len(weights)), bf16_size)
            for group, (tiny, size) in int4.items():
                show(f"tinygemm int4 g{group}", graph_time(lambda i: tiny[i](x), len(tiny)), size)
            size8 = n * k + 2 * n
            show("torch int8", graph_time(lambda i: torch.ops.aten._weight_int8pack_mm(x, int8[i], scales8[:, 0]),
                                          len(int8)), size8)
            reference = x.double() @ (int8[0].double() * scales8.double()).T
            timed = []
            for config in dict.fromkeys([int8_config(m, n, k, k)] + QUANT_CONFIGS[m]):
                error = ((int8_matmul(x, int8[0], scales8, config=config).double() - reference).norm()
                         / reference.norm()).item()
                assert error < 1e-2, (name, m, config, error)
                timed.append((graph_time(lambda i: int8_matmul(x, int8[i], scales8, config=config), len(int8)), config))
            seconds, config = min(timed)
            show("int8", seconds, size8, config)
            print(" ".join(line[:1]) + "\n" + "\n".join("   " + part for part in line[1:]), flush=True)
        del weights, values, int8, int4
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--sweep", action="store_true")
    mode.add_argument("--quant", action="store_true")
    args = parser.parse_args()
    read, copy = bandwidths()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"read {read / 1e12:.2f} TB/s, copy {copy / 1e12:.2f} TB/s")
    if args.quant:
        return quant()
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
