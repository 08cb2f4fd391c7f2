"""Byte-level BPE pieces shared by the tekken.json and GGUF ("gpt2") converters."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character: printable Latin-1 bytes stand for themselves, the
    others (controls, space, ...) are moved to code points from 256 up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


def spell(token: bytes) -> str:
    """A token's bytes written in the byte alphabet, as byte-level BPE vocabularies store them."""
    alphabet = byte_alphabet()
    return "".join(alphabet[b] for b in token)
