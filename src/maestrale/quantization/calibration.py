"""The layer-by-layer loop that GPTQConfig and AwqConfig quantize with: the calibration text runs up to the first
decoder layer; each layer then chooses its int4 weights on its inputs (the outputs of the layers before it, as
quantized) and passes its own outputs on, computed by its float layers holding the chosen weights' dequantized
values (torch's CPU int4 product is slow in float32). Only the decoder's linear layers whose inputs are whole groups
are quantized: the head, the embeddings and Mixtral's routers and stacked experts (not linear layers) stay in float."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..loading.progress import progress
from .weight_only import LINEARS, Int4Weight, QuantizedLinear

Inputs = list[tuple[torch.Tensor, dict]]  # a decoder layer's (hidden states, keyword arguments), one per piece


def calibration_ids(config, model: nn.Module) -> list[torch.Tensor]:
    """config.dataset's texts as (1, tokens) id tensors, each cut into pieces of at most model_seqlen tokens."""
    name = type(config).__name__
    if config.dataset is None:
        raise ValueError(f"{name}: quantizing needs calibration text: pass dataset=[texts] (a few thousand words or "
                         "more, like what the model will read) and tokenizer=...")
    tokenizer = config.tokenizer
    if isinstance(tokenizer, str):
        from ..tokenization import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    length = config.model_seqlen or min(2048, model.config.max_position_embeddings)
    pieces = []
    for index, text in enumerate(config.dataset):
        ids = torch.tensor(tokenizer(text).input_ids, dtype=torch.long)
        if ids.numel() < 2:
            raise ValueError(f"{name}: dataset[{index}] has {ids.numel()} tokens; calibration texts need at least "
                             "two (drop it, or pass longer texts)")
        # a last piece of one token would run the decode step's stacked products, which bypass the layers' hooks
        pieces += [piece[None] for piece in ids.split(length) if piece.numel() > 1]
    return pieces


class _Captured(Exception):
    """Raised by a hook to stop a forward once the hook has the inputs it waits for."""


@torch.no_grad()
def quantize_layers(model: nn.Module, config, choose: Callable[[int, nn.Module, Inputs], dict[str, Int4Weight]]
                    ) -> None:
    """Quantize the decoder layers one after another: choose(index, layer, inputs) returns the int4 weights of the
    layer's named linear layers (left holding their dequantized values), which then replace them."""
    samples = calibration_ids(config, model)
    layers = model.base_model.layers
    device = next(layers[0].parameters()).device
    inputs: Inputs = []

    def capture(module, args, kwargs):
        inputs.append((args[0], kwargs))
        raise _Captured

    hook = layers[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for ids in samples:
            try:
                model(ids.to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        hook.remove()
    for index, layer in enumerate(progress(layers, f"{config.quant_method.upper()}: quantizing decoder layers")):
        chosen = choose(index, layer, inputs)
        inputs = [(layer(x, **kwargs)[0], kwargs) for x, kwargs in inputs]
        for name, weight in chosen.items():
            linear = layer.get_submodule(name)
            quantized = QuantizedLinear(linear.in_features, linear.out_features, linear.bias)
            quantized.weight = weight
            layer.set_submodule(name, quantized)
    model.config.quantization_config = config


def input_groups(layer: nn.Module, first: tuple[torch.Tensor, dict], group_size: int) -> list[list[str]]:
    """The layer's linear layers whose inputs are whole groups, in sets that read one input (q/k/v, gate/up), in
    the order the layer runs them."""
    # the inputs themselves, not their ids: a tensor freed by then can leave its id to the next layer's input
    order: list[tuple[str, torch.Tensor]] = []
    hooks = [module.register_forward_pre_hook(lambda m, args, name=name: order.append((name, args[0])))
             for name, module in layer.named_modules()
             if type(module) in LINEARS and module.in_features % group_size == 0]
    try:
        layer(first[0], **first[1])
    finally:
        for hook in hooks:
            hook.remove()
    groups: list[list[str]] = []
    for position, (name, source) in enumerate(order):
        if position and source is order[position - 1][1]:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


def collect(layer: nn.Module, names: list[str], inputs: Inputs, add: Callable[[str, torch.Tensor], None]) -> None:
    """Run the layer on each piece, calling add(name, x) with the named linear layers' inputs x (tokens, features)
    in float32; `names` in the order the layer runs them, each forward stopping after the last."""

    def record(name: str, x: torch.Tensor) -> None:
        add(name, x.reshape(-1, x.shape[-1]).float())
        if name == names[-1]:
            raise _Captured

    hooks = [layer.get_submodule(name).register_forward_pre_hook(lambda m, args, name=name: record(name, args[0]))
             for name in names]
    try:
        for x, kwargs in inputs:
            try:
                layer(x, **kwargs)
            except _Captured:
                pass
    finally:
        for hook in hooks:
            hook.remove()
