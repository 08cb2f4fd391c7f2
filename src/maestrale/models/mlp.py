"""Feed-forward blocks: the SwiGLU MLP and Mixtral's sparse mixture of experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .linear import Linear, decode_step, linear, stacked_weight

ACT_FNS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)); Phi-3 stores gate and up as one fused projection."""

    def __init__(self, config, fused_gate_up: bool = False):
        super().__init__()
        hidden, inter = config.hidden_size, config.intermediate_size
        if fused_gate_up:
            self.gate_up_proj = Linear(hidden, 2 * inter, bias=False)
        else:
            self.gate_proj = Linear(hidden, inter, bias=False)
            self.up_proj = Linear(hidden, inter, bias=False)
        self.down_proj = Linear(inter, hidden, bias=False)
        self.act_fn = ACT_FNS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_up_proj"):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        elif decode_step(x) and (gate_up := stacked_weight((self.gate_proj, self.up_proj))) is not None:
            gate, up = linear(x, gate_up).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        if self.act_fn is F.silu and kernels.fused(gate, up) and gate.stride(-1) == up.stride(-1) == 1:
            return self.down_proj(kernels.silu_gate(gate, up))
        return self.down_proj(self.act_fn(gate) * up)


class Router(nn.Module):
    """Scores experts per token; keeps the top k, renormalised to sum to one."""

    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.weight = nn.Parameter(torch.empty(config.num_local_experts, config.hidden_size))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.weight)
        probs = F.softmax(logits.float(), dim=-1)
        top_probs, top_experts = probs.topk(self.top_k, dim=-1)
        return logits, top_probs / top_probs.sum(dim=-1, keepdim=True), top_experts


class Experts(nn.Module):
    """All experts' SwiGLU weights as 3-D tensors: gate_up_proj (E, 2I, H) and down_proj (E, H, I)."""

    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_local_experts
        inter, hidden = config.intermediate_size, config.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, hidden, inter))
        self.act_fn = ACT_FNS[config.hidden_act]

    def forward(self, x: torch.Tensor, top_experts: torch.Tensor, top_weights: torch.Tensor) -> torch.Tensor:
        tokens, k = top_experts.shape
        experts = top_experts.reshape(-1)
        if experts.numel() <= self.num_experts:
            # Decoding: gather only the experts the few tokens use and run them as one batched product.
            rows = x.repeat_interleave(k, dim=0).unsqueeze(-1)
            gate, up = torch.bmm(self.gate_up_proj[experts], rows).squeeze(-1).chunk(2, dim=-1)
            out = torch.bmm(self.down_proj[experts], (self.act_fn(gate) * up).unsqueeze(-1)).squeeze(-1)
            out = out * top_weights.reshape(-1, 1)
            return out.view(tokens, k, -1).sum(dim=1).to(x.dtype)
        # Prefill: each expert once, on the rows routed to it
        return grouped_experts(x, top_experts, top_weights, self.num_experts, self._ffn)

    def _ffn(self, e: int, rows: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(rows, self.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(self.act_fn(gate) * up, self.down_proj[e])


def grouped_experts(x: torch.Tensor, top_experts: torch.Tensor, top_weights: torch.Tensor, num_experts: int,
                    ffn) -> torch.Tensor:
    """The routers' mix of expert outputs: the (token, expert) pairs sorted by expert, each expert run once on its
    contiguous group of rows (`ffn(e, rows)`), one host sync per layer."""
    k = top_experts.shape[1]
    experts = top_experts.reshape(-1)
    order = experts.argsort(stable=True)
    counts = torch.bincount(experts, minlength=num_experts).tolist()
    token_of = order // k
    outs = [ffn(e, group) for e, group in enumerate(x[token_of].split(counts)) if group.shape[0]]
    weighted = torch.cat(outs) * top_weights.reshape(-1)[order, None]
    return torch.zeros_like(x).index_add_(0, token_of, weighted.to(x.dtype))


class SparseMoeBlock(nn.Module):
    """Mixtral's feed-forward: a router picks top-k experts per token and mixes their outputs."""

    def __init__(self, config):
        super().__init__()
        self.jitter_noise = config.router_jitter_noise
        self.gate = Router(config)
        self.experts = Experts(config)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        if self.training and self.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        x = x.reshape(-1, shape[-1])
        router_logits, top_weights, top_experts = self.gate(x)
        return self.experts(x, top_experts, top_weights).view(shape), router_logits


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """Switch-Transformer auxiliary loss: num_experts * sum_e (fraction of tokens routed to e) * (mean prob of e)."""
    device = router_logits[0].device
    logits = torch.cat([layer.to(device) for layer in router_logits])
    probs = F.softmax(logits, dim=-1, dtype=torch.float32)
    chosen = F.one_hot(probs.topk(top_k, dim=-1).indices, num_experts).sum(dim=1).float()
    if attention_mask is None:
        weight = torch.ones(probs.shape[0], device=device)
    else:
        seq_len = router_logits[0].shape[0] // attention_mask.shape[0]
        # The router saw the current tokens only: the mask's last columns.
        mask = attention_mask[:, -seq_len:].reshape(-1).to(device, torch.float32)
        weight = mask.repeat(len(router_logits))
    total = weight.sum()
    tokens_per_expert = (chosen * weight[:, None]).sum(dim=0) / total
    prob_per_expert = (probs * weight[:, None]).sum(dim=0) / total
    return (tokens_per_expert * prob_per_expert).sum() * num_experts
