"""Weight-only int8 and int4 weights: the one quantized representation behind TorchAoConfig, GPTQ and AWQ
checkpoints and GGUF's 4- and 8-bit blocks, and the linear layer that runs it.

int4 holds 4-bit values q (0..15) with a scale and a zero point per group of `group_size` inputs:
w = (q - 8) * scale + zero, the convention of torch's int4 products (tinygemm's). The values are held in the packed
layout of the product on the device they sit on: on CPU torch's (_weight_int4pack_mm_for_cpu), on CUDA maestrale's,
int32 words laid out as the tensor-core operand of its Gluon kernel (int4_mma_words, engine/kernels.py
int4_mma_matmul; tinygemm ran 0.24x of the bfloat16 product at 32 rows on the H200); .to(device) unpacks and packs
them again when that layout changes. int8 holds int8 values with one scale per row or per group of 16 or 32 (GGUF's
Q6_K and Q8_0). On CUDA maestrale's Triton kernels run them (int8_row_matmul on the values read as int32 words at one
row, int8_matmul otherwise; torch's _weight_int8pack_mm ran 0.01-0.09x of the bfloat16 product there); on CPU torch's
int8 product for 16-bit activations and one scale a row, else row chunks dequantized small enough to stay in cache.
Scales are held in the dtype the product runs in, the model's.

A packed weight is a module (PackedWeight) set as a layer's `weight`: tie_weights() shares it as it shares a
Parameter, and the engine, finding no Parameter, runs the layer's forward.

`quantize_int4` and `quantize_int8` are torchao's weight-only rules (Int4WeightOnlyConfig with its tinygemm or HQQ
parameters, Int8WeightOnlyConfig per row), computed the way torchao computes them, so both libraries hold the same
values and scales.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from ..models.kernels import use_triton
from ..models.linear import Linear, stacked_rows
from ..models.mlp import Experts, grouped_experts

# torch 2.13's AVX-512 build of its int8 product crashes (a segmentation fault) on some shapes, e.g. 37 x 200 by 3
# rows of bfloat16: not used there.
INT8PACK_CRASHES = torch.backends.cpu.get_cpu_capability() == "AVX512"
INT4_GROUPS = (32, 64, 128, 256)  # the group sizes torch's int4 products take
INT4_ROWS = 16  # torch's CPU int4 layout takes whole tiles of rows: rows are padded (on every device, one layout of
# scales), cut from products
KERNEL_ROWS = 64  # up to this many rows of x, CUDA's int4 product runs the Triton kernel; more (a prompt) run cuBLAS
# on the dequantized weight, which reads the weight once where the kernel reads it once per 64 rows
CHUNK_VALUES = 1 << 20  # grouped int8 weights dequantize this many values at a time: 4 MB of float32
LINEARS = (nn.Linear, Linear)  # exactly these types: heads' and projections' layers, not subclasses of others


class PackedWeight(nn.Module):
    """A (rows, cols) weight held quantized; `matmul` is x @ weight.T, `dequantize` the float matrix. The rows may
    stack `num_experts` equal experts (stacked_experts), which `matmul(..., experts=)` indexes."""

    num_experts = 1

    def __init__(self, kind: str, shape: tuple[int, int]):
        super().__init__()
        self.kind, self.shape = kind, shape  # kind: where the values came from ("Q4_K", "int4", "gptq", ...)

    def _expert_rows(self, act, experts: torch.Tensor | None) -> int:
        """The outputs of one product: the weight's rows, one expert's with `experts`, halved by a gate."""
        rows = self.shape[0] // self.num_experts
        return rows // 2 if act is not None else rows

    def extra_repr(self) -> str:
        return f"{self.kind}, shape={self.shape}"


class Int4Weight(PackedWeight):
    """4-bit values in groups along the input, each group with a scale and a zero point."""

    def __init__(self, kind: str, values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
        """values: (rows, cols) integers 0..15; scale, zero: (rows, cols / group_size), in the product's dtype."""
        rows, cols = values.shape
        super().__init__(kind, (rows, cols))
        self.group_size = cols // scale.shape[1]
        if self.group_size not in INT4_GROUPS or cols % self.group_size:
            raise ValueError(f"int4 weight of shape {(rows, cols)} with {scale.shape[1]} groups per row: torch's int4 "
                             f"products take groups of {', '.join(map(str, INT4_GROUPS))} inputs")
        pad = -rows % INT4_ROWS  # zero rows (scale and zero 0)
        self.register_buffer("packed", _pack_int4(F.pad(values.to(torch.int32), (0, 0, 0, pad)), self.group_size))
        scale_and_zeros = F.pad(torch.stack([scale, zero], dim=-1), (0, 0, 0, 0, 0, pad))  # (rows, groups, 2)
        self.register_buffer("scale_and_zeros", scale_and_zeros.transpose(0, 1).contiguous())

    @classmethod
    def of_packed(cls, kind: str, shape: tuple[int, int], group_size: int, packed: torch.Tensor,
                  scale_and_zeros: torch.Tensor) -> Int4Weight:
        """The weight of values already in its device's layout (stacked_packed's rows of several)."""
        weight = cls.__new__(cls)
        PackedWeight.__init__(weight, kind, shape)
        weight.group_size = group_size
        weight.register_buffer("packed", packed)
        weight.register_buffer("scale_and_zeros", scale_and_zeros)
        return weight

    def fuses_gate(self, x: torch.Tensor) -> bool:
        """Whether matmul(x, F.silu) runs in one launch: the tensor-core kernel's (_on_kernel), its gate rows whole
        tiles of 16."""
        return self._on_kernel(x) and (self.shape[0] // self.num_experts // 2) % INT4_ROWS == 0

    def _on_kernel(self, x: torch.Tensor) -> bool:
        """Whether the tensor-core kernel runs x: 16-bit, on CUDA, up to KERNEL_ROWS rows."""
        return x.is_cuda and x.shape[0] <= KERNEL_ROWS and self.scale_and_zeros.dtype in (torch.float16,
                                                                                         torch.bfloat16)

    def matmul(self, x: torch.Tensor, act=None, summed: bool = True, experts: torch.Tensor | None = None,
               rows_per_x: int = 1) -> torch.Tensor:
        """x @ weight.T; act (F.silu, where fuses_gate): the weight holds gate rows then up rows, the result is
        silu(gate) * up, in one launch. summed=False: where the kernel splits the inputs, its float32 partial sums
        (splits, rows, n) for the caller to add up (engine/kernels.py partials_sum). experts (pairs,), for stacked
        experts where _on_kernel: output row i is expert experts[i] times x's row i // rows_per_x."""
        x = x.to(self.scale_and_zeros.dtype).contiguous()
        rows = self._expert_rows(act, experts)
        if self._on_kernel(x):
            from ..engine.kernels import int4_mma_matmul  # here: the engine imports this module

            return int4_mma_matmul(x, self.packed, self.scale_and_zeros, rows, self.group_size, act, summed=summed,
                                   experts=experts, rows_per_x=rows_per_x)
        if act is not None or experts is not None:
            raise ValueError(f"Int4Weight.matmul: the gate and experts= run on CUDA for up to {KERNEL_ROWS} rows of "
                             f"16-bit x only, got {x.shape[0]} rows of {x.dtype} on {x.device}")
        if x.is_cuda:
            out = F.linear(x, self.dequantize())
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scale_and_zeros)
            out = out if out.shape[-1] == self.shape[0] else out[:, :self.shape[0]]
        return out if summed else out[None]

    def values(self) -> torch.Tensor:
        """The (rows, cols) values 0..15, as uint8."""
        rows = self.scale_and_zeros.shape[1]
        return _unpack_int4(self.packed, rows, self.shape[1], self.group_size)[:self.shape[0]]

    def dequantize(self) -> torch.Tensor:
        scale, zero = self.scale_and_zeros[:, :self.shape[0]].float().transpose(0, 1).unbind(-1)
        groups = (self.values().float() - 8).unflatten(1, (-1, self.group_size))
        return (groups * scale[..., None] + zero[..., None]).flatten(1).to(self.scale_and_zeros.dtype)

    def _apply(self, fn, recurse: bool = True):
        scale_and_zeros = fn(self.scale_and_zeros)
        if scale_and_zeros.device.type != self.packed.device.type:  # the other device's product reads another layout
            rows = self.scale_and_zeros.shape[1]
            values = _unpack_int4(self.packed, rows, self.shape[1], self.group_size)
            self.packed = _pack_int4(fn(values.to(torch.int32)), self.group_size)
        else:
            self.packed = fn(self.packed)
        self.scale_and_zeros = scale_and_zeros
        return self


class Int8Weight(PackedWeight):
    """int8 values with a scale per row (one group) or per group of inputs."""

    def __init__(self, kind: str, values: torch.Tensor, scales: torch.Tensor):
        """values: (rows, cols) int8; scales: (rows, groups) in the product's dtype."""
        super().__init__(kind, tuple(values.shape))
        self.register_buffer("values", values)
        self.register_buffer("scales", scales)

    def rows(self, index: torch.Tensor | slice) -> torch.Tensor:
        """The dequantized rows at `index` (any shape): an embedding lookup."""
        values = self.values[index].unflatten(-1, (self.scales.shape[-1], -1))
        return (values.to(self.scales.dtype) * self.scales[index][..., None]).flatten(-2)

    def fuses_gate(self, x: torch.Tensor) -> bool:
        """Whether matmul(x, F.silu) runs in one launch: int8_row_matmul's, at one row of x where Triton runs (CUDA,
        or its interpreter)."""
        return use_triton(x) and x.shape[0] == 1 and self.shape[1] % 4 == 0

    def matmul(self, x: torch.Tensor, act=None, summed: bool = True, experts: torch.Tensor | None = None,
               rows_per_x: int = 1) -> torch.Tensor:
        """x @ weight.T; act (F.silu, where fuses_gate): the weight holds gate rows then up rows, the result is
        silu(gate) * up. summed=False, experts (on CUDA, any rows of x), rows_per_x: as Int4Weight.matmul's."""
        x = x.to(self.scales.dtype)
        rows = self._expert_rows(act, experts)
        if self.fuses_gate(x) or (experts is not None and use_triton(x) and self.shape[1] % 4 == 0):
            from ..engine.kernels import int8_row_matmul  # here: the engine imports this module

            return int8_row_matmul(x, self.values, self.scales, rows, act, summed=summed, experts=experts,
                                   rows_per_x=rows_per_x)
        if act is not None or experts is not None:
            raise ValueError(f"Int8Weight.matmul: the gate is fused on CUDA at one row only, and experts= runs on "
                             f"CUDA only, got {x.shape[0]} rows on {x.device}")
        if use_triton(x):
            from ..engine.kernels import int8_matmul

            return int8_matmul(x, self.values, self.scales, summed=summed)
        # torch's int8 product (one scale per row) is vectorised on CPU for 16-bit activations only: in float32 it ran
        # 20-30x slower than dequantized row chunks on an AVX2 machine (BENCHMARKS.md).
        if self.scales.shape[1] == 1 and x.dtype != torch.float32 and not INT8PACK_CRASHES:
            out = torch.ops.aten._weight_int8pack_mm(x.contiguous(), self.values, self.scales[:, 0])
        else:
            step = max(1, CHUNK_VALUES // self.shape[1])
            out = torch.cat([F.linear(x, self.rows(slice(start, start + step)))
                             for start in range(0, self.shape[0], step)], dim=-1)
        return out if summed else out[None]

    def dequantize(self) -> torch.Tensor:
        return self.rows(slice(None))


def _mma_dims(rows: int, cols: int, group: int) -> tuple[int, ...]:
    """int4_mma_words' view of (rows, cols) values: (row tile, b, g, group, t, kh, v, c, e)."""
    v = 2 if group == 32 else 4
    return rows // 16, 2, 8, cols // group, 4, group // (16 * v), v, 2, 2


MMA_ORDER = (0, 3, 5, 2, 4, 6, 8, 7, 1)  # int4_mma_words' memory order of _mma_dims: tile, group, kh, g, t, v, e, c, b


def int4_mma_words(values: torch.Tensor, group: int) -> torch.Tensor:
    """(rows, cols) values 0..15 (rows a multiple of 16) as the layout of CUDA's int4 tensor-core kernel
    (engine/kernels.py int4_mma_matmul), viewed as (rows, cols / 8) int32 words. Each 16-row tile's words run over
    its groups; within a group, word (kh, lane 4g + t, v) is lane's share of the tensor-core operand of inputs 16j..
    16j + 15 (j = kh * V + v, V = 2 for groups of 32, else 4) in the order the kernel reads x: input c * 8 + 2t + e
    of step j is the group's input t * group / 4 + 4j + 2c + e, so that a thread's x is contiguous. Fields
    b + 2c + 4e (bits 4f..4f + 3) hold rows g + 8b: the kernel's _pairs_ptx turns field pairs (f, f + 4) into the
    operand's registers, two inputs each."""
    rows, cols = values.shape
    fields = values.long().view(_mma_dims(rows, cols, group)).permute(MMA_ORDER).flatten(-3)
    return nibble_words(fields).reshape(rows, cols // 8)


def nibble_words(nibbles: torch.Tensor) -> torch.Tensor:
    """(..., 8) values 0..15 -> (...) int32 words, the first value in the lowest bits."""
    words = (nibbles.long() << (4 * torch.arange(8, device=nibbles.device))).sum(-1)
    return (words - (words >> 31 << 32)).to(torch.int32)  # the top bit as the sign: int32's wrap-around


def int4_mma_values(words: torch.Tensor, group: int) -> torch.Tensor:
    """The (rows, cols) uint8 values of int4_mma_words."""
    rows, cols = words.shape[0], words.shape[1] * 8
    dims = _mma_dims(rows, cols, group)
    fields = (words.reshape(-1, 1) >> (4 * torch.arange(8, device=words.device, dtype=torch.int32))) & 15
    fields = fields.reshape([dims[i] for i in MMA_ORDER])
    return fields.permute([MMA_ORDER.index(i) for i in range(9)]).reshape(rows, cols).to(torch.uint8)


def _pack_int4(values: torch.Tensor, group: int) -> torch.Tensor:
    """(rows, cols) int32 values 0..15 in the layout of the int4 product on their device."""
    if values.is_cuda:
        return int4_mma_words(values, group)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(values.contiguous(), 1)


def _unpack_int4(packed: torch.Tensor, rows: int, cols: int, group: int) -> torch.Tensor:
    """The (rows, cols) uint8 values of a packed int4 weight."""
    if packed.is_cuda:
        return int4_mma_values(packed, group)
    # torch's CPU layout: blocks of BLOCK rows (64 with AVX512, else 32), each k-major with BLOCK/2 bytes per input;
    # a full block pairs row r with row r + BLOCK/2 in a byte (AVX512: 16-row lanes 0|2 and 1|3), a shorter one
    # (the last) pairs neighbouring rows.
    capability = torch.backends.cpu.get_cpu_capability()
    block = 64 if capability == "AVX512" else 32
    flat, start, out = packed.reshape(-1), 0, []
    for first in range(0, rows, block):
        size = min(block, rows - first)
        data = flat[start:start + cols * size // 2].reshape(cols, size // 2)
        start += cols * size // 2
        low, high = data & 15, data >> 4
        if size == block == 64:
            values = torch.cat([low[:, :16], low[:, 16:], high[:, :16], high[:, 16:]], dim=1)
        elif size == block and capability == "AVX2":
            values = torch.cat([low, high], dim=1)
        else:
            values = torch.stack([low, high], dim=-1).reshape(cols, size)
        out.append(values.T)
    return torch.cat(out).contiguous()


def quantize_int4(weight: torch.Tensor, group_size: int, algorithm: str = "tinygemm", kind: str = "int4"
                  ) -> Int4Weight:
    """torchao's int4 weight-only quantization, by its `int4_choose_qparams_algorithm`: "tinygemm" (min-max, in the
    weight's dtype: per group, scale = (max - min) / 15 (at least 1e-6), zero = min + 8 * scale,
    q = round((w - (zero - 8 * scale)) / scale) in 0..15) or "hqq" (see _hqq)."""
    if algorithm == "hqq":
        values, scale, zero = _hqq(weight, group_size)
        return Int4Weight(kind, values, scale, zero)
    groups = weight.unflatten(1, (-1, group_size))
    low, high = groups.amin(-1), groups.amax(-1)
    scale = torch.clamp((high - low) / 15.0, min=1e-6)
    zero = low + scale * 8.0
    minimum = (zero - scale * 8.0)[..., None]
    values = torch.clamp(torch.round((groups - minimum) / scale[..., None]), 0, 15)
    return Int4Weight(kind, values.flatten(1).to(torch.int32), scale, zero)


def _hqq(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Half-quadratic quantization as torchao runs it: min-max parameters with a rounded zero point, then up to 20
    proximal steps that move each group's zero point to lower the l0.7 error of the dequantized weight (stopping when
    the mean error stops falling), in float32 (float16 on CUDA); the result in tinygemm's form, in the weight's
    dtype."""
    w = weight.float().reshape(-1, group_size)
    low, high = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    inverse = (15 / (high - low)).clamp(max=2e4)
    zero = torch.round(-low * inverse)
    work = torch.float16 if weight.is_cuda else torch.float32
    w_work, inverse, zero = w.to(work), inverse.to(work), zero.to(work)
    beta, best = 10.0, 1e4
    for _ in range(20):
        q = torch.round(w_work * inverse + zero).clamp(0, 15)
        error = w_work - (q - zero) / inverse
        shrunk = torch.sign(error) * F.relu(torch.abs(error) - (1.0 / beta) * torch.pow(torch.abs(error), 0.7 - 1))
        zero = torch.mean(q - (w_work - shrunk) * inverse, dim=1, keepdim=True)
        beta *= 1.01
        mean_error = float(torch.abs(error).mean())
        if mean_error >= best:
            break
        best = mean_error
    values = torch.round(w * inverse + zero).clamp(0, 15)
    scale = 1.0 / inverse
    zero = ((8 - zero.float()) * scale.float()).to(zero.dtype)
    rows = weight.shape[0]
    return (values.reshape(weight.shape).to(torch.int32), scale.to(weight.dtype).reshape(rows, -1),
            zero.to(weight.dtype).reshape(rows, -1))


def quantize_int8(weight: torch.Tensor, kind: str = "int8") -> Int8Weight:
    """torchao's int8 weight-only quantization (symmetric, per row): scale = max(|min|, |max|, 0) / 127.5 in the
    weight's dtype (at least float32's eps), then in float32: q = round(w / scale) in -128..127."""
    low = torch.min(weight.amin(1, keepdim=True), torch.zeros(1, dtype=weight.dtype, device=weight.device))
    high = torch.max(weight.amax(1, keepdim=True), torch.zeros(1, dtype=weight.dtype, device=weight.device))
    scale = torch.clamp(torch.max(-low, high) / 127.5, min=torch.finfo(torch.float32).eps).float()
    values = torch.clamp(torch.round(weight * (1.0 / scale)), -128, 127).to(torch.int8)
    return Int8Weight(kind, values, scale.to(weight.dtype))


class QuantizedLinear(nn.Module):
    """A linear layer whose weight is a PackedWeight; the bias, if any, stays a float Parameter."""

    def __init__(self, in_features: int, out_features: int, bias: nn.Parameter | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight: PackedWeight | None = None  # set by the loader, or shared by tie_weights()
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.weight.matmul(x.reshape(-1, self.in_features)).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class QuantizedEmbedding(nn.Module):
    """An embedding whose table is an int8 weight (GGUF Q8_0 or Q6_K)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.weight: Int8Weight | None = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.weight.rows(input_ids)


def _stacked(weights: list[PackedWeight], name: str) -> torch.Tensor:
    """The weights' buffer `name` as row blocks of one tensor, laid out once."""
    return stacked_rows([getattr(w, name) for w in weights], lambda i, rows: setattr(weights[i], name, rows))


def stacked_packed(linears) -> PackedWeight | None:
    """The int8 weights, or int4 weights in CUDA's layout, of bias-free QuantizedLinear layers that read the same
    input, as one weight of all their rows: a decode step then runs one product instead of several (and fuses the gate
    into gate/up's). None where the layers are not all such layers (see _stacked_weights)."""
    if any(type(linear) is not QuantizedLinear or linear.bias is not None or linear._forward_hooks
           or linear._forward_pre_hooks for linear in linears):
        return None
    return _stacked_weights([linear.weight for linear in linears])


def stacked_experts(weights: nn.ModuleList, gated: bool = False) -> PackedWeight | None:
    """QuantizedExperts' per-expert weights as one weight of `num_experts` stacked experts, which CUDA's int8 and
    int4 kernels index by expert (matmul's experts=); None where Triton does not run (CUDA, or int8 under its
    interpreter), or where they do not stack (int4: an expert's rows, each half of them if gated, whole tiles of 16
    rows, as the kernel reads them)."""
    first = weights[0]
    held = first.packed if isinstance(first, Int4Weight) else getattr(first, "values", None)
    tile = ((2 if gated else 1) * INT4_ROWS) if isinstance(first, Int4Weight) else 1
    if held is None or not use_triton(held) or any(w.shape[0] % tile for w in weights):
        return None  # (int4 in CPU's layout: _stacked_weights declines it)
    stacked = _stacked_weights(list(weights))
    if stacked is not None:
        stacked.num_experts = len(weights)
    return stacked


def _stacked_weights(weights: list[PackedWeight]) -> PackedWeight | None:
    """The weights' rows as one weight, the values laid out once (stacked_rows); int4's scales and zeros, (groups,
    rows, 2), are concatenated (a few hundredths of the values' bytes). None where they are not all int8 weights or
    int4 weights in CUDA's layout of one group size and dtype and width, or an int4 weight other than the last has
    rows padded."""
    first = weights[0]
    if any(type(w) is not type(first) or w.shape[1] != first.shape[1] for w in weights) \
            or not isinstance(first, (Int4Weight, Int8Weight)):
        return None
    rows = (sum(w.shape[0] for w in weights), first.shape[1])
    if isinstance(first, Int8Weight):
        if any((w.scales.shape[1], w.scales.dtype) != (first.scales.shape[1], first.scales.dtype) for w in weights):
            return None
        return first if len(weights) == 1 else Int8Weight(first.kind, _stacked(weights, "values"),
                                                          _stacked(weights, "scales"))
    if not first.packed.is_cuda or any((w.group_size, w.scale_and_zeros.dtype) != (first.group_size,
                                       first.scale_and_zeros.dtype) for w in weights):
        return None
    if len(weights) == 1:
        return first
    if any(w.shape[0] % INT4_ROWS for w in weights[:-1]):
        return None  # padding rows inside would sit among the outputs
    return Int4Weight.of_packed(first.kind, rows, first.group_size, _stacked(weights, "packed"),
                                torch.cat([w.scale_and_zeros for w in weights], dim=1))


class QuantizedExperts(nn.Module):
    """Mixtral's stacked experts (models/mlp.py Experts) held packed: gate_up_proj and down_proj hold one
    PackedWeight per expert, (2I, H) and (H, I). Each expert runs on the rows routed to it (grouped_experts); the
    decode step on CUDA reads them stacked, indexed by expert (stacked_experts)."""

    def __init__(self, num_experts: int, act_fn):
        super().__init__()
        self.num_experts, self.act_fn = num_experts, act_fn
        self.gate_up_proj = nn.ModuleList()  # filled by the loader
        self.down_proj = nn.ModuleList()

    def forward(self, x: torch.Tensor, top_experts: torch.Tensor, top_weights: torch.Tensor) -> torch.Tensor:
        return grouped_experts(x, top_experts, top_weights, self.num_experts, self._ffn)

    def _ffn(self, e: int, rows: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj[e].matmul(rows).to(rows.dtype).chunk(2, dim=-1)
        return self.down_proj[e].matmul(self.act_fn(gate) * up).to(rows.dtype)


def packed_weights(model: nn.Module) -> dict[str, PackedWeight]:
    """{module name: packed weight} of the model's quantized layers (a tied weight once)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, PackedWeight)}


def dequantize(model: nn.Module, dtype: torch.dtype) -> None:
    """Replace each quantized layer by a Linear or nn.Embedding holding its dequantized weight in `dtype` (quantized
    experts by Experts); a weight tied between the embedding and the head stays one Parameter."""
    floats: dict[int, nn.Parameter] = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedExperts):
            with torch.device("meta"):
                new = Experts(model.config)
            for piece in ("gate_up_proj", "down_proj"):
                stacked = torch.stack([w.dequantize().to(dtype) for w in getattr(module, piece)])
                setattr(new, piece, nn.Parameter(stacked, requires_grad=False))
            model.set_submodule(name, new)
            continue
        if not isinstance(module, (QuantizedLinear, QuantizedEmbedding)):
            continue
        weight = floats.get(id(module.weight))
        if weight is None:
            weight = floats[id(module.weight)] = nn.Parameter(module.weight.dequantize().to(dtype), requires_grad=False)
        if isinstance(module, QuantizedEmbedding):
            new = nn.Embedding(module.num_embeddings, module.embedding_dim, module.padding_idx, device="meta")
        else:
            new = Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            new.bias = module.bias
        new.weight = weight
        model.set_submodule(name, new)


def refuse_save(model: nn.Module) -> None:
    """Refuse to save weights kept quantized, except GPTQ's and AWQ's (GPTQConfig's, AwqConfig's or a checkpoint's),
    which save as checkpoints of their method."""
    from .config import AwqConfig, GPTQConfig, PackedInt4Config  # here: config.py imports this module

    kinds = sorted({weight.kind for weight in packed_weights(model).values()})
    config = getattr(model.config, "quantization_config", None)
    if kinds and not (isinstance(config, (GPTQConfig, AwqConfig, PackedInt4Config))
                      and kinds == [config.quant_method]):
        raise ValueError(f"save_pretrained: {type(model).__name__} holds weights kept quantized ({', '.join(kinds)}), "
                         "which maestrale does not save; call model.dequantize() first to save a float checkpoint, or "
                         "save the float model and quantize it again when loading")


def skipped(name: str, patterns: list[str]) -> bool:
    """Whether a module name matches a pattern as transformers matches modules not to convert: as a prefix ending at a
    module boundary ("layers.1" takes "layers.1.mlp", not "layers.11"), as a regex with that boundary, or as a
    suffix."""
    return any(re.match(rf"(?:{p})(?:(?<=\.)|(?=\.|$))", name) or name.endswith(p) for p in patterns)


def modules_not_to_convert(model: nn.Module, patterns: list[str] | None, option: str) -> list[str]:
    """The modules a quantization leaves in float: `patterns` (each must match a module; `option` names them in the
    error), or by default the output head and the module of the last parameter (and tied weights), as transformers
    picks them."""
    if patterns is not None:
        names = [name for name, _ in model.named_modules() if name]
        for pattern in patterns:
            if not any(skipped(name, [pattern]) for name in names):
                raise ValueError(f"{option} names {pattern!r}, which matches no module of {type(model).__name__}; use "
                                 "names such as 'lm_head' or 'self_attn.o_proj'")
        return list(patterns)
    head = model.get_output_embeddings()
    keep = {name for name, module in model.named_modules() if head is not None and module is head}
    keep.add(list(model.named_parameters())[-1][0].removesuffix(".weight"))
    if head is not None and getattr(model.config, "tie_word_embeddings", False):
        keep.add(next(name for name, module in model.named_modules() if module is model.get_input_embeddings()))
    return sorted(keep)
