"""A one-line progress count on stderr, drawn only when stderr is a terminal (quiet in logs, pipes and tests)."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")


def progress(items: Sequence[T], description: str) -> Iterator[T]:
    show = sys.stderr.isatty()
    for i, item in enumerate(items, 1):
        if show:
            print(f"\r{description}: {i}/{len(items)}", end="", file=sys.stderr, flush=True)
        yield item
    if show:
        print(file=sys.stderr)
