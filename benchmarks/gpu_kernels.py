"""matvec's Triton kernel against cuBLAS (F.linear) on the batch-1 decode products of the dense families.

    PYTHONPATH=src python benchmarks/gpu_kernels.py [--sweep]

The question it answers: can a Triton matrix-vector kernel stream a dense layer's weights faster than cuBLAS's
batch-1 products (which the decode step uses today), and with which blocks? Each product runs as a CUDA graph of calls
over enough distinct weight copies (>= 512 MB) that no weight is served from L2, as in a real step; the time is the
median replay over the calls, and TB/s counts the weight bytes read. The gate_up rows time cuBLAS's bare product
against matvec with the silu gate fused. The device's read and copy bandwidths are printed first. --sweep times every
block configuration and prints the fastest per shape; without it, matvec_config's choice is timed.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
import triton

from maestrale.engine.kernels import matvec, matvec_config, matvec_torch

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    read, copy = bandwidths()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"read {read / 1e12:.2f} TB/s, copy {copy / 1e12:.2f} TB/s")
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
