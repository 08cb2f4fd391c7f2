"""A tokenizer from the `tokenizer.*` metadata of a GGUF file (what maestrale.loading.gguf.read_gguf returns).

Two tokenizer models are read: "gpt2" (byte-level BPE, e.g. SmolLM2) and "llama" (SentencePiece BPE with byte
fallback, e.g. Mistral and Phi-3 GGUFs), built as transformers builds them from the same metadata.
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from .byte_level import byte_alphabet, spell
from .fast import PreTrainedTokenizerFast
from .sentencepiece import CONTROL, USER_DEFINED, merges_from_vocab

SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
               "pad_token": "padding_token_id"}


def tokenizer_from_gguf(metadata: dict[str, Any], architecture: str | None = None,
                        name_or_path: str = "") -> PreTrainedTokenizerFast:
    """Build the tokenizer a GGUF file describes from its `tokenizer.*` fields (keys as in the file, e.g.
    "tokenizer.ggml.tokens"). `architecture` ("llama", "phi3", ...) picks Phi-3's variant of SentencePiece."""
    fields = {key.removeprefix("tokenizer."): value for key, value in metadata.items()}
    kind = fields.get("ggml.model")
    tokens = fields.get("ggml.tokens")
    if not tokens:
        raise ValueError("The GGUF metadata has no tokenizer.ggml.tokens: this file carries no tokenizer")
    types = fields.get("ggml.token_type") or [1] * len(tokens)
    if kind == "gpt2":
        alphabet = set(byte_alphabet().values())
        # A control token outside the byte alphabet is a converter's mislabel; adding it would grow the vocabulary.
        usable = [set(token) <= alphabet for token in tokens]
        tokenizer = _byte_level(tokens, usable, fields.get("ggml.merges"))
    elif kind == "llama":
        tokenizer = _sentencepiece(tokens, fields.get("ggml.merges"), phi3=architecture == "phi3")
        usable = [True] * len(tokens)
    else:
        raise ValueError(f"GGUF tokenizer model {kind!r} (tokenizer.ggml.model) is not supported; maestrale reads "
                         "'gpt2' (byte-level BPE) and 'llama' (SentencePiece BPE)")
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind_, ok in zip(tokens, types, usable) if kind_ == CONTROL and ok])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, kind_ in zip(tokens, types) if kind_ == USER_DEFINED])

    specials = {name: tokens[fields[f"ggml.{key}"]] for name, key in SPECIAL_IDS.items()
                if fields.get(f"ggml.{key}") is not None and 0 <= fields[f"ggml.{key}"] < len(tokens)}
    add_bos = fields.get("ggml.add_bos_token", True if kind == "llama" else None)
    return PreTrainedTokenizerFast(
        tokenizer, **specials, add_bos_token=add_bos, add_eos_token=fields.get("ggml.add_eos_token"),
        chat_template=fields.get("chat_template"), name_or_path=name_or_path,
        tokenizer_class="LlamaTokenizer" if kind == "llama" else "PreTrainedTokenizerFast",
        padding_side="left" if kind == "llama" else "right",
    )


def _merges(merges: list[str] | None, vocab: dict[str, int]) -> list[tuple[str, str]]:
    if merges is None:
        return merges_from_vocab(vocab)
    return [tuple(m.split(" ", 1)) for m in merges]


def _byte_level(tokens: list[str], spelled: list[bool], merges: list[str] | None) -> Tokenizer:
    # Vocabularies store tokens in the byte alphabet (`spelled`); respell any that a converter wrote as plain text.
    vocab = {token if ok else spell(token.encode("utf-8")): i for i, (token, ok) in enumerate(zip(tokens, spelled))}
    tokenizer = Tokenizer(BPE(vocab, _merges(merges, vocab), continuing_subword_prefix="", end_of_word_suffix="",
                              fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece(tokens: list[str], merges: list[str] | None, phi3: bool) -> Tokenizer:
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = Tokenizer(BPE(vocab, _merges(merges, vocab), fuse_unk=True, byte_fallback=True))
    if phi3:  # Phi-3's tokenizer.json prefixes with a normalizer rather than a Metaspace pre-tokenizer
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(content=" ", left=1, right=0)])
    return tokenizer
