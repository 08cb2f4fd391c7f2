"""Sizes written as people write them: "50GB", "500MiB", or a number of bytes."""

from __future__ import annotations

UNITS = (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1))


def parse_size(value: int | float | str) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip().upper()
    for unit, scale in UNITS:
        if text.endswith(unit):
            try:
                return float(text[: -len(unit)]) * scale
            except ValueError:
                break
    raise ValueError(f"cannot read the size {value!r}; write it like '20GiB', '500MB' or a number of bytes")
