"""from_pretrained: find the checkpoint, build its config, build the model without weights, fill it shard by shard."""

from __future__ import annotations

import copy
import logging
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..configs import config_class_for, refuse_remote_code
from ..configs.base import COMMON_DEFAULTS, CONFIG_NAME, PretrainedConfig, read_config_dict
from ..generation.configuration import GENERATION_CONFIG_NAME, GenerationConfig
from ..models.modeling_utils import resolve_dtype
from ..quantization.config import (AwqConfig, BitsAndBytesConfig, GPTQConfig, QuantizationConfig, TorchAoConfig,
                                   check_quantization, saved_quantization_config)
from .checkpoint import Shard, find_weight_files, open_shard
from .gguf import GGUFShard, open_gguf
from .hub import resolve_file
from .layout import Layout, Slot
from .mistral_native import PARAMS_NAME, open_mistral_native
from .mistral_native import WEIGHT_FILES as NATIVE_WEIGHT_FILES
from .placement import add_device_hooks, materialize, parameters_on_meta, resolve_device_map
from .progress import progress

logger = logging.getLogger(__name__)

# Config keys accepted as from_pretrained keyword arguments besides the declared fields.
CONFIG_KWARGS = {"num_labels", "id2label", "label2id", "rope_scaling", "rope_theta"}


@dataclass
class Checkpoint:
    """What a source on disk provides: a config as a dict, weight shards, and where they came from."""

    config_dict: dict[str, Any]
    config_source: str  # the file the config was read from, named in messages
    shards: list[Shard]
    origin: str  # the file or folder the weights come from, named in messages
    generation_config: Path | None = None


def open_checkpoint(name_or_path: str | os.PathLike, gguf_file: str | None, hub_kwargs: dict,
                    use_safetensors: bool | None = None) -> Checkpoint:
    """A .gguf file, a Hugging Face folder or hub repo, or a Mistral native folder (params.json)."""
    text = os.fspath(name_or_path)
    if gguf_file is not None or (text.endswith(".gguf") and os.path.isfile(text)):
        path = resolve_file(name_or_path, gguf_file, **hub_kwargs) if gguf_file is not None else Path(text)
        config_dict, shard = open_gguf(path)
        return Checkpoint(config_dict, str(path), [shard], str(path))

    config_path = resolve_file(name_or_path, CONFIG_NAME, required=False, **hub_kwargs)
    if config_path is not None:
        files = find_weight_files(name_or_path, hub_kwargs, use_safetensors)
        if not files and use_safetensors is not None:
            wanted, other = ("model.safetensors (or its index)", "False") if use_safetensors else \
                ("pytorch_model.bin (or its index)", "True")
            raise FileNotFoundError(
                f"{name_or_path} has no {wanted}, which use_safetensors={use_safetensors} asks for; pass "
                f"use_safetensors={other} or leave it out to load the weights it has"
            )
        if not files:
            raise FileNotFoundError(
                f"{name_or_path} has a config.json but no weights: expected model.safetensors, "
                "model.safetensors.index.json with its shards, or pytorch_model.bin; for a .gguf file pass gguf_file="
            )
        generation = resolve_file(name_or_path, GENERATION_CONFIG_NAME, required=False, **hub_kwargs)
        return Checkpoint(read_config_dict(config_path), str(config_path), [open_shard(f) for f in files],
                          str(config_path.parent), generation)

    params_path = resolve_file(name_or_path, PARAMS_NAME, required=False, **hub_kwargs)
    if params_path is not None:
        for name in NATIVE_WEIGHT_FILES:  # fetched into the same folder when it is a hub repo
            if resolve_file(name_or_path, name, required=False, **hub_kwargs) is not None:
                break
        config_dict, shards = open_mistral_native(params_path.parent)
        return Checkpoint(config_dict, str(params_path), shards, str(params_path.parent))
    raise FileNotFoundError(
        f"{name_or_path} holds no checkpoint maestrale can read: no config.json (Hugging Face format), no params.json "
        "(Mistral native format); for a .gguf file pass gguf_file= or the file's path"
    )


def load_pretrained(
    cls,
    pretrained_model_name_or_path: str | os.PathLike,
    *,
    config: PretrainedConfig | None = None,
    dtype: torch.dtype | str | None = None,
    torch_dtype: torch.dtype | str | None = None,
    device_map: str | int | torch.device | dict | None = None,
    max_memory: dict | None = None,
    attn_implementation: str | None = None,
    gguf_file: str | None = None,
    keep_quantized: bool = False,
    quantization_config: BitsAndBytesConfig | TorchAoConfig | GPTQConfig | AwqConfig | dict | None = None,
    ignore_mismatched_sizes: bool = False,
    output_loading_info: bool = False,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    force_download: bool = False,
    subfolder: str = "",
    low_cpu_mem_usage: bool | None = None,  # accepted for compatibility: loading is always lean
    use_safetensors: bool | None = None,
    **kwargs: Any,
):
    """Load a model class (or an Auto class, which has `model_class(config)`) from a checkpoint."""
    refuse_remote_code(kwargs)
    quantization_config = check_quantization(quantization_config)  # before any download
    hub_kwargs = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token,
                      force_download=force_download, subfolder=subfolder)
    checkpoint = open_checkpoint(pretrained_model_name_or_path, gguf_file, hub_kwargs, use_safetensors)
    config = _build_config(cls, checkpoint, config, kwargs)
    config.name_or_path = os.fspath(pretrained_model_name_or_path)

    requested = dtype if dtype is not None else torch_dtype
    if requested is None or requested == "auto":  # transformers 5 reads the checkpoint's dtype by default
        requested = config.dtype or _first_float_dtype(checkpoint.shards) or torch.float32
    config.dtype = resolve_dtype(requested)

    model_class = cls.model_class(config) if hasattr(cls, "model_class") else cls
    with parameters_on_meta():
        model = model_class.from_config(config, attn_implementation=attn_implementation, dtype=config.dtype)
    placement = resolve_device_map(device_map, model, max_memory)
    quantized = _quantize_linears(model, quantization_config, placement, device_map, checkpoint)
    # GPTQ and AWQ quantize the loaded float model, on calibration text; a checkpoint saved quantized keeps its own
    calibrate = isinstance(quantization_config, (GPTQConfig, AwqConfig)) and quantized is None
    if keep_quantized:
        quantized = _keep_packed(model, checkpoint, quantized is not None or calibrate)

    layout = Layout(model)
    slots, report = _plan(layout, checkpoint, ignore_mismatched_sizes)
    materialize(model, placement)
    _initialise(model, report["missing_keys"] + [name for name, _, _ in report["mismatched_keys"]])
    _fill(model, checkpoint.shards, slots)
    if quantized is not None:
        report["missing_keys"] += quantized.finish(checkpoint.origin)
    model.tie_weights()
    add_device_hooks(model, placement)
    model.eval()
    if calibrate:
        from ..quantization.awq import quantize_awq
        from ..quantization.gptq import quantize_gptq

        (quantize_gptq if isinstance(quantization_config, GPTQConfig) else quantize_awq)(model, quantization_config)
    if checkpoint.generation_config is not None and hasattr(model, "generation_config"):
        model.generation_config = GenerationConfig.from_pretrained(checkpoint.generation_config)
    _warn(model, checkpoint.origin, report)
    return (model, report) if output_loading_info else model


def _build_config(cls, checkpoint: Checkpoint, config: PretrainedConfig | None, overrides: dict) -> PretrainedConfig:
    if config is not None:
        config = copy.deepcopy(config)
        for key, value in overrides.items():
            setattr(config, key, value)
        config.validate()
    else:
        data = checkpoint.config_dict
        saved = data.get("quantization_config")
        if saved is not None and saved.get("quant_method") == TorchAoConfig.quant_method:
            raise NotImplementedError(
                f"{checkpoint.config_source} describes a checkpoint quantized with torchao (transformers' layout of "
                "its tensor subclasses), which maestrale cannot read; load the float checkpoint with "
                "quantization_config=TorchAoConfig(...) instead"
            )
        if saved is not None:
            saved_quantization_config(saved, checkpoint.config_source)  # refuses what maestrale cannot load, by name
        config_class = config_class_for(data.get("model_type"), checkpoint.config_source)
        known = set(config_class._field_defaults()) | set(COMMON_DEFAULTS) | CONFIG_KWARGS
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"from_pretrained got unexpected keyword arguments {unknown}: they are neither loading "
                            f"options nor fields of {config_class.__name__}")
        config = config_class.from_dict(data, **overrides)
    wanted = getattr(cls, "config_class", None)
    if wanted is not None and wanted.model_type and wanted.model_type != config.model_type:
        raise ValueError(
            f"{checkpoint.origin} holds a {config.model_type!r} model, which {cls.__name__} cannot load; use the "
            f"{config.model_type} classes or an Auto class (e.g. AutoModelForCausalLM)"
        )
    return config


def _quantize_linears(model: nn.Module, requested: QuantizationConfig | None, placement, device_map,
                      checkpoint: Checkpoint):
    """Swap the model's linear layers for quantized ones when the checkpoint was saved quantized (its config says
    how: bitsandbytes, GPTQ, AWQ) or `requested` asks for it (BitsAndBytesConfig, TorchAoConfig; GPTQConfig and
    AwqConfig quantize after loading); their tensors then go to the returned loader instead of the plan."""
    saved = getattr(model.config, "quantization_config", None)
    if saved is not None:
        config = saved_quantization_config(saved, checkpoint.config_source) if isinstance(saved, dict) else saved
        if requested is not None:
            logger.warning(f"{checkpoint.config_source} is already quantized; its quantization_config is used and "
                           "the one passed to from_pretrained is ignored")
    elif requested is not None and not isinstance(requested, (GPTQConfig, AwqConfig)):
        config = requested
    else:
        return None
    if isinstance(config, BitsAndBytesConfig):
        from ..quantization.bnb import QuantizedLoad

        load = QuantizedLoad(model, config, saved is not None, placement, device_map)
    else:
        from ..quantization.load import WeightOnlyLoad

        load = WeightOnlyLoad(model, config, placement, checkpoint.shards)
    checkpoint.shards = load.intercept(checkpoint.shards)
    return load


def _keep_packed(model: nn.Module, checkpoint: Checkpoint, quantized: bool):
    """GGUF blocks kept packed in GGUF layers (quantization/gguf.py) instead of dequantized; `quantized`: whether
    the checkpoint or quantization_config quantizes the model otherwise."""
    if not isinstance(checkpoint.shards[0], GGUFShard):
        raise ValueError(f"keep_quantized=True keeps GGUF blocks packed, but {checkpoint.origin} is not a GGUF file; "
                         "pass gguf_file=, or drop keep_quantized")
    if quantized:
        raise ValueError("keep_quantized=True and quantization_config both quantize the model; pass only one")
    from ..quantization.gguf import PackedLoad

    load = PackedLoad(model, checkpoint.shards[0])
    checkpoint.shards = load.shards()
    return load


def _first_float_dtype(shards: list[Shard]) -> torch.dtype | None:
    for shard in shards:
        for _, dtype in shard.infos().values():
            if dtype.is_floating_point:
                return dtype
    return None


def _plan(layout: Layout, checkpoint: Checkpoint, ignore_mismatched_sizes: bool):
    """From tensor metadata only: where each tensor goes, and what is missing, unexpected or the wrong shape."""
    slots: dict[str, Slot] = {}
    covered: dict[str, int] = defaultdict(int)
    unexpected, mismatched = [], []
    for shard in checkpoint.shards:
        for name, (shape, _) in shard.infos().items():
            slot = layout.slot(name)
            if slot is None:
                if not layout.is_alias(name):
                    unexpected.append(name)
                continue
            expected = tuple(layout.params[slot.param][slot.index].shape)
            if tuple(shape) != expected:
                mismatched.append((slot.param, tuple(shape), expected))
                continue
            slots[name] = slot
            covered[slot.param] += math.prod(shape)
    if mismatched and not ignore_mismatched_sizes:
        lines = "\n".join(f"  {name}: checkpoint {list(got)}, model {list(want)}" for name, got, want in mismatched)
        raise RuntimeError(  # transformers' error class for this case
            f"{checkpoint.origin}: {len(mismatched)} tensors do not fit the model its config describes:\n{lines}\n"
            "Fix the config (hidden_size, vocab_size, heads, num_labels, ...) to match the weights, or pass "
            "ignore_mismatched_sizes=True to initialise these weights anew"
        )
    mismatched_params = {name for name, _, _ in mismatched}
    missing = [name for name, param in layout.params.items()
               if covered[name] < param.numel() and name not in mismatched_params]
    return slots, {"missing_keys": missing, "unexpected_keys": unexpected, "mismatched_keys": mismatched,
                   "error_msgs": []}


@torch.no_grad()
def _initialise(model: nn.Module, names: list[str]) -> None:
    """Draw fresh values, as a new model would, for the modules owning weights the checkpoint lacks."""
    for owner in dict.fromkeys(name.rpartition(".")[0] for name in names):
        model._init_weights(model.get_submodule(owner))


@torch.no_grad()
def _fill(model: nn.Module, shards: list[Shard], slots: dict[str, Slot]) -> None:
    params = dict(model.named_parameters())
    for shard in progress(shards, "loading checkpoint shards"):
        for name, tensor in shard.tensors():
            slot = slots.get(name)
            if slot is not None:
                params[slot.param][slot.index].copy_(tensor)  # converts dtype and device in one pass
            del tensor  # drop the read buffer before reading the next tensor


def _warn(model: nn.Module, origin: str, report: dict) -> None:
    advice = "Train the model on a downstream task before using it for predictions."
    if report["missing_keys"]:
        logger.warning(f"Some weights of {type(model).__name__} were not in {origin} and are newly initialised: "
                       f"{report['missing_keys']}. {advice}")
    if report["mismatched_keys"]:
        shapes = ", ".join(f"{name} (checkpoint {list(got)}, model {list(want)})"
                           for name, got, want in report["mismatched_keys"])
        logger.warning(f"Some weights of {type(model).__name__} have other shapes in {origin} and are newly "
                       f"initialised (ignore_mismatched_sizes=True): {shapes}. {advice}")
    if report["unexpected_keys"]:
        logger.warning(f"Some weights of {origin} were not used by {type(model).__name__}: {report['unexpected_keys']}")
