"""int8/int4 weight-only weights: torch's products against the float product of the dequantized weight, the values
the packed layout holds, and the quantization rules against torchao's own on the same tensors."""

import pytest
import torch

from maestrale.quantization.weight_only import Int4Weight, Int8Weight, QuantizedLinear, quantize_int4, quantize_int8


def _int4(rows, cols, group, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 16, (rows, cols), generator=g, dtype=torch.int32)
    scale = torch.rand(rows, cols // group, generator=g) * 0.02 + 0.001
    zero = torch.randn(rows, cols // group, generator=g) * 0.05
    return values, scale.to(dtype), zero.to(dtype)


def _reference(values, scale, zero, group):
    """(q - 8) * scale + zero per group, in float64."""
    expand = lambda t: t.double().repeat_interleave(group, dim=1)  # noqa: E731
    return (values.double() - 8) * expand(scale) + expand(zero)


@pytest.mark.parametrize("group", [32, 64, 128, 256])
@pytest.mark.parametrize("rows", [5, 37, 130])  # not whole tiles of 16 (the CPU layout's) nor of the 32/64-row blocks
def test_int4_product_equals_the_dequantized_product(rows, group):
    cols = 2 * group if group < 256 else 256
    values, scale, zero = _int4(rows, cols, group, torch.float32, seed=rows + group)
    weight = Int4Weight("int4", values, scale, zero)
    assert torch.equal(weight.values(), values.to(torch.uint8))  # the layout unpacked
    reference = _reference(values, scale, zero, group)
    torch.testing.assert_close(weight.dequantize().double(), reference, rtol=0, atol=1e-6)
    layer = QuantizedLinear(cols, rows, torch.nn.Parameter(torch.randn(rows)))
    layer.weight = weight
    for shape in [(1, cols), (3, cols), (2, 5, cols)]:
        x = torch.randn(shape)
        expected = x.double() @ reference.T + layer.bias.double()
        bound = (x.abs().double() @ reference.abs().T).max()  # float32 rounding grows with the sum of |x * w|
        torch.testing.assert_close(layer(x).double(), expected, rtol=0, atol=1e-6 * bound.item())


def test_int4_in_bfloat16_runs_in_bfloat16_precision():
    values, scale, zero = _int4(37, 128, 32, torch.bfloat16)
    weight = Int4Weight("int4", values, scale, zero)
    reference = _reference(values, scale, zero, 32)
    x = torch.randn(4, 128)
    bound = (x.abs().double() @ reference.abs().T).max().item()
    torch.testing.assert_close(weight.matmul(x.bfloat16()).double(), x.double() @ reference.T, rtol=0,
                               atol=1e-2 * bound)


@pytest.mark.parametrize("rows, cols", [(5, 96), (37, 200), (130, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_product_equals_the_dequantized_product(rows, cols, dtype):
    g = torch.Generator().manual_seed(rows)
    values = torch.randint(-128, 128, (rows, cols), generator=g, dtype=torch.int8)
    scales = (torch.rand(rows, 1, generator=g) * 0.01).to(dtype)
    weight = Int8Weight("int8", values, scales)
    reference = values.double() * scales.double()
    torch.testing.assert_close(weight.dequantize().double(), reference, rtol=torch.finfo(dtype).eps, atol=0)
    x = torch.randn(3, cols)
    bound = (x.abs().double() @ reference.abs().T).max().item()
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(weight.matmul(x.to(dtype)).double(), x.double() @ reference.T, rtol=0,
                               atol=tolerance * bound)


def test_moving_an_int4_weight_keeps_its_values():
    values, scale, zero = _int4(37, 64, 32, torch.float32)
    layer = QuantizedLinear(64, 37, None)
    layer.weight = Int4Weight("int4", values, scale, zero)
    before = layer(torch.ones(1, 64))
    layer.to("cpu")  # the same layout: nothing unpacked
    assert torch.equal(layer.weight.values(), values.to(torch.uint8))
    assert torch.equal(layer(torch.ones(1, 64)), before)


def test_int4_refuses_a_group_size_the_product_does_not_take():
    values, scale, zero = _int4(16, 96, 48, torch.float32)
    with pytest.raises(ValueError, match="groups of 32, 64, 128, 256"):
        Int4Weight("int4", values, scale, zero)


def _weight(rows, cols, dtype):
    w = torch.randn(rows, cols) * 0.1
    w[0, :32] += 2.0  # a group far from zero: the minimum and zero point matter
    w[1, :32] = 0.5  # a constant group: the scale's floor
    return w.to(dtype)


@pytest.mark.parametrize("algorithm", ["tinygemm", "hqq"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [32, 128])
def test_int4_quantization_is_torchaos(dtype, group, algorithm):
    pytest.importorskip("torchao", reason="torchao is not installed (test extra)")
    from torchao.prototype.quantization.int4.int4_opaque_tensor import Int4OpaqueTensor
    from torchao.quantization.quantize_.workflows import Int4ChooseQParamsAlgorithm

    w = _weight(48, 256, dtype)
    theirs = Int4OpaqueTensor.from_hp(w, [1, group], Int4ChooseQParamsAlgorithm(algorithm))
    ours = quantize_int4(w, group, algorithm)
    assert torch.equal(ours.packed, theirs.qdata)
    assert torch.equal(ours.scale_and_zeros, theirs.scale_and_zero)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_quantization_is_torchaos(dtype):
    pytest.importorskip("torchao", reason="torchao is not installed (test extra)")
    from torchao.quantization import PerRow
    from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor

    w = _weight(37, 96, dtype)
    theirs = Int8Tensor.from_hp(w, PerRow())
    ours = quantize_int8(w)
    assert torch.equal(ours.values, theirs.qdata)
    assert torch.equal(ours.scales, theirs.scale.to(dtype))


def _layers(weights):
    layers = []
    for weight in weights:
        layer = QuantizedLinear(weight.shape[1], weight.shape[0], None)
        layer.weight = weight
        layers.append(layer)
    return layers


def test_stacked_int8_layers_run_one_product_on_their_rows():
    """q/k/v-like int8 layers stacked for the decode step: one product equal to the layers' own, the layers reading
    their rows of the stacked values (nothing stored twice), laid out once."""
    from maestrale.quantization.weight_only import stacked_packed

    layers = _layers([quantize_int8(torch.randn(rows, 96) * 0.05) for rows in (64, 16, 16)])
    x = torch.randn(3, 96)
    separate = torch.cat([layer(x) for layer in layers], dim=-1)
    before = [layer.weight.dequantize() for layer in layers]
    stacked = stacked_packed(layers)
    assert stacked.shape == (96, 96) and torch.equal(stacked.matmul(x), separate)
    for layer, weight in zip(layers, before):
        assert torch.equal(layer.weight.dequantize(), weight)
        assert stacked.values.data_ptr() <= layer.weight.values.data_ptr() < stacked.values.data_ptr() + 96 * 96
    assert stacked_packed(layers).values.data_ptr() == stacked.values.data_ptr()  # laid out once
    others = _layers([quantize_int4(torch.randn(16, 96 * 4), 32)])  # another kind, other inputs: each runs itself
    assert stacked_packed([*layers, *others]) is None
    assert stacked_packed(_layers([Int8Weight("Q8_0", torch.zeros(8, 96, dtype=torch.int8), torch.ones(8, 3))])
                          + layers) is None  # another group size


def test_int4_layers_on_cpu_are_not_stacked():
    """torch's CPU int4 layout is not one of rows: each layer runs its own product there."""
    from maestrale.quantization.weight_only import stacked_packed

    assert stacked_packed(_layers([quantize_int4(torch.randn(rows, 128), 32) for rows in (32, 16)])) is None
