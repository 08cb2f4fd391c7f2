"""What `maestrale serve` costs per token besides the model: one streaming client, the model step replaced by fixed
logits, so every microsecond left is the scheduler, block manager, sampler, detokeniser, HTTP/SSE and the thread
hand-offs. Prints microseconds per output token for the engine loop alone and for the server under one client, and
the server's CPU time per token (steadier than the wall time on a shared CPU).

    PYTHONPATH=src python benchmarks/serve_overhead.py                 # SmolLM2's tokenizer and vocabulary
    PYTHONPATH=src python benchmarks/serve_overhead.py --step-ms 0 --tokens 2000 --requests 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def fixed_logits_engine(max_tokens: int, step_ms: float):
    """An LLMEngine on the default model whose model step waits `step_ms` without the GIL (as the engine thread does
    while a GPU step runs) and returns the same logits (argmax: a word) every step."""
    import torch

    from maestrale.cli import load
    from maestrale.engine.llm_engine import LLMEngine

    model, tokenizer = load(None, "cpu", "float32")
    engine = LLMEngine(model, tokenizer, max_model_len=max_tokens + 64)
    row = torch.zeros(model.config.vocab_size)
    row[tokenizer(" the", add_special_tokens=False)["input_ids"][0]] = 1.0

    def run(new_tokens, *_):
        time.sleep(step_ms / 1e3)
        return row.expand(len(new_tokens), -1)

    engine.runner.run = run
    return engine, tokenizer


def engine_loop(engine, prompt: list[int], max_tokens: int) -> float:
    """Microseconds per token of engine.step() alone, one request."""
    from maestrale.engine.sampling import SamplingParams

    engine.add_request("loop", prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    begin, tokens = time.perf_counter(), 0
    while engine.has_unfinished():
        tokens += sum(len(out.token_ids) for out in engine.step())
    return (time.perf_counter() - begin) / tokens * 1e6


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid`, all its threads (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def one_client(url: str, max_tokens: int, requests: int, pid: int) -> tuple[float, float]:
    """(wall, server CPU) microseconds per streamed token, best of `requests` requests one after the other; wall
    from the first token to the last."""
    wall = cpu = float("inf")
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
        for _ in range(requests):
            start = cpu_seconds(pid)
            stream = await client.completions.create(model="m", prompt="Once upon a time", max_tokens=max_tokens,
                                                     temperature=0, stream=True, extra_body={"ignore_eos": True})
            stamps = [time.perf_counter() async for chunk in stream if chunk.choices and chunk.choices[0].text]
            wall = min(wall, (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e6)
            cpu = min(cpu, (cpu_seconds(pid) - start) / len(stamps) * 1e6)
    return wall, cpu


def serve(max_tokens: int, step_ms: float, port: int) -> None:
    import uvicorn

    from maestrale.serving.app import create_app
    from maestrale.serving.async_engine import AsyncEngine

    engine, tokenizer = fixed_logits_engine(max_tokens, step_ms)
    uvicorn.run(create_app(AsyncEngine(engine, 8), tokenizer, "m"), host="127.0.0.1", port=port, log_level="warning")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1000, help="output tokens a request")
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--step-ms", type=float, default=4.6, help="the model step's time (4.6: the static decoder's "
                        "on an H200, Mistral-7B bfloat16); 0 measures the engine's own cost alone")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the server process
    args = parser.parse_args()
    if args.serve:
        return serve(args.tokens, args.step_ms, args.port)

    engine, tokenizer = fixed_logits_engine(args.tokens, args.step_ms)
    prompt = tokenizer("Once upon a time")["input_ids"]
    loop_us = min(engine_loop(engine, prompt, args.tokens) for _ in range(args.requests))
    # The server in a process of its own, as under a real client: the client does not take the server's GIL.
    proc = subprocess.Popen([sys.executable, __file__, "--serve", "--tokens", str(args.tokens), "--step-ms",
                             str(args.step_ms), "--port", str(args.port)])
    url = f"http://127.0.0.1:{args.port}"
    try:
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        server_us, server_cpu_us = asyncio.run(one_client(url, args.tokens, args.requests, proc.pid))
    finally:
        proc.terminate()
        proc.wait()
    step_us = args.step_ms * 1e3
    print(f"{args.tokens} tokens, model step {step_us:.0f} us, best of {args.requests}: engine loop {loop_us:.0f} "
          f"us/token ({loop_us - step_us:.0f} beyond the step), server with one streaming client {server_us:.0f} "
          f"us/token ({server_us - step_us:.0f} beyond the step), of which {server_cpu_us:.0f} us of the server's CPU "
          f"time; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
