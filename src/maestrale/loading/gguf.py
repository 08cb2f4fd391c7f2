"""GGUF files (llama.cpp): the config from the metadata, tensors dequantized by the `gguf` package under Hugging Face
names, and the tokenizer fields for maestrale.tokenization. gguf_file.py reads the container.

Architectures: `llama` (read as Mistral without a sliding window; with experts, as Mixtral) and `phi3`.
llama.cpp's converter interleaves the rotary halves of llama q/k rows; we undo that so the weights match HF layout.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import TensorInfo
from .gguf_file import GGUFFile, GGUFTensor
from .layout import deinterleave_rotary

TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
IN_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "block_sparse_moe.gate",
}
# Phi-3 stores its fused gate and up projection as ffn_up.
PHI3_IN_LAYER = {**IN_LAYER, "ffn_up": "mlp.gate_up_proj"}
# Mixtral's experts come as one (E, rows, cols) tensor each; we split them into the hub's per-expert names.
EXPERTS = {"ffn_gate_exps": "w1", "ffn_down_exps": "w2", "ffn_up_exps": "w3"}
LAYER_TENSOR = re.compile(r"^blk\.(?P<layer>\d+)\.(?P<part>\w+)\.(?P<kind>weight|bias)$")
ROPE_FACTORS = ("rope_factors_long.weight", "rope_factors_short.weight")
ARCHITECTURES = ("llama", "phi3")


def read_gguf(path: str | Path) -> tuple[dict[str, Any], "GGUFShard", dict[str, Any]]:
    """(config dict, the tensors as a shard, tokenizer metadata: every `tokenizer.*` field of the file)."""
    config, shard = open_gguf(path)
    tokenizer = {name: value for name, value in shard.file.fields.items() if name.startswith("tokenizer.")}
    return config, shard, tokenizer


def open_gguf(path: str | Path) -> tuple[dict[str, Any], "GGUFShard"]:
    """(config dict, the tensors as a shard)."""
    path = Path(path)
    file = GGUFFile(path)
    fields = file.fields
    arch = fields.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; maestrale reads {list(ARCHITECTURES)}")
    tokens = fields.get("tokenizer.ggml.tokens", [])
    config = _config(path, arch, fields, {t.name: t for t in file.tensors}, len(tokens))
    return config, GGUFShard(path, file, config)


def read_gguf_config(path: str | Path):
    """The maestrale config of a .gguf file, read from its metadata only."""
    from ..configs import config_class_for

    config, _ = open_gguf(path)
    return config_class_for(config["model_type"], str(path)).from_dict(config)


def _config(path: Path, arch: str, fields: dict[str, Any], tensors: dict[str, Any], num_tokens: int
            ) -> dict[str, Any]:
    def field(key: str, default=None):
        return fields.get(f"{arch}.{key}", default)

    required = {"hidden_size": "embedding_length", "intermediate_size": "feed_forward_length",
                "num_hidden_layers": "block_count", "num_attention_heads": "attention.head_count",
                "max_position_embeddings": "context_length"}
    config: dict[str, Any] = {}
    for name, key in required.items():
        if field(key) is None:
            raise ValueError(f"{path}: the GGUF metadata lacks {arch}.{key}, needed for {name}")
        config[name] = int(field(key))
    kv_heads = field("attention.head_count_kv", config["num_attention_heads"])
    if not isinstance(kv_heads, int):
        raise ValueError(f"{path}: {arch}.attention.head_count_kv varies per layer ({kv_heads}); maestrale needs one")
    experts = field("expert_count")
    config.update(
        model_type="phi3" if arch == "phi3" else ("mixtral" if experts else "mistral"),
        num_key_value_heads=kv_heads,
        vocab_size=int(field("vocab_size") or num_tokens),
        rms_norm_eps=float(field("attention.layer_norm_rms_epsilon", 1e-5)),
        sliding_window=field("attention.sliding_window"),
        # Without an output tensor the head reuses the token embeddings.
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=fields.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=fields.get("tokenizer.ggml.padding_token_id"),
    )
    if field("rope.freq_base") is not None:
        config["rope_theta"] = float(field("rope.freq_base"))
    if arch == "llama" and field("rope.dimension_count"):
        config["head_dim"] = int(field("rope.dimension_count"))
    if experts:
        config.update(num_local_experts=int(experts), num_experts_per_tok=int(field("expert_used_count", 2)))
    if arch == "phi3" and all(name in tensors for name in ROPE_FACTORS):
        long, short = (_dequantized(tensors[name]).reshape(-1).tolist() for name in ROPE_FACTORS)
        original = field("rope.scaling.original_context_length", config["max_position_embeddings"])
        config.update(original_max_position_embeddings=int(original),
                      rope_scaling={"rope_type": "longrope", "long_factor": long, "short_factor": short})
    return config


def _dequantized(tensor: GGUFTensor) -> np.ndarray:
    """float32 values, as the gguf package computes them: its numpy loops, or for the commonest types torch's ops in
    the same operations and order (equal bit for bit, and faster: the default model loads in less time)."""
    kind = tensor.tensor_type.name
    if kind in ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0"):
        with warnings.catch_warnings():  # a read-only view of the file, only read
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            data = torch.from_numpy(tensor.data)
        if kind in ("F32", "F16", "BF16"):
            values = data.view({"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[kind]).float()
        else:
            values = dequantize_blocks(kind, data)
        return values.numpy().reshape(tensor.shape)
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    return dequantize(tensor.data, GGMLQuantizationType(int(tensor.tensor_type))).reshape(tensor.shape)


def dequantize_blocks(kind: str, data: torch.Tensor) -> torch.Tensor:
    """float32 values of rows (..., bytes) of Q4_0 / Q4_1 / Q8_0 blocks of 32 values, each a float16 scale d (Q4_1:
    then a minimum m) and the values: Q8_0 q * d; Q4_0 (q - 8) * d, Q4_1 q * d + m, the low nibbles of 16 bytes
    first, then the high ones."""
    blocks = data.view(*data.shape[:-1], -1, {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[kind])
    d = blocks[..., 0:2].contiguous().view(torch.float16).float()
    if kind == "Q8_0":
        return blocks[..., 2:].contiguous().view(torch.int8).float().mul_(d).flatten(-2)
    qs = blocks[..., -16:]
    q = torch.cat([qs & 15, qs >> 4], dim=-1)
    if kind == "Q4_0":
        return q.view(torch.int8).sub(8).float().mul_(d).flatten(-2)
    return q.float().mul_(d).add_(blocks[..., 2:4].contiguous().view(torch.float16).float()).flatten(-2)


class GGUFShard:
    """The tensors of a GGUF file under Hugging Face names, dequantized to float32 one at a time."""

    def __init__(self, path: Path, file: GGUFFile, config: dict[str, Any]):
        self.path, self.file = path, file
        self._in_layer = PHI3_IN_LAYER if config["model_type"] == "phi3" else IN_LAYER
        # Only llama.cpp's llama converter permutes q/k.
        self._heads = None if config["model_type"] == "phi3" else {
            "q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}

    def infos(self) -> dict[str, TensorInfo]:
        infos = {}
        for tensor in self.file.tensors:
            for name, expert in self._names(tensor.name, tensor.shape[0]):
                infos[name] = (tensor.shape if expert is None else tensor.shape[1:], torch.float32)
        return infos

    def tensors(self, skip: Collection[str] = ()) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, float32 tensor) pairs; the GGUF tensors named in `skip` are not read."""
        for tensor in self.file.tensors:
            names = [] if tensor.name in skip else self._names(tensor.name, tensor.shape[0])
            if not names:
                continue
            array = _dequantized(tensor)
            # Unquantized tensors come back as read-only views of the file; torch wants memory it may own.
            weights = torch.from_numpy(array if array.flags.writeable else array.copy())
            for name, expert in names:
                yield name, self._unpermute(name, weights if expert is None else weights[expert])

    def _names(self, gguf_name: str, rows: int) -> list[tuple[str, int | None]]:
        """HF names for one GGUF tensor (of `rows` along its first torch dimension), with the expert index for
        stacked experts; [] for tensors already read into the config."""
        if gguf_name in ROPE_FACTORS:
            return []
        stem, _, kind = gguf_name.rpartition(".")
        if stem in TOP_LEVEL:
            return [(f"{TOP_LEVEL[stem]}.{kind}", None)]
        m = LAYER_TENSOR.match(gguf_name)
        if m is None:
            return [(gguf_name, None)]  # reported as unexpected by the loader
        layer = f"model.layers.{m['layer']}"
        if m["part"] in EXPERTS:
            return [(f"{layer}.block_sparse_moe.experts.{e}.{EXPERTS[m['part']]}.weight", e) for e in range(rows)]
        if m["part"] in self._in_layer:
            return [(f"{layer}.{self._in_layer[m['part']]}.{m['kind']}", None)]
        return [(gguf_name, None)]

    def _unpermute(self, name: str, weights: torch.Tensor) -> torch.Tensor:
        if self._heads is not None:
            for proj, heads in self._heads.items():
                if name.endswith(f"self_attn.{proj}.weight"):
                    return deinterleave_rotary(weights, heads)
        return weights
