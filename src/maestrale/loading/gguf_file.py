"""The GGUF container (llama.cpp's file format): metadata fields and tensor records, the tensor bytes as read-only
views of a memory map.

The header is parsed with struct in one pass (gguf's GGUFReader builds a numpy view per string, which takes seconds on
a tokenizer's vocabulary). The commonest tensor types are known here; the gguf package, whose import takes ~0.3 s
(it imports mistral_common), supplies the others. Layout, version 2 and 3,
little-endian: magic, version, tensor count, field count; the fields (key, value type, value); the tensor records
(name, dimensions fastest-first, GGML type, offset); then, aligned to `general.alignment`, the tensor data.
"""

from __future__ import annotations

import enum
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
DEFAULT_ALIGNMENT = 32


class GGMLType(enum.IntEnum):
    """The tensor types read without the gguf package, by GGML's numbers (equal to gguf's GGMLQuantizationType)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q8_0 = 8
    Q4_K = 12
    Q6_K = 14
    BF16 = 30


# (values, bytes) of a block of each type
BLOCK_SIZES = {GGMLType.F32: (1, 4), GGMLType.F16: (1, 2), GGMLType.BF16: (1, 2), GGMLType.Q4_0: (32, 18),
               GGMLType.Q4_1: (32, 20), GGMLType.Q8_0: (32, 34), GGMLType.Q4_K: (256, 144), GGMLType.Q6_K: (256, 210)}


def tensor_type(type_id: int) -> tuple[Any, tuple[int, int]]:
    """A GGML type number's type (GGMLType, or gguf's GGMLQuantizationType for the others) and block sizes."""
    if type_id in GGMLType._value2member_map_:
        return GGMLType(type_id), BLOCK_SIZES[GGMLType(type_id)]
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    kind = GGMLQuantizationType(type_id)  # a ValueError or KeyError where gguf does not know it either
    return kind, GGML_QUANT_SIZES[kind]


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # torch order, slowest-varying dimension first
    tensor_type: Any  # GGMLType, or gguf's GGMLQuantizationType (same numbers)
    data: np.ndarray  # the raw bytes, (*shape[:-1], bytes per row)


class GGUFFile:
    """`fields` (key -> Python value; arrays as lists) and `tensors` of a GGUF file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} does not exist")
        try:
            with open(self.path, "rb") as f:
                self._buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._parse()
        except (ValueError, struct.error, OverflowError) as e:  # UnicodeDecodeError is a ValueError
            raise OSError(f"{self.path} is not a readable GGUF file ({e}); download it again") from None

    def _parse(self) -> None:
        if self._buffer[:4] != b"GGUF":
            raise ValueError("it does not start with the GGUF magic bytes")
        version, tensor_count, field_count = struct.unpack_from("<IQQ", self._buffer, 4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version:#x} is not 2 or 3 (or the file is big-endian)")
        self._pos = 24
        self.fields: dict[str, Any] = {}
        for _ in range(field_count):
            key = self._string()
            self.fields[key] = self._value(self._unpack("<I"))
        records = []
        for _ in range(tensor_count):
            name = self._string()
            dims = [self._unpack("<Q") for _ in range(self._unpack("<I"))]
            records.append((name, tuple(reversed(dims)), self._unpack("<I"), self._unpack("<Q")))
        alignment = self.fields.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment % 8:
            raise ValueError(f"general.alignment is {alignment!r}, not a positive multiple of 8")
        start = -(-self._pos // alignment) * alignment
        self.tensors: list[GGUFTensor] = []
        for name, shape, type_id, offset in records:
            try:
                kind, (block, block_bytes) = tensor_type(type_id)
            except (ValueError, KeyError):
                raise ValueError(f"tensor {name!r} has GGML type {type_id}, which the gguf package cannot read; "
                                 "upgrade it (pip install -U gguf)") from None
            if shape and shape[-1] % block:
                raise ValueError(f"tensor {name!r} has rows of {shape[-1]} values, not whole blocks of {block}")
            row_bytes = shape[-1] // block * block_bytes if shape else block_bytes
            rows = math.prod(shape[:-1])
            if start + offset + rows * row_bytes > len(self._buffer):
                raise ValueError(f"tensor {name!r} runs past the end of the file: it is truncated")
            data = np.frombuffer(self._buffer, np.uint8, rows * row_bytes, start + offset)
            self.tensors.append(GGUFTensor(name, shape, kind, data.reshape(*shape[:-1], row_bytes)))

    def _unpack(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self._buffer, self._pos)
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        size = self._unpack("<Q")
        end = self._pos + size
        if end > len(self._buffer):
            raise ValueError("a string runs past the end of the file: it is truncated")
        text = self._buffer[self._pos:end].decode("utf-8")
        self._pos = end
        return text

    def _value(self, kind: int) -> Any:
        if kind in SCALARS:
            return self._unpack(SCALARS[kind])
        if kind == STRING:
            return self._string()
        if kind != ARRAY:
            raise ValueError(f"unknown metadata value type {kind} at byte {self._pos}")
        item_kind, count = self._unpack("<I"), self._unpack("<Q")
        if item_kind in SCALARS and item_kind != 7:  # numbers in one read
            dtype = np.dtype(SCALARS[item_kind])
            if self._pos + count * dtype.itemsize > len(self._buffer):
                raise ValueError("an array runs past the end of the file: it is truncated")
            values = np.frombuffer(self._buffer, dtype, count, self._pos).tolist()
            self._pos += count * dtype.itemsize
            return values
        if item_kind == STRING:  # a vocabulary: tens of thousands of strings, in one tight loop
            return self._strings(count)
        return [self._value(item_kind) for _ in range(count)]

    def _strings(self, count: int) -> list[str]:
        buffer, pos, end, length = self._buffer, self._pos, len(self._buffer), struct.Struct("<Q").unpack_from
        strings = []
        for _ in range(count):
            (size,) = length(buffer, pos)
            pos += 8 + size
            if pos > end:
                raise ValueError("a string runs past the end of the file: it is truncated")
            strings.append(buffer[pos - size:pos].decode("utf-8"))
        self._pos = pos
        return strings
