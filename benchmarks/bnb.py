"""bitsandbytes 4-bit NF4 models in maestrale and transformers, same random weights, one run.

    PYTHONPATH=src python3 benchmarks/bnb.py [--repeats 3] [--new-tokens 64]    # an H200: Mistral-7B's shape
    PYTHONPATH=src python3 benchmarks/bnb.py --tiny                             # a small model on the CPU (smoke)

A random bfloat16 Mistral-7B (mistralai/Mistral-7B-v0.1's shape) is saved once into /dev/shm (memory, not disk,
when it has room; else a temporary folder) and loaded by both libraries with the same BitsAndBytesConfig: NF4,
double quantization, bfloat16 compute (the QLoRA recipe; without double quantization the float32 block scales alone
add 1/16 byte per weight, which puts the 4-bit model just above 0.3x of bfloat16). Printed: the GPU memory each
model's weights take (allocated after loading minus before) beside the bfloat16 bytes, and decode tokens/s at
batch 1 and 32 after a 32-token prompt: (time for N new tokens - time for 1) / (N - 1), greedy, the libraries
alternating, best of --repeats. Runs with the transformers 5.x and bitsandbytes versions installed.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import shutil
import tempfile
import time

import torch

import maestrale

MISTRAL_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, sliding_window=4096, max_position_embeddings=32768,
                  rope_theta=10000.0, rms_norm_eps=1e-5)
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)
PROMPT = 32
QUANTIZATION = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype=torch.bfloat16)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def allocated(device: str) -> int:
    gc.collect()
    if device != "cuda":
        return 0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated()


def save_random_model(fields: dict, device: str) -> str:
    """A random bfloat16 Mistral checkpoint, drawn on `device`, in /dev/shm when it fits."""
    config = maestrale.MistralConfig(**fields)
    with torch.device(device):
        model = maestrale.MistralForCausalLM.from_config(config, dtype=torch.bfloat16)
    need = 2 * model.num_parameters() * 1.1
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > need else None
    folder = tempfile.mkdtemp(prefix="bnb-bench-", dir=shm)
    model.save_pretrained(folder, max_shard_size="2GB")  # shard by shard: a small host copy at a time
    del model
    return folder


def load(library: str, folder: str, device: str):
    """(model, bytes its weights took on the device) for "maestrale" or "transformers"."""
    module = importlib.import_module(library)
    before = allocated(device)
    config = module.BitsAndBytesConfig(**QUANTIZATION)
    model = module.AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, dtype=torch.bfloat16,
                                                        device_map=device).eval()
    used = allocated(device) - before if device == "cuda" else model.get_memory_footprint(return_buffers=False)
    return model, used


def decode_rate(model, batch: int, new_tokens: int, device: str) -> float:
    """Decode tokens/s per sequence-step summed over the batch: batch * (N - 1) / (t(N) - t(1))."""
    ids = torch.randint(3, model.config.vocab_size, (batch, PROMPT), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)

    def run(n: int) -> float:
        sync(device)
        start = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=0, eos_token_id=None)
        sync(device)
        return time.perf_counter() - start

    with torch.inference_mode():
        run(2)  # warm-up: kernels, the static decoder's capture
        return batch * (new_tokens - 1) / (run(new_tokens) - run(1))


def versions() -> str:
    parts = []
    for name in ("torch", "transformers", "bitsandbytes", "maestrale"):
        parts.append(f"{name} {importlib.import_module(name).__version__}")
    return ", ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a small model on the CPU, to check the script runs")
    parser.add_argument("--repeats", type=int, default=3, help="timings per library and batch size (best is kept)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per timing")
    args = parser.parse_args()
    device = "cpu" if args.tiny else "cuda"
    fields, batches = (TINY, (1, 4)) if args.tiny else (MISTRAL_7B, (1, 32))
    new_tokens = min(args.new_tokens, 8) if args.tiny else args.new_tokens
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/bnb.py: no CUDA device; run it on a GPU, or pass --tiny for the CPU smoke run")

    print(f"{versions()}; device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    folder = save_random_model(fields, device)
    try:
        models, memory = {}, {}
        for library in ("maestrale", "transformers"):
            models[library], memory[library] = load(library, folder, device)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    with torch.device("meta"):
        bf16 = 2 * maestrale.MistralForCausalLM(maestrale.MistralConfig(**fields)).num_parameters()
    print(f"\nweights: bfloat16 would take {bf16 / 2**20:.1f} MiB")
    for library in models:
        print(f"  {library:12} {memory[library] / 2**20:.1f} MiB = {memory[library] / bf16:.3f}x bfloat16 "
              f"(<= 0.3x: {'yes' if memory[library] <= 0.3 * bf16 else 'NO'})")

    print(f"\ndecode tokens/s, {PROMPT}-token prompt, {new_tokens} new tokens, best of {args.repeats} (alternating)")
    for batch in batches:
        best = dict.fromkeys(models, 0.0)
        for _ in range(args.repeats):
            for library, model in models.items():
                best[library] = max(best[library], decode_rate(model, batch, new_tokens, device))
        ratio = best["maestrale"] / best["transformers"]
        print(f"  batch {batch:3}: maestrale {best['maestrale']:9.1f}  transformers {best['transformers']:9.1f}  "
              f"ratio {ratio:.2f}x")
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
