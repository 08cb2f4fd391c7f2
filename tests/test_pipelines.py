"""pipeline("text-generation") gives transformers' records on the same local folder: plain prompts, chats, batches."""

import pytest
import transformers

import maestrale
from parity import SMALL

CHAT = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "What is the capital of France?"}]
CALLS = {
    "prompt": (["Hello there"], dict(max_new_tokens=6, do_sample=False)),
    "chat": ([CHAT], dict(max_new_tokens=6, do_sample=False)),
    "chat_new_text": ([CHAT], dict(max_new_tokens=4, do_sample=False, return_full_text=False)),
    "prefill": ([CHAT + [{"role": "assistant", "content": "The capital"}]], dict(max_new_tokens=4, do_sample=False)),
    "batch_of_prompts": ([["a b", "c d e"]], dict(max_new_tokens=4, do_sample=False, return_full_text=False)),
    "batch_of_chats": ([[CHAT, CHAT[1:]]], dict(max_new_tokens=3, do_sample=False)),
    "beams": ([CHAT], dict(max_new_tokens=4, num_beams=2, num_return_sequences=2, do_sample=False)),
    "max_length_instead_of_the_default_256_new_tokens": (["Hi"], dict(do_sample=False, max_length=8)),
}


@pytest.fixture(scope="module")
def pipes(chat_folder):
    return (transformers.pipeline("text-generation", model=str(chat_folder)),
            maestrale.pipeline("text-generation", model=str(chat_folder)))


@pytest.mark.parametrize("call", CALLS)
def test_records_equal_transformers(pipes, call):
    args, kwargs = CALLS[call]
    ref, ours = pipes
    assert ours(*args, **kwargs) == ref(*args, **kwargs)


def test_model_and_tokenizer_objects(pipes, chat_folder):
    ref, _ = pipes
    model = maestrale.AutoModelForCausalLM.from_pretrained(chat_folder)
    tokenizer = maestrale.AutoTokenizer.from_pretrained(chat_folder)
    pipe = maestrale.pipeline("text-generation", model=model, tokenizer=tokenizer, max_new_tokens=5)
    assert pipe.model is model and pipe.tokenizer is tokenizer
    out = pipe(CHAT, do_sample=False)
    assert out == ref(CHAT, do_sample=False, max_new_tokens=5)
    assert out[0]["generated_text"][:2] == CHAT and out[0]["generated_text"][2]["role"] == "assistant"


def test_sampling_defaults_and_num_return_sequences(pipes):
    """Without do_sample the pipeline samples (transformers' default, temperature 0.7); seeded, both draw alike."""
    import torch

    ref, ours = pipes
    torch.manual_seed(3)
    expected = ref("Once upon", max_new_tokens=5, num_return_sequences=3)
    torch.manual_seed(3)
    got = ours("Once upon", max_new_tokens=5, num_return_sequences=3)
    assert len(got) == 3 and got == expected


def test_device_minus_one_is_the_cpu(pipes, chat_folder):
    ref, _ = pipes
    pipe = maestrale.pipeline("text-generation", model=str(chat_folder), device=-1)
    assert pipe.model.device.type == "cpu"
    assert pipe("Hi", max_new_tokens=3, do_sample=False) == ref("Hi", max_new_tokens=3, do_sample=False)


def test_unsupported_task_lists_the_supported_ones():
    with pytest.raises(ValueError, match="'summarization' is not supported by maestrale; supported tasks: "
                                         "text-generation"):
        maestrale.pipeline("summarization", model="anything")


def test_model_without_a_name_needs_a_tokenizer():
    fresh = maestrale.MistralForCausalLM(maestrale.MistralConfig(**SMALL))
    assert fresh.name_or_path == ""
    with pytest.raises(ValueError, match="pass tokenizer="):
        maestrale.pipeline("text-generation", model=fresh)
