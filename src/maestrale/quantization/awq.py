"""AWQ quantization with calibration text (AwqConfig), after Lin et al. 2023, "AWQ: Activation-aware Weight
Quantization for LLM Compression and Acceleration".

Rounding a weight to a 4-bit grid costs the layer's output most where the input channel it multiplies is large. AWQ
multiplies each input channel j of a layer's weight by s_j = mean|x_j|^alpha before rounding (so that the channels
that matter get finer steps) and divides the rows that produce x_j by s_j (the norm before q/k/v and before gate/up,
the up rows before down, the v rows before o where each query head has its own value head), which leaves the float
model's outputs as they were. alpha is chosen per set of layers that read one input, on a grid of GRID points in
[0, 1), as the one whose rounding changes those layers' outputs on the calibration inputs the least; alpha 0 is
plain rounding. The grid is AWQ's: per group, a scale and an integer zero point spanning the group's values
(awq_rounding). Scales are chosen for all of a decoder layer's sets first, then its weights rounded
(a later set's scale may fold into an earlier set's rows); the layers run as calibration.py describes.
"""

from __future__ import annotations

import torch
from torch import nn

from .calibration import Inputs, collect, input_groups, quantize_layers
from .config import AwqConfig
from .load import int4_weight
from .weight_only import Int4Weight

GRID = 20


def awq_rounding(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values (rows, cols) 0..15, scales (groups, rows), integer zero points (groups, rows)) of `weight` rounded to
    AWQ's grid, as AutoAWQ rounds: per group, scale = (max - min) / 15 (at least 1e-5 / 15), zero = -round(min /
    scale) clamped to 0..15, q = round(w / scale) + zero clamped to 0..15; the scales rounded to the weight's dtype as
    they are held."""
    rows, cols = weight.shape
    groups = weight.to(torch.promote_types(weight.dtype, torch.float32)).reshape(-1, group_size)
    low, high = groups.amin(1), groups.amax(1)
    scale = ((high - low).clamp(min=1e-5) / 15).to(weight.dtype).to(groups.dtype)
    zero = torch.clamp(-torch.round(low / scale), 0, 15)
    values = torch.clamp(torch.round(groups / scale[:, None]) + zero[:, None], 0, 15)
    return (values.reshape(rows, cols).to(torch.int32), scale.reshape(rows, -1).T, zero.reshape(rows, -1).T)


def _dequantized(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    values, scale, zero = awq_rounding(weight, group_size)
    groups = values.to(scale.dtype).reshape(weight.shape[0], -1, group_size) - zero.T[..., None]
    return (groups * scale.T[..., None]).flatten(1)


def input_scale(x: torch.Tensor, weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """AWQ's per-input-channel scale for the weights (rows, cols) that read x (tokens, cols): mean|x|^alpha,
    normalized to a geometric mean of its extremes of 1, for the alpha whose rounding changes x W^T the least. The
    change |x (W' - W)^T|^2 is taken as the trace of (W' - W) X^T X (W' - W)^T, X^T X formed once: per alpha, rows x
    cols^2 multiply-adds instead of tokens x cols x rows (fewer wherever the calibration has more tokens than the
    layers have inputs)."""
    magnitude = x.abs().mean(0).clamp(min=1e-4)
    hessian = x.T @ x
    weights = [w.to(x.dtype) for w in weights]
    best, best_error = torch.ones_like(magnitude), float("inf")
    for step in range(GRID):
        s = magnitude.pow(step / GRID)
        s = s / (s.max() * s.min()).sqrt()
        error = 0.0
        for w in weights:
            change = _dequantized(w * s, group_size) / s - w
            error += float(((change @ hessian) * change).sum())
        if error < best_error:
            best, best_error = s, error
    return best


def _producers(layer: nn.Module, name: str) -> list[torch.Tensor]:
    """The tensors whose rows (entries, for a norm's weight) make the inputs of the linear layer `name`, which an
    input scale's inverse can be folded into; none for o_proj under grouped-query attention (a value head serves
    several query heads, whose channels would need one scale)."""
    attn, mlp = layer.self_attn, layer.mlp
    if name in ("self_attn.q_proj", "self_attn.qkv_proj"):
        return [layer.input_layernorm.weight]
    if name in ("mlp.gate_proj", "mlp.gate_up_proj"):
        return [layer.post_attention_layernorm.weight]
    if name == "mlp.down_proj":
        up = mlp.up_proj if hasattr(mlp, "up_proj") else None
        return [up.weight] if up is not None else [mlp.gate_up_proj.weight[mlp.gate_up_proj.out_features // 2:]]
    if name == "self_attn.o_proj" and attn.num_heads == attn.num_kv_heads:
        v = attn.v_proj if hasattr(attn, "v_proj") else None
        if v is not None:
            return [v.weight] + ([v.bias] if v.bias is not None else [])
        return [attn.qkv_proj.weight[-attn.o_proj.in_features:]]
    return []


def fold(layer: nn.Module, group: list[str], s: torch.Tensor) -> None:
    """Scale input channel j of the named linear layers (which read one input) by s_j and divide the rows that make
    that input by s_j: the same float outputs. Nothing changes where there are no such rows (_producers)."""
    producers = _producers(layer, group[0])
    for tensor in producers:
        tensor.data.div_(s.to(tensor.dtype).reshape(-1, *[1] * (tensor.dim() - 1)))
    for name in group if producers else []:
        weight = layer.get_submodule(name).weight
        weight.data.mul_(s.to(weight.dtype))


def quantize_awq(model: nn.Module, config: AwqConfig) -> None:
    """Replace the linear layers of the model's decoder layers by int4 AWQ weights chosen on config.dataset (see
    calibration.py for which layers)."""

    def choose(index: int, layer: nn.Module, inputs: Inputs) -> dict[str, Int4Weight]:
        groups = input_groups(layer, inputs[0], config.group_size)
        seen: dict[str, list[torch.Tensor]] = {}
        collect(layer, [group[0] for group in groups], inputs, lambda name, x: seen.setdefault(name, []).append(x))
        for group in groups:
            if _producers(layer, group[0]):
                weights = [layer.get_submodule(name).weight for name in group]
                fold(layer, group, input_scale(torch.cat(seen[group[0]]), weights, config.group_size))
        chosen = {}
        for name in (name for group in groups for name in group):
            linear = layer.get_submodule(name)
            weight = int4_weight(*awq_rounding(linear.weight, config.group_size), linear.weight.dtype, "awq")
            linear.weight.data.copy_(weight.dequantize())
            chosen[name] = weight
        return chosen

    quantize_layers(model, config, choose)
