"""int8/int4 weight-only weights on CUDA (maestrale's kernels, engine/kernels.py int4_mma_matmul, int8_row_matmul
and int8_matmul): products against the float product of the dequantized weight on odd shapes, decode rows (1, 3) to
prefill rows (33, 100), moves between CPU and CUDA layouts, and a TorchAoConfig model against its dequantized self.
Skipped without CUDA."""

import pytest
import torch

import maestrale
from maestrale.quantization.weight_only import Int4Weight, Int8Weight, QuantizedLinear, quantize_int4, quantize_int8

if not torch.cuda.is_available():
    pytest.skip("the CUDA weight-only products need a GPU", allow_module_level=True)


def _int4(rows, cols, group, device="cpu"):
    g = torch.Generator().manual_seed(rows + cols)
    values = torch.randint(0, 16, (rows, cols), generator=g, dtype=torch.int32)
    scale = (torch.rand(rows, cols // group, generator=g) * 0.02 + 0.001).bfloat16()
    zero = (torch.randn(rows, cols // group, generator=g) * 0.05).bfloat16()
    return values.to(device), scale.to(device), zero.to(device)


@pytest.mark.parametrize("group", [32, 64, 128, 256])
@pytest.mark.parametrize("rows, groups", [(5, 1), (37, 3), (130, 2), (1000, 4)])  # cols of 1, 2 or 4 k-tiles of 16
def test_int4_product_on_cuda_equals_the_dequantized_product(rows, groups, group):
    values, scale, zero = _int4(rows, groups * group, group, "cuda")
    weight = Int4Weight("int4", values, scale, zero)
    assert torch.equal(weight.values(), values.to(torch.uint8))
    reference = weight.dequantize().double()
    expand = lambda t: t.double().repeat_interleave(group, dim=1)  # noqa: E731
    torch.testing.assert_close(reference, (values.double() - 8) * expand(scale) + expand(zero), rtol=0, atol=1e-2)
    for m in (1, 3, 17, 33, 100):
        x = torch.randn(m, groups * group, device="cuda")
        bound = (x.abs().double() @ reference.abs().T).max().item()
        torch.testing.assert_close(weight.matmul(x.bfloat16()).double(), x.double() @ reference.T, rtol=0,
                                   atol=1e-2 * bound)


def test_int4_moves_between_the_cpu_and_cuda_layouts():
    values, scale, zero = _int4(37, 256, 64)
    layer = QuantizedLinear(256, 37, None)
    layer.weight = Int4Weight("int4", values, scale, zero)
    x = torch.randn(3, 256).bfloat16()
    on_cpu, packed = layer(x), layer.weight.packed.clone()
    layer.to("cuda")
    assert layer.weight.packed.is_cuda and torch.equal(layer.weight.values().cpu(), values.to(torch.uint8))
    torch.testing.assert_close(layer(x.cuda()).cpu(), on_cpu, rtol=1e-2, atol=1e-2)
    layer.to("cpu")
    assert torch.equal(layer.weight.packed, packed)


@pytest.mark.parametrize("rows, cols", [(5, 96), (37, 200), (1000, 4096)])
def test_int8_product_on_cuda_equals_the_dequantized_product(rows, cols):
    weight = quantize_int8(torch.randn(rows, cols, device="cuda").bfloat16() * 0.05)
    assert isinstance(weight, Int8Weight) and weight.values.is_cuda
    reference = weight.dequantize().double()
    for m in (1, 3, 17, 33, 100):
        x = torch.randn(m, cols, device="cuda")
        bound = (x.abs().double() @ reference.abs().T).max().item()
        torch.testing.assert_close(weight.matmul(x.bfloat16()).double(), x.double() @ reference.T, rtol=0,
                                   atol=1e-2 * bound)


def test_grouped_int8_product_on_cuda_equals_the_dequantized_product():
    """int8 with a scale per group of 32 inputs (GGUF's Q8_0) through the same kernel."""
    values = torch.randint(-128, 128, (45, 256), dtype=torch.int8, device="cuda")
    weight = Int8Weight("Q8_0", values, (torch.rand(45, 8, device="cuda") * 0.01).bfloat16())
    reference = weight.dequantize().double()
    x = torch.randn(5, 256, device="cuda")
    bound = (x.abs().double() @ reference.abs().T).max().item()
    torch.testing.assert_close(weight.matmul(x.bfloat16()).double(), x.double() @ reference.T, rtol=0,
                               atol=1e-2 * bound)


@pytest.mark.parametrize("algorithm", ["tinygemm", "hqq"])
def test_int4_quantization_on_cuda_equals_the_cpu_one(algorithm):
    w = torch.randn(48, 512).bfloat16() * 0.05
    ours, theirs = quantize_int4(w.cuda(), 128, algorithm), quantize_int4(w, 128, algorithm)
    if algorithm == "tinygemm":  # the same bfloat16 arithmetic; HQQ runs in float16 on CUDA, as torchao's does
        assert torch.equal(ours.values().cpu(), theirs.values())
        assert torch.equal(ours.scale_and_zeros.cpu(), theirs.scale_and_zeros)
    torch.testing.assert_close(ours.dequantize().cpu().float(), w.float(), rtol=0, atol=0.1)


@pytest.mark.parametrize("quant_type", ["int8", "int4"])
def test_torchao_config_model_on_cuda_equals_its_dequantized_model(tmp_path, quant_type):
    torchao = pytest.importorskip("torchao.quantization", reason="torchao is not installed")
    config = maestrale.MistralConfig(vocab_size=1000, hidden_size=512, intermediate_size=1536, num_hidden_layers=2,
                                     num_attention_heads=8, num_key_value_heads=2)
    torch.manual_seed(0)
    maestrale.MistralForCausalLM(config).save_pretrained(tmp_path)
    kind = torchao.Int8WeightOnlyConfig() if quant_type == "int8" else torchao.Int4WeightOnlyConfig(group_size=128)
    model = maestrale.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map="cuda",
                                                           quantization_config=maestrale.TorchAoConfig(kind))
    assert model.model.layers[0].mlp.down_proj.weight.kind.startswith(quant_type)
    ids = torch.randint(0, 1000, (2, 24), device="cuda")
    with torch.no_grad():
        quantized = model(ids).logits.float()
        # the static decoder (compiled, in a CUDA graph) runs the quantized layers; its first token is the forward's
        out = model.generate(ids[:1], max_new_tokens=8, do_sample=False, cache_implementation="static")
        assert out[0, 24] == quantized[0, -1].argmax()
        layer = model.__dict__["_static_decoder"].layers[0]  # q/k/v and gate/up stacked, one product each
        assert layer.qkv.shape == (512 + 2 * 128, 512) and layer.gate_up.shape == (2 * 1536, 512)
        model.dequantize()
        torch.testing.assert_close(model(ids).logits.float(), quantized, rtol=0,
                                   atol=5e-2 * quantized.abs().max().item())


@pytest.mark.parametrize("quant_type", ["int8", "int4"])
def test_mixtral_experts_quantized_on_cuda_decode_through_the_expert_kernels(tmp_path, quant_type):
    """FqnToConfig's quantized experts: the static decoder (a CUDA graph) reads them stacked, by expert, in one product
    each for gate/up and down (int4_mma_matmul / int8_row_matmul's experts=); its logits equal the forward's (the
    experts run one at a time on their rows), and the forward's equal the dequantized model's, at batch 1 and 3."""
    torchao = pytest.importorskip("torchao.quantization", reason="torchao is not installed")
    from maestrale.quantization.weight_only import PackedWeight

    config = maestrale.MixtralConfig(vocab_size=1000, hidden_size=512, intermediate_size=768, num_hidden_layers=2,
                                     num_attention_heads=8, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2)
    torch.manual_seed(0)
    maestrale.MixtralForCausalLM(config).save_pretrained(tmp_path)
    rule = torchao.Int8WeightOnlyConfig() if quant_type == "int8" else torchao.Int4WeightOnlyConfig(group_size=128)
    fqn = torchao.FqnToConfig({"_default": rule, r"re:.*\.experts": rule})
    model = maestrale.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map="cuda",
                                                           quantization_config=maestrale.TorchAoConfig(fqn))
    kwargs = dict(do_sample=False, return_dict_in_generate=True, output_logits=True, max_new_tokens=6)
    for batch in (1, 3):
        ids = torch.randint(0, 1000, (batch, 20), device="cuda")
        with torch.no_grad():
            ref = model.generate(ids, cache_implementation="dynamic", **kwargs)
            fast = model.generate(ids, cache_implementation="static", **kwargs)
        layer = model.__dict__["_static_decoder"].layers[0]
        assert isinstance(layer.gate_up, PackedWeight) and layer.gate_up.num_experts == 4
        assert layer.gate_up.shape == (4 * 2 * 768, 512) and layer.down.shape == (4 * 512, 768)
        for step, (a, b) in enumerate(zip(ref.logits, fast.logits)):
            torch.testing.assert_close(b.float(), a.float(), rtol=0, atol=3e-2 * a.float().abs().max().item())
            if not torch.equal(ref.sequences[:, 20 + step], fast.sequences[:, 20 + step]):
                break  # a near tie rounded the other way: the steps after read other tokens
    with torch.no_grad():
        quantized = model(ids).logits.float()
        model.dequantize()
        torch.testing.assert_close(model(ids).logits.float(), quantized, rtol=0,
                                   atol=5e-2 * quantized.abs().max().item())


def test_stacked_int4_layers_run_one_product_and_fuse_the_gate():
    """gate/up-like int4 layers in CUDA's layout stacked: one product equal to the layers' own, nothing stored twice,
    and the fused silu gate equal to the gate of the dequantized product."""
    from maestrale.engine.kernels import matvec_torch
    from maestrale.quantization.weight_only import stacked_packed

    layers = []
    for rows in (48, 48):
        values, scale, zero = _int4(rows, 256, 64, "cuda")
        layers.append(QuantizedLinear(256, rows, None))
        layers[-1].weight = Int4Weight("int4", values, scale, zero)
    x = torch.randn(3, 256, device="cuda").bfloat16()
    separate = torch.cat([layer(x) for layer in layers], dim=-1)
    stacked = stacked_packed(layers)
    assert stacked.shape == (96, 256)
    torch.testing.assert_close(stacked.matmul(x), separate, rtol=1e-2, atol=1e-2 * separate.abs().max().item())
    assert layers[1].weight.packed.data_ptr() == stacked.packed.data_ptr() + 48 * 32 * 4
    reference = matvec_torch(x.double(), stacked.dequantize().double(), torch.nn.functional.silu)
    bound = reference.abs().max().item()
    for rows in (1, 3):
        out = stacked.matmul(x[:rows], torch.nn.functional.silu)
        torch.testing.assert_close(out.double(), reference[:rows], rtol=0, atol=2e-2 * bound)


def test_int8_product_fuses_the_gate_at_one_row():
    from maestrale.engine.kernels import matvec_torch

    weight = quantize_int8(torch.randn(2 * 40, 256, device="cuda").bfloat16() * 0.05)
    x = torch.randn(1, 256, device="cuda").bfloat16()
    assert weight.fuses_gate(x) and not weight.fuses_gate(x.expand(3, -1))
    reference = matvec_torch(x.double(), weight.dequantize().double(), torch.nn.functional.silu)
    torch.testing.assert_close(weight.matmul(x, torch.nn.functional.silu).double(), reference, rtol=0,
                               atol=2e-2 * reference.abs().max().item())
