"""The linear layer of the decoder and its heads: nn.Linear, with a faster product for decoding on CPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) that runs oneDNN's product for float32 decode steps on CPU.

    A decode step (one position per row) is a matrix-vector product bound by how fast the weights stream from memory;
    oneDNN reads float32 weights as they are stored (no packed copy) about 1.5x faster than the MKL product behind
    F.linear (measured on AMD EPYC, BENCHMARKS.md). Longer inputs keep F.linear, whose rounding is transformers'
    bit for bit; oneDNN's differs by rounding only, as F.linear's own does between batch sizes. oneDNN's product has
    no backward, so it runs only where autograd is off (generate, no_grad, inference_mode).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _ONEDNN and x.shape[-2] == 1 and x.is_cpu and x.dtype == torch.float32 and not torch.is_grad_enabled():
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
