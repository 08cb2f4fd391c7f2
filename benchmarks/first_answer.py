"""Time to the first answer of the README's first command, from a fresh process, as a newcomer sees it.

    .venv/bin/python benchmarks/first_answer.py [--runs 5] [--max-new-tokens 16] [--baseline-src OTHER/src]

Runs `maestrale generate --chat "What is the capital of France, and what is it famous for?"` (as `.venv/bin/python -m
maestrale`; the default SmolLM2 model, dequantized) and the same with --keep-quantized, alternating, and prints for
each the time from the process's start to the first byte on its stdout (the first streamed piece of the reply) and
to its end, median and best of --runs. --baseline-src also runs the command on another source tree (e.g. an older
commit's `src`, put first on PYTHONPATH), alternating with this one's, to see what a change gained on the same
machine state.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "What is the capital of France, and what is it famous for?"


def first_answer(src: Path, extra: list[str], max_new_tokens: int) -> tuple[float, float, str]:
    """(seconds to the first stdout byte, seconds to the end, the reply) of one fresh `maestrale generate`."""
    # `python -m maestrale` is the `maestrale` command, and runs whichever tree PYTHONPATH puts first
    command = [str(ROOT / ".venv/bin/python"), "-m", "maestrale", "generate", "--chat", QUESTION, "--max-new-tokens",
               str(max_new_tokens), *extra]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=dict(os.environ, PYTHONPATH=str(src)))
    first = process.stdout.read(1)
    first_at = time.perf_counter() - start
    rest = process.stdout.read()  # through the same buffered reader as the first byte: communicate() would skip it
    errors = process.stderr.read()
    if process.wait():
        sys.exit(f"{' '.join(command)} failed ({process.returncode}): {errors.decode()[-500:]}")
    return first_at, time.perf_counter() - start, (first + rest).decode().strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--baseline-src", type=Path, help="another source tree to run beside this one")
    args = parser.parse_args()
    trees = {"": ROOT / "src"} | ({"baseline ": args.baseline_src.resolve()} if args.baseline_src else {})
    variants = {f"{tree}{name}": (src, extra) for tree, src in trees.items()
                for name, extra in (("dequantized (default)", []), ("--keep-quantized", ["--keep-quantized"]))}
    print(f"load average at start {os.getloadavg()[0]:.2f}", flush=True)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    replies = {}
    for _ in range(args.runs):
        for name, (src, extra) in variants.items():
            first, done, replies[name] = first_answer(src, extra, args.max_new_tokens)
            times[name].append((first, done))
    for name, runs in times.items():
        firsts, dones = [t for t, _ in runs], [t for _, t in runs]
        print(f"{name:34s} first byte median {statistics.median(firsts):.2f} s (best {min(firsts):.2f}), "
              f"{args.max_new_tokens} tokens done {statistics.median(dones):.2f} s; runs "
              + " ".join(f"{t:.2f}" for t in firsts))
    for name, reply in replies.items():
        print(f"{name}: {reply!r}")
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
