"""Load generator for OpenAI-compatible servers: `maestrale serve` beside `transformers serve --continuous-batching`.

Starts each server on the same model (the default SmolLM2 GGUF unless --model), sends a fixed count of prompts of
synthetic ShareGPT-like lengths (log-normal prompt and output lengths) at an unlimited rate and at fixed request rates
(Poisson arrivals) through the asyncio openai client, and prints output tokens/s, requests/s, time to first token
and time between tokens (p50/p99). Then 16 concurrent clients against one client, the CPU criterion (>= 3x).

    PYTHONPATH=src python benchmarks/serve.py                       # CPU defaults: short prompts and replies
    PYTHONPATH=src python benchmarks/serve.py --compare-transformers --num-prompts 32 --rates inf,1
    PYTHONPATH=src python benchmarks/serve.py --random-model --dtype bfloat16 --num-prompts 500 \\
        --input-mean 200 --output-mean 200 --rates inf,8 --compare-transformers --client-processes 4 \\
        --server-args "--device cuda --max-num-seqs 256 --max-num-batched-tokens 4096"   # a GPU run

A rate run's "in flight" is how many requests were running on average; at a fixed rate it is the rate times a
request's latency, so a rate that keeps ~32 in flight is found from a first run's figure (--time-limit stops a run
whose server is slow, counting the tokens that came by then).

After each maestrale run it prints where the server's time went: the engine's steps (how many, their decode rows and
prefill tokens, milliseconds by part from /metrics) and the CPU time of the engine process and of the HTTP event loop.

--random-model writes Mistral-7B-v0.3's shape with random weights (and mistral-common's v3 tokenizer) to a folder
both servers load.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import multiprocessing
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

SRC = Path(__file__).resolve().parents[1] / "src"
# maestrale decodes all max_tokens (vLLM's ignore_eos); transformers serve refuses the field and may stop early,
# which its token counts show.
MAESTRALE_EXTRA = {"ignore_eos": True}
WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point number "
         "group problem fact river garden music window story ocean forest letter mountain").split()


# Mistral-7B-v0.3's config.json fields (its vocabulary is the v3 tokenizer's 32,768).
MISTRAL_7B_V03 = dict(vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, sliding_window=None, max_position_embeddings=32768,
                      rope_theta=1e6, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)


def random_mistral(folder: str, layers: int) -> None:
    """A checkpoint folder at Mistral-7B-v0.3's shape (`layers` of them), random bfloat16 weights, a real tokenizer
    with Mistral-7B-Instruct-v0.3's chat template (for --chat)."""
    import importlib.util

    import torch

    from maestrale import AutoTokenizer, MistralConfig, MistralForCausalLM

    data = Path(importlib.util.find_spec("mistral_common").submodule_search_locations[0]) / "data"
    tokenizer_dir = tempfile.mkdtemp(prefix="tokenizer-")
    shutil.copy(data / "mistral_instruct_tokenizer_240323.model.v3", Path(tokenizer_dir) / "tokenizer.model")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.chat_template = (SRC.parent / "tests" / "fixtures" / "chat_templates" /
                               "Mistral-7B-Instruct-v0.3.jinja").read_text()
    tokenizer.save_pretrained(folder)
    shutil.rmtree(tokenizer_dir)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # from_config draws N(0, 0.02) weights
        model = MistralForCausalLM.from_config(MistralConfig(**dict(MISTRAL_7B_V03, num_hidden_layers=layers)),
                                               dtype=torch.bfloat16)
    model.save_pretrained(folder)


# Run by transformers' own Python: the folder's tokenizer as transformers serve loads it, and one prompt's text and ids.
TRANSFORMERS_ENCODE = """
import json, sys
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
prompt = sys.argv[2]
if sys.argv[3] == "chat":
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
print(json.dumps([prompt, tokenizer(prompt, add_special_tokens=sys.argv[3] != "chat")["input_ids"]]))
"""


def check_transformers_tokenizer(cli: str, folder: str, prompt: str, chat: bool) -> None:
    """Fail, with transformers' own error, unless the Python of transformers' CLI `cli` loads the folder's tokenizer
    and encodes `prompt` (as a user's message with `chat`) to maestrale's ids; transformers serve would only say
    "Unrecognized processing class" (its AutoProcessor hides why each class failed)."""
    from maestrale import AutoTokenizer

    first = Path(cli).read_text(errors="replace").splitlines()[0] if Path(cli).is_file() else ""
    python = first[2:].strip() if first.startswith("#!") and "python" in first else sys.executable
    done = subprocess.run([python, "-c", TRANSFORMERS_ENCODE, folder, prompt, "chat" if chat else "text"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"transformers ({python}) cannot load the tokenizer of {folder}:\n{done.stderr[-3000:]}")
    text, ids = json.loads(done.stdout.splitlines()[-1])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ours = prompt
    if chat:
        ours = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    our_ids = tokenizer(ours, add_special_tokens=not chat)["input_ids"]
    if (ours, our_ids) != (text, ids):
        raise RuntimeError(f"transformers and maestrale tokenize the prompt of {folder} differently: {text!r} -> "
                           f"{ids[:32]}... against {ours!r} -> {our_ids[:32]}...")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], port: int, env: dict, timeout: float = 600) -> subprocess.Popen:
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{command[0]} exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{command[0]} did not answer /health within {timeout:.0f}s")


def stop(proc: subprocess.Popen, grace: float = 60) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds: transformers serve 5.17 on CUDA went on past 120 s after a run
    whose time limit had cancelled its requests."""
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        print(f"{proc.args[0]} did not exit {grace:.0f} s after SIGTERM: killed", flush=True)
        proc.kill()
        proc.wait()


def workload(count: int, input_mean: int, output_mean: int, seed: int) -> list[tuple[str, int]]:
    """(prompt, max_tokens) pairs, lengths log-normal around the means as ShareGPT's are (sigma ~0.8)."""
    rng = random.Random(seed)

    def length(mean: int) -> int:
        return max(2, min(int(rng.lognormvariate(0, 0.8) * mean / 1.377), 4 * mean))  # 1.377 = e^(0.8^2/2)

    return [(" ".join(rng.choice(WORDS) for _ in range(length(input_mean))), length(output_mean))
            for _ in range(count)]


async def one(client, model: str, prompt: str, max_tokens: int, records: list, extra: dict,
              chat: bool = False) -> None:
    """Stream one completion (with `chat`, a chat completion of the prompt as the user's message) and record (start,
    stamps of the chunks with text, tokens, end), also when cancelled at the time limit."""
    start = time.perf_counter()
    stamps, tokens = [], 0
    kwargs = dict(model=model, max_tokens=max_tokens, temperature=0, stream=True,
                  stream_options={"include_usage": True}, extra_body=extra)
    try:
        if chat:
            stream = await client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **kwargs)
        else:
            stream = await client.completions.create(prompt=prompt, **kwargs)
        async for chunk in stream:
            if chunk.choices and (chunk.choices[0].delta.content if chat else chunk.choices[0].text):
                stamps.append(time.perf_counter())
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    finally:
        records.append((start, stamps, tokens or len(stamps), time.perf_counter()))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


def summary(records: list, wall: float) -> dict:
    """Output tokens/s, requests/s, TTFT and time between tokens (p50/p99; 0 between tokens that arrive together),
    time per output token (p50 of each request's (last - first) / (tokens - 1), as vLLM's TPOT), and the requests in
    flight on average (Little's law: their total time over the wall time)."""
    ttft = [stamps[0] - start for start, stamps, *_ in records if stamps]
    tbt = [b - a for _, stamps, *_ in records for a, b in zip(stamps, stamps[1:])]
    tpot = [(stamps[-1] - stamps[0]) / (n - 1) for _, stamps, n, _ in records if len(stamps) > 1 and n > 1]
    tokens = sum(n for _, _, n, _ in records)
    return {"wall": wall, "tok/s": tokens / wall, "req/s": len(records) / wall, "ttft50": percentile(ttft, 50),
            "ttft99": percentile(ttft, 99), "tbt50": percentile(tbt, 50), "tbt99": percentile(tbt, 99),
            "tpot50": percentile(tpot, 50), "in flight": sum(end - start for start, *_, end in records) / wall}


def server_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds of server process `pid` (Linux): its main thread (the HTTP event loop), its other threads, and its
    child processes (maestrale's engine process)."""
    out = {"main": 0.0, "other": 0.0, "children": 0.0}

    def seconds(stat: Path) -> float:
        fields = stat.read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    for task in Path(f"/proc/{pid}/task").iterdir():
        out["main" if int(task.name) == pid else "other"] += seconds(task / "stat")
        for child in (task / "children").read_text().split():
            out["children"] += sum(seconds(t / "stat") for t in Path(f"/proc/{child}/task").iterdir())
    return out


def server_counters(url: str, pid: int) -> dict[str, float]:
    """maestrale's engine counters from /metrics (name{labels} -> value) and the server's CPU time by thread."""
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    out = {name: float(value) for name, value in (line.rsplit(" ", 1) for line in lines
                                                    if line.startswith("maestrale_engine_"))}
    return {**out, **{f"cpu_{k}": v for k, v in server_cpu_seconds(pid).items()}}


def engine_report(before: dict, after: dict, wall: float) -> str:
    """Where a run's server time went, per engine step: what it computed, its parts, the threads' CPU."""
    d = {k: v - before.get(k, 0.0) for k, v in after.items()}
    work = {k.split('"')[1]: v for k, v in d.items() if k.startswith("maestrale_engine_step_work_total")}
    parts = {k.split('"')[1]: v for k, v in d.items() if k.startswith("maestrale_engine_step_seconds_total")}
    steps = max(work.get("steps", 0), 1)
    per_step = lambda seconds: f"{seconds / steps * 1e3:.1f}"  # noqa: E731
    return (f"  engine: {steps:.0f} steps, {wall / steps * 1e3:.1f} ms each; a step {work.get('decode_rows', 0) / steps:.0f} "
            f"decode rows, {work.get('prefill_rows', 0) / steps:.1f} prefill chunks of {work.get('prefill_tokens', 0) / steps:.0f} "
            f"tokens; ms a step: " + ", ".join(f"{k} {per_step(v)}" for k, v in parts.items()) +
            f", idle {per_step(d.get('maestrale_engine_idle_seconds_total', 0))}; CPU ms a step: engine "
            f"{per_step(d.get('maestrale_engine_thread_cpu_seconds_total', 0))} (its process in all "
            f"{per_step(d['cpu_children'])}), HTTP event loop {per_step(d['cpu_main'])} (the HTTP process's other "
            f"threads {per_step(d['cpu_other'])})")


def connect(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=3600)


async def send_all(url: str, extra: dict, model: str, prompts, rate: float, seed: int, chat: bool = False,
                   time_limit: float | None = None) -> tuple:
    """All prompts, arriving at `rate` requests/s (Poisson), or at once for rate inf, the requests still running
    after `time_limit` seconds cancelled: (records, start, end, this process's CPU seconds, requests finished)."""
    rng, records, tasks = random.Random(seed), [], []
    cpu = time.process_time()
    async with connect(url) as client:
        begin = time.perf_counter()

        async def everything():
            for prompt, max_tokens in prompts:
                tasks.append(asyncio.create_task(one(client, model, prompt, max_tokens, records, extra, chat)))
                if rate != float("inf"):
                    await asyncio.sleep(rng.expovariate(rate))
            await asyncio.gather(*tasks)

        try:
            await asyncio.wait_for(everything(), time_limit)
        except asyncio.TimeoutError:
            pass
        end, finished = time.perf_counter(), sum(t.done() and not t.cancelled() for t in tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return records, begin, end, time.process_time() - cpu, finished


def send_share(*args) -> tuple:
    return asyncio.run(send_all(*args))


def at_rate(url: str, extra: dict, model: str, prompts, rate: float, seed: int, processes: int = 1,
            chat: bool = False, time_limit: float | None = None) -> dict:
    """summary() of send_all() over `processes` client processes, each sending every processes-th prompt at
    rate / processes (together a Poisson stream at `rate`), so the clients' own CPU time (the openai client parses
    each chunk in Python) does not cap what is measured. perf_counter is CLOCK_MONOTONIC on Linux, one clock for
    all processes."""
    shares = [(url, extra, model, prompts[i::processes], rate / processes, seed + i, chat, time_limit)
              for i in range(processes)]
    if processes == 1:
        parts = [send_share(*shares[0])]
    else:
        with concurrent.futures.ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = list(pool.map(send_share, *zip(*shares)))
    wall = max(end for _, _, end, _, _ in parts) - min(begin for _, begin, *_ in parts)
    out = summary([r for records, *_ in parts for r in records], wall)
    finished = sum(finished for *_, finished in parts)
    return {**out, "req/s": finished / wall, "client cpu": sum(cpu for *_, cpu, _ in parts) / wall / processes,
            "finished": finished}


async def clients(url: str, model: str, count: int, requests_each: int, max_tokens: int) -> dict:
    """summary() of `count` clients, each sending `requests_each` requests one after the other."""
    records = []
    async with connect(url) as client:
        async def loop(i: int):
            for j in range(requests_each):
                prompt = f"{WORDS[i % len(WORDS)]} {WORDS[j % len(WORDS)]} story"
                await one(client, model, prompt, max_tokens, records, MAESTRALE_EXTRA)

        begin = time.perf_counter()
        await asyncio.gather(*(loop(i) for i in range(count)))
        return summary(records, time.perf_counter() - begin)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="hub id, folder or .gguf (default: the SmolLM2 GGUF)")
    parser.add_argument("--random-model", action="store_true", help="Mistral-7B-v0.3's shape, random weights")
    parser.add_argument("--random-layers", type=int, default=32, help="layers of --random-model")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-mean", type=int, default=48, help="mean prompt length in words")
    parser.add_argument("--output-mean", type=int, default=32, help="mean output length in tokens")
    parser.add_argument("--rates", default="inf,2", help="request rates per second, comma-separated; inf = at once")
    parser.add_argument("--clients-max-tokens", type=int, default=32)
    parser.add_argument("--client-processes", type=int, default=1, help="load-generator processes for the rate "
                        "runs (each openai client chunk costs ~0.1-0.2 ms of a client's CPU: one process tops out "
                        "at a few thousand tokens/s)")
    parser.add_argument("--compare-transformers", action="store_true", help="also run transformers serve")
    parser.add_argument("--server-args", default="", help="extra options for maestrale serve")
    parser.add_argument("--chat", action="store_true", help="send each prompt as a user's message to "
                        "/v1/chat/completions instead of /v1/completions")
    parser.add_argument("--time-limit", type=float, help="cancel what a rate run still has running after this many "
                        "seconds and count the tokens that came by then (bounds transformers serve's runs)")
    args = parser.parse_args()

    sys.path.insert(0, str(SRC))
    from maestrale.cli import default_model

    source = args.model or (None if args.random_model else default_model())
    name = f"random Mistral-7B-v0.3 shape, {args.random_layers} layers" if args.random_model else source
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    prompts = workload(args.num_prompts, args.input_mean, args.output_mean, seed=0)
    rates = [float(r) for r in args.rates.split(",")]
    folder = None
    if args.random_model:
        folder = source = tempfile.mkdtemp(prefix="serve-bench-")
        random_mistral(folder, args.random_layers)
    elif args.compare_transformers and source.endswith(".gguf"):
        # The same weights, dequantized, as a folder with its tokenizer, which both servers load.
        from maestrale import AutoTokenizer
        from maestrale.loading import convert_gguf

        folder = tempfile.mkdtemp(prefix="serve-bench-")
        convert_gguf(source, folder)
        AutoTokenizer.from_pretrained(os.path.dirname(source), gguf_file=os.path.basename(source)).save_pretrained(folder)
        source = folder
    served = source
    servers = {"maestrale": lambda port: [sys.executable, "-m", "maestrale", "serve", "--model", served, "--dtype",
                                          args.dtype, "--port", str(port), *args.server_args.split()]}
    if args.compare_transformers:
        transformers_cli = shutil.which("transformers") or str(Path(sys.executable).with_name("transformers"))
        servers["transformers"] = lambda port: [transformers_cli, "serve", "--continuous-batching", "--device",
                                                "cpu" if "cuda" not in args.server_args else "auto", "--dtype",
                                                args.dtype, "--port", str(port), "--host", "127.0.0.1", served]
        check_transformers_tokenizer(transformers_cli, served, prompts[0][0], args.chat)

    print(f"model {name}, {args.dtype}; {args.num_prompts} prompts, mean {args.input_mean} words in, "
          f"{args.output_mean} tokens out; load average {os.getloadavg()[0]:.2f}")
    results = {}
    for name, command in servers.items():
        port = free_port()
        proc = start(command(port), port, env)
        url = f"http://127.0.0.1:{port}"
        # transformers serve answers only for the model it was started on, under that name; before 5.24 its
        # /v1/models listed the HuggingFace cache instead (a 500 where there is none, else other models).
        model = served if name == "transformers" else httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        try:
            extra = MAESTRALE_EXTRA if name == "maestrale" else {}
            if not args.chat:
                probe = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 1},
                                   timeout=600)
                if probe.status_code == 404:
                    raise RuntimeError(f"{name} serve has no /v1/completions (404): run with --chat")
            at_rate(url, extra, model, prompts[:2], float("inf"), 0, chat=args.chat)  # warm-up
            for rate in rates:
                before = server_counters(url, proc.pid) if name == "maestrale" else None
                results[name, rate] = at_rate(url, extra, model, prompts, rate, 1, args.client_processes, args.chat,
                                              args.time_limit)
                r = results[name, rate]
                cut = "" if r["finished"] == len(prompts) else f", time limit: {r['finished']} of {len(prompts)} done"
                print(f"{name:12} rate {rate:>4}: {r['tok/s']:8.1f} output tok/s {r['req/s']:6.2f} req/s  "
                      f"TTFT p50 {r['ttft50'] * 1e3:7.0f} ms p99 {r['ttft99'] * 1e3:7.0f} ms  "
                      f"TBT p50 {r['tbt50'] * 1e3:6.1f} ms p99 {r['tbt99'] * 1e3:6.0f} ms  "
                      f"TPOT p50 {r['tpot50'] * 1e3:6.1f} ms  in flight {r['in flight']:.1f}  "
                      f"(client processes busy {r['client cpu']:.0%}{cut})", flush=True)
                if before is not None:
                    print(engine_report(before, server_counters(url, proc.pid), r["wall"]), flush=True)
            if name == "maestrale":
                single = asyncio.run(clients(url, model, 1, 4, args.clients_max_tokens))
                many = asyncio.run(clients(url, model, 16, 2, args.clients_max_tokens))
                # One client's tok/s counts each request's time to first token; its TBT is the decode step alone.
                print(f"maestrale    1 client {single['tok/s']:.1f} output tok/s (TTFT p50 {single['ttft50'] * 1e3:.0f} "
                      f"ms, TBT p50 {single['tbt50'] * 1e3:.1f} ms), 16 clients {many['tok/s']:.1f}: "
                      f"{many['tok/s'] / single['tok/s']:.2f}x (load average {os.getloadavg()[0]:.2f})", flush=True)
        finally:
            stop(proc)
    for rate in rates:
        if ("transformers", rate) in results:
            ratio = results["maestrale", rate]["tok/s"] / results["transformers", rate]["tok/s"]
            print(f"rate {rate}: maestrale / transformers output tok/s = {ratio:.2f}x")
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
