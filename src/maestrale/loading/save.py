"""save_pretrained: config.json, generation_config.json and safetensors shards (with their index) that transformers
opens. Everything is written into a temporary folder first, so a failure leaves nothing half-written."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME
from .layout import checkpoint_tensors
from .sizes import parse_size


def save_pretrained(model, save_directory: str | os.PathLike, *, state_dict: dict[str, torch.Tensor] | None = None,
                    max_shard_size: int | str = "50GB", safe_serialization: bool = True,
                    is_main_process: bool = True) -> None:
    if not safe_serialization:
        raise ValueError("maestrale saves safetensors only (safe_serialization=True): pickled .bin files can carry "
                         "code, so we do not write them")
    if not is_main_process:
        return
    from ..quantization.weight_only import refuse_save

    refuse_save(model)
    target = Path(save_directory)
    if target.is_file():
        raise ValueError(f"save_pretrained needs a folder, but {target} is a file")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _use_default_permissions(staging)  # mkdtemp makes it private (0700); a saved model is an ordinary folder
        model.config.architectures = [type(model).__name__]
        model.config.dtype = model.dtype
        model.config.save_pretrained(staging)
        if hasattr(model, "generation_config"):
            model.generation_config.save_pretrained(staging)
        write_shards(checkpoint_tensors(model, state_dict), staging, parse_size(max_shard_size))
        for file in staging.iterdir():
            _use_default_permissions(file)
        _publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_shards(tensors: Iterable[tuple[str, torch.Tensor]], folder: Path, max_shard_bytes: float) -> None:
    """Split tensors into shards of at most `max_shard_bytes` (a bigger tensor gets a shard of its own); one shard
    is written as model.safetensors, several as model-0000i-of-0000n.safetensors with an index."""
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, tensor))
        size += nbytes
    count = len(shards)
    weight_map, total_size, total_parameters = {}, 0, 0
    for i, shard in enumerate(shards, 1):
        filename = SAFE_WEIGHTS_NAME if count == 1 else f"model-{i:05d}-of-{count:05d}.safetensors"
        # Own copies on the CPU: views into one parameter (Mixtral experts) must not share storage in the file.
        data = {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in shard}
        save_file(data, folder / filename, metadata={"format": "pt"})
        for name, tensor in data.items():
            weight_map[name] = filename
            total_size += tensor.numel() * tensor.element_size()
            total_parameters += tensor.numel()
        del data
    if count > 1:
        index = {"metadata": {"total_parameters": total_parameters, "total_size": total_size},
                 "weight_map": dict(sorted(weight_map.items()))}
        (folder / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _use_default_permissions(path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _publish(staging: Path, target: Path) -> None:
    """Move the finished files into place: the whole folder at once when it is new; otherwise file by file, after
    removing the weight files of an earlier save (other files there, e.g. a tokenizer, are kept)."""
    if not target.exists():
        os.replace(staging, target)
        return
    for old in (*target.glob("model*.safetensors"), target / SAFE_WEIGHTS_INDEX_NAME):
        if old.is_file():
            old.unlink()
    for new in staging.iterdir():
        os.replace(new, target / new.name)
