"""GPU decode speed of maestrale and transformers, same random weights at real shapes, one run.

    python benchmarks/gpu.py [--models mistral-7b ministral-8b phi3-mini-4k phi3-mini-128k mixtral-8x7b]
                             [--mixtral-layers 8] [--new-tokens 128] [--hf-static] [--long-generation 32752]
                             [--quant bf16 int8 int4-g32 int4-g64 int4-g128]

For each model, bfloat16, both libraries with the same weights: batch-1 decode tokens/s after a 512-token prompt,
time to first token for 512- and 4096-token prompts, batch-32 decode tokens/s, peak GPU memory. Decode tokens/s
excludes the prompt: (time for N new tokens - time for 1) over N - 1 steps, median of 3 after a warm-up. transformers
runs its default (dynamic cache, SDPA) and, with --hf-static, its static cache with automatic torch.compile.
The roofline is the bytes one decode step must read (every weight but the embedding table; for Mixtral only the
experts a token uses) over the device's measured copy bandwidth; each batch-1 result is shown as a fraction of it.
--long-generation N generates N tokens with Mistral-7B's 4096 window (2 layers, to be quick) and prints the cache bytes.

Both libraries get the same weights without a copy between them: each parameter is drawn from a generator seeded by
its name (the libraries' state dicts share names and shapes). One model is in memory at a time (Mixtral-8x7B whole,
87 GiB, fits one H200). --quant adds weight-only rows: the bfloat16 model is saved to a temporary folder and loaded
again with quantization_config=TorchAoConfig(Int8WeightOnlyConfig() or Int4WeightOnlyConfig(group_size=G)), by each
library with its own TorchAoConfig, as a user would (torchao needed; a failure on transformers' side is printed and the
run goes on). Mixtral's config is FqnToConfig({"_default": that, "re:.*\\.experts": that}), which quantizes its
experts too; where the checkpoint would not fit the disk (Mixtral-8x7B whole), the built model is quantized in memory
by the same steps (quantize_in_memory). A quantized row's roofline counts maestrale's packed bytes; "x bf16" is a row's
batch-1 speed over maestrale's bfloat16 one.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import shutil
import statistics
import tempfile
import time
import traceback
import zlib

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
QUANTS = ["bf16", "int8", "int4-g32", "int4-g64", "int4-g128"]
EXPERTS = r"re:.*\.experts"  # FqnToConfig's key for the stacked experts of every layer


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
    """Weight bytes one decode step reads: all but the embedding table; of the experts, those a token uses (packed
    weights, which are buffers, by their packed bytes)."""
    config, total = model.config, 0
    embed = model.get_input_embeddings().weight
    for name, p in [*model.named_parameters(), *model.named_buffers()]:
        if (p is embed and not config.tie_word_embeddings) or "rotary" in name:
            continue
        size = p.numel() * p.element_size()
        if ".experts." in name:
            size = size * min(1.0, batch * config.num_experts_per_tok / config.num_local_experts)
        total += size
    return int(total)


def fields_of(name: str, mixtral_layers: int) -> tuple[str, dict]:
    family, fields = MODELS[name]
    return family, dict(fields, **({"num_hidden_layers": mixtral_layers} if family == "Mixtral" else {}),
                        eos_token_id=None, pad_token_id=0)


def build(library, name: str, mixtral_layers: int):
    """`library`'s model (maestrale or transformers) of `name` on the GPU in bfloat16, each parameter drawn from a
    generator seeded by its name: norms 1, the rest normal(0, 0.02)."""
    family, fields = fields_of(name, mixtral_layers)
    config = getattr(library, f"{family}Config")(**fields)
    model_class = getattr(library, f"{family}ForCausalLM")
    make = model_class._from_config if library.__name__ == "transformers" else model_class.from_config
    with torch.device("cuda"):
        model = make(config, dtype=torch.bfloat16).eval()
    g = torch.Generator(device="cuda")
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=g.manual_seed(zlib.crc32(pname.encode())))
    return model


def quant_config(library, quant: str, moe: bool):
    """`library`'s TorchAoConfig for `quant` (int8, int4-gG); for a mixture of experts, FqnToConfig also reaching the
    stacked experts (a plain config leaves them in bfloat16, in both libraries)."""
    from torchao.quantization import FqnToConfig, Int4WeightOnlyConfig, Int8WeightOnlyConfig

    # int4 in torchao's tinygemm packing (torch's own kernel): its default, "plain", needs the mslk package, which
    # PyPI holds only as an empty placeholder. maestrale quantizes the same either way (it keeps its own layout).
    rule = Int8WeightOnlyConfig() if quant == "int8" else Int4WeightOnlyConfig(
        group_size=int(quant.split("-g")[1]), int4_packing_format="tile_packed_to_4d")
    return library.TorchAoConfig(FqnToConfig({"_default": rule, EXPERTS: rule}) if moe else rule)


def load_quantized(library, folder: str, quant: str, moe: bool):
    """`library`'s model from `folder`, quantized on load with its own TorchAoConfig for `quant`."""
    return library.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.bfloat16, device_map="cuda", quantization_config=quant_config(library, quant, moe)).eval()


def quantize_in_memory(library, model, quant: str, moe: bool):
    """The bfloat16 `model` quantized in place by the steps its library's from_pretrained takes with the same
    TorchAoConfig, each weight as it would stream in, for a model whose checkpoint the disk cannot hold: maestrale's
    loader fed the model's own tensors; transformers' quantize_ per module (its linear layers; the experts' 3-D
    weights through FqnToConfig of their names)."""
    config = quant_config(library, quant, moe)
    if library.__name__ == "maestrale":
        from maestrale.quantization.load import WeightOnlyLoad

        params = dict(model.named_parameters())
        load = WeightOnlyLoad(model, config, {"": torch.device("cuda")}, [])
        for param in [*load.linears, *load.experts]:
            load.take(param, (), params.pop(param).detach())
        load.finish("the model in memory")
        return model
    from torchao.quantization import FqnToConfig, quantize_

    rule = config.quant_type.fqn_to_config["_default"] if moe else config.quant_type
    head = model.get_output_embeddings()
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and module is not head:
            quantize_(module, rule)
        elif moe and name.endswith(".experts"):
            quantize_(module, FqnToConfig({"gate_up_proj": rule, "down_proj": rule}), filter_fn=None)
    return model


def free() -> None:
    gc.collect()  # the static decoder and the model refer to each other
    torch.cuda.empty_cache()


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


def profile_step(model, vocab: int, batch: int) -> None:
    """GPU time of one decode step of `batch` rows by kernel (the step run eagerly, as captured), for finding where
    time goes."""
    ids = torch.randint(3, vocab, (batch, PROMPT), device="cuda")
    model.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=None)
    decoder = model._static_decoder
    # as generate() runs it (no autograd), within the decoder's compile budget (its parts' code is shared by models)
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=64):
        decoder._step()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            decoder._step()
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.device_time_total for e in events)
    print(f"  one step of {batch} rows: {total / 1e3:.2f} ms of kernels, {sum(e.count for e in events)} launches")
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
    parser.add_argument("--profile", action="store_true",
                        help="print one maestrale decode step's kernels, at batch 1 and 32")
    parser.add_argument("--quant", nargs="+", default=["bf16"], choices=QUANTS,
                        help="weights: bfloat16 and/or weight-only int8 / int4 (group size) through TorchAoConfig")
    args = parser.parse_args()
    transformers = importlib.import_module("transformers")
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, transformers {transformers.__version__}; "
          f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; prompt {PROMPT}, {args.new_tokens} new tokens")
    rows = []
    maestrale = importlib.import_module("maestrale")
    for name in args.models:
        bf16_speed, rooflines = None, {}

        def run(label, quant, make, extra=None):
            """Build a model, measure it, print its row, free it; a failure on transformers' side is printed. Both
            libraries' rows of one quantization share maestrale's roofline (torchao's tensors report their logical
            size, not their packed bytes)."""
            nonlocal bf16_speed
            try:
                model = make()
                roofline = rooflines.setdefault(quant, bandwidth / step_bytes(model))
                weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
                if args.profile and label.startswith("maestrale"):
                    for batch in (1, BATCH):
                        profile_step(model, model.config.vocab_size, batch)
                r = measure(model, model.config.vocab_size, args.new_tokens, **(extra or {}))
            except Exception:
                if label.startswith("maestrale"):
                    raise
                print(f"  {name:15} {label:34} failed:\n{traceback.format_exc(limit=-4)}", flush=True)
                return
            finally:
                model = None
                free()
            if label == "maestrale bf16":
                bf16_speed = r["decode_1"]
            speedup = f" {r['decode_1'] / bf16_speed:4.2f}x bf16" if bf16_speed else ""
            rows.append((name, label, r, roofline, weights))
            print(f"  {name:15} {label:34} b1 {r['decode_1']:7.1f} tok/s ({r['decode_1'] / roofline:5.1%} of "
                  f"{roofline:.0f}){speedup}  b32 {r['decode_32']:7.0f} tok/s  TTFT512 {r['ttft_512'] * 1e3:6.1f} ms  "
                  f"TTFT4096 {r['ttft_4096'] * 1e3:6.1f} ms  peak {(weights + r['extra_memory_32']) / 2**30:5.1f} GiB",
                  flush=True)

        def runs(quant, make):
            run(f"maestrale {quant}", quant, lambda: make(maestrale))
            if not args.skip_hf:
                run(f"transformers {quant}", quant, lambda: make(transformers))
                if args.hf_static:
                    run(f"transformers {quant} static+compile", quant, lambda: make(transformers),
                        {"cache_implementation": "static"})

        if "bf16" in args.quant:
            runs("bf16", lambda library: build(library, name, args.mixtral_layers))
        quants = [q for q in QUANTS[1:] if q in args.quant]
        moe = MODELS[name][0] == "Mixtral"
        if quants:
            with tempfile.TemporaryDirectory() as folder:
                model = build(maestrale, name, args.mixtral_layers)
                checkpoint = sum(p.numel() * p.element_size() for p in model.parameters())
                on_disk = checkpoint < 0.9 * shutil.disk_usage(folder).free
                if on_disk:
                    model.save_pretrained(folder)
                else:
                    print(f"  {name}: its {checkpoint / 2**30:.0f} GiB checkpoint does not fit the disk: the quantized "
                          "rows quantize the built bfloat16 model in memory (quantize_in_memory)", flush=True)
                model = None
                free()
                for quant in quants:
                    if on_disk:
                        runs(quant, lambda library: load_quantized(library, folder, quant, moe))
                    else:
                        runs(quant, lambda library: quantize_in_memory(
                            library, build(library, name, args.mixtral_layers), quant, moe))
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
