"""Reading .safetensors files tensor by tensor, checking the header against the file before trusting it.

We read with plain file reads rather than a memory map: each tensor lands in one fresh buffer that is freed once it is
copied into the model, so host memory holds the model plus one tensor, and a damaged file is reported by name.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
# Headers larger than this are not safetensors headers but garbage (the format itself caps them at 100 MB).
MAX_HEADER_BYTES = 100_000_000


class SafetensorsFile:
    """One .safetensors file: `infos()` reads only the header, `tensors()` reads the data."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._entries, self.metadata, self._data_start = _read_header(self.path)

    def infos(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {name: (shape, dtype) for name, (shape, dtype, _, _) in self._entries.items()}

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        with open(self.path, "rb") as f:
            for name, (shape, dtype, begin, end) in sorted(self._entries.items(), key=lambda item: item[1][2]):
                tensor = torch.empty(shape, dtype=dtype)
                if end > begin:
                    f.seek(self._data_start + begin)
                    if f.readinto(tensor.reshape(-1).view(torch.uint8).numpy()) != end - begin:
                        raise OSError(f"{self.path}: tensor {name!r} could not be read in full; the file is damaged, "
                                      "download or save it again")
                yield name, tensor


def _fail(path: Path, problem: str) -> None:
    raise OSError(f"{path} is not a valid safetensors file: {problem}. Download or save it again")


def _read_header(path: Path):
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            _fail(path, f"it is {size} bytes long, too short to hold a header")
        header_len = int.from_bytes(prefix, "little")
        if header_len > min(size - 8, MAX_HEADER_BYTES):
            _fail(path, f"the header claims {header_len} bytes but the file has {size} (truncated or not safetensors)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            _fail(path, f"its header is not JSON ({e})")
    if not isinstance(header, dict):
        _fail(path, "its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start, data_len = 8 + header_len, size - 8 - header_len
    entries = {}
    for name, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            _fail(path, f"the header entry of tensor {name!r} is malformed: {entry!r}")
        expected = math.prod(shape) * dtype.itemsize
        if end - begin != expected or begin < 0:
            _fail(path, f"tensor {name!r} of shape {list(shape)} and dtype {entry['dtype']} needs {expected} bytes, "
                        f"the header gives it {end - begin}")
        if end > data_len:
            _fail(path, f"tensor {name!r} ends at data byte {end} but the file holds only {data_len} bytes of data "
                        "(the file is truncated)")
        entries[name] = (shape, dtype, begin, end)
    return entries, metadata, data_start
