"""Soak `maestrale serve`: a fixed count of requests over loopback, every one answered, resident memory flat.

Starts the server (the default model unless --model), sends --requests requests from --concurrency clients
(chat and completions, streamed and not, a few disconnecting mid-stream), and prints the server's resident memory
after a warm-up and at the end. Exits 1 when a request fails, blocks stay in use, or memory grows by more than
--max-growth-mib.

    PYTHONPATH=src python scripts/serve_soak.py --requests 1000 --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import httpx
import openai
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from serve import free_port, start  # noqa: E402  (benchmarks/serve.py)

SRC = Path(__file__).resolve().parents[1] / "src"


async def request(client, model: str, i: int) -> None:
    kind = i % 4
    if kind == 0:
        r = await client.completions.create(model=model, prompt=f"Request {i}: once upon a time", max_tokens=4)
        assert r.choices[0].finish_reason in ("stop", "length")
    elif kind == 1:
        r = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": f"Hi {i}"}],
                                                 max_tokens=4, temperature=0.7, seed=i)
        assert r.choices[0].message.role == "assistant"
    else:
        stream = await client.completions.create(model=model, prompt=f"Count {i}:", max_tokens=6, stream=True)
        seen = 0
        async for _ in stream:
            seen += 1
            if kind == 3 and seen == 2:  # a client that leaves mid-stream
                await stream.close()
                break


async def run(url: str, model: str, count: int, concurrency: int) -> int:
    queue = list(range(count))
    failures = []
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600) as client:
        async def worker():
            while queue:
                i = queue.pop()
                try:
                    await request(client, model, i)
                except Exception as e:  # noqa: BLE001 (counted and reported)
                    failures.append(f"request {i}: {e!r}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    for failure in failures[:5]:
        print(failure)
    return len(failures)


def kv_blocks_used(url: str) -> int:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("maestrale_kv_blocks_used "):
            return int(float(line.split()[1]))
    raise RuntimeError("/metrics has no maestrale_kv_blocks_used")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--max-growth-mib", type=float, default=64)
    args = parser.parse_args()
    port = free_port()
    command = [sys.executable, "-m", "maestrale", "serve", "--port", str(port), "--dtype", "float32",
               "--max-model-len", "512"] + (["--model", args.model] if args.model else [])
    proc = start(command, port, {**os.environ, "PYTHONPATH": str(SRC)})
    url = f"http://127.0.0.1:{port}"
    try:
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        server = psutil.Process(proc.pid)

        def rss() -> list[float]:  # MiB of the HTTP process and of its children (the engine process)
            return [p.memory_info().rss / 2**20 for p in [server, *server.children(recursive=True)]]

        begin = time.perf_counter()
        failed = asyncio.run(run(url, model, args.warmup, args.concurrency))
        after_warmup = rss()
        failed += asyncio.run(run(url, model, args.requests - args.warmup, args.concurrency))
        time.sleep(1)  # aborted streams free their blocks at the next step
        at_end, used = rss(), kv_blocks_used(url)
        wall = time.perf_counter() - begin
    finally:
        proc.terminate()
        code = proc.wait(timeout=120)
    growth = sum(at_end) - sum(after_warmup)
    mib = lambda values: " + ".join(f"{v:.0f}" for v in values) + " MiB"  # noqa: E731
    print(f"{args.requests} requests ({args.concurrency} clients) in {wall:.0f}s, {failed} failed; resident memory "
          f"(the server's processes) {mib(after_warmup)} after {args.warmup} warm-up requests, {mib(at_end)} at the "
          f"end ({growth:+.1f} MiB); KV blocks in use when idle: {used}; exit code after SIGTERM: {code}; "
          f"load average {os.getloadavg()[0]:.2f}")
    return int(failed > 0 or used != 0 or growth > args.max_growth_mib or code != 0)


if __name__ == "__main__":
    sys.exit(main())
