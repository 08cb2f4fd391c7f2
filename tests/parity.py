"""Helpers shared by the parity tests: build the same random model in transformers and in maestrale."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

import maestrale

SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0)


def config_pair(family: str, **overrides):
    """(transformers config, maestrale config) of one family with the same fields."""
    import transformers

    fields = {**SMALL, **overrides}
    if family == "ministral":  # transformers 5.23 leaves head_dim None for Ministral and then crashes
        fields.setdefault("head_dim", fields["hidden_size"] // fields["num_attention_heads"])
    name = {"mistral": "Mistral", "ministral": "Ministral", "mixtral": "Mixtral", "phi3": "Phi3"}[family]
    ref = getattr(transformers, f"{name}Config")(**fields)
    ours = getattr(maestrale, f"{name}Config")(**fields)
    return ref, ours


def model_pair(family: str, task: str = "ForCausalLM", attn: str = "eager", seed: int = 0, **overrides):
    """The same randomly initialised model in transformers and maestrale, in eval mode, float32."""
    import transformers

    ref_config, config = config_pair(family, **overrides)
    name = {"mistral": "Mistral", "ministral": "Ministral", "mixtral": "Mixtral", "phi3": "Phi3"}[family]
    torch.manual_seed(seed)
    ref = getattr(transformers, f"{name}{task}")._from_config(ref_config, attn_implementation=attn).eval()
    ours = getattr(maestrale, f"{name}{task}").from_config(config, attn_implementation=attn).eval()
    with torch.no_grad():  # re-draw every parameter so biases and norms differ from their trivial init
        for p in ref.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 0.5).add_(1.0 if p.dim() == 1 else 0.0)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def mistral_v3_tokenizer(folder: Path, **config):
    """maestrale's tokenizer for Mistral's v3 SentencePiece model (shipped with mistral-common), saved in `folder` with
    a Mistral-hub-like tokenizer_config.json updated by `config`."""
    spec = importlib.util.find_spec("mistral_common")
    if spec is None:
        pytest.skip("mistral-common (which ships Mistral's tokenizer files) is not installed")
    shutil.copy(Path(spec.submodule_search_locations[0]) / "data" / "mistral_instruct_tokenizer_240323.model.v3",
                folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
        "eos_token": "</s>", "unk_token": "<unk>", "legacy": False, **config}))
    return maestrale.AutoTokenizer.from_pretrained(folder)
