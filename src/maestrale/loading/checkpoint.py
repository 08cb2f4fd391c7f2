"""The weight files of a Hugging Face checkpoint folder or hub repo, opened as shards that read tensor by tensor.

A shard is any object with `path`, `infos() -> {name: (shape, dtype)}` (metadata only, cheap) and
`tensors() -> iterator of (name, tensor)`; the loader plans from the infos, then streams the tensors.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import torch

from .hub import resolve_file
from .safetensors_io import SafetensorsFile

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "pytorch_model.bin"
WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"

TensorInfo = tuple[tuple[int, ...], torch.dtype]


class Shard(Protocol):
    path: Path

    def infos(self) -> dict[str, TensorInfo]: ...

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]: ...


def find_weight_files(name_or_path: str | os.PathLike, hub_kwargs: dict, use_safetensors: bool | None = None
                      ) -> list[Path]:
    """The weight files of an HF checkpoint, safetensors first; [] when it has none. use_safetensors=True looks for
    safetensors only, False for torch .bin files only."""
    formats = [(SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME), (WEIGHTS_INDEX_NAME, WEIGHTS_NAME)]
    if use_safetensors is not None:
        formats = formats[:1] if use_safetensors else formats[1:]
    for index_name, single_name in formats:
        single = resolve_file(name_or_path, single_name, required=False, **hub_kwargs)
        if single is not None:
            return [single]
        index = resolve_file(name_or_path, index_name, required=False, **hub_kwargs)
        if index is not None:
            return _shards_of_index(index, name_or_path, hub_kwargs)
    return []


def _shards_of_index(index: Path, name_or_path, hub_kwargs: dict) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = list(dict.fromkeys(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise OSError(f"{index} is not a valid index file (a JSON object with a `weight_map`): {e!r}") from None
    subfolder = hub_kwargs.get("subfolder", "")
    paths = []
    for name in files:
        try:
            paths.append(resolve_file(name_or_path, name, **hub_kwargs))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{index} lists the shard {name!r} but it is missing from {os.path.join(str(name_or_path), subfolder)}; "
                "download the checkpoint again"
            ) from None
    return paths


def open_shard(path: Path) -> Shard:
    if path.suffix == ".safetensors":
        return SafetensorsFile(path)
    if path.suffix in (".bin", ".pth", ".pt"):
        return TorchFile(path)
    raise ValueError(f"{path}: unknown weight file type {path.suffix!r}; expected .safetensors, .bin or .pth")


class TorchFile:
    """A torch pickle (.bin/.pth) opened with weights_only=True, so it can only yield tensors, never run code."""

    def __init__(self, path: str | Path, state_dict_key: str | None = None):
        self.path = Path(path)
        try:
            # Zip-format files are memory-mapped: tensor data is read from the page cache only when copied.
            state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(self.path))
        except pickle.UnpicklingError as e:
            raise OSError(
                f"{self.path} was refused: its pickle holds more than tensors, and loading it could run code. "
                "maestrale only reads plain tensors from .bin/.pth files (torch.load(weights_only=True)); ask for a "
                f"safetensors version of the checkpoint. Detail: {str(e).splitlines()[0]}"
            ) from None
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            raise OSError(f"{self.path} is not a readable torch checkpoint ({e}); download or save it again") from None
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
        ):
            raise OSError(f"{self.path} does not hold a state dict (a mapping from names to tensors)")
        self._state = state

    def infos(self) -> dict[str, TensorInfo]:
        return {name: (tuple(t.shape), t.dtype) for name, t in self._state.items()}

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self._state.items()


class MappedShard:
    """A shard whose tensor names (and possibly values) are translated into Hugging Face names.

    `rename` returns None for tensors the model does not use; `transform(new_name, tensor)` reorders values
    (e.g. rotary layouts) without changing shapes.
    """

    def __init__(self, inner: Shard, rename: Callable[[str], str | None],
                 transform: Callable[[str, torch.Tensor], torch.Tensor] = lambda name, tensor: tensor):
        self.inner, self.path, self.rename, self.transform = inner, inner.path, rename, transform

    def infos(self) -> dict[str, TensorInfo]:
        return {new: info for name, info in self.inner.infos().items() if (new := self.rename(name)) is not None}

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in self.inner.tensors():
            new = self.rename(name)
            if new is not None:
                yield new, self.transform(new, tensor)
