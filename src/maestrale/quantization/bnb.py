"""bitsandbytes 4-bit (NF4/FP4) and 8-bit (LLM.int8) linear layers, swapped in for nn.Linear while loading.

The layers, their packed weights and quant states are bitsandbytes' own (Linear4bit/Params4bit, Linear8bitLt/
Int8Params), built the way transformers builds them, so both libraries hold and save the same bytes. A float
checkpoint is quantized tensor by tensor as it streams in; a pre-quantized one (config.json with a bitsandbytes
quantization_config) is read as it was saved. bitsandbytes is imported here only, when a model is quantized.
"""

from __future__ import annotations

import sys
from copy import copy

import torch
from torch import nn

from ..loading.placement import DeviceMap, device_for
from ..models.linear import Linear
from .config import BitsAndBytesConfig
from .load import LinearSwapLoad
from .weight_only import LINEARS, modules_not_to_convert, skipped

INSTALL = "pip install 'maestrale[bnb]'"
# The quant-state tensors saved beside a 4-bit `weight` (as `weight.<piece>`) and beside an 8-bit layer's weight.
PIECES_4BIT = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4",
               "quant_state.bitsandbytes__fp4")
PIECES_8BIT = ("SCB", "weight_format")
# bitsandbytes' CPU-packed 4-bit layout (AVX512-BF16 machines) takes a weight's rows in blocks of this many
# (_convert_weight_packed_for_cpu's block_n) and fails on others at the first inference forward.
CPU_PACKED_ROWS = 32


def require_bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        raise ImportError(f"quantization_config=BitsAndBytesConfig(...) needs the bitsandbytes package, which is not "
                          f"installed: {INSTALL}") from None
    return bitsandbytes


def quantized_linears(model: nn.Module) -> dict[str, nn.Module]:
    """{module name: layer} of the model's bitsandbytes layers; {} (and no import) when bitsandbytes was never
    loaded, since then no layer can be one."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return {}
    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return {name: module for name, module in model.named_modules() if isinstance(module, kinds)}


def portable(module: nn.Module) -> tuple[torch.Tensor, object]:
    """A Linear4bit's packed weight and quant state in the portable layout, the layer left as it runs.

    On AVX512-BF16 machines bitsandbytes repacks a 4-bit layer for the CPU at its first inference forward, absmax
    rounded to bfloat16 (what its kernel multiplies by). Its own way back (in state_dict) works in place, so the layer
    then packs again: a nested absmax quantized anew drifts each time, and an unnested one, which it leaves as the
    packed layout holds it (bfloat16, blocks per row by rows), is read in the wrong order by every loader and by
    that next packing. Here the way back works on a copy of the state and lays such an absmax out in float32."""
    weight = module.weight
    data, state = weight.data, weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        data, state = sys.modules["bitsandbytes"].functional._convert_weight_packed_for_cpu_inverse(data, copy(state))
    if state.absmax.dim() == 2:  # also where bitsandbytes' state_dict already went back
        state = copy(state)
        state.absmax = state.absmax.T.reshape(-1).float()
    return data, state


def weight_tensors(module: nn.Module, name: str) -> list[tuple[str, torch.Tensor]]:
    """A bitsandbytes layer's weight and quant-state tensors, in the portable layout, under the names transformers
    saves (`name` is the weight's)."""
    if isinstance(module, sys.modules["bitsandbytes"].nn.Linear4bit):
        data, state = portable(module)
        return [(name, data.detach().as_subclass(torch.Tensor))] + [
            (f"{name}.{key}", tensor.detach()) for key, tensor in state.as_dict(packed=True).items()]
    prefix = name.removesuffix("weight")
    return [(key, tensor.detach().as_subclass(torch.Tensor)) for key, tensor in module.state_dict(prefix=prefix).items()
            if key != prefix + "bias"]


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    bnb = sys.modules["bitsandbytes"]
    if isinstance(module, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(*portable(module))
    weight = module.weight
    scale = weight.SCB if weight.SCB is not None else module.state.SCB  # the first forward moves it to the state
    return bnb.functional.int8_vectorwise_dequant(weight.data, scale)


def dequantize(model: nn.Module, dtype: torch.dtype) -> None:
    """Replace each bitsandbytes layer by a Linear holding its dequantized weight in `dtype`."""
    for name, module in quantized_linears(model).items():
        weight = dequantized_weight(module).to(dtype)
        linear = Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight)
        linear.bias = module.bias
        model.set_submodule(name, linear)


def modules_to_keep(model: nn.Module, config: BitsAndBytesConfig, device_map) -> list[str]:
    """Modules left unquantized: llm_int8_skip_modules, else transformers' default (modules_not_to_convert); with
    llm_int8_enable_fp32_cpu_offload, the modules a device_map dict puts on the CPU."""
    keep = modules_not_to_convert(model, config.llm_int8_skip_modules, "BitsAndBytesConfig: llm_int8_skip_modules")
    if isinstance(device_map, dict):
        on_cpu = [prefix for prefix, device in device_map.items() if torch.device(device).type == "cpu"]
        if on_cpu and len(on_cpu) < len(device_map) and not config.llm_int8_enable_fp32_cpu_offload:
            raise ValueError(f"device_map puts {on_cpu} on the CPU beside the GPU, where bitsandbytes layers cannot "
                             "run: set BitsAndBytesConfig(llm_int8_enable_fp32_cpu_offload=True) to keep those modules "
                             "unquantized there, or map every module to the GPU")
        if config.llm_int8_enable_fp32_cpu_offload:
            keep += on_cpu
    return keep


def _bnb_linear(bnb, linear: nn.Linear, config: BitsAndBytesConfig) -> nn.Module:
    """The bitsandbytes layer for `linear`, on the meta device; its bias keeps the model's dtype."""
    bias = linear.bias is not None
    if config.load_in_8bit:
        new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias,
                                  has_fp16_weights=config.llm_int8_has_fp16_weight,
                                  threshold=config.llm_int8_threshold, device="meta")
    else:
        new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias, config.bnb_4bit_compute_dtype,
                                compress_statistics=config.bnb_4bit_use_double_quant,
                                quant_type=config.bnb_4bit_quant_type, quant_storage=config.bnb_4bit_quant_storage,
                                device="meta")
        if linear.out_features % CPU_PACKED_ROWS:  # then its portable product, as where the CPU cannot pack
            new.support_avx512bf16_for_cpu = False
    if bias:
        new.bias = linear.bias
    return new.requires_grad_(False)  # frozen, as transformers leaves them: train adapters or unquantized layers


class QuantizedLoad(LinearSwapLoad):
    """Swaps a meta model's linear layers for bitsandbytes ones and fills their weights from the checkpoint.

    The swapped layers' weights are held out of the model until their tensors arrive, so the loader neither
    allocates float storage for them nor plans their (packed) shapes. A pre-quantized layer's quant-state pieces
    vary with its config, so its weight is built in `finish`, once all the checkpoint's tensors are in.
    """

    def __init__(self, model: nn.Module, config: BitsAndBytesConfig, pre_quantized: bool, placement: DeviceMap,
                 device_map=None):
        if not (config.load_in_4bit or config.load_in_8bit):
            raise ValueError("BitsAndBytesConfig: neither load_in_4bit nor load_in_8bit is True; set one of them, or "
                             "drop quantization_config")
        self.bnb = require_bitsandbytes()
        super().__init__(model, config, pre_quantized, placement)
        keep = modules_to_keep(model, config, device_map)
        self.swap([name for name, module in model.named_modules()
                   if type(module) in LINEARS and not skipped(name, keep)], self._held_out)

    def _held_out(self, linear: nn.Module) -> nn.Module:
        new = _bnb_linear(self.bnb, linear, self.config)
        # Held out until the checkpoint's tensor arrives; a meta stand-in (not a parameter) meanwhile, which the
        # loader neither allocates nor plans, and on which a fresh init of the layer's bias is a no-op.
        new.weight = new._parameters.pop("weight").as_subclass(torch.Tensor)
        return new

    def split(self, name: str) -> tuple[str, str]:
        for known in PIECES_4BIT:
            if name.endswith(f".weight.{known}"):
                return name.removesuffix(f".{known}"), known
        for known in PIECES_8BIT:
            if name.endswith(f".{known}"):
                return name.removesuffix(known) + "weight", known
        return name, ""

    def quantize(self, param: str, tensor: torch.Tensor) -> None:
        # In the model's dtype, quantized on its device (bitsandbytes does that on the first move).
        module, device = self.linears[param], device_for(self.placement, param)
        weight = tensor.to(self.dtype)
        if self.config.load_in_8bit:
            new = self.bnb.nn.Int8Params(weight, requires_grad=False,
                                         has_fp16_weights=self.config.llm_int8_has_fp16_weight)
        else:
            new = self.bnb.nn.Params4bit(weight, requires_grad=False,
                                         compress_statistics=self.config.bnb_4bit_use_double_quant,
                                         quant_type=self.config.bnb_4bit_quant_type,
                                         quant_storage=self.config.bnb_4bit_quant_storage, module=module)
        module.weight = new.to(device)

    def build(self, param: str, pieces: dict[str, torch.Tensor]) -> None:
        module, device = self.linears[param], device_for(self.placement, param)
        data = pieces.pop("")
        if self.config.load_in_8bit:
            module.weight = self.bnb.nn.Int8Params(data, requires_grad=False, has_fp16_weights=False,
                                                   SCB=pieces["SCB"]).to(device)
        else:
            module.weight = self.bnb.nn.Params4bit.from_prequantized(data, pieces, requires_grad=False, device=device,
                                                                     module=module)
