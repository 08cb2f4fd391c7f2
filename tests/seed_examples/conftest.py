"""Local stand-ins for the hub checkpoints of the doc examples: one tiny random model per family, saved with its
family's real tokenizer (from mistral-common's files) and chat template, as the hub folders hold them."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

import maestrale

TEMPLATES = Path(__file__).parent.parent / "fixtures" / "chat_templates"
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512)
# Folder name -> (model class, config fields, tokenizer file in mistral-common's data, chat template).
FAMILIES = {
    "tiny-mistral": ("MistralForCausalLM", dict(sliding_window=64), "tokenizer.model.v1",
                     "Mistral-7B-Instruct-v0.2.jinja"),
    "tiny-mixtral": ("MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2), "tokenizer.model.v1",
                     "Mixtral-8x7B-Instruct-v0.1.jinja"),
    "tiny-ministral": ("MinistralForCausalLM", dict(sliding_window=64, layer_types=["sliding_attention",
                                                                                     "full_attention"]),
                       "tekken_240911.json", "Ministral-8B-Instruct-2410.jinja"),
    "tiny-phi3": ("Phi3ForCausalLM", dict(vocab_size=32064), "tokenizer.model.v1", "Phi-3-mini-4k-instruct.jinja"),
}
# The Phi-3 tokens its chat template writes, added after the 32000 SentencePiece pieces as in Phi-3's tokenizer.
PHI3_TOKENS = ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]


def _tokenizer(source: Path, file: str, template: str):
    spec = importlib.util.find_spec("mistral_common")
    if spec is None:
        pytest.skip("mistral-common is not installed (test extra): its tokenizer files stand in for the hub's")
    name = "tekken.json" if file.endswith(".json") else "tokenizer.model"
    shutil.copy(Path(spec.submodule_search_locations[0]) / "data" / file, source / name)
    if name == "tokenizer.model":  # as the hub's folders of these models name it (Phi-3 adds no BOS)
        config = {"tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": "phi3" not in source.name}
        (source / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = maestrale.AutoTokenizer.from_pretrained(source)
    tokenizer.chat_template = (TEMPLATES / template).read_text()
    return tokenizer


@pytest.fixture(scope="session")
def seed_fixtures(tmp_path_factory) -> Path:
    """A folder holding tiny-mistral/, tiny-mixtral/, tiny-ministral/ and tiny-phi3/: config.json, bfloat16
    safetensors, generation_config.json, tokenizer.json, tokenizer_config.json and chat_template.jinja each."""
    root = tmp_path_factory.mktemp("seed_examples")
    for folder, (model_class, fields, file, template) in FAMILIES.items():
        tokenizer = _tokenizer(tmp_path_factory.mktemp(f"{folder}-tokenizer"), file, template)
        if folder == "tiny-phi3":
            tokenizer.add_special_tokens({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                                          "additional_special_tokens": PHI3_TOKENS[1:]})
        fields = {"vocab_size": len(tokenizer), **TINY, **fields, "bos_token_id": tokenizer.bos_token_id,
                  "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
        assert fields["vocab_size"] >= len(tokenizer)
        cls = getattr(maestrale, model_class)
        torch.manual_seed(0)
        model = cls.from_config(cls.config_class(**fields))
        model.to(torch.bfloat16).save_pretrained(root / folder)
        tokenizer.save_pretrained(root / folder)
    return root
