"""Mistral's native checkpoint format (mistral-inference): params.json with consolidated.safetensors or
consolidated.00.pth, read under Hugging Face names.

Native q/k rows hold interleaved rotary pairs; HF rotates halves, so those rows are reordered on the way in.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from .checkpoint import MappedShard, Shard, open_shard
from .layout import deinterleave_rotary

PARAMS_NAME = "params.json"
WEIGHT_FILES = ("consolidated.safetensors", "consolidated.00.pth")
# Used when params.json has no max_seq_len (as in transformers' converter).
DEFAULT_MAX_POSITIONS = 32768

NAMES = [
    (r"^tok_embeddings\.weight$", "model.embed_tokens.weight"),
    (r"^norm\.weight$", "model.norm.weight"),
    (r"^output\.weight$", "lm_head.weight"),
    (r"^layers\.(\d+)\.attention_norm\.weight$", r"model.layers.\1.input_layernorm.weight"),
    (r"^layers\.(\d+)\.ffn_norm\.weight$", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"^layers\.(\d+)\.attention\.w([qkvo])\.weight$", r"model.layers.\1.self_attn.\2_proj.weight"),
    (r"^layers\.(\d+)\.feed_forward\.w1\.weight$", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"^layers\.(\d+)\.feed_forward\.w2\.weight$", r"model.layers.\1.mlp.down_proj.weight"),
    (r"^layers\.(\d+)\.feed_forward\.w3\.weight$", r"model.layers.\1.mlp.up_proj.weight"),
    # Mixture of experts: onto the hub's per-expert names, which the layout fuses.
    (r"^layers\.(\d+)\.feed_forward\.gate\.weight$", r"model.layers.\1.block_sparse_moe.gate.weight"),
    (r"^layers\.(\d+)\.feed_forward\.experts\.(\d+)\.(w[123])\.weight$",
     r"model.layers.\1.block_sparse_moe.experts.\2.\3.weight"),
]
NAMES = [(re.compile(pattern), replacement) for pattern, replacement in NAMES]


def hf_name(native: str) -> str:
    """The Hugging Face name of a native tensor; unknown names pass through (the loader reports them)."""
    for pattern, replacement in NAMES:
        if pattern.match(native):
            return pattern.sub(replacement, native)
    return native


def read_params(folder: Path) -> dict[str, Any]:
    """A config dict (for MistralConfig or MixtralConfig) from params.json."""
    path = folder / PARAMS_NAME
    try:
        params = json.loads(path.read_text(encoding="utf-8"))
        config = {
            "hidden_size": params["dim"], "num_hidden_layers": params["n_layers"],
            "intermediate_size": params["hidden_dim"], "num_attention_heads": params["n_heads"],
            "rms_norm_eps": params["norm_eps"], "vocab_size": params["vocab_size"],
        }
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"{path} is not a valid params.json: {e}") from None
    except KeyError as e:
        raise ValueError(f"{path} lacks the field {e.args[0]!r}") from None
    window = params.get("sliding_window")
    config.update(
        model_type="mixtral" if params.get("moe") else "mistral",
        head_dim=params.get("head_dim", config["hidden_size"] // config["num_attention_heads"]),
        num_key_value_heads=params.get("n_kv_heads", config["num_attention_heads"]),
        rope_theta=params.get("rope_theta", 10000.0),
        max_position_embeddings=params.get("max_seq_len", DEFAULT_MAX_POSITIONS),
        sliding_window=int(window) if window is not None else None,  # sometimes a string
        tie_word_embeddings=bool(params.get("tied_embeddings", False)),
    )
    if params.get("moe"):
        config.update(num_local_experts=params["moe"]["num_experts"],
                      num_experts_per_tok=params["moe"]["num_experts_per_tok"])
    return config


def open_mistral_native(folder: str | Path) -> tuple[dict[str, Any], list[Shard]]:
    folder = Path(folder)
    config = read_params(folder)
    if len(list(folder.glob("consolidated.*.pth"))) > 1:
        raise ValueError(f"{folder} splits its weights over several consolidated.NN.pth files (model-parallel "
                         "shards); maestrale reads one consolidated.safetensors or consolidated.00.pth")
    weights = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{folder} has params.json but no weights: expected one of {list(WEIGHT_FILES)}")
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}

    def to_hf_layout(name: str, tensor: torch.Tensor) -> torch.Tensor:
        proj = name.rsplit(".", 2)[-2]
        return deinterleave_rotary(tensor, heads[proj]) if proj in heads else tensor

    return config, [MappedShard(open_shard(weights), hf_name, to_hf_layout)]
