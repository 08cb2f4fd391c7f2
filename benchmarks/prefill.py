"""Long-prompt prefill on one GPU, bfloat16, same random weights at the real shapes: maestrale (sdpa and
flash_attention_2) beside transformers' sdpa, in one run.

    python3 benchmarks/prefill.py [--cases mistral-7b:4096,32768 ministral-8b:4096,32768,131072] [--repeats 2]
                                  [--skip-hf-above 32768] [--chunk 2048] [--profile]

Prefill time is the time to the first token: generate(prompt, max_new_tokens=1), batch 1, best of --repeats after a
warm-up at the same length (one timed run above 32,768 tokens). Achieved TFLOP/s counts the useful work, the same for both libraries: 2 FLOPs per weight
of every layer's products per token, and 4 * heads * head_dim per attended (query, key) pair, causal and within the
window (Ministral-8B: full attention every fourth layer, a 32,768 window elsewhere). The matrix rate is that of a
bfloat16 8192 x 8192 x 8192 product on the same device. Peak memory is torch's peak allocation during the prefill.
maestrale chunks a prompt longer than a sliding window (--chunk tokens a forward); transformers runs it in one
forward, so its mask grows with the square of the prompt: an out-of-memory there is reported as such.
--profile prints, for each length, the kernels of one maestrale flash_attention_2 prefill by GPU time.
"""

from __future__ import annotations

import argparse
import gc
import traceback

import torch

from gpu import MODELS, sync_time


def matmul_rate() -> float:
    """FLOP/s of a bfloat16 8192^3 product (median of 20)."""
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    a @ b
    times = sorted(sync_time(lambda: a @ b) for _ in range(20))
    return 2 * 8192**3 / times[10]


def prefill_flops(config, tokens: int) -> float:
    heads, head_dim = config.num_attention_heads, config.resolved_head_dim
    kv = config.num_key_value_heads * head_dim
    per_layer = config.hidden_size * (heads * head_dim + 2 * kv) + heads * head_dim * config.hidden_size
    per_layer += 3 * config.hidden_size * config.intermediate_size
    flops = 2.0 * tokens * per_layer * config.num_hidden_layers
    for kind in config.attention_layer_types:
        window = config.sliding_window if kind == "sliding_attention" else None
        if window is None or window >= tokens:
            pairs = tokens * (tokens + 1) / 2
        else:  # the first `window` queries see all before them, the rest `window` keys each
            pairs = window * (window + 1) / 2 + (tokens - window) * window
        flops += 4.0 * heads * head_dim * pairs
    return flops


def time_prefill(model, tokens: int, repeats: int, **generate_kwargs) -> tuple[float, float] | str:
    """(best seconds, peak GiB), or why there is none."""
    prompt = torch.randint(3, model.config.vocab_size, (1, tokens), device="cuda",
                           generator=torch.Generator("cuda").manual_seed(0))
    run = lambda: model.generate(prompt, max_new_tokens=1, do_sample=False, **generate_kwargs)  # noqa: E731
    try:
        run()  # warm-up: kernels compiled and loaded, caches allocated once
        torch.cuda.reset_peak_memory_stats()
        best = min(sync_time(run) for _ in range(repeats))
        return best, torch.cuda.max_memory_allocated() / 2**30
    except torch.OutOfMemoryError:
        return "out of memory"
    except Exception as error:  # noqa: BLE001 -- reported in the table; the other contenders still run
        traceback.print_exc()
        return f"failed: {type(error).__name__}"
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def profile_prefill(model, tokens: int) -> None:
    """The 25 costliest kernels of one prefill, by GPU time."""
    from torch.profiler import ProfilerActivity, profile

    prompt = torch.randint(3, model.config.vocab_size, (1, tokens), device="cuda")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model.generate(prompt, max_new_tokens=1, do_sample=False)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))


def build(library, family: str, fields: dict):
    config = getattr(library, f"{family}Config")(**fields)
    model_class = getattr(library, f"{family}ForCausalLM")
    make = model_class._from_config if library.__name__ == "transformers" else model_class.from_config
    with torch.device("cuda"):
        return make(config, dtype=torch.bfloat16).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["mistral-7b:4096,32768", "ministral-8b:4096,32768,131072"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-hf-above", type=int, default=None, help="skip transformers above this many tokens")
    parser.add_argument("--chunk", type=int, default=None, help="maestrale's prefill_chunk_size (default: automatic)")
    parser.add_argument("--profile", action="store_true", help="print one flash_attention_2 prefill's kernels")
    args = parser.parse_args()

    import transformers

    import maestrale

    rate = matmul_rate()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"maestrale {maestrale.__version__}; bfloat16 matrix rate {rate / 1e12:.0f} TFLOP/s")
    print(f"{'model':<14}{'tokens':>8}  {'library':<34}{'prefill s':>10}{'TFLOP/s':>9}{'of matmul':>10}"
          f"{'peak GiB':>9}{'speed-up':>9}")
    for case in args.cases:
        name, lengths = case.split(":")
        lengths = [int(n) for n in lengths.split(",")]
        family, fields = MODELS[name]
        fields = dict(fields, eos_token_id=None, pad_token_id=0,
                      max_position_embeddings=max(fields["max_position_embeddings"], max(lengths)))
        torch.manual_seed(0)
        ours = build(maestrale, family, fields)
        hf = build(transformers, family, fields)
        hf.load_state_dict(ours.state_dict())
        for tokens in lengths:
            flops, repeats = prefill_flops(ours.config, tokens), args.repeats if tokens <= 32768 else 1
            results = {}
            for backend in ("sdpa", "flash_attention_2"):
                ours.set_attn_implementation(backend)
                results[f"maestrale {backend}"] = time_prefill(ours, tokens, repeats,
                                                               prefill_chunk_size=args.chunk)
            if args.skip_hf_above is None or tokens <= args.skip_hf_above:
                results["transformers sdpa"] = time_prefill(hf, tokens, repeats)
            if args.profile:
                profile_prefill(ours, tokens)
            reference = results.get("transformers sdpa")
            for library, result in results.items():
                if isinstance(result, str):
                    print(f"{name:<14}{tokens:>8}  {library:<34}{result:>10}")
                    continue
                seconds, peak = result
                ratio = f"{reference[0] / seconds:.2f}x" if isinstance(reference, tuple) else "-"
                print(f"{name:<14}{tokens:>8}  {library:<34}{seconds:>10.3f}{flops / seconds / 1e12:>9.0f}"
                      f"{flops / seconds / rate:>10.0%}{peak:>9.1f}{ratio:>9}", flush=True)
        del ours, hf
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
