"""AwqConfig: AWQ quantization on calibration text. The input scales against plain rounding, the folding of their
inverses into the rows before each layer (the float model unchanged), whole models quantized on load against their
dequantized weights, and the AWQ checkpoint they save against the tests' own packer of AWQ's published layout."""

import copy
import json

import pytest
import torch

from parity import model_pair
from quantized import FAMILIES, SIZES
from test_gptq_quantize import TEXTS, char_tokenizer

import maestrale
from maestrale.quantization.awq import awq_rounding, fold, input_scale
from maestrale.quantization.calibration import input_groups
from maestrale.quantization.weight_only import Int4Weight, QuantizedLinear

IDS = torch.tensor([[1, 5, 9, 33, 2, 17, 40], [3, 3, 8, 60, 11, 12, 55]])


def rounded(w, group):
    """w rounded to AWQ's grid, written out: per group, scale = (max - min) / 15, integer zero point
    -round(min / scale) in 0..15, q = round(w / scale) + zero in 0..15."""
    g = w.reshape(-1, group)
    low, high = g.amin(1, keepdim=True), g.amax(1, keepdim=True)
    scale = (high - low) / 15
    zero = torch.clamp(-torch.round(low / scale), 0, 15)
    return ((torch.clamp(torch.round(g / scale) + zero, 0, 15) - zero) * scale).reshape(w.shape)


def test_awq_rounding_is_awqs_grid():
    w = torch.randn(16, 128, dtype=torch.float64)
    w[3, :32] = w[3, :32].abs() + 0.5  # a group of positive weights: zero point 0, its largest weights clipped
    values, scale, zero = awq_rounding(w, 32)
    assert values.dtype == torch.int32 and scale.shape == zero.shape == (4, 16)
    assert bool(((zero >= 0) & (zero <= 15) & (zero == zero.round())).all()) and bool((zero[0, 3] == 0))
    dequantized = (values.double().reshape(16, 4, 32) - zero.T[..., None]) * scale.T[..., None]
    torch.testing.assert_close(dequantized.reshape(16, 128), rounded(w, 32), rtol=0, atol=1e-12)
    inside = dequantized.reshape(16, 128) - w
    assert inside[:3].abs().max() <= scale.max() / 2 + 1e-12  # groups that straddle 0 are rounded to a half step


def test_input_scales_lower_the_output_error_where_channels_differ():
    torch.manual_seed(0)
    x = torch.randn(512, 256) * torch.where(torch.rand(256) < 0.05, 20.0, 1.0)  # a few salient channels
    weights = [torch.randn(64, 256), torch.randn(32, 256)]
    s = input_scale(x, weights, 128)

    def error(scale):
        return sum(float((x @ (rounded(w * scale, 128) / scale).T - x @ w.T).pow(2).sum()) for w in weights)

    assert s.shape == (256,) and bool((s > 0).all())
    assert error(s) < 0.7 * error(torch.ones(256))  # plain rounding: s = 1, which the search also tries


@pytest.mark.parametrize("family", ["mistral", "phi3"])
def test_input_groups_are_the_sets_that_read_one_input(family):
    """q/k/v (or qkv), o, gate/up (or gate_up), down, in the order the layer runs them, on every run: a freed input's
    address, reused by the next layer's input, does not join two sets (it did about one run in ten)."""
    _, model = model_pair(family, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                          num_key_value_heads=4)
    layer, first = model.model.layers[0], []
    hook = layer.register_forward_pre_hook(lambda m, args, kwargs: first.append((args[0], kwargs)), with_kwargs=True)
    with torch.no_grad():
        model(IDS[:1] % model.config.vocab_size)
        hook.remove()
        expected = ([["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                     ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]] if family == "mistral" else
                    [["self_attn.qkv_proj"], ["self_attn.o_proj"], ["mlp.gate_up_proj"], ["mlp.down_proj"]])
        for _ in range(30):
            assert input_groups(layer, first[0], 32) == expected


@pytest.mark.parametrize("family, kv_heads", [("mistral", 2), ("mistral", 4), ("phi3", 4), ("mixtral", 2)])
def test_folded_scales_leave_the_float_model_unchanged(family, kv_heads):
    _, model = model_pair(family, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                          num_key_value_heads=kv_heads, **{k: v for k, v in FAMILIES[family].items()})
    model = model.double()
    with torch.no_grad():
        expected = model(IDS % model.config.vocab_size).logits
        layer, first = model.model.layers[0], []
        hook = layer.register_forward_pre_hook(lambda m, args, kwargs: first.append((args[0], kwargs)),
                                               with_kwargs=True)
        model(IDS[:1] % model.config.vocab_size)
        hook.remove()
        groups = input_groups(layer, first[0], 32)
        before = {name: p.clone() for name, p in layer.named_parameters()}
        for group in groups:
            width = layer.get_submodule(group[0]).in_features
            fold(layer, group, torch.rand(width, dtype=torch.float64) + 0.5)
        changed = {name for name, p in layer.named_parameters() if not torch.equal(p, before[name])}
        torch.testing.assert_close(model(IDS % model.config.vocab_size).logits, expected, rtol=1e-10, atol=1e-10)
    # each set of inputs but o's under grouped-query attention (and Mixtral's experts, which are not linear layers)
    # has its scales folded into the rows that make it
    attention = {"input_layernorm.weight",
                 "self_attn.qkv_proj.weight" if family == "phi3" else "self_attn.q_proj.weight"}
    if kv_heads == 4:
        attention |= {"self_attn.o_proj.weight"}
    assert attention <= changed
    assert ("self_attn.o_proj.weight" in changed) == (kv_heads == 4)
    if family != "mixtral":
        assert {"post_attention_layernorm.weight", "mlp.down_proj.weight"} <= changed


def awq_config(folder, **options):
    vocab = maestrale.AutoConfig.from_pretrained(folder).vocab_size
    return maestrale.AwqConfig(group_size=32, dataset=TEXTS, tokenizer=char_tokenizer(vocab), **options)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_model_quantized_on_load_equals_its_dequantized_weights(family_folder, family):
    folder = family_folder(family)
    config = awq_config(folder, model_seqlen=40)
    model = maestrale.AutoModelForCausalLM.from_pretrained(folder, quantization_config=config)
    projections = {name: m for name, m in model.named_modules() if name.endswith("_proj")}
    assert projections and all(isinstance(m, QuantizedLinear) and isinstance(m.weight, Int4Weight)
                               and m.weight.kind == "awq" for m in projections.values())
    assert model.config.quantization_config is config
    assert model.config.to_dict()["quantization_config"]["quant_method"] == "awq"
    ids = IDS % model.config.vocab_size
    dequantized = copy.deepcopy(model).dequantize()
    with torch.no_grad():
        expected = dequantized(ids).logits
        torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("family", ["mistral", "phi3", "mixtral"])
def test_an_awq_model_saves_as_an_awq_checkpoint_that_loads_back(family_folder, tmp_path, family):
    from safetensors.torch import load_file
    from test_gptq_awq import pack_awq

    folder = family_folder(family)
    model = maestrale.AutoModelForCausalLM.from_pretrained(folder, quantization_config=awq_config(folder))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved == {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm",
                     "modules_to_not_convert": None}
    tensors = load_file(tmp_path / "model.safetensors")
    for name, module in model.named_modules():  # packed by the test's own packer of the published layout
        if isinstance(module, QuantizedLinear):
            weight = module.weight
            scale, zero = weight.scale_and_zeros[:, :weight.shape[0]].unbind(-1)
            qweight, qzeros = pack_awq(weight.values().numpy(), torch.round(8 - zero / scale).long().numpy())
            assert torch.equal(tensors[f"{name}.qweight"], qweight) and torch.equal(tensors[f"{name}.qzeros"], qzeros)
            assert torch.equal(tensors[f"{name}.scales"], scale)
            assert f"{name}.weight" not in tensors
    loaded = maestrale.AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = IDS % model.config.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_saving_a_calibrated_model_with_a_state_dict_is_refused(family_folder, tmp_path, method):
    folder = family_folder("mistral")
    vocab = maestrale.AutoConfig.from_pretrained(folder).vocab_size
    config = awq_config(folder) if method == "awq" else maestrale.GPTQConfig(
        bits=4, group_size=32, dataset=TEXTS, tokenizer=char_tokenizer(vocab))
    model = maestrale.AutoModelForCausalLM.from_pretrained(folder, quantization_config=config)
    with pytest.raises(ValueError, match=rf"state_dict=.*holds {method} int4 weights, .*call save_pretrained "
                                         "without state_dict"):
        model.save_pretrained(tmp_path / "out", state_dict=model.state_dict())
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("options, error, message", [
    (dict(bits=8), NotImplementedError, r"AwqConfig\(bits=8\): AWQ quantizes to 4 bits"),
    (dict(group_size=100), ValueError, r"AwqConfig\(group_size=100\) is not supported: use 32, 64, 128, 256"),
    (dict(zero_point=False), NotImplementedError, r"zero_point=False\): AWQ's GEMM layout holds a zero point"),
    (dict(version="gemv"), NotImplementedError, r"version='gemv'\): maestrale writes AWQ's 'gemm' layout"),
    (dict(model_seqlen=0), ValueError, "AwqConfig: model_seqlen must be a number of tokens"),
    (dict(dataset="wikitext2"), ValueError, r"AwqConfig\(dataset='wikitext2'\): one of transformers' hub datasets"),
    (dict(dataset=TEXTS), ValueError, "AwqConfig: dataset needs a tokenizer"),
])
def test_config_refuses_bad_options_by_name(options, error, message):
    with pytest.raises(error, match=message):
        maestrale.AwqConfig(**options)


def test_quantizing_without_a_dataset_says_what_to_pass(family_folder):
    with pytest.raises(ValueError, match=r"AwqConfig: quantizing needs calibration text: pass dataset=\[texts\]"):
        maestrale.AutoModelForCausalLM.from_pretrained(family_folder("mistral"),
                                                       quantization_config=maestrale.AwqConfig())
