"""GGUF weights kept packed (from_pretrained(..., gguf_file=..., keep_quantized=True)): Q4_0, Q4_1, Q4_K, Q8_0 and
Q6_K blocks become the weights of QuantizedLinear and QuantizedEmbedding layers (quantization/weight_only.py) instead
of float matrices.

The 4-bit types become int4 weights (quantization/weight_only.py) exactly, groups of 32 dequantized as
(q - 8) * scale + zero: Q4_0's d * (q - 8) is scale d, zero 0; Q4_1's d * q + m is scale d, zero m + 8d; Q4_K's
d * sc * q - dmin * m is scale d * sc, zero 8 * d * sc - dmin * m. Q8_0 (d * q per 32) and Q6_K (d * sc * (q - 32) per
16) become int8 weights with those group scales. A layer's scales are held in the model's dtype, which is the dtype
the product runs in.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from ..loading.gguf import GGUFShard
from ..loading.layout import Layout
from ..models.linear import Linear
from . import gguf_kernels
from .weight_only import Int4Weight, Int8Weight, PackedWeight, QuantizedEmbedding, QuantizedLinear

logger = logging.getLogger(__name__)


def _blocks(data: np.ndarray, block_bytes: int, halves: int) -> tuple[np.ndarray, ...]:
    """The `halves` float16 fields at the start of each block (as float32), then the block's remaining bytes."""
    blocks = data.reshape(data.shape[0], -1, block_bytes)
    fields = blocks[..., :2 * halves].copy().view(np.float16).astype(np.float32)
    return (*np.moveaxis(fields, -1, 0), blocks[..., 2 * halves:])


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(rows, blocks, 16) bytes -> (rows, cols) values 0..15: a block's low nibbles are its first 16 values."""
    return np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(qs.shape[0], -1)


def _q4_k(raw: np.ndarray) -> tuple[np.ndarray, ...]:
    """Q4_K super-blocks of 256: eight groups of 32, w = d * sc * q - dmin * m with 6-bit sc and m per group."""
    blocks = raw.reshape(raw.shape[0], -1, 144)
    d, dmin = np.moveaxis(blocks[..., :4].copy().view(np.float16).astype(np.float32), -1, 0)
    s = blocks[..., 4:16].astype(np.uint8)
    sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)], axis=-1)
    m = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], axis=-1)
    qs = blocks[..., 16:].reshape(*blocks.shape[:2], 4, 1, 32)  # 64 values per 32 bytes: low nibbles first
    values = np.concatenate([qs & 15, qs >> 4], axis=-2).reshape(raw.shape[0], -1)
    scale = (d[..., None] * sc).reshape(raw.shape[0], -1)
    return values, scale, (-dmin[..., None] * m).reshape(raw.shape[0], -1) + 8 * scale


def _q6_k(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q6_K super-blocks of 256: 6-bit q - 32 with an int8 scale (times d) per 16 values."""
    blocks = raw.reshape(raw.shape[0], -1, 210)
    ql = blocks[..., :128].reshape(*blocks.shape[:2], 2, 2, 32)  # (half, which 32 bytes, byte)
    qh = blocks[..., 128:192].reshape(*blocks.shape[:2], 2, 1, 32)
    low = np.concatenate([ql & 15, ql >> 4], axis=-2)  # per half: values 0-31, 32-63, 64-95, 96-127
    high = (qh >> (2 * np.arange(4, dtype=np.uint8)[:, None])) & 3
    values = (low | (high << 4)).astype(np.int8) - 32
    d = blocks[..., 208:210].copy().view(np.float16).astype(np.float32)
    scale = d * blocks[..., 192:208].copy().view(np.int8).astype(np.float32)
    return values.reshape(raw.shape[0], -1), scale.reshape(raw.shape[0], -1)


def pack(gguf_type: str, data: torch.Tensor, dtype: torch.dtype) -> PackedWeight:
    """A PackedWeight from a GGUF tensor's raw bytes (rows, bytes per row), scales in `dtype`: maestrale's own
    kernels on the blocks as they are (gguf_kernels.py) where they are built, torch's on re-packed blocks otherwise."""

    if gguf_type in gguf_kernels.GGML_TYPES and gguf_kernels.available():
        return gguf_kernels.BlocksWeight.from_file(gguf_type, data, dtype)
    raw = data.numpy()
    if gguf_type in ("Q8_0", "Q6_K"):
        if gguf_type == "Q8_0":
            d, qs = _blocks(raw, 34, 1)
            values = qs.view(np.int8).reshape(raw.shape[0], -1)
        else:
            values, d = _q6_k(raw)
        return Int8Weight(gguf_type, torch.from_numpy(values.copy()), torch.from_numpy(d).to(dtype))
    if gguf_type == "Q4_K":
        values, d, zero = _q4_k(raw)
    elif gguf_type == "Q4_0":
        d, qs = _blocks(raw, 18, 1)
        values, zero = _nibbles(qs), np.zeros_like(d)
    else:  # Q4_1
        d, m, qs = _blocks(raw, 20, 2)
        values, zero = _nibbles(qs), m + 8 * d
    return Int4Weight(gguf_type, torch.from_numpy(values.astype(np.int32)), torch.from_numpy(d).to(dtype),
                      torch.from_numpy(zero).to(dtype))


PACKED_TYPES = ("Q4_0", "Q4_1", "Q4_K", "Q8_0", "Q6_K")
FLOAT_TYPES = ("F32", "F16", "BF16")  # loaded as they are, nothing to keep packed
EMBEDDING_TYPES = ("Q8_0", "Q6_K")  # row lookups need the values unpacked; torch's int4 layout is the product's


class PackedLoad:
    """Swaps a meta model's linear layers (and a Q8_0 embedding) for GGUF layers and hands them their blocks.

    The GGUF tensors of the swapped layers are kept out of the loader's plan and never dequantized; tensors of
    other types stay dequantized, with a notice per type naming them.
    """

    def __init__(self, model: nn.Module, shard: GGUFShard):
        self.model, self.shard, self.dtype = model, shard, model.config.dtype
        layout = Layout(model)
        modules = dict(model.named_modules())
        self.layers: dict[str, tuple[str, nn.Module]] = {}  # GGUF tensor name -> (HF weight name, its new layer)
        fallback: dict[str, list[str]] = defaultdict(list)
        for tensor in shard.file.tensors:
            kind, names = tensor.tensor_type.name, shard._names(tensor.name, tensor.shape[0])
            if kind in FLOAT_TYPES or not names:
                continue
            new = None
            if len(names) == 1 and names[0][1] is None:  # not one of stacked experts
                slot = layout.slot(names[0][0])
                if slot is None:
                    continue  # reported as unexpected by the loader
                if not slot.index and slot.param.endswith(".weight"):
                    owner = slot.param.removesuffix(".weight")
                    new = self._swap(owner, modules[owner], kind)
            if new is None:
                fallback[kind].append(tensor.name)
            else:
                self.layers[tensor.name] = (names[0][0], new)
        for kind, names in fallback.items():
            logger.warning(f"keep_quantized: {len(names)} tensors of type {kind} are dequantized to {self.dtype}, as "
                           f"maestrale keeps only {', '.join(PACKED_TYPES)} packed (and {', '.join(EMBEDDING_TYPES)} "
                           f"for embeddings): {', '.join(names)}")
        self._swap_tied_head()

    def _swap(self, name: str, module: nn.Module, kind: str) -> nn.Module | None:
        if type(module) in (nn.Linear, Linear) and kind in PACKED_TYPES:
            new = QuantizedLinear(module.in_features, module.out_features, module.bias)
        elif type(module) is nn.Embedding and kind in EMBEDDING_TYPES:
            new = QuantizedEmbedding(module.num_embeddings, module.embedding_dim, module.padding_idx)
        else:
            return None
        self.model.set_submodule(name, new)
        return new

    def _swap_tied_head(self) -> None:
        """A head tied to a packed embedding becomes a GGUF layer that tie_weights() points at the same weight."""
        head = self.model.get_output_embeddings()
        if (isinstance(self.model.get_input_embeddings(), QuantizedEmbedding) and head is not None
                and getattr(self.model.config, "tie_word_embeddings", False)):
            self.model.set_output_embeddings(QuantizedLinear(head.in_features, head.out_features, head.bias))

    def shards(self) -> list:
        return [_PackedShard(self)]

    def finish(self, origin: str) -> list[str]:
        """Check that every packed layer got its tensor; the names of weights drawn afresh: none, a GGUF file
        holds them all."""
        missing = [name for name, layer in self.layers.values() if layer.weight is None]
        if missing:
            raise ValueError(f"{origin}: no packed tensor reached {missing[:3]}; the file does not fit its config")
        return []


class _PackedShard:
    """The GGUF shard without the packed layers' tensors, which it reads raw and hands to their layers."""

    def __init__(self, load: PackedLoad):
        self.load, self.path = load, load.shard.path

    def infos(self):
        packed = {hf for hf, _ in self.load.layers.values()}
        return {name: info for name, info in self.load.shard.infos().items() if name not in packed}

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        packed = self.load.layers
        for name, tensor in self.load.shard.tensors(skip=packed.keys()):
            yield name, tensor
        for tensor in self.load.shard.file.tensors:
            if tensor.name in packed:
                hf_name, layer = packed[tensor.name]
                # q/k rows are whole rows of blocks, so the rotary reordering moves them as bytes.
                raw = self.load.shard._unpermute(hf_name, torch.from_numpy(np.array(tensor.data)))
                layer.weight = pack(tensor.tensor_type.name, raw, self.load.dtype)
