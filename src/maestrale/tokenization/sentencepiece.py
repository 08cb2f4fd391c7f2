"""SentencePiece `tokenizer.model` -> `tokenizers.Tokenizer`, for byte-fallback BPE models (Mistral v1/v2/v3/v7,
Llama, Phi-3).

The .model file is a protobuf `ModelProto`; we read the few fields we need with a small wire-format reader instead
of depending on `sentencepiece` or `protobuf`. The result is built the way transformers' LlamaTokenizer builds it,
so that ids agree: BPE with byte fallback, merges recovered from the vocabulary, a Metaspace pre-tokenizer.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

# SentencePiece.Type values
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}


@dataclass
class SentencePieceModel:
    pieces: list[tuple[str, float, int]] = field(default_factory=list)  # (piece, score, type)
    model_type: str = "unigram"
    byte_fallback: bool = False
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = -1
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True


def _fields(data: bytes):
    """(field number, wire type, value) for each field of one protobuf message."""
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = data[pos:pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(data, pos)
            value, pos = data[pos:pos + size], pos + size
        elif wire == 5:
            value, pos = data[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} in field {number}")
        yield number, wire, value


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _int32(value: int) -> int:
    """Negative int32 values (like pad_id = -1) travel as 64-bit two's complement varints."""
    return value - (1 << 64) if value >= 1 << 63 else value


def read_model(path: str | Path) -> SentencePieceModel:
    """Parse the parts of a SentencePiece ModelProto that tokenization needs."""
    data = Path(path).read_bytes()
    model = SentencePieceModel()
    try:
        for number, _, value in _fields(data):
            if number == 1:  # SentencePiece
                piece, score, kind = "", 0.0, NORMAL
                for n, _, v in _fields(value):
                    if n == 1:
                        piece = v.decode("utf-8")
                    elif n == 2:
                        score = struct.unpack("<f", v)[0]
                    elif n == 3:
                        kind = v
                model.pieces.append((piece, score, kind))
            elif number == 2:  # TrainerSpec
                for n, _, v in _fields(value):
                    if n == 3:
                        model.model_type = MODEL_TYPES.get(v, str(v))
                    elif n == 35:
                        model.byte_fallback = bool(v)
                    elif n in (40, 41, 42, 43):
                        setattr(model, ("unk_id", "bos_id", "eos_id", "pad_id")[n - 40], _int32(v))
            elif number == 3:  # NormalizerSpec
                for n, _, v in _fields(value):
                    if n == 2:
                        model.precompiled_charsmap = v
                    elif n in (3, 4, 5):
                        setattr(model, ("add_dummy_prefix", "remove_extra_whitespaces", "escape_whitespaces")[n - 3],
                                bool(v))
    except (IndexError, UnicodeDecodeError, struct.error, ValueError) as error:
        raise ValueError(f"{path} is not a SentencePiece model file (protobuf parse failed: {error})") from None
    if not model.pieces:
        raise ValueError(f"{path} is not a SentencePiece model file: it holds no vocabulary pieces")
    return model


def merges_from_vocab(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a piece into two pieces of the vocabulary,
    ranked by the id of the merged piece, then by the length of its left part (the order transformers uses)."""
    merges = []
    for piece, index in sorted(vocab.items(), key=lambda item: item[1]):
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((left, right))
    return merges


def special_pieces(model: SentencePieceModel) -> list[AddedToken]:
    """Control pieces (<s>, [INST], ...) as special added tokens, user-defined ones as plain added tokens."""
    return [AddedToken(piece, special=kind == CONTROL, normalized=False)
            for piece, _, kind in model.pieces if kind in (CONTROL, USER_DEFINED)]


def llama_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], legacy: bool, add_prefix_space: bool,
                    byte_fallback: bool = True) -> Tokenizer:
    """The byte-fallback BPE pipeline transformers' LlamaTokenizer builds: no normalizer, a Metaspace pre-tokenizer
    and the matching decoder; its `tokenizer.json` pipeline, if any, is not used.

    `legacy=True` puts a "▁" before the text after every special token, as SentencePiece does; the default only
    before the start of the text. `add_prefix_space=False` puts it nowhere."""
    tokenizer = Tokenizer(BPE(vocab, merges, fuse_unk=True, byte_fallback=byte_fallback))
    scheme = ("always" if legacy else "first") if add_prefix_space else "never"
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def sentencepiece_tokenizer(model: SentencePieceModel, legacy: bool) -> Tokenizer:
    """The pipeline that encodes like SentencePiece itself, from the model's own normalizer settings: what
    transformers builds for a tokenizer.model whose folder names no tokenizer class. Merges are ranked by the score of
    the merged piece, and user-defined pieces stay whole. `legacy` (transformers' default here) gives every chunk
    between added tokens a dummy prefix, otherwise only the first."""
    kinds = {piece: kind for piece, _, kind in model.pieces}
    vocab = {piece: index for index, (piece, _, _) in enumerate(model.pieces)}
    normal = {piece: (score, index) for index, (piece, score, kind) in enumerate(model.pieces) if kind == NORMAL}
    ranked = sorted((-score, index, piece[:cut], piece[cut:]) for piece, (score, index) in normal.items()
                    for cut in range(1, len(piece)) if piece[:cut] in normal and piece[cut:] in normal)
    user_defined = [piece for piece, kind in kinds.items() if kind == USER_DEFINED]
    unk = model.pieces[model.unk_id][0] if 0 <= model.unk_id < len(model.pieces) else None
    tokenizer = Tokenizer(BPE(vocab, [(left, right) for _, _, left, right in ranked], unk_token=unk, fuse_unk=True,
                              byte_fallback=model.byte_fallback, ignore_merges=bool(user_defined)))
    steps = [normalizers.Precompiled(model.precompiled_charsmap)] if model.precompiled_charsmap else []
    if model.remove_extra_whitespaces:  # spaces only: SentencePiece keeps newlines and tabs
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if model.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    if model.add_dummy_prefix and legacy:  # Metaspace adds no prefix to text that starts with "▁"; SentencePiece does
        steps.append(normalizers.Replace(Regex(r"\A▁"), "▁▁"))
    tokenizer.normalizer = normalizers.Sequence(steps)
    splits = []
    if model.add_dummy_prefix:
        splits.append(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always" if legacy else "first",
                                               split=False))
    if user_defined:
        pattern = "|".join(re.escape(piece) for piece in sorted(user_defined, key=len, reverse=True))
        splits.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
    if splits:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(splits)
    steps = [decoders.Replace("▁", " ")] + ([decoders.ByteFallback()] if model.byte_fallback else [])
    if model.add_dummy_prefix:
        steps += [decoders.Fuse(), decoders.Strip(content=" ", left=1, right=0)]
    elif model.byte_fallback:
        steps.append(decoders.Fuse())
    tokenizer.decoder = decoders.Sequence(steps)
    tokenizer.add_special_tokens([t for t in special_pieces(model) if t.special])
    return tokenizer


def tokenizer_from_sentencepiece(path: str | Path, llama: bool, legacy: bool | None = None,
                                 add_prefix_space: bool = True) -> tuple[Tokenizer, dict[str, str]]:
    """A `tokenizers.Tokenizer` that encodes like transformers' tokenizer for this tokenizer.model, and the
    unk/bos/eos token strings its trainer spec names. `llama`: the folder names transformers' LlamaTokenizer class
    (see `llama_tokenizer`; `legacy` defaults to False); otherwise see `sentencepiece_tokenizer` (`legacy` defaults
    to True, `add_prefix_space` is not used)."""
    model = read_model(path)
    if model.model_type != "bpe":
        raise ValueError(
            f"{path} is a SentencePiece {model.model_type} model; maestrale converts BPE models only "
            "(Mistral, Llama, Phi-3). Use a tokenizer.json for this tokenizer."
        )
    if llama:
        vocab = {piece: index for index, (piece, _, _) in enumerate(model.pieces)}
        tokenizer = llama_tokenizer(vocab, merges_from_vocab(vocab), bool(legacy), add_prefix_space,
                                    model.byte_fallback)
        tokenizer.add_special_tokens([t for t in special_pieces(model) if t.special])
        tokenizer.add_tokens([t for t in special_pieces(model) if not t.special])
    else:
        tokenizer = sentencepiece_tokenizer(model, legacy=True if legacy is None else legacy)
    names = {"unk_token": model.unk_id, "bos_token": model.bos_id, "eos_token": model.eos_id}
    specials = {name: model.pieces[index][0] for name, index in names.items() if 0 <= index < len(model.pieces)}
    return tokenizer, specials
