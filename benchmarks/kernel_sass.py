"""Static instruction counts of int8_row_matmul's kernel, compiled for an H100/H200 (sm_90) on any machine, no GPU.

    PYTHONPATH=src python benchmarks/kernel_sass.py [--gated] [--x bfloat16|float16] [CONFIG ...]

CONFIG is BLOCK_N,BLOCK_K,SPLIT_K,num_warps,num_stages as int8_row_config returns it, e.g. 8,1024,1,2,1. With none,
the configs int8_row_config picks for Mistral-7B's products. Each line gives the kernel's registers and the SASS
instructions of its main loop (its one runtime loop, over the inputs), as instructions a thread issues per weight it
reads, by opcode. The question it answers without a device: is a product bound by what it issues rather than by
bandwidth? An H200 issues ~33 T thread-instructions/s (132 multiprocessors x 4 schedulers x 32 lanes x 1.98 GHz);
int8 at 4 TB/s is 4 T weights/s, so about 8 instructions a weight is the most that leaves it bound by bandwidth. One
scale a row; needs triton (its ptxas, nvdisasm and cuobjdump).
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gpu_kernels import QUANT_SHAPES
from maestrale.engine import kernels

TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def compile_sm90(config: tuple, gated: bool, x: str) -> bytes:
    """The cubin of _int8_row_kernel for `config`, specialized as int8_row_matmul calls it on Mistral-7B's shapes
    (16-byte aligned pointers, sizes and strides divisible by 16)."""
    block_n, block_k, split, warps, stages = config
    args = {"X": f"*{x}", "W": "*i32", "S": "*bf16", "OUT": "*fp32" if split > 1 else f"*{x}", "N": "i32", "K": "i32",
            "s_w": "i32", "s_row": "i32", "s_group": "i32", "ones": "i32"}
    constants = dict(GROUP=1 << 30, GATED=gated and split == 1, SPLIT_K=split, BLOCK_N=block_n, BLOCK_K=block_k)
    names = [*args, *constants]
    signature = {**args, **{name: "constexpr" for name in constants}}
    aligned = {(names.index(name),): [["tt.divisibility", 16]] for name in ("X", "W", "S", "OUT", "N", "K", "s_w")}
    source = ASTSource(kernels._int8_row_kernel, signature,
                       constexprs={(names.index(name),): value for name, value in constants.items()}, attrs=aligned)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps,
                                                                                    "num_stages": stages})
    return compiled.asm["cubin"]


def loop_counts(cubin: bytes) -> tuple[int, collections.Counter]:
    """Registers a thread, and the opcodes of the longest loop (the code between a label and a branch back to it)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([TOOLS / "nvdisasm", "-c", f.name], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([TOOLS / "cuobjdump", "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    code, labels = [], {}
    for line in sass.splitlines():
        if label := re.match(r"\s*(\.L_x_\d+):", line):
            labels[label.group(1)] = len(code)
        elif instruction := re.search(r"/\*[0-9a-f]{4}\*/\s+(.*?);", line):
            code.append(instruction.group(1).strip())
    loops = [(labels[m.group(1)], i) for i, text in enumerate(code)
             if (m := re.search(r"BRA\s+.*?(\.L_x_\d+)", text)) and labels.get(m.group(1), len(code)) < i]
    start, end = max(loops, key=lambda loop: loop[1] - loop[0])
    opcodes = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]
                                  for text in code[start:end + 1])
    return registers, opcodes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*")
    parser.add_argument("--gated", action="store_true", help="for CONFIGs: a gate/up product")
    parser.add_argument("--x", default="bfloat16", choices=["bfloat16", "float16"])
    args = parser.parse_args()
    x = {"bfloat16": "bf16", "float16": "fp16"}[args.x]
    if args.configs:
        cases = [(c, tuple(int(v) for v in c.split(",")), args.gated) for c in args.configs]
    else:
        cases = [(name, kernels.int8_row_config(n, k, gated), gated) for name, n, k, gated in QUANT_SHAPES]
    for label, config, gated in cases:
        registers, opcodes = loop_counts(compile_sm90(config, gated, x))
        # unsplit and gated: the gate's and the up's rows in one tile; split: 2n plain rows
        rows = 2 * config[0] if gated and config[2] == 1 else config[0]
        weights = rows * config[1] / (32 * config[3])  # a thread's share of one pass of the loop
        total = sum(opcodes.values())
        print(f"{label:14} {config}: {registers} registers; loop {total} instructions, {total / weights:.2f} a weight: "
              + ", ".join(f"{op} {count / weights:.2f}" for op, count in opcodes.most_common(8)), flush=True)


if __name__ == "__main__":
    main()
