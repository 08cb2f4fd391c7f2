"""GPTQConfig: GPTQ quantization on calibration text. The column-by-column algorithm against the paper's update
written out with an explicit inverse Hessian, its output error against plain rounding, and whole models quantized on
load, run through the int4 kernels against their dequantized float weights."""

import copy
import json
from types import SimpleNamespace

import pytest
import torch

from parity import model_pair
from quantized import FAMILIES, SIZES

import maestrale
from maestrale.quantization.gptq import gptq_weight
from maestrale.quantization.weight_only import Int4Weight, QuantizedLinear, quantize_int4

TEXTS = ["GPTQ picks each weight's rounding so that the layer's outputs on this text change as little as they can.",
         "A second calibration text, shorter than the first."]


def paper_gptq(w, h, group, sym, damp, at_ties):
    """(values 0..15, how many were ties) by the update of the GPTQ paper (its eq. 2-3, as in Optimal Brain
    Surgeon): quantize column j, move the columns after it by -err / [H^-1]_jj * [H^-1]_j, then remove j from
    H^-1; float64. A value within rounding noise of a tie takes the side `at_ties` took (the symmetric grid puts each
    group's most negative weight exactly on one)."""
    w, h = w.double().clone(), h.double().clone()
    h += damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    inverse = torch.linalg.inv(h)
    values, ties = torch.zeros(w.shape, dtype=torch.int32), 0
    for j in range(w.shape[1]):
        if j % group == 0:
            g = w[:, j:j + group]
            low, high = g.amin(1).clamp(max=0), g.amax(1).clamp(min=0)
            if sym:
                high = torch.maximum(-low, high)
                low = -high
            scale = (high - low) / 15
            zero = torch.full_like(scale, 8) if sym else torch.round(-low / scale)
        unrounded = w[:, j] / scale + zero
        tie = (unrounded - unrounded.floor() - 0.5).abs() < 1e-9
        q = torch.where(tie, at_ties[:, j].double(), torch.clamp(torch.round(unrounded), 0, 15))
        values[:, j], ties = q.int(), ties + int(tie.sum())
        err = (w[:, j] - (q - zero) * scale) / inverse[j, j]
        w[:, j + 1:] -= err[:, None] * inverse[j, j + 1:][None]
        inverse = inverse - torch.outer(inverse[:, j], inverse[j, :]) / inverse[j, j]
    return values, ties


def correlated_inputs(cols, dtype=torch.float64):
    """Inputs with strongly correlated features (what GPTQ's error spreading exploits)."""
    return (torch.randn(600, 32, dtype=dtype) @ torch.randn(32, cols, dtype=dtype)
            + 0.3 * torch.randn(600, cols, dtype=dtype))


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_gptq_weight_is_the_papers_update(sym, group):
    x, w = correlated_inputs(256), torch.randn(24, 256, dtype=torch.float64)
    values = gptq_weight(w, x.T @ x, group, sym, 0.1).values().int()
    expected, ties = paper_gptq(w, x.T @ x, group, sym, 0.1, at_ties=values)
    assert torch.equal(values, expected)
    assert ties <= (24 * 256 // group if sym else 3)  # at most one a group, on the symmetric grid


def test_group_aware_order_is_the_papers_update_on_reordered_inputs():
    """Groups by their largest diagonal entry of H, each group's columns by theirs, largest first (GPTQModel's
    act_group_aware): the paper's update on the columns so reordered, the values put back in place."""
    x, w = correlated_inputs(256), torch.randn(24, 256, dtype=torch.float64)
    x *= torch.rand(256, dtype=torch.float64) * 3  # inputs of unequal size, so the order matters
    h = x.T @ x
    diag = h.diagonal().tolist()
    groups = sorted(range(256 // 64), key=lambda g: -max(diag[g * 64:(g + 1) * 64]))
    order = [i for g in groups for i in sorted(range(g * 64, (g + 1) * 64), key=lambda i: -diag[i])]
    values = gptq_weight(w, h, 64, False, 0.1, group_aware=True).values().int()
    reordered, _ = paper_gptq(w[:, order], h[order][:, order], 64, False, 0.1, at_ties=values[:, order])
    assert order != list(range(256)) and torch.equal(values[:, order], reordered)
    assert not torch.equal(values, gptq_weight(w, h, 64, False, 0.1).values().int())


@pytest.mark.parametrize("sym", [True, False])
def test_gptq_lowers_the_layer_output_error(sym):
    x, w = correlated_inputs(256, torch.float32), torch.randn(48, 256)
    error = lambda q: ((x @ (q.dequantize().float() - w).T) ** 2).sum()  # noqa: E731
    # 0.09-0.12 of plain rounding's error on such inputs (seen in a scratch run)
    assert error(gptq_weight(w, x.T @ x, 128, sym, 0.1)) < 0.3 * error(quantize_int4(w, 128))


def test_inputs_that_are_always_zero_get_zero_weights():
    x, w = correlated_inputs(64, torch.float32), torch.randn(16, 64)
    x[:, [3, 40]] = 0
    weight = gptq_weight(w, x.T @ x, 32, False, 0.1).dequantize()
    assert weight.isfinite().all() and torch.equal(weight[:, [3, 40]], torch.zeros(16, 2))


def char_tokenizer(vocab_size):
    return lambda text: SimpleNamespace(input_ids=[ord(c) % vocab_size for c in text])


@pytest.mark.parametrize("family", FAMILIES)
def test_a_model_quantized_on_load_equals_its_dequantized_weights(family_folder, family):
    folder = family_folder(family)
    vocab = maestrale.AutoConfig.from_pretrained(folder).vocab_size
    config = maestrale.GPTQConfig(bits=4, group_size=32, dataset=TEXTS, tokenizer=char_tokenizer(vocab),
                                  model_seqlen=40)
    model = maestrale.AutoModelForCausalLM.from_pretrained(folder, quantization_config=config)
    float_model = maestrale.AutoModelForCausalLM.from_pretrained(folder)
    projections = {name: m for name, m in model.named_modules() if name.endswith("_proj")}
    assert projections and all(isinstance(m, QuantizedLinear) and isinstance(m.weight, Int4Weight)
                               and m.weight.kind == "gptq" for m in projections.values())
    assert type(model.lm_head) is type(float_model.lm_head)  # the head stays float
    assert model.config.quantization_config is config
    assert model.config.to_dict()["quantization_config"]["quant_method"] == "gptq"
    for name, module in projections.items():  # chosen near the float weights
        w = float_model.get_submodule(name).weight
        assert (module.weight.dequantize() - w).abs().max() < 0.25 * w.abs().max()
    ids = torch.tensor([[1, 5, 9, 33, 2, 17, 40], [3, 3, 8, 60, 11, 12, 55]]) % vocab
    dequantized = copy.deepcopy(model).dequantize()
    with torch.no_grad():
        expected = dequantized(ids).logits
        torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def test_layers_whose_inputs_are_not_whole_groups_stay_float(tmp_path):
    ref, _ = model_pair("mistral", hidden_size=64, intermediate_size=96)
    ref.save_pretrained(tmp_path)
    config = maestrale.GPTQConfig(bits=4, group_size=64, dataset=TEXTS, tokenizer=char_tokenizer(ref.config.vocab_size))
    model = maestrale.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config)
    kinds = {name.rpartition(".")[2]: type(m).__name__ for name, m in model.named_modules() if name.endswith("_proj")}
    assert kinds == {"q_proj": "QuantizedLinear", "k_proj": "QuantizedLinear", "v_proj": "QuantizedLinear",
                     "o_proj": "QuantizedLinear", "gate_proj": "QuantizedLinear", "up_proj": "QuantizedLinear",
                     "down_proj": "Linear"}  # 96 inputs: not whole groups of 64


@pytest.mark.parametrize("options, error, message", [
    (dict(bits=8), NotImplementedError, r"GPTQConfig\(bits=8\): maestrale's GPTQ quantizes to 4 bits"),
    (dict(bits=4, group_size=-1), ValueError, r"GPTQConfig\(group_size=-1\) is not supported: use 32, 64, 128, 256"),
    (dict(bits=4, desc_act=True), NotImplementedError, r"desc_act=True\): act-order"),
    (dict(bits=4, damp_percent=0), ValueError, "damp_percent must be a number between 0 and 1, got 0"),
    (dict(bits=4, sym="yes"), TypeError, "sym must be True or False"),
    (dict(bits=4, model_seqlen=1), ValueError, "model_seqlen must be a number of tokens"),
    (dict(bits=4, dataset="c4"), ValueError, r"dataset='c4'\): one of transformers' hub datasets .*pass the "
                                             "calibration texts themselves"),
    (dict(bits=4, dataset=[]), TypeError, "dataset must be a non-empty list of strings"),
    (dict(bits=4, dataset=TEXTS), ValueError, "dataset needs a tokenizer"),
])
def test_config_refuses_bad_options_by_name(options, error, message):
    with pytest.raises(error, match=message):
        maestrale.GPTQConfig(**options)


def test_quantizing_without_a_dataset_says_what_to_pass(family_folder):
    with pytest.raises(ValueError, match=r"quantizing needs calibration text: pass dataset=\[texts\]"):
        maestrale.AutoModelForCausalLM.from_pretrained(family_folder("mistral"),
                                                       quantization_config=maestrale.GPTQConfig(bits=4))


@pytest.mark.parametrize("family, sym, checkpoint_format", [("mistral", True, "gptq"), ("phi3", False, "gptq_v2"),
                                                            ("mixtral", False, "gptq")])
def test_a_gptq_model_saves_as_a_gptq_checkpoint_that_loads_back(family_folder, tmp_path, family, sym,
                                                                 checkpoint_format):
    from safetensors.torch import load_file
    from test_gptq_awq import pack_gptq

    folder = family_folder(family)
    vocab = maestrale.AutoConfig.from_pretrained(folder).vocab_size
    config = maestrale.GPTQConfig(bits=4, group_size=32, sym=sym, format=checkpoint_format, dataset=TEXTS,
                                  tokenizer=char_tokenizer(vocab))
    model = maestrale.AutoModelForCausalLM.from_pretrained(folder, quantization_config=config)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved == {"quant_method": "gptq", "bits": 4, "group_size": 32, "damp_percent": 0.1, "desc_act": False,
                     "act_group_aware": True, "sym": sym, "true_sequential": True, "model_seqlen": None,
                     "checkpoint_format": checkpoint_format}
    tensors = load_file(tmp_path / "model.safetensors")
    for name, module in model.named_modules():  # packed by the test's own packer of the published layout
        if isinstance(module, QuantizedLinear):
            weight = module.weight
            scale, zero = weight.scale_and_zeros[:, :weight.shape[0]].unbind(-1)
            zeros = torch.round(8 - zero / scale).long()
            assert not sym or bool((zeros == 8).all())
            qweight, qzeros = pack_gptq(weight.values().numpy(), zeros.numpy(), checkpoint_format)
            assert torch.equal(tensors[f"{name}.qweight"], qweight) and torch.equal(tensors[f"{name}.qzeros"], qzeros)
            assert torch.equal(tensors[f"{name}.g_idx"], torch.arange(weight.shape[1], dtype=torch.int32) // 32)
            assert f"{name}.weight" not in tensors
    loaded = maestrale.AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.tensor([[1, 5, 9, 33, 2, 17, 40]]) % vocab
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_other_kept_quantized_weights_are_still_not_saved(family_folder, tmp_path):
    torchao = pytest.importorskip("torchao.quantization", reason="torchao is not installed (test extra)")
    model = maestrale.AutoModelForCausalLM.from_pretrained(
        family_folder("mistral"), quantization_config=maestrale.TorchAoConfig(torchao.Int4WeightOnlyConfig(32)))
    with pytest.raises(ValueError, match=r"holds weights kept quantized \(int4 g32\), which maestrale does not save"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
