"""The linear layer of the decoder and its heads: nn.Linear, with faster products for decode steps."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def decode_step(x: torch.Tensor) -> bool:
    """One position per row and no autograd: each product reads every weight once for little arithmetic.

    Not under torch.compile, which picks its own kernels (and cannot trace stacked_weight's layout check)."""
    return x.shape[-2] == 1 and not torch.is_grad_enabled() and not torch.compiler.is_compiling()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, or oneDNN's product for float32 decode steps on CPU (see Linear)."""
    if _ONEDNN and x.is_cpu and x.dtype == torch.float32 and decode_step(x):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) that runs oneDNN's product for float32 decode steps on CPU.

    A decode step's product is bound by how fast the weights stream from memory; oneDNN reads float32 weights as they
    are stored (no packed copy) about 1.5x faster than the MKL product behind F.linear (BENCHMARKS.md). Longer inputs
    keep F.linear, whose rounding is transformers' bit for bit; oneDNN's differs by rounding only, as F.linear's own
    does between batch sizes. oneDNN's product has no backward, so it runs only where autograd is off.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def stacked_weight(layers: tuple[nn.Module, ...]) -> torch.Tensor | None:
    """The weights of bias-free Linear layers that read the same input, as one matrix: a decode step then runs one
    product instead of several, and fewer, larger products stream the weights faster (BENCHMARKS.md).

    The first call copies the weights into one tensor and points each layer's weight at its rows, so nothing is
    stored twice and the state dict keeps its names and values; later calls find that layout and copy nothing.
    Whatever gives a weight other memory (.to(), load_state_dict(assign=True)) makes the next call lay them out again.
    None where a layer is not a plain Linear without hooks (quantized, wrapped by an adapter): each then runs itself.
    """
    if any(type(layer) is not Linear or layer.bias is not None or layer._forward_hooks or layer._forward_pre_hooks
           for layer in layers):
        return None
    weights = [layer.weight for layer in layers]
    return stacked_rows(weights, lambda i, rows: setattr(weights[i], "data", rows))


def stacked_rows(tensors: list[torch.Tensor], assign: Callable[[int, torch.Tensor], None]) -> torch.Tensor:
    """2-D tensors of equal width as row blocks of one tensor. Unless they already lie back to back in one storage,
    they are copied into one tensor and each is handed its rows (`assign(i, rows)`), so nothing is stored twice."""
    first = tensors[0]
    base, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    laid_out = True
    for t in tensors:
        laid_out = (laid_out and t.is_contiguous() and t.storage_offset() == offset
                    and t.untyped_storage().data_ptr() == base)
        offset += t.numel()
    if not laid_out:
        with torch.inference_mode(False):  # a normal tensor, so that weights can still be trained
            first = torch.cat([t.detach() for t in tensors])
        for i, rows in enumerate(first.split([t.shape[0] for t in tensors])):
            assign(i, rows)
    cols = first.shape[1]
    return torch.as_strided(first.detach(), (sum(t.shape[0] for t in tensors), cols), (cols, 1))
