"""The static decoder beneath generate() against the reference path (DynamicCache, eager forward), every family.

On CPU the decoder runs its step eagerly with the torch versions of the kernels (cache_implementation="static");
on CUDA the same tests run the compiled, graph-captured step with the Triton kernels.
"""

import pytest
import torch

import maestrale
from maestrale.engine import StaticDecoder

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=None)
LONGROPE = {"type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 1.8, 2.0, 2.2, 2.5],
            "long_factor": [2.0, 3.0, 5.0, 9.0, 10.0, 11.0, 12.0, 13.0]}
# Windows shorter than prompt + output, so rings wrap; Phi-3's longrope switches tables at position 16.
FAMILIES = {
    "mistral-window5": (maestrale.MistralConfig, {"sliding_window": 5}),
    "ministral-mixed-window6": (maestrale.MinistralConfig, {
        "sliding_window": 6, "head_dim": 16, "layer_types": ["full_attention", "sliding_attention", "full_attention"]}),
    "mixtral-window7": (maestrale.MixtralConfig, {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 7}),
    "mixtral-8experts": (maestrale.MixtralConfig, {"num_local_experts": 8, "num_experts_per_tok": 2}),
    "phi3-longrope": (maestrale.Phi3Config, {"max_position_embeddings": 64, "original_max_position_embeddings": 16,
                                             "rope_scaling": LONGROPE, "num_key_value_heads": 4}),
    "phi3-partial-rotary": (maestrale.Phi3Config, {"partial_rotary_factor": 0.5, "sliding_window": 9}),
}


def build(name: str, device: str, dtype=torch.float32):
    config_class, overrides = FAMILIES[name]
    config = config_class(**{**SMALL, **overrides})
    model = maestrale.AutoModelForCausalLM.from_config(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 0.2).add_(1.0 if p.dim() == 1 else 0.0)
    return model.eval().to(device, dtype)


def prompts(batch: int, device: str):
    """A left-padded batch: row r has 9 - 2r real tokens."""
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, 97, (batch, 9), generator=g)
    mask = torch.ones_like(ids)
    for row in range(1, batch):
        mask[row, : 2 * row] = 0
        ids[row, : 2 * row] = 0
    return ids.to(device), mask.to(device)


def generate(model, ids, mask, implementation, new=24):
    return model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                          cache_implementation=implementation, return_dict_in_generate=True, output_logits=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_static_equals_reference(name, batch, device):
    model = build(name, device)
    ids, mask = prompts(batch, device)
    ref = generate(model, ids, mask, "dynamic")
    fast = generate(model, ids, mask, "static")
    assert torch.equal(ref.sequences, fast.sequences)
    for a, b in zip(ref.logits, fast.logits):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    # The cache handed back holds what the reference cache holds.
    for a, b in zip(ref.past_key_values.layers, fast.past_key_values.layers):
        assert a.seen == b.seen
        torch.testing.assert_close(b.keys, a.keys, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(b.values, a.values, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_rolling_cache_holds_the_window(device):
    model = build("ministral-mixed-window6", device)
    ids, mask = prompts(1, device)
    model.generate(ids, max_new_tokens=40, cache_implementation="static")
    decoder = model._static_decoder
    assert [k.shape[2] for k in decoder.k_cache] == [256, 6, 256]  # sliding layer: exactly the window
    # A second generation reuses the decoder (and on CUDA its graph) and still matches the reference.
    again = model.generate(ids, max_new_tokens=30, cache_implementation="static")
    assert model._static_decoder is decoder
    assert torch.equal(again, model.generate(ids, max_new_tokens=30, cache_implementation="dynamic"))


def test_choice_of_path():
    model = build("mistral-window5", "cpu")
    ids, mask = prompts(1, "cpu")
    model.generate(ids, max_new_tokens=3)
    assert "_static_decoder" not in model.__dict__  # CPU default: the reference path
    with pytest.raises(ValueError, match="output_attentions"):
        model.generate(ids, max_new_tokens=3, cache_implementation="static", output_attentions=True,
                       return_dict_in_generate=True)
    with pytest.raises(ValueError, match="cache_implementation='paged'"):
        model.generate(ids, max_new_tokens=3, cache_implementation="paged")


def test_fused_weights_share_storage():
    """Fusing q/k/v and gate/up re-points the parameters into one tensor: no second copy, same state dict."""
    model = build("mistral-window5", "cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    StaticDecoder(model, 1, 256)
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.weight.data_ptr() == attn.q_proj.weight.data_ptr() + attn.q_proj.weight.numel() * 4
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    StaticDecoder(model, 1, 256)  # already laid out: nothing moves
    assert attn.k_proj.weight.data_ptr() == attn.q_proj.weight.data_ptr() + attn.q_proj.weight.numel() * 4
