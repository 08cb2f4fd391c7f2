"""Perplexity of the real SmolLM2-135M-Instruct on real English text: float32 against int8 and int4 weight-only
quantization (TorchAoConfig, GPTQConfig, AwqConfig) through maestrale's kernels.

    .venv/bin/python benchmarks/perplexity_quant.py [--dtype bfloat16] [--window 512] [--max-tokens N] [--threads N]
        [--rows awq gptq ...]

The reference is the GGUF fixture dequantized to float32; each quantized model is that same file quantized on load
with TorchAoConfig(Int8WeightOnlyConfig()) or TorchAoConfig(Int4WeightOnlyConfig(group_size=32, 64, 128)) (and with
int4_choose_qparams_algorithm="hqq" for 64 and 128), running in --dtype (bfloat16 by default: torch's int4 CPU
product is vectorised for bfloat16 activations only on AVX2 machines; the unquantized model in that dtype and int8 in
float32 are printed too, to tell bfloat16's rounding from the quantization's). The GPTQ rows quantize with
GPTQConfig(bits=4, group_size=..., sym=...) and the AWQ rows with AwqConfig(group_size=...), each calibrated on
another text, torch's README. The text and the
scoring are benchmarks/perplexity.py's. As torchao does, a layer whose inputs are not whole groups stays in float:
SmolLM2's 576-wide inputs are whole groups of 32 and 64, not of 128, so g128 quantizes only the down projections;
the head is tied to the embedding and stays in float. Each line says how many linear layers were quantized.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import time

import torch

from cpu_decode import GGUF_NAME, fixture_folder
from perplexity import english_ids, perplexity

BARS = {"int8": 0.005, "int4 g128": 0.03}  # the bars, relative to float32
GPTQ_ROWS = ((32, False), (64, False), (128, True), (128, False))  # (group size, sym); transformers' default is sym
AWQ_GROUPS = (64, 128)


def calibration_text() -> str:
    """GPTQ's calibration text: torch's README (its package description, about 3,500 words), another text than the
    one scored."""
    return importlib.metadata.distribution("torch").metadata.get_payload()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, help="score only the first N tokens (a quick run)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--rows", nargs="+", help="run only the rows whose names contain one of these (and float32)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

    import maestrale
    from maestrale.quantization.weight_only import packed_weights

    folder = fixture_folder()
    tokenizer = maestrale.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    path, text, ids = english_ids(tokenizer, args.max_tokens)
    print(f"torch {torch.__version__} (CPU capability {torch.backends.cpu.get_cpu_capability()}), torchao "
          f"{importlib.metadata.version('torchao')}, {args.threads} threads; {path}: {len(text.split())} words, "
          f"{ids.numel()} tokens scored in windows of {args.window}")
    dtype = getattr(torch, args.dtype)
    hqq = {"int4_choose_qparams_algorithm": "hqq"}
    calibration = calibration_text()
    configs = {"float32": (torch.float32, None)}
    if dtype != torch.float32:
        configs[args.dtype] = (dtype, None)
    configs["int8"] = (dtype, maestrale.TorchAoConfig(Int8WeightOnlyConfig()))
    if dtype != torch.float32:
        configs["int8 float32"] = (torch.float32, maestrale.TorchAoConfig(Int8WeightOnlyConfig()))
    for group in (32, 64, 128):
        configs[f"int4 g{group}"] = (dtype, maestrale.TorchAoConfig(Int4WeightOnlyConfig(group_size=group)))
    for group in (64, 128):
        configs[f"int4 g{group} hqq"] = (dtype, maestrale.TorchAoConfig(Int4WeightOnlyConfig(group_size=group, **hqq)))
    for group, sym in GPTQ_ROWS:
        configs[f"int4 g{group} gptq{'' if sym else ' asym'}"] = (dtype, maestrale.GPTQConfig(
            bits=4, group_size=group, sym=sym, dataset=[calibration], tokenizer=tokenizer))
    for group in AWQ_GROUPS:
        configs[f"int4 g{group} awq"] = (dtype, maestrale.AwqConfig(group_size=group, dataset=[calibration],
                                                                    tokenizer=tokenizer))

    if args.rows:
        configs = {name: c for name, c in configs.items() if name == "float32" or any(r in name for r in args.rows)}
    results = {}
    for name, (model_dtype, quantization) in configs.items():
        start = time.perf_counter()
        model = maestrale.AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=model_dtype,
                                                               quantization_config=quantization)
        loaded = time.perf_counter() - start
        linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules()) + len(packed_weights(model))
        results[name] = perplexity(model, ids, args.window)
        ratio = results[name] / results["float32"]
        bar = f" (bar {BARS[name] * 100:.1f}%: {'met' if abs(ratio - 1) <= BARS[name] else 'MISSED'})" \
            if name in BARS else ""
        print(f"{name:>14} ({model_dtype}): perplexity {results[name]:.4f}, {ratio:.4f} x float32, "
              f"{abs(ratio - 1) * 100:.2f}% apart{bar}; {len(packed_weights(model))} of {linears} linear layers "
              f"quantized (loaded and quantized in {loaded:.0f} s, scored in "
              f"{time.perf_counter() - start - loaded:.0f} s)")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
