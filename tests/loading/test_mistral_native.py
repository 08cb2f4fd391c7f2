"""Mistral's native format (params.json + consolidated weights) loads onto the HF names and rotary layout."""

import json

import pytest
import torch
import transformers
from safetensors.torch import save_file

import maestrale
from maestrale.loading import convert_mistral_native
from parity import model_pair


def interleave_rotary(weight, heads):
    """Native q/k rows: rotary pairs interleaved per head (the inverse of HF's permutation)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, -1).transpose(1, 2).reshape(weight.shape)


def write_native(model, folder, weights_file):
    config, state = model.config, model.state_dict()
    params = {"dim": config.hidden_size, "n_layers": config.num_hidden_layers, "head_dim": config.head_dim,
              "hidden_dim": config.intermediate_size, "n_heads": config.num_attention_heads,
              "n_kv_heads": config.num_key_value_heads, "norm_eps": config.rms_norm_eps,
              "vocab_size": config.vocab_size, "rope_theta": config.rope_parameters["rope_theta"],
              "max_seq_len": config.max_position_embeddings, "sliding_window": config.sliding_window}
    native = {"tok_embeddings.weight": state["model.embed_tokens.weight"], "norm.weight": state["model.norm.weight"],
              "output.weight": state["lm_head.weight"]}
    inter = config.intermediate_size
    for i in range(config.num_hidden_layers):
        p, n = f"model.layers.{i}.", f"layers.{i}."
        native[n + "attention_norm.weight"] = state[p + "input_layernorm.weight"]
        native[n + "ffn_norm.weight"] = state[p + "post_attention_layernorm.weight"]
        native[n + "attention.wq.weight"] = interleave_rotary(state[p + "self_attn.q_proj.weight"], 4)
        native[n + "attention.wk.weight"] = interleave_rotary(state[p + "self_attn.k_proj.weight"], 2)
        native[n + "attention.wv.weight"] = state[p + "self_attn.v_proj.weight"]
        native[n + "attention.wo.weight"] = state[p + "self_attn.o_proj.weight"]
        if config.model_type == "mixtral":
            params["moe"] = {"num_experts": config.num_local_experts, "num_experts_per_tok": config.num_experts_per_tok}
            native[n + "feed_forward.gate.weight"] = state[p + "mlp.gate.weight"]
            for e in range(config.num_local_experts):
                gate_up = state[p + "mlp.experts.gate_up_proj"][e]
                native[n + f"feed_forward.experts.{e}.w1.weight"] = gate_up[:inter].clone()
                native[n + f"feed_forward.experts.{e}.w3.weight"] = gate_up[inter:].clone()
                native[n + f"feed_forward.experts.{e}.w2.weight"] = state[p + "mlp.experts.down_proj"][e].clone()
        else:
            native[n + "feed_forward.w1.weight"] = state[p + "mlp.gate_proj.weight"]
            native[n + "feed_forward.w2.weight"] = state[p + "mlp.down_proj.weight"]
            native[n + "feed_forward.w3.weight"] = state[p + "mlp.up_proj.weight"]
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps(params))
    native = {k: v.contiguous() for k, v in native.items()}
    if weights_file.endswith(".safetensors"):
        save_file(native, folder / weights_file)
    else:
        torch.save(native, folder / weights_file)


@pytest.mark.parametrize("family,weights_file", [("mistral", "consolidated.safetensors"),
                                                 ("mistral", "consolidated.00.pth"),
                                                 ("mixtral", "consolidated.safetensors")])
def test_native_checkpoint_loads_like_the_hf_one(family, weights_file, tmp_path):
    _, ours = model_pair(family, sliding_window=6, max_position_embeddings=512)
    write_native(ours, tmp_path / "native", weights_file)
    loaded = maestrale.AutoModelForCausalLM.from_pretrained(tmp_path / "native")
    assert type(loaded) is type(ours) and loaded.config.sliding_window == 6
    assert loaded.config.max_position_embeddings == 512
    for name, tensor in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_convert_mistral_native(tmp_path):
    ref, ours = model_pair("mistral")
    write_native(ours, tmp_path / "native", "consolidated.safetensors")
    convert_mistral_native(tmp_path / "native", tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.no_grad():
        assert torch.equal(theirs(ids).logits, ref(ids).logits)


def test_native_folder_without_weights(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps({"dim": 32}))
    with pytest.raises(ValueError, match="params.json lacks the field 'n_layers'"):
        maestrale.AutoModelForCausalLM.from_pretrained(tmp_path)
