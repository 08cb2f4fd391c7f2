"""Perplexity of the real SmolLM2-135M-Instruct on real English text: GGUF blocks kept packed vs dequantized.

    .venv/bin/python benchmarks/perplexity.py [--window 512] [--max-tokens N] [--threads N]

The text is the GNU GPL version 3 that ships inside torch's wheel (a license of one of its third-party test folders,
about 5,600 words). Non-overlapping windows of --window tokens, each scored from its second token on. The packed model
runs as benchmarks/cpu_decode.py runs it (Q4_1 and Q8_0 blocks; maestrale's kernels with int8 activations in a
float32 model, or torch's int4 product in bfloat16 where those do not build); the reference is the file dequantized
to float32. Also prints both models' greedy answers to the README's question.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import os
import time

import torch

from cpu_decode import GGUF_NAME, fixture_folder, packed_dtype

TEXT_SUFFIX = "cpr/test/LICENSE"  # GPL-3.0 text in torch's dist-info
QUESTION = "What is the capital of France, and what is it famous for?"  # README's first command


def english_text() -> tuple[str, str]:
    files = [f for f in importlib.metadata.distribution("torch").files or [] if str(f).endswith(TEXT_SUFFIX)]
    if not files:
        raise SystemExit(f"torch's wheel has no file ending in {TEXT_SUFFIX}; pass another text")
    path = files[0].locate()
    return str(path), open(path, encoding="utf-8").read()


def english_ids(tokenizer, max_tokens: int | None) -> tuple[str, str, torch.Tensor]:
    """(path, text, its first max_tokens token ids)."""
    path, text = english_text()
    return path, text, torch.tensor(tokenizer(text).input_ids)[:max_tokens]


@torch.inference_mode()
def perplexity(model, ids: torch.Tensor, window: int) -> float:
    total, count = 0.0, 0
    for start in range(0, ids.numel() - 1, window):
        chunk = ids[start:start + window][None]
        if chunk.shape[1] < 2:
            break
        logits = model(chunk).logits[0, :-1].float()
        total += torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, help="score only the first N tokens (a quick run)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import maestrale

    folder = fixture_folder()
    tokenizer = maestrale.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    path, text, ids = english_ids(tokenizer, args.max_tokens)
    print(f"{path}: {len(text.split())} words, {ids.numel()} tokens scored in windows of {args.window}")
    load = maestrale.AutoModelForCausalLM.from_pretrained
    models = {"float32 (dequantized)": load(folder, gguf_file=GGUF_NAME, dtype=torch.float32),
              f"packed Q4_1 ({str(packed_dtype())[6:]})": load(folder, gguf_file=GGUF_NAME, dtype=packed_dtype(),
                                                               keep_quantized=True)}
    results = {}
    for name, model in models.items():
        start = time.perf_counter()
        results[name] = perplexity(model, ids, args.window)
        print(f"{name:>24}: perplexity {results[name]:.4f}  ({time.perf_counter() - start:.0f} s)")
    reference, packed = results.values()
    print(f"packed / float32 = {packed / reference:.4f} ({abs(packed / reference - 1) * 100:.2f}% apart; "
          f"the bar is 1%) load average {os.getloadavg()[0]:.2f}")

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                           return_tensors="pt")
    prompt = prompt if isinstance(prompt, torch.Tensor) else prompt["input_ids"]
    for name, model in models.items():
        with torch.inference_mode():
            out = model.generate(prompt, max_new_tokens=48, do_sample=False)
        print(f"{name}: {tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)!r}")


if __name__ == "__main__":
    main()
