"""GPTQ quantization with calibration text (GPTQConfig), after Frantar et al. 2022, "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers".

A layer's weight W (rows, cols) is quantized one input column at a time, in order (or act_group_aware's); each
column's rounding error, divided by the diagonal of the inverse of H = X^T X (X: the layer's inputs on the
calibration text), is spread over the columns not yet quantized along that row of the inverse, so that X W^T changes
as little as it can. The inverse is taken once as an upper Cholesky factor, and the spreading is deferred to blocks
of columns (the paper's "lazy batch" form). A group's scale and zero point are chosen when its first column comes
up, from the weights as they stand then.

The decoder layers are quantized one after another, each on the outputs of the layers before it as quantized. Within
a layer (true_sequential) the projections that read one input (q/k/v, gate/up) are quantized together, in the order
the layer runs them, each set on inputs that went through the sets quantized before it. The weights become the int4
weights TorchAoConfig, GPTQ and AWQ checkpoints load into (weight_only.py).
"""

from __future__ import annotations

import torch
from torch import nn

from .calibration import Inputs, collect, input_groups, quantize_layers
from .config import GPTQConfig
from .weight_only import Int4Weight

BLOCK = 128  # columns whose error updates are deferred together


def gptq_weight(weight: torch.Tensor, hessian: torch.Tensor, group_size: int, sym: bool, damp_percent: float,
                group_aware: bool = False) -> Int4Weight:
    """The int4 weight GPTQ chooses for `weight` (rows, cols) given its inputs' `hessian` (cols, cols), X^T X;
    computed in float32 (float64 for float64 inputs), scales in the weight's dtype. group_aware: quantize the
    groups in order of their largest diagonal entry of H and each group's columns by theirs, largest first (GPTQModel's
    act_group_aware, after Gafni et al. 2025): the inputs that matter most are rounded while the most columns remain
    to absorb their error, and each group's columns still form one group."""
    work = torch.promote_types(weight.dtype, torch.float32)
    w = weight.to(work).clone()
    h = hessian.to(work).clone()
    rows, cols = w.shape
    dead = h.diagonal() == 0  # inputs that are always zero: their weights cannot matter
    h[dead, dead] = 1
    w[:, dead] = 0
    order = torch.arange(cols, device=w.device)
    if group_aware:
        importance = h.diagonal().reshape(-1, group_size)
        within = importance.argsort(dim=1, descending=True, stable=True) + order[::group_size, None]
        order = within[importance.amax(1).argsort(descending=True, stable=True)].flatten()
        w, h = w[:, order], h[order][:, order]
    columns = order.tolist()  # indexing by Python ints: no device syncs in the loop
    h.diagonal().add_(damp_percent * h.diagonal().mean())
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    values = torch.zeros(rows, cols, dtype=torch.int32, device=w.device)
    scales, zeros = torch.zeros(2, rows, cols // group_size, dtype=work, device=w.device)
    block = max(BLOCK, group_size)
    for start in range(0, cols, block):
        end = min(start + block, cols)
        part, errors = w[:, start:end].clone(), torch.zeros(rows, end - start, dtype=work, device=w.device)
        inverse = upper[start:end, start:end]
        for i in range(end - start):
            if (start + i) % group_size == 0:
                scale, zero = _qparams(part[:, i:i + group_size], sym)
                scale = scale.to(weight.dtype).to(work)  # as it is held
                group = columns[start + i] // group_size
                scales[:, group], zeros[:, group] = scale, zero
            q = torch.clamp(torch.round(part[:, i] / scale) + zero, 0, 15)
            values[:, columns[start + i]] = q.to(torch.int32)
            error = (part[:, i] - (q - zero) * scale) / inverse[i, i]
            part[:, i:] -= error[:, None] * inverse[i, i:][None]
            errors[:, i] = error
        w[:, end:] -= errors @ upper[start:end, end:]
    # as int4 weights: w = scale * (q - zero) = (q - 8) * scale + scale * (8 - zero), as a GPTQ checkpoint loads
    return Int4Weight("gptq", values, scales.to(weight.dtype), (scales * (8 - zeros)).to(weight.dtype))


def _qparams(group: torch.Tensor, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of `group`: (scale, integer zero point) of a 4-bit grid spanning its values and 0, as GPTQ picks them
    (symmetric: zero point 8 and a grid of twice the largest magnitude); a row of zeros gets the grid of [-1, 1]."""
    low = torch.clamp(group.amin(1), max=0)
    high = torch.clamp(group.amax(1), min=0)
    if sym:
        high = torch.maximum(-low, high)
        low = -high
    empty = (low == 0) & (high == 0)
    low, high = torch.where(empty, -1.0, low), torch.where(empty, 1.0, high)
    scale = (high - low) / 15
    zero = torch.full_like(scale, 8) if sym else torch.round(-low / scale)
    return scale, zero


def quantize_gptq(model: nn.Module, config: GPTQConfig) -> None:
    """Replace the linear layers of the model's decoder layers by int4 GPTQ weights chosen on config.dataset (see
    calibration.py for which layers)."""

    def choose(index: int, layer: nn.Module, inputs: Inputs) -> dict[str, Int4Weight]:
        groups = input_groups(layer, inputs[0], config.group_size)
        chosen: dict[str, Int4Weight] = {}
        for part in ([group] for group in groups) if config.true_sequential else [groups]:
            hessians = _hessians(layer, [group[0] for group in part], inputs)
            for group in part:
                for name in group:
                    chosen[name] = _choose(layer.get_submodule(name), hessians[group[0]], config,
                                           f"layers.{index}.{name}")
        return chosen

    quantize_layers(model, config, choose)


def _choose(linear: nn.Module, hessian: torch.Tensor, config: GPTQConfig, name: str) -> Int4Weight:
    """The GPTQ weight of `linear`, whose float weight then holds its dequantized values."""
    try:
        weight = gptq_weight(linear.weight, hessian, config.group_size, config.sym, config.damp_percent,
                             config.act_group_aware)
    except torch.linalg.LinAlgError:
        raise ValueError(f"GPTQ: the inputs of {name} on the calibration text give a Hessian that is not positive "
                         f"definite even with damp_percent={config.damp_percent}; raise damp_percent or pass more "
                         "calibration text") from None
    linear.weight.copy_(weight.dequantize())
    return weight


def _hessians(layer: nn.Module, names: list[str], inputs: Inputs) -> dict[str, torch.Tensor]:
    """{name: X^T X} of the named linear layers' inputs X over the calibration pieces, in float32."""
    hessians: dict[str, torch.Tensor] = {}

    def add(name: str, x: torch.Tensor) -> None:
        hessians[name] = hessians.get(name, 0) + x.T @ x

    collect(layer, names, inputs, add)
    return hessians
