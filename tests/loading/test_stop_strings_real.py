"""stop_strings on the real SmolLM2 (GGUF) against transformers: a stop string that already occurred earlier in the
text must still stop generation where it occurs again."""

import pytest
import torch
import transformers

from maestrale.generation import StopStringCriteria

TEXT = "The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is Madrid."


@pytest.fixture(scope="module")
def tokenizer(hf_smollm2_tokenizer):
    return hf_smollm2_tokenizer()


@pytest.mark.parametrize("stops", [[" capital"], ["Rome"], ["al of"], ["."], ["is M", "xyz"]])
def test_stop_string_criterion_fires_where_transformers_does(tokenizer, stops):
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    theirs, ours = transformers.StopStringCriteria(tokenizer, stops), StopStringCriteria(tokenizer, stops)
    expected = [bool(theirs(ids[:, :n], None)[0]) for n in range(1, ids.shape[1] + 1)]
    got = [bool(ours(ids[:, :n], None)[0]) for n in range(1, ids.shape[1] + 1)]
    assert got == expected
    assert sum(expected) >= 1


def test_generation_stops_at_a_stop_string_seen_before(smollm2, hf_smollm2_model, tokenizer):
    reference = hf_smollm2_model
    inputs = tokenizer("The capital of France is Paris. The capital of Italy is", return_tensors="pt")
    kwargs = dict(max_new_tokens=20, do_sample=False, stop_strings=[" capital"], tokenizer=tokenizer)
    with torch.no_grad():
        expected = reference.generate(**inputs, **kwargs)
    got = smollm2.generate(**inputs, **kwargs)
    assert torch.equal(got, expected), (tokenizer.decode(got[0]), tokenizer.decode(expected[0]))
    assert tokenizer.decode(got[0]).endswith("Rome. The capital")
