"""GPTQ and AWQ checkpoints: tiny models whose linear layers are packed here by the formats' published layouts (AutoGPTQ
/ GPTQModel, AutoAWQ's GEMM) from known 4-bit values, loaded by maestrale and compared with the float model whose
weights are those values dequantized; the variants maestrale does not read are refused by name."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from parity import model_pair

import maestrale

SIZES = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, vocab_size=97)
PROMPT = torch.tensor([[1, 5, 9, 33, 2, 17, 40], [3, 3, 8, 60, 11, 12, 95]])
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # the output held by each nibble of an AWQ int32, from the lowest bits


def _int32(nibbles: np.ndarray) -> torch.Tensor:
    """(..., 8) values 0..15 -> (...) int32, the first value in the lowest bits."""
    words = (nibbles.astype(np.uint32) << (4 * np.arange(8, dtype=np.uint32))).sum(-1, dtype=np.uint32)
    return torch.from_numpy(words.view(np.int32).copy())


def pack_gptq(q, zeros, version):
    """qweight (in / 8, out): eight consecutive inputs per int32; qzeros (groups, out / 8): eight consecutive
    outputs, minus one in the v1 layout."""
    out, cols = q.shape
    qweight = _int32(q.T.reshape(cols // 8, 8, out).transpose(0, 2, 1))
    stored = (zeros - 1) & 15 if version == "gptq" else zeros
    return qweight, _int32(stored.reshape(zeros.shape[0], out // 8, 8))


def pack_awq(q, zeros):
    """qweight (in, out / 8) and qzeros (groups, out / 8): eight outputs per int32 in AWQ's order."""
    out, cols = q.shape
    qweight = _int32(q.T.reshape(cols, out // 8, 8)[..., AWQ_ORDER])
    return qweight, _int32(zeros.reshape(zeros.shape[0], out // 8, 8)[..., AWQ_ORDER])


def build(tmp_path, family="mistral", method="gptq", group_size=128, version="gptq", g_idx=None, sizes=SIZES,
          **config):
    """A checkpoint folder packed in `method`'s layout, and the float transformers model it dequantizes to.
    g_idx: cols -> each input's group, for GPTQ's g_idx (by default the plain order)."""
    ref, _ = model_pair(family, **sizes)
    rng = np.random.default_rng(0)
    tensors, packed = {}, set()
    for name, module in ref.named_modules():
        if not isinstance(module, torch.nn.Linear) or name == "lm_head":
            continue
        out, cols = module.weight.shape
        groups = cols // (cols if group_size == -1 else group_size)
        q = rng.integers(0, 16, (out, cols))
        # v1 GPTQ cannot store a zero point of 0 (it stores them minus one)
        zeros = rng.integers(1 if (method, version) == ("gptq", "gptq") else 0, 16, (groups, out))
        scales = rng.uniform(0.002, 0.02, (groups, out)).astype(np.float16)
        group_of = np.arange(cols) // (cols // groups)
        weight = scales.astype(np.float32)[group_of].T * (q - zeros[group_of].T)
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(weight))
        qweight, qzeros = pack_gptq(q, zeros, version) if method == "gptq" else pack_awq(q, zeros)
        packed.add(f"{name}.weight")
        tensors.update({f"{name}.qweight": qweight, f"{name}.qzeros": qzeros,
                        f"{name}.scales": torch.from_numpy(scales)})
        if method == "gptq":
            tensors[f"{name}.g_idx"] = torch.from_numpy(group_of if g_idx is None else g_idx(cols)).int()
    ref.save_pretrained(tmp_path)
    tensors.update({name: tensor for name, tensor in ref.state_dict().items() if name not in packed})
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    layout = dict(checkpoint_format=version, desc_act=False, sym=True) if method == "gptq" else dict(version="gemm",
                                                                                                     zero_point=True)
    quantization = {"quant_method": method, "bits": 4, "group_size": group_size, **layout, **config}
    data = json.loads((tmp_path / "config.json").read_text())
    data["quantization_config"] = quantization
    (tmp_path / "config.json").write_text(json.dumps(data))
    return ref.eval()


CASES = {
    "gptq-g128": dict(method="gptq", group_size=128),
    "gptq-g32": dict(method="gptq", group_size=32),
    "gptq-per-row": dict(method="gptq", group_size=-1),  # one group of 128 or 256 per row
    "gptq-g512-phi3": dict(method="gptq", group_size=512, family="phi3",  # split into groups of 256; fused layers
                           sizes=dict(SIZES, hidden_size=512, intermediate_size=512)),
    "gptq_v2-g64": dict(method="gptq", group_size=64, version="gptq_v2"),
    "gptq-desc_act-trivial": dict(method="gptq", group_size=128, desc_act=True),
    "awq-g128": dict(method="awq", group_size=128),
    "awq-g32-phi3": dict(method="awq", group_size=32, family="phi3"),
}


@pytest.mark.parametrize("case", CASES)
def test_packed_checkpoint_equals_its_dequantized_float_model(tmp_path, case):
    options = CASES[case]
    ref = build(tmp_path, **options)
    model = maestrale.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.config.quantization_config.quant_method == options["method"]
    assert {type(m.weight).__name__ for name, m in model.named_modules() if name.endswith("_proj")} == {"Int4Weight"}
    assert isinstance(model.lm_head.weight, torch.nn.Parameter)  # left in float by the checkpoint
    with torch.no_grad():
        expected, got = ref(PROMPT).logits, model(PROMPT).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * expected.abs().max().item())
    model.dequantize()
    with torch.no_grad():
        torch.testing.assert_close(model(PROMPT).logits, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def _edit_config(folder, **changes):
    data = json.loads((folder / "config.json").read_text())
    data["quantization_config"].update(changes)
    (folder / "config.json").write_text(json.dumps(data))


@pytest.mark.parametrize("method, changes, message", [
    ("gptq", dict(bits=3), "gptq checkpoint with bits=3"),
    ("gptq", dict(bits=8), "gptq checkpoint with bits=8"),
    ("gptq", dict(checkpoint_format="marlin"), "gptq checkpoint_format='marlin'"),
    ("awq", dict(version="gemv"), "awq version='gemv'"),
    ("awq", dict(version="exllama"), "awq version='exllama'"),
])
def test_unsupported_variants_are_refused_by_field(tmp_path, method, changes, message):
    build(tmp_path, method=method)
    _edit_config(tmp_path, **changes)
    with pytest.raises(NotImplementedError, match=message):
        maestrale.AutoModelForCausalLM.from_pretrained(tmp_path)


def test_act_order_with_a_permutation_is_refused(tmp_path):
    build(tmp_path, g_idx=lambda cols: np.random.default_rng(1).permutation(cols) // 128, desc_act=True)
    with pytest.raises(NotImplementedError, match=r"_proj\.g_idx .*desc_act=True"):
        maestrale.AutoModelForCausalLM.from_pretrained(tmp_path)


def test_a_group_size_the_kernels_cannot_take_is_refused(tmp_path):
    build(tmp_path, group_size=16)
    with pytest.raises(NotImplementedError, match="group_size=16"):
        maestrale.AutoModelForCausalLM.from_pretrained(tmp_path)


def test_gptq_config_cannot_quantize_a_float_checkpoint(tmp_path):
    ref, _ = model_pair("mistral", **SIZES)
    ref.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="a gptq dict describes a checkpoint quantized beforehand"):
        maestrale.AutoModelForCausalLM.from_pretrained(
            tmp_path, quantization_config={"quant_method": "gptq", "bits": 4, "group_size": 128})


def test_a_layer_without_its_qzeros_is_named(tmp_path):
    build(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.up_proj.qzeros"]
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="has no qzeros for model.layers.1.mlp.up_proj; a gptq layer needs"):
        maestrale.AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("case", ["gptq-g128", "gptq_v2-g64", "awq-g128", "awq-g32-phi3"])
def test_a_loaded_checkpoint_saves_back_its_own_tensors(tmp_path, case):
    options = CASES[case]
    build(tmp_path / "in", **options)
    model = maestrale.AutoModelForCausalLM.from_pretrained(tmp_path / "in")
    model.save_pretrained(tmp_path / "out")
    original, saved = load_file(tmp_path / "in" / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(saved) == sorted(original)
    for name, tensor in original.items():  # the packed words bit for bit; scales in the model's dtype, same values
        assert torch.equal(saved[name], tensor.to(saved[name].dtype)), name
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config == json.loads((tmp_path / "in" / "config.json").read_text())["quantization_config"]
    loaded = maestrale.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(loaded(PROMPT).logits, model(PROMPT).logits, rtol=0, atol=0)


def test_a_checkpoint_whose_groups_were_split_on_loading_is_not_saved_in_its_layout(tmp_path):
    build(tmp_path / "in", method="gptq", group_size=-1)
    model = maestrale.AutoModelForCausalLM.from_pretrained(tmp_path / "in")
    with pytest.raises(ValueError, match=r"q_proj: its checkpoint's group_size -1 was split into groups of 128 "
                                         r"inputs on loading.*model.dequantize\(\) and save"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
