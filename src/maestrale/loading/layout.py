"""Where each checkpoint tensor lands in a model, and the names a model's weights are saved under.

Parameter names equal transformers' state dict, so most tensors map to themselves. Two things differ:
- prefixes: a checkpoint of a task model (`model.layers...`) fills a bare decoder and the other way round;
- Mixtral on the hub stores each expert as `block_sparse_moe.experts.E.w1/w2/w3.weight`, while the model keeps all
  experts in `mlp.experts.gate_up_proj` (E, 2I, H) = cat(w1, w3) and `mlp.experts.down_proj` (E, H, I) = w2.
  Those tensors fill slices of one parameter; saving writes them back out the same way, as transformers does.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

HUB_EXPERT = re.compile(r"^(?P<layer>.+)\.block_sparse_moe\.experts\.(?P<expert>\d+)\.(?P<w>w[123])\.weight$")
HUB_ROUTER = re.compile(r"^(?P<layer>.+)\.block_sparse_moe\.gate\.weight$")
MODEL_EXPERTS = re.compile(r"^(?P<layer>.+)\.mlp\.experts\.(?P<kind>gate_up_proj|down_proj)$")
MODEL_ROUTER = re.compile(r"^(?P<layer>.+)\.mlp\.gate\.weight$")


@dataclass(frozen=True)
class Slot:
    """A parameter, and the part of it (an index into it) one checkpoint tensor fills."""

    param: str
    index: tuple = ()


class Layout:
    """Maps checkpoint tensor names onto the parameters of one model."""

    def __init__(self, model: nn.Module):
        self.params = dict(model.named_parameters())
        # Tied weights appear once in `params`; their other names (e.g. lm_head.weight) are aliases to skip.
        self.aliases = {name for name, _ in model.named_parameters(remove_duplicate=False)} - self.params.keys()
        self.prefix = model.base_model_prefix
        self.is_task_model = model.base_model is not model
        self.moe = is_moe(model.config)
        self.intermediate = model.config.intermediate_size

    def slot(self, name: str) -> Slot | None:
        """Where the checkpoint tensor `name` goes; None when the model has no place for it."""
        for candidate in self._with_prefix_variants(name):
            if candidate in self.params:
                return Slot(candidate)
            if self.moe and (slot := self._hub_moe_slot(candidate)) is not None and slot.param in self.params:
                return slot
        return None

    def is_alias(self, name: str) -> bool:
        return any(candidate in self.aliases for candidate in self._with_prefix_variants(name))

    def _with_prefix_variants(self, name: str) -> list[str]:
        prefix = self.prefix + "."
        if self.is_task_model:
            return [name] if name.startswith(prefix) else [name, prefix + name]
        return [name.removeprefix(prefix)]

    def _hub_moe_slot(self, name: str) -> Slot | None:
        if m := HUB_ROUTER.match(name):
            return Slot(f"{m['layer']}.mlp.gate.weight")
        if m := HUB_EXPERT.match(name):
            expert, inter = int(m["expert"]), self.intermediate
            if m["w"] == "w2":
                return Slot(f"{m['layer']}.mlp.experts.down_proj", (expert,))
            half = slice(0, inter) if m["w"] == "w1" else slice(inter, 2 * inter)
            return Slot(f"{m['layer']}.mlp.experts.gate_up_proj", (expert, half))
        return None


def is_moe(config) -> bool:
    return getattr(config, "num_local_experts", None) is not None


def checkpoint_tensors(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None
                       ) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's weights (or the tensors of `state_dict`, named as the model's) under the names transformers
    saves (Mixtral experts one by one), tied copies left out; the int4 weights of a GPTQ or AWQ model (quantized by
    GPTQConfig or AwqConfig, or loaded from such a checkpoint) as its method's tensors."""
    from ..quantization.bnb import quantized_linears, weight_tensors
    from ..quantization.config import AwqConfig, GPTQConfig, PackedInt4Config
    from ..quantization.load import packed_pieces
    from ..quantization.weight_only import packed_weights

    quantization = getattr(model.config, "quantization_config", None)
    if isinstance(quantization, (GPTQConfig, AwqConfig, PackedInt4Config)):
        if state_dict is not None:
            method = quantization.quant_method
            raise ValueError(f"save_pretrained(state_dict=...): {type(model).__name__} holds {method} int4 weights, "
                             f"which a state dict holds in maestrale's own layout, not as {method} tensors; call "
                             "save_pretrained without state_dict")
        for name, weight in packed_weights(model).items():
            layer = name.removesuffix(".weight")
            for piece, tensor in packed_pieces(weight, layer, quantization).items():
                yield f"{layer}.{piece}", tensor

    inter, moe = model.config.intermediate_size, is_moe(model.config)
    named = model.named_parameters() if state_dict is None else _untied(state_dict)
    quantized = {} if state_dict is not None else {f"{name}.weight": m for name, m in quantized_linears(model).items()}
    for name, param in named:
        tensor = param.detach()
        if name in quantized:  # packed, with its quant-state tensors
            yield from weight_tensors(quantized[name], name)
        elif moe and (m := MODEL_EXPERTS.match(name)):
            hub = f"{m['layer']}.block_sparse_moe.experts"
            for e in range(tensor.shape[0]):
                if m["kind"] == "down_proj":
                    yield f"{hub}.{e}.w2.weight", tensor[e]
                else:
                    yield f"{hub}.{e}.w1.weight", tensor[e, :inter]
                    yield f"{hub}.{e}.w3.weight", tensor[e, inter:]
        elif moe and (m := MODEL_ROUTER.match(name)):
            yield f"{m['layer']}.block_sparse_moe.gate.weight", tensor
        else:
            yield name, tensor


def _untied(state_dict: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """A state dict names tied weights twice over one storage; the first name is the one saved."""
    seen = set()
    for name, tensor in state_dict.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            yield name, tensor


def deinterleave_rotary(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorder the rows of a q or k projection from interleaved rotary pairs (x0, y0, x1, y1, ... per head), as
    Mistral's native format and llama.cpp store them, to the halves HF rotates (x0, x1, ..., y0, y1, ...)."""
    half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)
