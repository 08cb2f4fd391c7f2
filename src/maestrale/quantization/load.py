"""Weight-only quantization while loading: TorchAoConfig quantizes a float checkpoint's linear layers as their
tensors stream in, and GPTQ and AWQ checkpoints' packed 4-bit tensors become the same int4 weights (weight_only.py).

The packed layouts, as AutoGPTQ / GPTQModel and AutoAWQ write them (each int32 holds eight 4-bit values, the first
in the lowest bits), with w = scale * (q - zero) per group of inputs:
- GPTQ: qweight (in / 8, out), eight consecutive inputs per int32; qzeros (groups, out / 8), eight consecutive
  outputs per int32, stored minus one in the v1 "gptq" layout (a historical offset, not in "gptq_v2"); scales
  (groups, out); g_idx (in,), each input's group: act-order checkpoints (desc_act) permute it, which the int4
  product cannot follow, so only the plain order i // group_size loads.
- AWQ (GEMM): qweight (in, out / 8) and qzeros (groups, out / 8), eight outputs per int32 in the order
  0, 2, 4, 6, 1, 3, 5, 7; scales (groups, out).
As int4 weights, (q - 8) * scale + zero', that is zero' = scale * (8 - zero). A group size the int4 product does not
take but that is a multiple of one it does (-1, one group per row, included) is split exactly into those groups.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..loading.checkpoint import Shard
from ..loading.layout import Layout
from ..loading.placement import DeviceMap, device_for
from ..models.mlp import Experts
from .config import AwqConfig, GPTQConfig, PackedInt4Config, TorchAoConfig, int4_rule
from .weight_only import (INT4_GROUPS, LINEARS, Int4Weight, Int8Weight, QuantizedExperts, QuantizedLinear,
                          modules_not_to_convert, nibble_words, quantize_int4, quantize_int8, skipped)

PIECES = ("qweight", "qzeros", "scales", "g_idx")
SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)
AWQ_COLUMNS = [0, 4, 1, 5, 2, 6, 3, 7]  # the nibble holding each of eight outputs (AWQ packs them 0, 2, 4, 6, 1, ...)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(..., n) int32 -> (..., n, 8) values 0..15, lowest bits first."""
    return (packed[..., None] >> SHIFTS.to(packed.device)) & 15


def gptq_pieces(weight: Int4Weight, name: str, checkpoint_format: str) -> dict[str, torch.Tensor]:
    """The GPTQ tensors (qweight, qzeros, scales, g_idx) of an int4 weight of w = scale * (q - zero) with integer
    zero points (GPTQConfig's), in `checkpoint_format` ("gptq" or "gptq_v2"): unpack's inverse."""
    rows, cols = weight.shape
    if rows % 8 or cols % 8:
        raise ValueError(f"{name}: a {rows}x{cols} weight does not pack into GPTQ's int32 words of eight values")
    held = weight.scale_and_zeros[:, :rows]  # (groups, rows, 2)
    scale, zero = held.float().unbind(-1)
    zeros = torch.round(8 - zero / scale)
    offset = 1 if checkpoint_format == "gptq" else 0
    if offset and bool((zeros == 0).any()):
        raise ValueError(f"{name} has a zero point of 0, which GPTQ's v1 layout (checkpoint_format 'gptq', stored "
                         "minus one) cannot hold; set model.config.quantization_config.format = 'gptq_v2' and save "
                         "again")
    values = weight.values()
    return {"qweight": nibble_words(values.T.reshape(cols // 8, 8, rows).transpose(1, 2)),
            "qzeros": nibble_words((zeros.long() - offset).reshape(-1, rows // 8, 8)),
            "scales": held[..., 0].contiguous(),
            "g_idx": (torch.arange(cols, device=values.device) // weight.group_size).to(torch.int32)}


def awq_pieces(weight: Int4Weight, name: str) -> dict[str, torch.Tensor]:
    """The AWQ (GEMM) tensors (qweight, qzeros, scales) of an int4 weight with integer zero points (AwqConfig's):
    unpack's inverse."""
    rows, cols = weight.shape
    if rows % 8:
        raise ValueError(f"{name}: a weight of {rows} outputs does not pack into AWQ's int32 words of eight outputs")
    held = weight.scale_and_zeros[:, :rows]  # (groups, rows, 2)
    scale, zero = held.float().unbind(-1)
    packing = [AWQ_COLUMNS.index(nibble) for nibble in range(8)]  # the output each nibble holds
    values = weight.values().T.reshape(cols, rows // 8, 8)[..., packing]
    zeros = torch.round(8 - zero / scale).long().reshape(-1, rows // 8, 8)[..., packing]
    return {"qweight": nibble_words(values), "qzeros": nibble_words(zeros), "scales": held[..., 0].contiguous()}


def packed_pieces(weight: Int4Weight, name: str, config: GPTQConfig | AwqConfig | PackedInt4Config
                  ) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of a weight GPTQConfig or AwqConfig chose, or a GPTQ or AWQ checkpoint held, in its
    method's layout (a checkpoint's own: written back as it was read)."""
    if isinstance(config, PackedInt4Config) and weight.group_size != config.group_size:
        raise ValueError(f"{name}: its checkpoint's group_size {config.group_size} was split into groups of "
                         f"{weight.group_size} inputs on loading (the int4 products' sizes), which the checkpoint's "
                         "layout cannot describe; save the original files, or model.dequantize() and save")
    if isinstance(config, GPTQConfig):
        return gptq_pieces(weight, name, config.format)
    if isinstance(config, PackedInt4Config) and config.quant_method == "gptq":
        return gptq_pieces(weight, name, "gptq" if config.zero_offset else "gptq_v2")
    return awq_pieces(weight, name)


def unpack(pieces: dict[str, torch.Tensor], config: PackedInt4Config, name: str
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values (out, in), scales (groups, out), zeros (groups, out)) of one layer's GPTQ or AWQ tensors."""
    qweight, qzeros, scales = pieces["qweight"], pieces["qzeros"], pieces["scales"]
    if config.quant_method == "gptq":
        values = _nibbles(qweight.T).flatten(1)
        zeros = _nibbles(qzeros).flatten(1) + config.zero_offset
    else:
        values = _nibbles(qweight)[..., AWQ_COLUMNS].flatten(1).T
        zeros = _nibbles(qzeros)[..., AWQ_COLUMNS].flatten(1)
    cols, groups = values.shape[1], scales.shape[0]
    group_size = cols if config.group_size == -1 else config.group_size
    if groups * group_size != cols or zeros.shape != scales.shape or scales.shape[1] != values.shape[0]:
        raise ValueError(f"{name}: qweight {list(qweight.shape)}, qzeros {list(qzeros.shape)} and scales "
                         f"{list(scales.shape)} do not describe one {config.quant_method} layer of group_size "
                         f"{config.group_size}")
    g_idx = pieces.get("g_idx")
    if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(cols, device=g_idx.device) // group_size):
        raise NotImplementedError(f"{name}.g_idx orders the inputs in another order than their groups (an act-order "
                                  "checkpoint, desc_act=True); maestrale loads GPTQ checkpoints with desc_act=False")
    return values, scales, zeros


def int4_weight(values: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype, kind: str
                ) -> Int4Weight:
    """The int4 weight of w = scale * (q - zero), groups split into the largest size the int4 product takes."""
    group_size = values.shape[1] // scales.shape[0]
    split = next((size for size in reversed(INT4_GROUPS) if group_size % size == 0), None)
    if split is None:
        raise NotImplementedError(f"{kind} group_size={group_size} is not supported: torch's int4 products take "
                                  f"groups of {', '.join(map(str, INT4_GROUPS))} inputs, or whole multiples of them")
    scale = scales.T.float()
    zero = scale * (8 - zeros.T.float())
    repeat = group_size // split
    return Int4Weight(kind, values, scale.repeat_interleave(repeat, 1).to(dtype),
                      zero.repeat_interleave(repeat, 1).to(dtype))


class LinearSwapLoad:
    """What the loaders that swap a meta model's linear layers for quantized ones share (WeightOnlyLoad here,
    bitsandbytes' QuantizedLoad): the swapped layers' checkpoint tensors are kept out of the loader's plan and handed
    here (`intercept`) as they stream in; a float weight is quantized at once, a pre-quantized layer's pieces are
    gathered until `complete` (else until `finish`) and then built.

    A subclass says how: `split` (a pre-quantized tensor's weight name and piece), `quantize` (a float weight) and
    `build` (a layer's pieces).
    """

    def __init__(self, model: nn.Module, config, pre_quantized: bool, placement: DeviceMap):
        self.model, self.config, self.pre_quantized, self.placement = model, config, pre_quantized, placement
        self.dtype = model.config.dtype
        self.layout = Layout(model)  # before the weights are held out: it maps checkpoint names onto them
        self.linears: dict[str, nn.Module] = {}  # weight name -> its new layer
        self.pieces: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)  # weight name -> the pieces so far
        self.filled: set[str] = set()

    def swap(self, owners: list[str], new_layer: Callable[[nn.Module], nn.Module]) -> None:
        """Replace each module named in `owners` by `new_layer(module)`."""
        modules = dict(self.model.named_modules())
        for owner in owners:
            new = new_layer(modules[owner])
            self.model.set_submodule(owner, new)
            self.linears[f"{owner}.weight"] = new

    def intercept(self, shards: list[Shard]) -> list[Shard]:
        return [InterceptedShard(shard, self) for shard in shards]

    def split(self, name: str) -> tuple[str, str] | None:
        """(weight name, piece) of a pre-quantized checkpoint's tensor, None for a tensor of no quantized layer."""
        raise NotImplementedError

    def quantize(self, param: str, tensor: torch.Tensor) -> None:
        """Give the layer of `param` the quantized form of its float weight `tensor`."""
        raise NotImplementedError

    def build(self, param: str, pieces: dict[str, torch.Tensor]) -> None:
        """Give the layer of `param` its weight from a pre-quantized checkpoint's `pieces`."""
        raise NotImplementedError

    def complete(self, param: str, pieces: dict[str, torch.Tensor]) -> bool:
        """Whether `pieces` are all a layer's; those never complete are built in `finish`."""
        return False

    def owner(self, name: str) -> tuple[str, str] | None:
        """(weight name, piece) for a checkpoint tensor of a swapped layer: piece "" for a float weight."""
        split = self.split(name) if self.pre_quantized else (name, "")
        slot = self.layout.slot(split[0]) if split is not None else None
        return (slot.param, split[1]) if slot is not None and slot.param in self.linears else None

    def take(self, param: str, piece: str, tensor: torch.Tensor) -> None:
        if not self.pre_quantized:
            self.quantize(param, tensor)
            self.filled.add(param)
            return
        pieces = self.pieces[param]
        pieces[piece] = tensor
        if self.complete(param, pieces):
            self.build(param, self.pieces.pop(param))
            self.filled.add(param)

    def finish(self, origin: str) -> list[str]:
        """Build the layers whose pieces are all in; draw (then quantize) the weights a float checkpoint lacks, as a
        new model would, and return their names."""
        for param, pieces in self.pieces.items():
            self.build(param, pieces)
            self.filled.add(param)
        self.pieces.clear()
        missing = [name for name in self.linears if name not in self.filled]
        if missing and self.pre_quantized:
            raise ValueError(f"{origin} has no tensor for {len(missing)} quantized weights, e.g. {missing[:3]}; "
                             "the checkpoint does not fit the model its config describes")
        for name in missing:
            layer = self.linears[name]
            fresh = torch.empty(layer.out_features, layer.in_features, dtype=self.dtype)
            self.take(name, "", fresh.normal_(0.0, self.model.config.initializer_range))
        self.model.config.quantization_config = self.config
        return missing


class WeightOnlyLoad(LinearSwapLoad):
    """Swaps a meta model's linear layers for QuantizedLinear ones and gives them int8/int4 weights: quantized from
    a float checkpoint's tensors (TorchAoConfig), or read from a GPTQ or AWQ checkpoint's packed tensors."""

    def __init__(self, model: nn.Module, config: TorchAoConfig | PackedInt4Config, placement: DeviceMap,
                 shards: list[Shard]):
        super().__init__(model, config, isinstance(config, PackedInt4Config), placement)
        self.expected: dict[str, set[str]] = defaultdict(set)  # weight name -> the packed pieces the checkpoint has
        self.rules: dict[str, Any] = {}  # weight name -> the torchao config quantizing it
        self.experts: dict[str, tuple[QuantizedExperts, str, tuple]] = {}  # 3-D weight -> (its module, name, shape)
        # 3-D weight -> (its parts so far, which (expert, row) they have filled)
        self.gathering: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        modules = dict(model.named_modules())
        if self.pre_quantized:
            for shard in shards:
                for name in shard.infos():
                    split = self.split(name)
                    slot = self.layout.slot(split[0]) if split is not None else None
                    if slot is not None:
                        self.expected[slot.param].add(split[1])
            if not self.expected:
                raise ValueError(f"quantization_config says {config.quant_method}, but no tensor of "
                                 f"{shards[0].path.parent} is the qweight of a layer of {type(model).__name__}; the "
                                 "checkpoint does not fit its config")
            for param, pieces in self.expected.items():
                lacking = sorted(set(PIECES[:3]) - pieces)
                if lacking:
                    raise ValueError(f"{shards[0].path.parent} has no {', '.join(lacking)} for "
                                     f"{param.removesuffix('.weight')}; a {config.quant_method} layer needs qweight, "
                                     "qzeros and scales")
            owners = [param.removesuffix(".weight") for param in self.expected]
            for owner in owners:
                if type(modules.get(owner)) not in LINEARS:
                    raise NotImplementedError(f"{config.quant_method} tensors for {owner}, which maestrale holds in "
                                              "another form than a linear layer (e.g. Mixtral's stacked experts)")
        else:
            keep = modules_not_to_convert(model, config.modules_to_not_convert, "TorchAoConfig: modules_to_not_convert")
            head = model.get_output_embeddings()
            tied = getattr(model.config, "tie_word_embeddings", False)
            owners = []
            for name, module in modules.items():
                if skipped(name, keep):
                    continue
                if type(module) in LINEARS and not (tied and module is head):
                    rule = _rule(config, f"{name}.weight", True, module.in_features)
                    if rule is not None:
                        owners.append(name)
                        self.rules[f"{name}.weight"] = rule
                elif type(module) is Experts:
                    self._swap_experts(name, module)
        self.swap(owners, lambda module: QuantizedLinear(module.in_features, module.out_features, module.bias))

    def _swap_experts(self, name: str, module: Experts) -> None:
        """Stacked experts that FqnToConfig quantizes become QuantizedExperts; their 3-D weights are gathered (from
        one tensor, or one a hub expert) and quantized an expert at a time."""
        pieces = {piece: getattr(module, piece) for piece in ("gate_up_proj", "down_proj")}
        rules = {piece: _rule(self.config, f"{name}.{piece}", False, p.shape[-1]) for piece, p in pieces.items()}
        if all(rule is None for rule in rules.values()):
            return
        if any(rule is None for rule in rules.values()):
            left = next(piece for piece, rule in rules.items() if rule is None)
            raise NotImplementedError(f"TorchAoConfig: FqnToConfig leaves {name}.{left} in float but quantizes the "
                                      "other weight of those experts; maestrale quantizes stacked experts whole: give "
                                      f"both the config (e.g. the key 're:.*\\.experts'), or neither")
        new = QuantizedExperts(module.num_experts, module.act_fn)
        self.model.set_submodule(name, new)
        for piece, p in pieces.items():
            self.experts[f"{name}.{piece}"] = (new, piece, tuple(p.shape))
            self.rules[f"{name}.{piece}"] = rules[piece]

    def owner(self, name: str) -> tuple[str, Any] | None:
        slot = self.layout.slot(name) if not self.pre_quantized else None
        if slot is not None and slot.param in self.experts:
            return slot.param, slot.index  # the part of the stacked weight this tensor fills
        return super().owner(name)

    def take(self, param: str, piece: Any, tensor: torch.Tensor) -> None:
        if param not in self.experts:
            return super().take(param, piece, tensor)
        shape = self.experts[param][2]
        if param in self.filled or (tuple(tensor.shape) == shape and param in self.gathering):
            raise ValueError(f"the checkpoint holds {param} (or one of its experts) twice")
        if tuple(tensor.shape) == shape:
            return self._quantize_experts(param, tensor)
        if param not in self.gathering:
            self.gathering[param] = (torch.empty(shape, dtype=self.dtype, device=device_for(self.placement, param)),
                                     torch.zeros(shape[:2], dtype=torch.bool))
        gathered, covered = self.gathering[param]
        if covered[piece].any():
            raise ValueError(f"the checkpoint holds rows of expert {piece[0]} of {param} twice (in two tensors)")
        gathered[piece] = tensor
        covered[piece] = True
        if covered.all():
            del self.gathering[param]
            self._quantize_experts(param, gathered)

    def _quantize_experts(self, param: str, tensor: torch.Tensor) -> None:
        module, piece, _ = self.experts[param]
        weight = tensor.to(device=device_for(self.placement, param), dtype=self.dtype)
        getattr(module, piece).extend(_quantized(expert, self.rules[param]) for expert in weight)
        self.filled.add(param)

    def finish(self, origin: str) -> list[str]:
        if self.gathering:
            raise ValueError(f"{origin} holds only some experts of {', '.join(sorted(self.gathering))}; the "
                             "checkpoint does not fit the model its config describes")
        missing = [param for param in self.experts if param not in self.filled]
        for param in missing:
            fresh = torch.empty(self.experts[param][2], dtype=self.dtype)
            self._quantize_experts(param, fresh.normal_(0.0, self.model.config.initializer_range))
        return super().finish(origin) + missing

    def split(self, name: str) -> tuple[str, str] | None:
        base, _, piece = name.rpartition(".")
        return (f"{base}.weight", piece) if piece in PIECES else None

    def quantize(self, param: str, tensor: torch.Tensor) -> None:
        # on its device, from the model's dtype, as transformers does
        weight = tensor.to(device=device_for(self.placement, param), dtype=self.dtype)
        self.linears[param].weight = _quantized(weight, self.rules[param])

    def complete(self, param: str, pieces: dict[str, torch.Tensor]) -> bool:
        return pieces.keys() == self.expected[param]

    def build(self, param: str, pieces: dict[str, torch.Tensor]) -> None:
        device = device_for(self.placement, param)
        pieces = {piece: tensor.to(device) for piece, tensor in pieces.items()}
        values = unpack(pieces, self.config, param.removesuffix(".weight"))
        self.linears[param].weight = int4_weight(*values, self.dtype, self.config.quant_method)


def _rule(config: TorchAoConfig, param: str, linear: bool, inputs: int) -> Any:
    """The torchao config quantizing `param` (a weight of `inputs` inputs), None where it stays in float: torchao
    leaves a weight in float when its inputs are not whole groups."""
    rule = config.weight_config(param, linear)
    group = int4_rule(rule)[0] if rule is not None else None
    return None if rule is None or (group is not None and inputs % group) else rule


def _quantized(weight: torch.Tensor, rule: Any) -> Int4Weight | Int8Weight:
    """A float (rows, cols) weight quantized by a torchao weight config (int8 per row, or int4 in groups)."""
    group, algorithm = int4_rule(rule)
    if group is None:
        return quantize_int8(weight)
    return quantize_int4(weight, group, algorithm, f"int4 g{group}" + (" hqq" if algorithm == "hqq" else ""))


class InterceptedShard:
    """A shard that hides the quantized layers' tensors from the loader's plan and hands them to `load`."""

    def __init__(self, shard: Shard, load: LinearSwapLoad):
        self.shard, self.load, self.path = shard, load, shard.path

    def infos(self):
        return {name: info for name, info in self.shard.infos().items() if self.load.owner(name) is None}

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in self.shard.tensors():
            owner = self.load.owner(name)
            if owner is None:
                yield name, tensor
            else:
                self.load.take(*owner, tensor)
