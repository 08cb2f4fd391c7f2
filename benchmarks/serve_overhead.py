"""What `maestrale serve` costs per token besides the model: one streaming client, the model step replaced by fixed
logits, so every microsecond left is the scheduler, block manager, sampler, detokeniser, HTTP/SSE and the thread
hand-offs. Prints microseconds per output token for the engine loop alone and for the server under one client, and
the server's CPU time per token (steadier than the wall time on a shared CPU).

    PYTHONPATH=src python benchmarks/serve_overhead.py                 # SmolLM2's tokenizer and vocabulary
    PYTHONPATH=src python benchmarks/serve_overhead.py --step-ms 0 --tokens 2000 --requests 5

--batch N instead splits the host time of one engine step with N sequences decoding, on a tiny random model at
Mistral-7B-v0.3's vocabulary with its v3 tokenizer, decode rows through PagedDecoder (eager here, a CUDA graph on a
GPU, so the "model" part is what the GPU would do): scheduling, building the step's inputs, model, sampling, and
detokenising and appending the tokens (stop checks, outputs); then, under N concurrent streaming clients (the
model step a GIL-free wait), the server's time and CPU per engine step: the HTTP event loop, the server process's
other threads and the engine process apart. --baseline-src serves an older tree's src as well (e.g. one from before
the engine had a process of its own, where its thread shared the event loop's GIL), alternating with this one:

    PYTHONPATH=src python benchmarks/serve_overhead.py --batch 256
    PYTHONPATH=src python benchmarks/serve_overhead.py --batch 256 --defer-texts --repeats 0   # as the server steps
    git archive 64de85b src | tar -x -C /tmp/base
    PYTHONPATH=src python benchmarks/serve_overhead.py --batch 96 --tokens 400 --steps 0 --step-ms 5 --launch-ms 6 \
        --baseline-src /tmp/base/src --repeats 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))


def fixed_logits_engine(max_tokens: int, step_ms: float):
    """An LLMEngine on the default model whose model step waits `step_ms` without the GIL (as the
    engine does while a GPU step runs) and returns the same logits (argmax: a word) every step."""
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
    return engine


def mistral_v3_tokenizer():
    """Mistral-7B-v0.3's tokenizer (its v3 SentencePiece model, shipped with mistral-common)."""
    import importlib.util
    import shutil
    import tempfile

    from maestrale import AutoTokenizer

    folder = Path(tempfile.mkdtemp(prefix="tiny-tokenizer-"))
    data = Path(importlib.util.find_spec("mistral_common").submodule_search_locations[0]) / "data"
    shutil.copy(data / "mistral_instruct_tokenizer_240323.model.v3", folder / "tokenizer.model")
    try:
        return AutoTokenizer.from_pretrained(folder)
    finally:
        shutil.rmtree(folder)


def tiny_engine(batch: int, max_tokens: int, step_ms: float | None = None, launch_ms: float = 0.0):
    """An LLMEngine on a 2-layer random model with Mistral-7B-v0.3's vocabulary and tokenizer, its decode rows through
    PagedDecoder (eager on CPU); with step_ms, the model and sampler are replaced by a GIL-free wait of step_ms
    where the tokens are copied to the host, and random tokens, the launch taking launch_ms of Python work (holding the
    GIL, as the launches, inputs and sampling calls of a real step do)."""
    import torch

    from maestrale import MistralConfig, MistralForCausalLM
    from maestrale.engine.decode import PagedDecoder
    from maestrale.engine.llm_engine import LLMEngine

    tokenizer = mistral_v3_tokenizer()
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
            while time.perf_counter() < launched[0] + launch_ms / 1e3:
                pass
            return torch.zeros(len(new_tokens), 1)

        def sample(seqs, logits):  # the step's "GPU time" runs from the launch
            time.sleep(max(0.0, launched[0] + step_ms / 1e3 - time.perf_counter()))
            return [Sampled(generator.randrange(1100, config.vocab_size)) for _ in seqs]  # ordinary pieces

        runner.run = run
        engine.sampler = sample
    return engine


def step_breakdown(batch: int, steps: int, params: dict, defer: bool = False) -> dict[str, float]:
    """Milliseconds per engine step with `batch` sequences decoding with SamplingParams(**params), by part (best of
    `steps` steps for each); with `defer`, steps as the server runs them, the texts left to settle(), timed apart
    (the server's next step calls it while the GPU runs)."""
    from maestrale.engine.sampling import SamplingParams

    engine = tiny_engine(batch, 4 * steps)
    tokenizer = engine.tokenizer
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
        appended, begin = engine.step_seconds["append"], time.perf_counter()
        engine.step(defer_texts=defer)
        parts = {**times, "step": time.perf_counter() - begin}
        parts["inputs"] = parts.pop("inputs + model") - parts["model"]
        parts["rest of step()"] = parts["step"] - sum(v for k, v in parts.items() if k != "step")
        parts["engine's append part"] = engine.step_seconds["append"] - appended  # /metrics': sampled to returned
        if defer:
            times.clear()
            begin = time.perf_counter()
            engine.settle()
            parts["settle"] = time.perf_counter() - begin
            parts["settle's detokenise"] = times.get("detokenise", 0.0)
        for part, seconds in parts.items():
            best[part] = min(best.get(part, float("inf")), seconds * 1e3)
    return best


def server_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds of server process `pid` (Linux): its main thread (the event loop), its other threads (the engine
    thread of a tree from before the engine's process, else the thread reading the engine's outputs), and its child
    processes (the engine)."""
    out = {"event loop": 0.0, "other threads": 0.0, "engine process": 0.0}

    def seconds(stat: Path) -> float:
        fields = stat.read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    for task in Path(f"/proc/{pid}/task").iterdir():
        out["event loop" if int(task.name) == pid else "other threads"] += seconds(task / "stat")
        for child in (task / "children").read_text().split():
            out["engine process"] += sum(seconds(t / "stat") for t in Path(f"/proc/{child}/task").iterdir())
    return out


def engine_counters(url: str) -> dict[str, float]:
    """The engine's step counters from /metrics (steps, decode_rows, prefill_rows, prefill_tokens) and its idle
    seconds."""
    out = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("maestrale_engine_step_work_total{"):
            out[line.split('"')[1]] = float(line.split()[-1])
        elif line.startswith("maestrale_engine_idle_seconds_total "):
            out["idle"] = float(line.split()[-1])
    return out


async def many_clients(url: str, batch: int, max_tokens: int, pid: int) -> dict[str, float]:
    """What `batch` concurrent streaming requests cost the server a step: decode rows, wall and busy (not idle)
    milliseconds, and CPU milliseconds by part; the SSE events counted in the raw bytes, the lightest client there
    is, since it shares the CPU with the server."""
    body = {"model": "m", "prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=httpx.Limits(max_connections=batch)) as client:
        async def one() -> int:
            count, tail = 0, b""
            async with client.stream("POST", "/v1/completions", json=body) as response:
                async for chunk in response.aiter_raw():
                    chunk = tail + chunk
                    count += chunk.count(b"data: {")
                    tail = chunk[-6:]  # shorter than the pattern: counted once, found across chunks
            return count

        await asyncio.gather(*(one() for _ in range(min(batch, 8))))  # warm-up
        start, counters, begin = server_cpu_seconds(pid), engine_counters(url), time.perf_counter()
        tokens = sum(await asyncio.gather(*(one() for _ in range(batch))))
        wall = time.perf_counter() - begin
        end, counters = server_cpu_seconds(pid), {k: v - counters[k] for k, v in engine_counters(url).items()}
    assert tokens == batch * max_tokens, f"{tokens} tokens streamed of {batch * max_tokens}"
    steps = counters["steps"]
    return {"rows": counters["decode_rows"] / steps, "wall": wall / steps * 1e3,
            "busy": (wall - counters["idle"]) / steps * 1e3,
            **{k: (end[k] - start[k]) / steps * 1e3 for k in end}}


def async_engine(build, max_pending: int):
    """The AsyncEngine over the engine that build() returns: in the engine process (this tree), or in this process's
    engine thread (a tree from before the engine's process: --baseline-src)."""
    from maestrale.serving import async_engine

    return async_engine.AsyncEngine(build if hasattr(async_engine, "EngineDead") else build(), max_pending)


def serve_tiny(batch: int, max_tokens: int, step_ms: float, launch_ms: float, port: int) -> None:
    import uvicorn

    from maestrale.serving.app import create_app

    engine = async_engine(functools.partial(tiny_engine, batch, max_tokens, step_ms, launch_ms), 2 * batch)
    uvicorn.run(create_app(engine, mistral_v3_tokenizer(), "m"), host="127.0.0.1", port=port, log_level="warning")


@contextlib.contextmanager
def serving(args, *options: str, src: str = str(SRC)) -> Iterator[tuple[str, int]]:
    """(URL, pid) of this script's server on maestrale's tree `src`, in a process of its own, as under real clients
    (which do not take the server's GIL), once /health answers; stopped on leaving."""
    proc = subprocess.Popen([sys.executable, __file__, "--serve", "--tokens", str(args.tokens), "--step-ms",
                             str(args.step_ms), "--launch-ms", str(args.launch_ms), "--port", str(args.port), "--src", src,
                             *options])
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
    if args.steps:
        parts = step_breakdown(args.batch, args.steps, sampling, args.defer_texts)
        texts = ", texts deferred" if args.defer_texts else ""
        print(f"engine step, {args.batch} rows decoding ({sampling}{texts}), best of {args.steps} steps (ms): " +
              ", ".join(f"{k} {v:.2f}" for k, v in parts.items()) + f"; load average {os.getloadavg()[0]:.2f}",
              flush=True)
    trees = {"baseline": args.baseline_src, "this tree": str(SRC)} if args.baseline_src else {"this tree": str(SRC)}
    for _ in range(args.repeats):
        for name, src in trees.items():  # alternating, so drifts of a shared machine's speed fall on both
            with serving(args, "--batch", str(args.batch), src=src) as (url, pid):
                r = asyncio.run(many_clients(url, args.batch, args.tokens, pid))
            print(f"{name:9}: {args.batch} streaming clients x {args.tokens} tokens, model step a {args.step_ms} ms "
                  f"wait, its launch {args.launch_ms} ms of Python: {r['rows']:.0f} decode rows a step; ms a step: wall {r['wall']:.2f} "
                  f"({r['rows'] / r['wall'] * 1e3:.0f} tok/s), engine busy {r['busy']:.2f}; server CPU ms a step: "
                  f"event loop {r['event loop']:.2f}, other threads {r['other threads']:.2f}, engine process "
                  f"{r['engine process']:.2f}; load average {os.getloadavg()[0]:.2f}", flush=True)


def engine_loop(engine, prompt: list[int], max_tokens: int) -> float:
    """Microseconds per token of engine.step() alone, one request."""
    from maestrale.engine.sampling import SamplingParams

    engine.add_request("loop", prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    begin, tokens = time.perf_counter(), 0
    while engine.has_unfinished():
        tokens += sum(len(out.token_ids) for out in engine.step())
    return (time.perf_counter() - begin) / tokens * 1e6


async def one_client(url: str, max_tokens: int, requests: int, pid: int) -> tuple[float, float]:
    """(wall, server CPU) microseconds per streamed token, best of `requests` requests one after the other; wall
    from the first token to the last."""
    wall = cpu = float("inf")
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
        for _ in range(requests):
            start = sum(server_cpu_seconds(pid).values())
            stream = await client.completions.create(model="m", prompt="Once upon a time", max_tokens=max_tokens,
                                                     temperature=0, stream=True, extra_body={"ignore_eos": True})
            stamps = [time.perf_counter() async for chunk in stream if chunk.choices and chunk.choices[0].text]
            wall = min(wall, (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e6)
            cpu = min(cpu, (sum(server_cpu_seconds(pid).values()) - start) / len(stamps) * 1e6)
    return wall, cpu


def serve(max_tokens: int, step_ms: float, port: int) -> None:
    import uvicorn

    from maestrale.cli import load_tokenizer
    from maestrale.serving.app import create_app

    engine = async_engine(functools.partial(fixed_logits_engine, max_tokens, step_ms), 8)
    uvicorn.run(create_app(engine, load_tokenizer(None), "m"), host="127.0.0.1", port=port, log_level="warning")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1000, help="output tokens a request")
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--step-ms", type=float, default=4.6, help="the model step's time (4.6: the static decoder's "
                        "on an H200, Mistral-7B bfloat16); 0 measures the engine's own cost alone")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--batch", type=int, help="split one step's host time with this many rows decoding")
    parser.add_argument("--steps", type=int, default=20, help="steps timed with --batch (0: none, the servers only)")
    parser.add_argument("--baseline-src", help="with --batch, also serve maestrale's src folder at this path (e.g. a "
                        "`git archive` of an older commit), alternating with this tree's")
    parser.add_argument("--repeats", type=int, default=1, help="server runs of each tree with --batch")
    parser.add_argument("--launch-ms", type=float, default=0.0, help="with --batch, Python work (holding the GIL) of "
                        "each step's launch in the servers, overlapping the --step-ms wait (the H200's engine took "
                        "12.4 ms of CPU a step at 96 rows)")
    parser.add_argument("--src", default=str(SRC), help=argparse.SUPPRESS)  # the server process's maestrale
    parser.add_argument("--temperature", type=float, default=0.0, help="of the --batch rows (0: greedy)")
    parser.add_argument("--top-p", type=float, default=1.0, help="of the --batch rows")
    parser.add_argument("--defer-texts", action="store_true", help="with --batch, time the steps as the server runs "
                        "them: the texts left to engine.settle(), timed apart")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the server process
    args = parser.parse_args()
    if args.serve:
        sys.path.insert(0, args.src)
        if args.batch:
            return serve_tiny(args.batch, args.tokens, args.step_ms, args.launch_ms, args.port)
        return serve(args.tokens, args.step_ms, args.port)
    if args.batch:
        return batch_report(args)

    engine = fixed_logits_engine(args.tokens, args.step_ms)
    prompt = engine.tokenizer("Once upon a time")["input_ids"]
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
