"""What `maestrale serve` costs per token besides the model: one streaming client, the model step replaced by fixed
logits, so every microsecond left is the scheduler, block manager, sampler, detokeniser, HTTP/SSE and the thread
hand-offs. Prints microseconds per output token for the engine loop alone and for the server under one client, and
the server's CPU time per token (steadier than the wall time on a shared CPU).

    PYTHONPATH=src python benchmarks/serve_overhead.py                 # SmolLM2's tokenizer and vocabulary
    PYTHONPATH=src python benchmarks/serve_overhead.py --step-ms 0 --tokens 2000 --requests 5

--batch N instead splits the host time of one engine step with N sequences decoding, on a tiny random model at
Mistral-7B-v0.3's vocabulary with its v3 tokenizer, decode rows through PagedDecoder (eager here, a CUDA graph on a
GPU, so the "model" part is what the GPU would do): scheduling, building the step's inputs, model, sampling, and
detokenising and appending the tokens (stop checks, outputs); then the server's CPU time per streamed token under N
concurrent streaming clients, engine thread and HTTP (event loop) thread apart, the model step a GIL-free wait.

    PYTHONPATH=src python benchmarks/serve_overhead.py --batch 256
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
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


def tiny_engine(batch: int, max_tokens: int, step_ms: float | None = None):
    """An LLMEngine on a 2-layer random model with Mistral-7B-v0.3's vocabulary and tokenizer, its decode rows through
    PagedDecoder (eager on CPU); with step_ms, the model and sampler are replaced by a GIL-free wait of step_ms
    where the tokens are copied to the host, and random tokens."""
    import importlib.util
    import shutil
    import tempfile

    import torch

    from maestrale import AutoTokenizer, MistralConfig, MistralForCausalLM
    from maestrale.engine.decode import PagedDecoder
    from maestrale.engine.llm_engine import LLMEngine

    folder = Path(tempfile.mkdtemp(prefix="tiny-tokenizer-"))
    data = Path(importlib.util.find_spec("mistral_common").submodule_search_locations[0]) / "data"
    shutil.copy(data / "mistral_instruct_tokenizer_240323.model.v3", folder / "tokenizer.model")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    shutil.rmtree(folder)
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=32768, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, eos_token_id=2)
    model = MistralForCausalLM.from_config(config).eval()
    engine = LLMEngine(model, tokenizer, num_blocks=batch * (-(-(max_tokens + 64) // 16)), max_num_seqs=batch,
                       max_num_batched_tokens=4096, max_model_len=max_tokens + 64)
    runner = engine.runner
    runner.decoder = PagedDecoder(model, runner.pools, runner.block_size, batch, -(-engine.max_model_len // 16))
    if step_ms is not None:  # as on CUDA: the model step is launched at once, the sampler's copy waits for it
        from maestrale.engine.sampling import Sampled

        generator, launched = random.Random(0), [0.0]

        def run(new_tokens, *_):
            launched[0] = time.perf_counter()
            return torch.zeros(len(new_tokens), 1)

        def sample(seqs, logits):  # the step's "GPU time" runs from the launch
            time.sleep(max(0.0, launched[0] + step_ms / 1e3 - time.perf_counter()))
            return [Sampled(generator.randrange(1100, config.vocab_size)) for _ in seqs]  # ordinary pieces

        runner.run = run

        engine.sampler = sample
    return engine, tokenizer


def step_breakdown(batch: int, steps: int, params: dict) -> dict[str, float]:
    """Milliseconds per engine step with `batch` sequences decoding with SamplingParams(**params), by part (best of
    `steps` steps for each)."""
    from maestrale.engine.sampling import SamplingParams

    engine, tokenizer = tiny_engine(batch, 4 * steps)
    times: dict[str, float] = {}

    def timed(owner, name: str, part: str):
        inner = getattr(owner, name)

        def wrapper(*args, **kwargs):
            begin = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                times[part] = times.get(part, 0.0) + time.perf_counter() - begin
        setattr(owner, name, wrapper)

    timed(engine.scheduler, "schedule", "schedule")
    timed(engine.runner, "run", "inputs + model")
    timed(engine.runner.decoder, "_step", "model")
    timed(engine, "sampler", "sampling")
    timed(engine.tokenizer, "batch_decode", "detokenise")
    timed(engine, "_append", "append")
    prompt = tokenizer("Once upon a time there was a river")["input_ids"]
    for i in range(batch):
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=4 * steps, ignore_eos=True, **params))
    while any(seq.num_pending > 1 for seq in engine.scheduler.running + list(engine.scheduler.waiting)):
        engine.step()  # the prefills
    best: dict[str, float] = {}
    for _ in range(steps):
        times.clear()
        begin = time.perf_counter()
        engine.step()
        times["step"] = time.perf_counter() - begin
        for part, seconds in times.items():
            best[part] = min(best.get(part, float("inf")), seconds * 1e3)
    best["inputs"] = best.pop("inputs + model") - best["model"]
    best["rest of step()"] = best["step"] - sum(v for k, v in best.items() if k != "step")
    return best


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds of each thread of process `pid`: 'main' (the event loop) and 'other' (the engine, torch)."""
    out = {"main": 0.0, "other": 0.0}
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        out["main" if int(task.name) == pid else "other"] += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


async def many_clients(url: str, batch: int, max_tokens: int, pid: int) -> tuple[dict[str, float], float]:
    """(server CPU microseconds per streamed token by thread, wall microseconds per token) with `batch` concurrent
    streaming requests; raw SSE lines through httpx, lighter than the openai client, since both share the CPU."""
    body = {"model": "m", "prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=httpx.Limits(max_connections=batch)) as client:
        async def one() -> int:
            count = 0
            async with client.stream("POST", "/v1/completions", json=body) as response:
                async for line in response.aiter_lines():
                    count += line.startswith("data: {")
            return count

        await asyncio.gather(*(one() for _ in range(min(batch, 8))))  # warm-up
        start, begin = thread_cpu_seconds(pid), time.perf_counter()
        tokens = sum(await asyncio.gather(*(one() for _ in range(batch))))
        wall = time.perf_counter() - begin
        end = thread_cpu_seconds(pid)
    return {k: (end[k] - start[k]) / tokens * 1e6 for k in end}, wall / tokens * 1e6


def serve_tiny(batch: int, max_tokens: int, step_ms: float, port: int) -> None:
    import uvicorn

    from maestrale.serving.app import create_app
    from maestrale.serving.async_engine import AsyncEngine

    engine, tokenizer = tiny_engine(batch, max_tokens, step_ms)
    uvicorn.run(create_app(AsyncEngine(engine, 2 * batch), tokenizer, "m"), host="127.0.0.1", port=port,
                log_level="warning")


@contextlib.contextmanager
def serving(args, *options: str) -> Iterator[tuple[str, int]]:
    """(URL, pid) of this script's server in a process of its own, as under real clients (which do not take the
    server's GIL), once /health answers; stopped on leaving."""
    proc = subprocess.Popen([sys.executable, __file__, "--serve", "--tokens", str(args.tokens), "--step-ms",
                             str(args.step_ms), "--port", str(args.port), *options])
    url = f"http://127.0.0.1:{args.port}"
    try:
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait()


def batch_report(args) -> None:
    import torch

    torch.set_num_threads(1)
    sampling = dict(temperature=args.temperature, top_p=args.top_p)
    parts = step_breakdown(args.batch, args.steps, sampling)
    print(f"engine step, {args.batch} rows decoding ({sampling}), best of {args.steps} steps (ms): " +
          ", ".join(f"{k} {v:.2f}" for k, v in parts.items()) + f"; load average {os.getloadavg()[0]:.2f}", flush=True)
    with serving(args, "--batch", str(args.batch)) as (url, pid):
        cpu, wall = asyncio.run(many_clients(url, args.batch, args.tokens, pid))
    print(f"server, {args.batch} streaming clients x {args.tokens} tokens, model step a {args.step_ms} ms wait: "
          f"CPU per token {cpu['main']:.0f} us in the event loop thread, {cpu['other']:.0f} us in the engine "
          f"thread; wall {wall:.0f} us per token ({wall * args.batch / 1e3:.1f} ms per step of {args.batch}); "
          f"load average {os.getloadavg()[0]:.2f}")


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
    parser.add_argument("--batch", type=int, help="split one step's host time with this many rows decoding")
    parser.add_argument("--steps", type=int, default=20, help="steps timed with --batch")
    parser.add_argument("--temperature", type=float, default=0.0, help="of the --batch rows (0: greedy)")
    parser.add_argument("--top-p", type=float, default=1.0, help="of the --batch rows")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the server process
    args = parser.parse_args()
    if args.serve:
        if args.batch:
            return serve_tiny(args.batch, args.tokens, args.step_ms, args.port)
        return serve(args.tokens, args.step_ms, args.port)
    if args.batch:
        return batch_report(args)

    engine, tokenizer = fixed_logits_engine(args.tokens, args.step_ms)
    prompt = tokenizer("Once upon a time")["input_ids"]
    loop_us = min(engine_loop(engine, prompt, args.tokens) for _ in range(args.requests))
    with serving(args) as (url, pid):
        server_us, server_cpu_us = asyncio.run(one_client(url, args.tokens, args.requests, pid))
    step_us = args.step_ms * 1e3
    print(f"{args.tokens} tokens, model step {step_us:.0f} us, best of {args.requests}: engine loop {loop_us:.0f} "
          f"us/token ({loop_us - step_us:.0f} beyond the step), server with one streaming client {server_us:.0f} "
          f"us/token ({server_us - step_us:.0f} beyond the step), of which {server_cpu_us:.0f} us of the server's CPU "
          f"time; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
