"""maestrale's C++ product on GGUF blocks (quantization/gguf_kernels.cpp) against gguf-py's dequantization."""

import logging

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize
from test_gguf_packed import GGUF_NAME, _blocks, _tiny_gguf, smollm2_path  # noqa: F401 (a fixture)

import maestrale
from maestrale.quantization import gguf_kernels
from maestrale.quantization.gguf import pack
from maestrale.quantization.weight_only import Int4Weight, QuantizedLinear

TYPES = (Q.Q4_0, Q.Q4_1, Q.Q8_0)

if not gguf_kernels.available():
    pytest.skip("maestrale's GGUF kernels did not build here (no C++ compiler?)", allow_module_level=True)


def quantized_activations(x: torch.Tensor) -> torch.Tensor:
    """x as the kernel sees it: int8 per block of 32, scale max |x| / 127 (the same float32 operations)."""
    blocks = x.float().unflatten(-1, (-1, 32))
    amax = blocks.abs().amax(-1, keepdim=True)
    c = amax.new_tensor(127.0)  # tensor by tensor: torch divides by a Python number as a product by its inverse
    inv = torch.where(amax > 0, c / amax, 0)
    return (torch.round(blocks * inv) * (amax / c)).flatten(-2)


def rounding_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """How far int8 activations can move x @ w.T: half a step (max |x| / 254 per block) times each block's |w|."""
    half_step = x.double().abs().unflatten(-1, (-1, 32)).amax(-1) / 254
    return half_step @ w.double().abs().unflatten(-1, (-1, 32)).sum(-1).T


def _weight(qtype, rows, cols, seed):
    raw = _blocks(rows, cols, qtype, np.random.default_rng(seed))
    return torch.from_numpy(raw), torch.from_numpy(dequantize(raw, qtype).reshape(rows, cols))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows, cols", [(37, 96), (5, 224), (130, 32), (1000, 576)])
def test_product_is_the_dequantized_product_within_activation_rounding(qtype, rows, cols):
    raw, reference = _weight(qtype, rows, cols, rows + cols)
    weight = pack(qtype.name, raw, torch.float32)
    assert isinstance(weight, gguf_kernels.BlocksWeight)
    assert torch.equal(weight.dequantize(), reference)
    for batch in range(1, 10):  # every tile of activation rows (4, 3, 2, 1) and their sequences
        x = torch.randn(batch, cols)
        out = weight.matmul(x).double()
        exact = x.double() @ reference.double().T
        float_rounding = 1e-6 * (x.double().abs() @ reference.double().abs().T)
        assert ((out - exact).abs() <= rounding_bound(x, reference) + float_rounding).all()
        # with x's int8 rounding applied beforehand, what is left is float rounding
        assert ((out - quantized_activations(x).double() @ reference.double().T).abs() <= float_rounding).all()
    # bfloat16 activations are read as they are, in float32
    x = torch.randn(2, cols, dtype=torch.bfloat16)
    torch.testing.assert_close(weight.matmul(x), weight.matmul(x.float()), rtol=0, atol=0)


def test_the_build_for_this_cpu_runs():
    """The library loaded is the widest instruction set the CPU has: AVX-512 with VNNI where /proc/cpuinfo lists it."""
    assert torch.ops.maestrale.simd() == gguf_kernels.cpu_simd()
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags to check against")
    if gguf_kernels.AVX512_CPUINFO <= flags:
        assert torch.ops.maestrale.simd() == "avx512"
    elif {"avx2", "fma", "f16c"} <= flags:
        assert torch.ops.maestrale.simd() == "avx2"


NARROWER = {"avx512": ["avx2", "scalar"], "avx2": ["scalar"], "scalar": []}[gguf_kernels.cpu_simd()]


@pytest.mark.parametrize("simd", NARROWER)
def test_narrower_builds_compute_as_this_cpus_build(simd):
    """The builds for CPUs without AVX-512 or AVX2 (each under its own operator namespace, beside the default one):
    AVX2 and AVX-512 sum the same integers and scale them in the same float operations, so they agree exactly; the
    scalar loop rounds its float sums otherwise, and agrees to float rounding."""
    torch.ops.load_library(str(gguf_kernels.build(simd, namespace=f"maestrale_{simd}")))
    ops = getattr(torch.ops, f"maestrale_{simd}")
    assert ops.simd() == simd
    for qtype in TYPES:
        raw, reference = _weight(qtype, 45, 160, 3)
        weight = pack(qtype.name, raw, torch.float32)
        for batch in (1, 3, 6):
            x = torch.randn(batch, 160)
            ours = ops.gguf_mm(x, weight.blocks, weight.ggml_type, 45)
            if simd == "scalar":
                bound = 1e-6 * (x.abs() @ reference.abs().T)
                assert ((ours - quantized_activations(x) @ reference.T).abs() <= bound).all()
            else:
                assert torch.equal(ours, weight.matmul(x))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_embedding_rows_are_the_dequantized_rows(qtype):
    raw, reference = _weight(qtype, 50, 256, 1)
    ids = torch.tensor([[3, 49, 0], [7, 7, 1]])
    assert torch.equal(pack(qtype.name, raw, torch.float32).rows(ids), reference[ids])


def _kernel_layers(model) -> list[str]:
    return [name for name, module in model.named_modules()
            if isinstance(module, QuantizedLinear) and isinstance(module.weight, gguf_kernels.BlocksWeight)]


def _int8_activations(model, names):
    """Round the input of the linear layers `names` as the kernels do: the float model they should then equal."""
    for name in names:
        model.get_submodule(name).register_forward_pre_hook(lambda _, args: (quantized_activations(args[0]),))


def test_packed_model_equals_the_dequantized_model(tmp_path):
    _tiny_gguf(tmp_path / "tiny.gguf", np.random.default_rng(0))
    load = maestrale.AutoModelForCausalLM.from_pretrained
    floats = load(tmp_path, gguf_file="tiny.gguf")
    packed = load(tmp_path, gguf_file="tiny.gguf", keep_quantized=True)
    ours = _kernel_layers(packed)
    assert len(ours) == 7  # q, k, v, gate, up, down, and the head tied to the Q8_0 embedding (o is Q5_0)
    ids = torch.tensor([[1, 50, 7, 95, 3], [4, 4, 80, 2, 9]])
    with torch.no_grad():
        plain = floats(ids).logits
        _int8_activations(floats, ours)
        rounded = floats(ids).logits
        logits = packed(ids).logits
        # with the kernels' int8 activations, the float model differs by float rounding (logits reach ~25) ...
        torch.testing.assert_close(logits, rounded, rtol=0, atol=1e-4)
        # ... without, by the rounding of 7 products' inputs: 2.6% of the largest logit here
        assert (logits - plain).abs().max() <= 0.05 * plain.abs().max()
        out = packed.generate(ids, max_new_tokens=6, do_sample=False)
        assert torch.equal(out, floats.generate(ids, max_new_tokens=6, do_sample=False))
        assert torch.equal(out, packed.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static"))


def test_without_a_compiler_torch_kernels_run_with_a_notice(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing cached
    monkeypatch.setenv("CXX", str(tmp_path / "no-compiler"))
    with caplog.at_level(logging.WARNING):
        assert gguf_kernels.available.__wrapped__() is False
    messages = [record.getMessage() for record in caplog.records]  # the build's notice, then the fallback's
    assert len(messages) == 2 and "compiling" in messages[0] and "torch's int4/int8 kernels run instead" in messages[1]
    monkeypatch.setattr(gguf_kernels, "available", lambda: False)
    raw, reference = _weight(Q.Q4_1, 16, 64, 0)
    assert isinstance(pack("Q4_1", raw, torch.float32), Int4Weight)


@pytest.mark.slow
def test_packed_smollm2_logits_and_memory(smollm2_path):  # noqa: F811 (the fixture)
    import os

    load = maestrale.AutoModelForCausalLM.from_pretrained
    packed = load(smollm2_path, gguf_file=GGUF_NAME, keep_quantized=True)
    size = os.path.getsize(os.path.join(smollm2_path, GGUF_NAME))
    footprint = packed.get_memory_footprint()
    print(f"packed SmolLM2 (maestrale's kernels): {footprint / 1e6:.1f} MB resident, file {size / 1e6:.1f} MB "
          f"({footprint / size:.2f}x)")
    assert footprint <= 1.3 * size
    floats = load(smollm2_path, gguf_file=GGUF_NAME)
    tokenizer = maestrale.AutoTokenizer.from_pretrained(smollm2_path, gguf_file=GGUF_NAME)
    ids = tokenizer("The capital of France is Paris. It is famous for the Eiffel Tower, its museums and its food.",
                    return_tensors="pt").input_ids
    with torch.no_grad():
        ours, plain = packed(ids).logits, floats(ids).logits
    # int8 activations through 30 layers: where one product's float rounding flips an int8 rounding downstream, the
    # tiny model's exact check (above) no longer holds; what is left to check is the answer (perplexity: BENCHMARKS.md)
    print(f"logits (up to {plain.abs().max():.1f}) move by {(ours - plain).abs().max():.2f} with int8 activations")
    agree = (ours.argmax(-1) == plain.argmax(-1)).float().mean()
    print(f"top tokens agree at {agree:.0%} of {ids.shape[1]} positions")
    assert agree >= 0.9
    assert (ours.argmax(-1)[..., None] == plain.topk(3, dim=-1).indices).any(-1).all()  # near-ties swap, no more


@pytest.mark.slow
def test_compiled_cpu_step_decodes_as_the_eager_step(tmp_path):
    """generate(cache_implementation="static", compile_config=...) on CPU: the step compiled, the kernels traced."""
    _tiny_gguf(tmp_path / "tiny.gguf", np.random.default_rng(0))
    packed = maestrale.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", keep_quantized=True)
    ids = torch.tensor([[1, 50, 7, 95, 3], [4, 4, 80, 2, 9]])
    options = dict(max_new_tokens=6, do_sample=False, cache_implementation="static", output_scores=True,
                   return_dict_in_generate=True)
    with torch.no_grad():
        eager = packed.generate(ids, **options)
        compiled = packed.generate(ids, compile_config={}, **options)
    assert packed._static_decoder.step is not packed._static_decoder._step  # the compiled one ran
    assert torch.equal(compiled.sequences, eager.sequences)
    # fused float glue may round otherwise, and move an int8 activation by one step: scores agree to that
    torch.testing.assert_close(torch.stack(compiled.scores), torch.stack(eager.scores), rtol=0, atol=3e-2)


@pytest.mark.parametrize("batch, heads, kv_heads, slots, t", [(1, 9, 3, 256, 40), (3, 4, 4, 16, 15), (2, 6, 2, 8, 21)])
def test_decode_attention_is_sdpa_over_the_valid_slots(batch, heads, kv_heads, slots, t):
    """Full caches (t < slots) and rings (t >= slots: every slot holds one of the last tokens), with padding."""
    from maestrale.engine.kernels import decode_attention_torch

    q, k, v = torch.randn(batch, heads, 40), torch.randn(batch, kv_heads, slots, 40), torch.randn(batch, kv_heads, slots, 40)
    seq_mask = torch.ones(batch, max(slots, 64), dtype=torch.int8)  # as the decoder's: a column per token
    seq_mask[-1, :3] = 0  # a left-padded row
    t = torch.tensor(t)
    expected = decode_attention_torch(q, k, v, seq_mask, t, 0.3)
    torch.testing.assert_close(gguf_kernels.decode_attention(q, k, v, seq_mask, t, 0.3), expected)


def _linears(qtype, cols: int, rows: tuple[int, ...]) -> list[QuantizedLinear]:
    """Bias-free layers reading the same `cols` inputs, with `rows` outputs each, their blocks kept packed."""
    layers = []
    for seed, n in enumerate(rows):
        layer = QuantizedLinear(cols, n, None)
        layer.weight = pack(qtype.name, _weight(qtype, n, cols, seed)[0], torch.float32)
        layers.append(layer)
    return layers


def test_stacked_blocks_run_one_product_on_the_layers_blocks():
    layers = _linears(Q.Q4_1, 96, (64, 32, 32))
    x = torch.randn(3, 96)
    separate = torch.cat([layer(x) for layer in layers], dim=-1)
    before = [layer.weight.blocks.clone() for layer in layers]
    stacked = gguf_kernels.stacked_blocks(layers)
    assert torch.equal(stacked.matmul(x), separate)
    for layer, blocks in zip(layers, before):  # the layers now read their rows of the stacked blocks, unchanged
        assert torch.equal(layer.weight.blocks, blocks)
        assert stacked.blocks.data_ptr() <= layer.weight.blocks.data_ptr() < stacked.blocks.data_ptr() + stacked.blocks.numel()
    assert gguf_kernels.stacked_blocks(layers).blocks.data_ptr() == stacked.blocks.data_ptr()  # laid out once
    other = _linears(Q.Q8_0, 96, (8,))
    assert gguf_kernels.stacked_blocks([*layers, *other]) is None  # another GGUF type: each layer runs itself


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_interleaved_layout_holds_the_files_blocks(qtype):
    """13 rows: one whole group of 8 and one of 5 padded with zero blocks; deinterleave gives the file's bytes back."""
    raw, _ = _weight(qtype, 13, 96, 4)
    laid_out = gguf_kernels.interleave(qtype.name, raw)
    size, head = gguf_kernels.BLOCK_BYTES[qtype.name], gguf_kernels.HEAD_BYTES[qtype.name]
    assert laid_out.shape == (2, 8 * raw.shape[1]) and laid_out.sum() == raw.sum()
    back = gguf_kernels.deinterleave(qtype.name, laid_out.unflatten(-1, (-1, 8 * size))).flatten(2).flatten(0, 1)
    assert torch.equal(back[:13], raw) and not back[13:].any()
    # the layout as group_tile reads it: block 1 of row 10 (group 1, row 2): d, then its bytes 8j-8j+7 in chunk 4
    group = laid_out[1].unflatten(0, (-1, 8 * size))[1]
    block = raw[10].unflatten(0, (-1, size))[1]
    assert torch.equal(group[4:6], block[:2])
    values = group[8 * head:]
    for j in range((size - head) // 8):
        assert torch.equal(values[64 * j + 4 * 8:64 * j + 5 * 8], block[head + 8 * j:head + 8 * j + 8])


def test_stacked_blocks_of_rows_not_in_whole_groups():
    """Only the last layer may end in a padded group: elsewhere its zero rows would sit among the outputs."""
    layers = _linears(Q.Q4_0, 64, (16, 8, 5))
    x = torch.randn(2, 64)
    separate = torch.cat([layer(x) for layer in layers], dim=-1)
    stacked = gguf_kernels.stacked_blocks(layers)
    assert stacked.shape == (29, 64) and torch.equal(stacked.matmul(x), separate)
    assert gguf_kernels.stacked_blocks(layers[::-1]) is None
