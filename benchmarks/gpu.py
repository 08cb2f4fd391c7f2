"""GPU decode speed of maestrale and transformers, same random weights at real shapes, one run.

    python benchmarks/gpu.py [--models mistral-7b ministral-8b phi3-mini-4k phi3-mini-128k mixtral-8x7b]
                             [--mixtral-layers 8] [--new-tokens 128] [--hf-static] [--long-generation 32752]

For each model, bfloat16, both libraries with the same weights: batch-1 decode tokens/s after a 512-token prompt,
time to first token for 512- and 4096-token prompts, batch-32 decode tokens/s, peak GPU memory. Decode tokens/s
excludes the prompt: (time for N new tokens - time for 1) over N - 1 steps, median of 3 after a warm-up. transformers
runs its default (dynamic cache, SDPA) and, with --hf-static, its static cache with automatic torch.compile.
The roofline is the bytes one decode step must read (every weight but the embedding table; for Mixtral only the
experts a token uses) over the device's measured copy bandwidth; each batch-1 result is shown as a fraction of it.
--long-generation N generates N tokens with Mistral-7B's 4096 window (2 layers, to be quick) and prints the cache bytes.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import statistics
import time

import torch

# Real shapes (from the models' config.json files); weights are random.
MISTRAL_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, sliding_window=4096, max_position_embeddings=32768,
                  rope_theta=10000.0, rms_norm_eps=1e-5)
PHI3_MINI = dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5, rope_theta=10000.0)
MODELS = {
    "mistral-7b": ("Mistral", MISTRAL_7B),
    "ministral-8b": ("Ministral", dict(
        vocab_size=131072, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, sliding_window=32768, max_position_embeddings=32768, rope_theta=1e8,
        layer_types=["full_attention" if i % 4 == 0 else "sliding_attention" for i in range(36)])),
    "phi3-mini-4k": ("Phi3", dict(PHI3_MINI, max_position_embeddings=4096, original_max_position_embeddings=4096,
                                  sliding_window=2047)),
    "phi3-mini-128k": ("Phi3", dict(PHI3_MINI, max_position_embeddings=131072, original_max_position_embeddings=4096,
                                    sliding_window=None, rope_scaling={
                                        "type": "longrope", "short_factor": [1.0 + i / 48 for i in range(48)],
                                        "long_factor": [1.0 + i for i in range(48)]})),
    "mixtral-8x7b": ("Mixtral", dict(MISTRAL_7B, sliding_window=None, rope_theta=1e6, num_local_experts=8,
                                     num_experts_per_tok=2)),
}
PROMPT, BATCH = 512, 32


def sync_time(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def copy_bandwidth() -> float:
    """Bytes read plus written per second by a 2 GiB device-to-device copy (median of 10)."""
    src = torch.randn(2**29, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = [sync_time(lambda: dst.copy_(src)) for _ in range(10)]
    return 2 * src.numel() * 4 / statistics.median(times)


def step_bytes(model, batch: int = 1) -> int:
    """Weight bytes one decode step reads: all but the embedding table; of the experts, those a token uses."""
    config, total = model.config, 0
    embed = model.get_input_embeddings().weight
    for name, p in model.named_parameters():
        if p is embed and not config.tie_word_embeddings:
            continue
        size = p.numel() * p.element_size()
        if ".experts." in name:
            size = size * min(1.0, batch * config.num_experts_per_tok / config.num_local_experts)
        total += size
    return int(total)


def build(name: str, mixtral_layers: int):
    import transformers

    import maestrale

    family, fields = MODELS[name]
    fields = dict(fields, **({"num_hidden_layers": mixtral_layers} if family == "Mixtral" else {}),
                  eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = getattr(transformers, f"{family}ForCausalLM")._from_config(
            getattr(transformers, f"{family}Config")(**fields), dtype=torch.bfloat16).eval()
        ours = getattr(maestrale, f"{family}ForCausalLM").from_config(
            getattr(maestrale, f"{family}Config")(**fields), dtype=torch.bfloat16).eval()
    ours.load_state_dict(hf.state_dict())
    return hf, ours


def measure(model, vocab: int, new_tokens: int, **generate_kwargs) -> dict:
    """TTFT (512, 4096), batch-1 and batch-32 decode tokens/s, peak memory over the weights' bytes."""
    g = torch.Generator(device="cuda").manual_seed(1)
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0, **generate_kwargs)
    result = {}
    for prompt_len in (PROMPT, 4096):
        ids = torch.randint(3, vocab, (1, prompt_len), device="cuda", generator=g)
        model.generate(ids, max_new_tokens=1, **kwargs)
        result[f"ttft_{prompt_len}"] = statistics.median(
            sync_time(lambda: model.generate(ids, max_new_tokens=1, **kwargs)) for _ in range(3))
    for batch in (1, BATCH):
        ids = torch.randint(3, vocab, (batch, PROMPT), device="cuda", generator=g)
        model.generate(ids, max_new_tokens=new_tokens, **kwargs)  # warm-up: compiles and captures where it does
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated()
        first = statistics.median(sync_time(lambda: model.generate(ids, max_new_tokens=1, **kwargs)) for _ in range(3))
        full = statistics.median(
            sync_time(lambda: model.generate(ids, max_new_tokens=new_tokens, **kwargs)) for _ in range(3))
        result[f"decode_{batch}"] = batch * (new_tokens - 1) / (full - first)
        result[f"extra_memory_{batch}"] = torch.cuda.max_memory_allocated() - resident
    return result


def profile_step(model, vocab: int) -> None:
    """GPU time of one decode step by kernel (the step run eagerly, as captured), for finding where time goes."""
    ids = torch.randint(3, vocab, (1, PROMPT), device="cuda")
    model.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=None)
    decoder = model._static_decoder
    decoder._step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        decoder._step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.device_time_total for e in events)
    print(f"  one step: {total / 1e3:.2f} ms of kernels, {sum(e.count for e in events)} launches")
    for e in sorted(events, key=lambda e: -e.device_time_total)[:12]:
        print(f"    {e.device_time_total / 1e3:7.3f} ms {e.count:5d}x  {e.key[:90]}")


def long_generation(tokens: int) -> None:
    import maestrale

    config = maestrale.MistralConfig(**dict(MISTRAL_7B, num_hidden_layers=2, eos_token_id=None))
    with torch.device("cuda"):
        model = maestrale.MistralForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    ids = torch.randint(3, 32000, (1, 16), device="cuda")
    seconds = sync_time(lambda: model.generate(ids, max_new_tokens=tokens, do_sample=False))
    decoder = model._static_decoder
    window_bytes = 2 * 2 * config.num_key_value_heads * config.head_dim * config.sliding_window * 2
    print(f"long generation: {tokens} tokens with window {config.sliding_window} (Mistral-7B shapes, 2 layers) in "
          f"{seconds:.1f} s; KV cache {decoder.cache_bytes():,} bytes = 2 layers x window "
          f"({window_bytes:,}); cache lengths {[k.shape[2] for k in decoder.k_cache]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--mixtral-layers", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--hf-static", action="store_true", help="also run transformers' static cache + compile")
    parser.add_argument("--skip-hf", action="store_true", help="maestrale alone")
    parser.add_argument("--long-generation", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="print one maestrale decode step's kernels")
    args = parser.parse_args()
    transformers = importlib.import_module("transformers")
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, transformers {transformers.__version__}; "
          f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; bfloat16, prompt {PROMPT}, {args.new_tokens} new tokens")
    rows = []
    for name in args.models:
        hf, ours = build(name, args.mixtral_layers)
        roofline = bandwidth / step_bytes(ours)
        vocab = ours.config.vocab_size
        runs = {"maestrale": (ours, {})}
        if not args.skip_hf:
            runs["transformers"] = (hf, {})
            if args.hf_static:
                runs["transformers static+compile"] = (hf, {"cache_implementation": "static"})
        weights = sum(p.numel() * p.element_size() for p in ours.parameters())
        if args.profile:
            profile_step(ours, vocab)
        for label, (model, extra) in runs.items():
            r = measure(model, vocab, args.new_tokens, **extra)
            rows.append((name, label, r, roofline, weights))
            print(f"  {name:15} {label:28} b1 {r['decode_1']:7.1f} tok/s ({r['decode_1'] / roofline:5.1%} of "
                  f"{roofline:.0f})  b32 {r['decode_32']:7.0f} tok/s  TTFT512 {r['ttft_512'] * 1e3:6.1f} ms  "
                  f"TTFT4096 {r['ttft_4096'] * 1e3:6.1f} ms  peak {(weights + r['extra_memory_32']) / 2**30:5.1f} GiB",
                  flush=True)
        del hf, ours, runs
        gc.collect()  # the static decoder and the model refer to each other
        torch.cuda.empty_cache()
    if args.long_generation:
        long_generation(args.long_generation)
    print("\n| model | library | batch-1 tok/s | roofline tok/s | fraction | batch-32 tok/s | TTFT 512 ms | "
          "TTFT 4096 ms | peak GiB (b1 / b32) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, label, r, roofline, weights in rows:
        print(f"| {name} | {label} | {r['decode_1']:.1f} | {roofline:.0f} | {r['decode_1'] / roofline:.1%} | "
              f"{r['decode_32']:.0f} | {r['ttft_512'] * 1e3:.1f} | {r['ttft_4096'] * 1e3:.1f} | "
              f"{(weights + r['extra_memory_1']) / 2**30:.1f} / {(weights + r['extra_memory_32']) / 2**30:.1f} |")


if __name__ == "__main__":
    main()
