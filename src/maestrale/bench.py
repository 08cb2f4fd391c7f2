"""`maestrale bench`: prefill and decode throughput and peak memory, optionally beside transformers.

Each library is measured in a fresh process, so peak memory is its own and neither warms the other's caches.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import resource
import time
from concurrent.futures import ProcessPoolExecutor

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def measure(model, batch_size: int, prompt_length: int, new_tokens: int) -> dict[str, float]:
    """Prefill tokens/s, decode tokens/s (greedy, exactly `new_tokens` tokens) and peak memory of one model."""
    device = model.device
    ids = torch.randint(3, model.config.vocab_size, (batch_size, prompt_length), device=device)
    mask = torch.ones_like(ids)

    def generate(length: int, tokens: int):
        return model.generate(ids[:, :length], attention_mask=mask[:, :length], do_sample=False,
                              max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=0)

    with torch.inference_mode():
        generate(8, 4)  # warm-up
        _sync(device)
        start = time.perf_counter()
        model(ids, attention_mask=mask)
        _sync(device)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        generate(prompt_length, new_tokens)
        _sync(device)
        total = time.perf_counter() - start
    return {"prefill_tok_s": batch_size * prompt_length / prefill,
            "decode_tok_s": batch_size * new_tokens / max(total - prefill, 1e-9),
            "peak_gib": _peak_memory_gib(device)}


def _load(library: str, source: str, device: str, dtype: str):
    """The model of `source` in `library` ("maestrale" or "transformers") on `device`."""
    if library == "maestrale":
        from .cli import load

        return load(source, device, dtype)[0]
    from .cli import CliError

    try:
        transformers = importlib.import_module("transformers")  # the reference, never a dependency of maestrale
    except ImportError:
        raise CliError("--compare-transformers needs transformers; install it with `pip install transformers`") \
            from None
    folder, kwargs = source, {}
    if source.endswith(".gguf"):
        folder, kwargs["gguf_file"] = os.path.split(os.path.abspath(source))
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype), **kwargs)
    return model.to(device).eval()


def _measure_library(library: str, source: str, device: str, dtype: str, sizes: list[int], prompt_length: int,
                     new_tokens: int) -> tuple[str, dict[int, dict[str, float]]]:
    model = _load(library, source, device, dtype)
    resolved = str(model.dtype).removeprefix("torch.")
    return resolved, {b: measure(model, b, prompt_length, new_tokens) for b in sizes}


def run_bench(args) -> None:
    from .cli import CliError, default_model, pick_device

    source = args.model or default_model()
    device = pick_device(args.device)
    try:
        sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise CliError(f"--batch-sizes must be positive integers separated by commas, got {args.batch_sizes!r}")
    if args.prompt_length < 8 or args.new_tokens < 1:
        raise CliError("--prompt-length must be >= 8 and --new-tokens >= 1")
    libraries = ["maestrale", "transformers"] if args.compare_transformers else ["maestrale"]
    rows, dtype = {}, args.dtype
    for library in libraries:
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            # transformers runs in the dtype maestrale resolved, so "auto" means the same for both
            dtype, rows[library] = pool.submit(_measure_library, library, source, device, dtype, sizes,
                                               args.prompt_length, args.new_tokens).result()
    print(f"model {source}\ndevice {device}  dtype {dtype}  prompt {args.prompt_length} tokens  "
          f"new {args.new_tokens} tokens  torch {torch.__version__}")
    print(f"{'library':<13} {'batch':>5} {'prefill tok/s':>14} {'decode tok/s':>13} {'peak GiB':>9}")
    for library, results in rows.items():
        for b, r in results.items():
            print(f"{library:<13} {b:>5} {r['prefill_tok_s']:>14.1f} {r['decode_tok_s']:>13.1f} {r['peak_gib']:>9.2f}")
    if "transformers" in rows:
        for b in sizes:
            ours, ref = rows["maestrale"][b], rows["transformers"][b]
            print(f"ratio maestrale/transformers, batch {b}: prefill {ours['prefill_tok_s'] / ref['prefill_tok_s']:.2f}x"
                  f"  decode {ours['decode_tok_s'] / ref['decode_tok_s']:.2f}x")
