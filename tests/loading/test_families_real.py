"""SmolLM2's real weights re-laid out as each other family give the dense Mistral model's logits, after a trip
through save_pretrained and from_pretrained."""

import pytest
import torch

import maestrale

FULL, SLIDE = "full_attention", "sliding_attention"


@pytest.fixture(scope="module")
def dense(smollm2, smollm2_prompts):
    ids = smollm2_prompts[1][0]
    with torch.no_grad():
        logits = smollm2(ids).logits
    fields = {k: getattr(smollm2.config, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "bos_token_id", "eos_token_id",
        "pad_token_id", "tie_word_embeddings", "rope_parameters")}
    return smollm2.state_dict(), fields, ids, logits


def reload_and_compare(model, tmp_path, ids, expected):
    model.save_pretrained(tmp_path, max_shard_size="200MB")
    loaded = maestrale.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=1e-4)


def test_as_phi3(dense, tmp_path):
    state, fields, ids, logits = dense
    model = maestrale.Phi3ForCausalLM(maestrale.Phi3Config(**fields))  # no head_dim: 576 // 9 = 64
    fused = {}
    for i in range(fields["num_hidden_layers"]):
        p = f"model.layers.{i}."
        fused[p + "self_attn.qkv_proj.weight"] = torch.cat([state[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        fused[p + "mlp.gate_up_proj.weight"] = torch.cat([state[p + "mlp.gate_proj.weight"],
                                                          state[p + "mlp.up_proj.weight"]])
    model.load_state_dict({**state, **fused}, strict=False)
    assert set(model.state_dict()) <= set(state) | set(fused)
    reload_and_compare(model, tmp_path, ids, logits)


def test_as_ministral(dense, tmp_path):
    state, fields, ids, logits = dense
    layer_types = [FULL if i % 3 == 0 else SLIDE for i in range(fields["num_hidden_layers"])]
    config = maestrale.MinistralConfig(**fields, head_dim=64, sliding_window=4096, layer_types=layer_types)
    model = maestrale.MinistralForCausalLM(config)
    model.load_state_dict(state)
    reload_and_compare(model, tmp_path, ids, logits)


@pytest.mark.slow
def test_as_mixtral_by_sparse_upcycling(dense, tmp_path):
    """Every expert a copy of the dense MLP: whatever the (random) router picks, the output is the dense MLP's."""
    state, fields, ids, logits = dense
    experts = 2
    model = maestrale.MixtralForCausalLM(maestrale.MixtralConfig(**fields, num_local_experts=experts,
                                                                 num_experts_per_tok=2))
    upcycled = {}
    for i in range(fields["num_hidden_layers"]):
        p = f"model.layers.{i}.mlp."
        gate_up = torch.cat([state[p + "gate_proj.weight"], state[p + "up_proj.weight"]])
        upcycled[p + "experts.gate_up_proj"] = gate_up.expand(experts, -1, -1).clone()
        upcycled[p + "experts.down_proj"] = state[p + "down_proj.weight"].expand(experts, -1, -1).clone()
        upcycled[p + "gate.weight"] = torch.randn(experts, fields["hidden_size"])
    model.load_state_dict({**{k: v for k, v in state.items() if ".mlp." not in k}, **upcycled})
    reload_and_compare(model, tmp_path, ids, logits)
