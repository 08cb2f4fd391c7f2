"""GGUF: the real SmolLM2 file against transformers' GGUF loader, the quantisation types, other architectures."""

import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.quants import quantize

import maestrale
from conftest import GGUF_NAME
from maestrale.loading import convert_gguf, read_gguf, read_gguf_config
from parity import model_pair


def greedy(model, ids, steps=12):
    for _ in range(steps):
        with torch.no_grad():
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids


def test_smollm2_logits_and_greedy_text_match_transformers(smollm2, hf_smollm2_model, smollm2_prompts):
    tokenizer, prompts = smollm2_prompts
    assert type(smollm2).__name__ == "MistralForCausalLM" and smollm2.config.sliding_window is None
    assert smollm2.lm_head.weight is smollm2.model.embed_tokens.weight
    for ids in prompts:
        with torch.no_grad():
            torch.testing.assert_close(smollm2(ids).logits, hf_smollm2_model(ids).logits, rtol=0, atol=1e-4)
    ours, theirs = greedy(smollm2, prompts[0]), greedy(hf_smollm2_model, prompts[0])
    assert torch.equal(ours, theirs)
    assert tokenizer.decode(ours[0]).startswith("The capital of France is Paris.")


def test_read_gguf_hands_over_config_and_tokenizer_fields(smollm2_folder):
    config, shard, tokenizer = read_gguf(f"{smollm2_folder}/{GGUF_NAME}")
    assert config["model_type"] == "mistral" and config["num_key_value_heads"] == 3 and config["head_dim"] == 64
    assert config["rope_theta"] == 100000.0 and config["tie_word_embeddings"] is True
    assert tokenizer["tokenizer.ggml.model"] == "gpt2" and len(tokenizer["tokenizer.ggml.tokens"]) == 49152
    assert "<|im_start|>" in tokenizer["tokenizer.chat_template"] and len(tokenizer["tokenizer.ggml.merges"]) == 48900
    assert shard.infos()["model.layers.0.self_attn.k_proj.weight"] == ((192, 576), torch.float32)
    assert read_gguf_config(f"{smollm2_folder}/{GGUF_NAME}").num_hidden_layers == 30


def _k_quant(rows, cols, qtype, block_bytes, f16_at, rng):
    """Random blocks of a K-quant type whose float16 scales are finite (random bytes could spell inf/nan)."""
    blocks = rng.integers(0, 256, (rows * cols // 256, block_bytes), dtype=np.uint8)
    for offset in f16_at:
        blocks[:, offset:offset + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("kind", [Q.Q4_0, Q.Q4_1, Q.Q8_0])
def test_blocks_dequantize_as_the_gguf_package_does_bit_for_bit(kind):
    from gguf.quants import dequantize

    from maestrale.loading.gguf import _dequantized
    from maestrale.loading.gguf_file import GGUFTensor

    values = (np.random.default_rng(1).standard_normal((3, 37, 96)) * 4).astype(np.float32)  # experts, odd rows
    packed = quantize(values, kind)
    ours = _dequantized(GGUFTensor("t", values.shape, kind, packed))
    reference = dequantize(packed, kind).reshape(values.shape)
    assert ours.dtype == np.float32 and np.array_equal(ours.view(np.uint32), reference.view(np.uint32))


def test_quantisation_types_dequantize_like_transformers(tmp_path):
    rng = np.random.default_rng(0)
    hidden, heads, kv_heads, vocab = 256, 4, 2, 256
    path = tmp_path / "tiny.gguf"
    writer = GGUFWriter(path, "llama")
    for add, value in (("add_block_count", 1), ("add_context_length", 64), ("add_embedding_length", hidden),
                       ("add_feed_forward_length", hidden), ("add_head_count", heads), ("add_head_count_kv", kv_heads),
                       ("add_layer_norm_rms_eps", 1e-5), ("add_rope_freq_base", 10000.0), ("add_vocab_size", vocab),
                       ("add_rope_dimension_count", hidden // heads)):
        getattr(writer, add)(value)

    def dense(rows, cols=hidden):
        return rng.standard_normal((rows, cols)).astype(np.float32) * 0.1

    tensors = {
        "token_embd.weight": (dense(vocab).astype(np.float16), None),
        "output.weight": (quantize(dense(vocab), Q.Q8_0), Q.Q8_0),
        "output_norm.weight": (1 + dense(1)[0], None),
        "blk.0.attn_norm.weight": (1 + dense(1)[0], None),
        "blk.0.ffn_norm.weight": (1 + dense(1)[0], None),
        "blk.0.attn_q.weight": (_k_quant(hidden, hidden, Q.Q4_K, 144, [0, 2], rng), Q.Q4_K),
        "blk.0.attn_k.weight": (_k_quant(hidden // 2, hidden, Q.Q5_K, 176, [0, 2], rng), Q.Q5_K),
        "blk.0.attn_v.weight": (_k_quant(hidden // 2, hidden, Q.Q6_K, 210, [208], rng), Q.Q6_K),
        "blk.0.attn_output.weight": (quantize(dense(hidden), Q.BF16), Q.BF16),
        "blk.0.ffn_gate.weight": (quantize(dense(hidden), Q.Q4_0), Q.Q4_0),
        "blk.0.ffn_up.weight": (quantize(dense(hidden), Q.Q4_1), Q.Q4_1),
        "blk.0.ffn_down.weight": (dense(hidden), None),
    }
    for name, (data, qtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    ours = maestrale.AutoModelForCausalLM.from_pretrained(path)  # a path ending in .gguf works without gguf_file=
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    state = ours.state_dict()
    for name, tensor in theirs.state_dict().items():
        assert torch.equal(state[name], tensor), name
    ids = torch.tensor([[1, 50, 7, 200]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=0, atol=1e-5)


def _interleave_rotary(weight, heads):
    """What llama.cpp's converter does to q/k rows (the inverse of what the loader undoes)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, -1).transpose(1, 2).reshape(weight.shape)


def _write_gguf(path, arch, config, tensors):
    writer = GGUFWriter(path, arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(config.vocab_size)
    if arch == "llama" and hasattr(config, "num_local_experts"):
        writer.add_expert_count(config.num_local_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor.detach().numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("family", ["mixtral", "phi3"])
def test_mixtral_and_phi3_gguf_layouts(family, tmp_path):
    _, ours = model_pair(family, num_local_experts=3) if family == "mixtral" else model_pair(family)
    config, state = ours.config, ours.state_dict()
    tensors = {"token_embd.weight": state["model.embed_tokens.weight"], "output.weight": state["lm_head.weight"],
               "output_norm.weight": state["model.norm.weight"]}
    inter = config.intermediate_size
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        blk = {"attn_norm": p + "input_layernorm.weight", "ffn_norm": p + "post_attention_layernorm.weight",
               "attn_output": p + "self_attn.o_proj.weight"}
        if family == "phi3":
            blk |= {"attn_qkv": p + "self_attn.qkv_proj.weight", "ffn_up": p + "mlp.gate_up_proj.weight",
                    "ffn_down": p + "mlp.down_proj.weight"}
        else:
            blk |= {"attn_v": p + "self_attn.v_proj.weight", "ffn_gate_inp": p + "mlp.gate.weight"}
            tensors[f"blk.{i}.attn_q.weight"] = _interleave_rotary(state[p + "self_attn.q_proj.weight"], 4)
            tensors[f"blk.{i}.attn_k.weight"] = _interleave_rotary(state[p + "self_attn.k_proj.weight"], 2)
            gate_up = state[p + "mlp.experts.gate_up_proj"]
            tensors[f"blk.{i}.ffn_gate_exps.weight"] = gate_up[:, :inter]
            tensors[f"blk.{i}.ffn_up_exps.weight"] = gate_up[:, inter:]
            tensors[f"blk.{i}.ffn_down_exps.weight"] = state[p + "mlp.experts.down_proj"]
        tensors |= {f"blk.{i}.{short}.weight": state[name] for short, name in blk.items()}
    _write_gguf(tmp_path / "m.gguf", "llama" if family == "mixtral" else "phi3", config, tensors)

    loaded = maestrale.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert type(loaded) is type(ours)
    for name, tensor in state.items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_convert_gguf_writes_a_folder_transformers_opens(smollm2_folder, smollm2, smollm2_prompts, tmp_path):
    convert_gguf(f"{smollm2_folder}/{GGUF_NAME}", tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert theirs.config.model_type == "mistral" and theirs.config.tie_word_embeddings
    ids = smollm2_prompts[1][1]
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, smollm2(ids).logits, rtol=0, atol=1e-4)
