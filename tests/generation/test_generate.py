"""generate() against transformers' generate on the same random weights: greedy, beam search, sampling, options."""

import copy
import logging

import pytest
import torch

from parity import model_pair

# Every family, each with a sliding window shorter than prompt + output (so rolling caches roll).
FAMILIES = {
    "mistral-window4": ("mistral", {"sliding_window": 4}),
    "ministral-mixed-window5": ("ministral", {"sliding_window": 5,
                                              "layer_types": ["full_attention", "sliding_attention", "sliding_attention"]}),
    "mixtral-window6": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 6}),
    "phi3-window5": ("phi3", {"sliding_window": 5, "pad_token_id": 0, "eos_token_id": 2, "bos_token_id": 1}),
}
PAD = 0


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request):
    family, overrides = FAMILIES[request.param]
    return model_pair(family, **overrides)


def prompts(batched: bool):
    """One prompt, or a left-padded batch of three of different lengths."""
    g = torch.Generator().manual_seed(1)
    if not batched:
        ids = torch.randint(3, 97, (1, 6), generator=g)
        return ids, torch.ones_like(ids)
    lengths = [7, 4, 2]
    ids = torch.full((3, 7), PAD)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, 7 - n:] = torch.randint(3, 97, (n,), generator=g)
        mask[row, 7 - n:] = 1
    return ids, mask


def eos_that_fires(ref, ids, mask):
    """A token the model greedily produces a few steps in, so stopping on it is exercised."""
    out = ref.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    return int(out[0, ids.shape[1] + 3])


def both(ref, ours, ids, mask, **kwargs):
    kwargs = dict(attention_mask=mask, pad_token_id=PAD, return_dict_in_generate=True, output_scores=True,
                  output_logits=True, **kwargs)
    return ref.generate(ids, **kwargs), ours.generate(ids, **kwargs)


def assert_same(a, b):
    assert torch.equal(a.sequences, b.sequences), f"\n{a.sequences}\n{b.sequences}"
    for name in ("scores", "logits"):
        ra, rb = getattr(a, name), getattr(b, name)
        assert len(ra) == len(rb)
        for x, y in zip(ra, rb):
            torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batched", [False, True], ids=["single", "left-padded-batch"])
@pytest.mark.parametrize("with_eos", [False, True], ids=["no-eos", "eos"])
def test_greedy_matches_transformers(pair, batched, with_eos):
    ref, ours = pair
    ids, mask = prompts(batched)
    eos = eos_that_fires(ref, ids, mask) if with_eos else None
    a, b = both(ref, ours, ids, mask, max_new_tokens=12, do_sample=False, eos_token_id=eos)
    assert_same(a, b)
    if with_eos:
        assert a.sequences.shape[1] < ids.shape[1] + 12 or (a.sequences == eos).any()


@pytest.mark.parametrize("batched", [False, True], ids=["single", "left-padded-batch"])
@pytest.mark.parametrize("with_eos", [False, True], ids=["no-eos", "eos"])
def test_beam_search_matches_transformers(pair, batched, with_eos):
    ref, ours = pair
    ids, mask = prompts(batched)
    eos = eos_that_fires(ref, ids, mask) if with_eos else None
    a, b = both(ref, ours, ids, mask, max_new_tokens=10, num_beams=3, num_return_sequences=2, eos_token_id=eos)
    assert_same(a, b)
    torch.testing.assert_close(b.sequences_scores, a.sequences_scores)
    assert torch.equal(a.beam_indices.int(), b.beam_indices.int())


@pytest.mark.parametrize("options", [
    dict(num_beams=4, early_stopping=True, length_penalty=0.5),
    dict(num_beams=2, early_stopping="never", length_penalty=2.0),
], ids=["early-true", "never"])
def test_beam_search_options(options):
    ref, ours = model_pair("mistral", sliding_window=None)
    ids, mask = prompts(True)
    eos = eos_that_fires(ref, ids, mask)
    a, b = both(ref, ours, ids, mask, max_new_tokens=9, eos_token_id=eos, **options)
    assert_same(a, b)


@pytest.mark.parametrize("options", [
    dict(repetition_penalty=1.7),
    dict(no_repeat_ngram_size=2),
    dict(bad_words_ids=[[5], [11, 12], [40, 41, 42]]),
    dict(min_new_tokens=8),
    dict(min_length=12),
], ids=lambda o: next(iter(o)))
def test_processors_in_greedy_match_transformers(options):
    ref, ours = model_pair("mistral", sliding_window=None)
    ids, mask = prompts(True)
    eos = eos_that_fires(ref, ids, mask)
    a, b = both(ref, ours, ids, mask, max_new_tokens=10, do_sample=False, eos_token_id=eos, **options)
    assert_same(a, b)


def test_sampling_is_seeded_and_matches_transformers():
    ref, ours = model_pair("mixtral", num_local_experts=4, num_experts_per_tok=2)
    ids, mask = prompts(True)
    kwargs = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, typical_p=0.95,
                  max_new_tokens=10, num_return_sequences=2)
    torch.manual_seed(7)
    a, b = both(ref, ours, ids, mask, **kwargs)
    torch.manual_seed(7)
    _, again = both(ref, ours, ids, mask, **kwargs)
    assert torch.equal(b.sequences, again.sequences)
    # Same processors, same random draws in the same order: even sampling agrees token for token.
    torch.manual_seed(7)
    a = ref.generate(ids, attention_mask=mask, pad_token_id=PAD, **kwargs)
    torch.manual_seed(7)
    b = ours.generate(ids, attention_mask=mask, pad_token_id=PAD, **kwargs)
    assert torch.equal(a, b)


def test_user_processors_criteria_and_prefix_function():
    ref, ours = model_pair("ministral", sliding_window=5)
    ids, mask = prompts(True)

    def no_token_7(input_ids, scores):
        return scores.index_fill(-1, torch.tensor([7]), float("-inf"))

    def stop_after_5_new(input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= ids.shape[1] + 5)

    def even_tokens(batch_id, sequence):
        return list(range(batch_id * 2, 97, 2))

    import transformers
    from maestrale.generation import LogitsProcessorList, StoppingCriteriaList
    a = ref.generate(ids, attention_mask=mask, pad_token_id=PAD, max_new_tokens=10,
                     logits_processor=transformers.LogitsProcessorList([no_token_7]),
                     stopping_criteria=transformers.StoppingCriteriaList([stop_after_5_new]),
                     prefix_allowed_tokens_fn=even_tokens)
    b = ours.generate(ids, attention_mask=mask, pad_token_id=PAD, max_new_tokens=10,
                      logits_processor=LogitsProcessorList([no_token_7]),
                      stopping_criteria=StoppingCriteriaList([stop_after_5_new]), prefix_allowed_tokens_fn=even_tokens)
    assert torch.equal(a, b)
    assert b.shape[1] == ids.shape[1] + 5 and (b[:, ids.shape[1]:] % 2 == 0).all()


def test_batch_encoding_as_first_argument_and_cache_returned():
    _, ours = model_pair("mistral")
    ids, mask = prompts(True)
    encoding = {"input_ids": ids, "attention_mask": mask}  # what a tokenizer or apply_chat_template returns
    out = ours.generate(encoding, max_new_tokens=5, pad_token_id=PAD, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ours.generate(ids, attention_mask=mask, max_new_tokens=5, pad_token_id=PAD))
    assert out.past_key_values.get_seq_length() == out.sequences.shape[1] - 1


def test_default_generation_config_and_max_length():
    ref, ours = model_pair("mistral")
    assert ours.generation_config.eos_token_id == ref.generation_config.eos_token_id == 2
    ids = torch.randint(3, 97, (1, 5))
    with pytest.warns(UserWarning, match="max_length"):
        out = ours.generate(ids, eos_token_id=None)
    assert out.shape == (1, 25)  # transformers' default: 20 new tokens
    assert ours.generate(ids, max_length=9, eos_token_id=None).shape == (1, 9)


def test_contradictions_raise_clear_errors():
    from maestrale.generation import TextStreamer
    _, ours = model_pair("mistral")
    ids = torch.randint(3, 97, (1, 5))
    with pytest.raises(ValueError, match="top_p"):
        ours.generate(ids, do_sample=True, top_p=1.5)
    with pytest.raises(ValueError, match="top_p"):
        ours.generate(ids, do_sample=True, top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        ours.generate(ids, max_new_tokens=-1)
    with pytest.raises(ValueError, match="streamer"):
        ours.generate(ids, num_beams=2, max_new_tokens=3, streamer=TextStreamer(tokenizer=None))
    with pytest.raises(ValueError, match="num_return_sequences"):
        ours.generate(ids, num_return_sequences=2, max_new_tokens=3)
    with pytest.raises(ValueError, match="tokenizer"):
        ours.generate(ids, stop_strings=["x"], max_new_tokens=3)
    with pytest.raises(ValueError, match="max_length"):
        ours.generate(ids, max_length=4)
    with pytest.raises(TypeError, match="unknown arguments"):
        ours.generate(ids, max_new_tokens=3, top_q=0.5)


def test_right_padding_warns(caplog):
    _, ours = model_pair("mistral")
    ids = torch.tensor([[5, 6, 7], [5, 6, PAD]])
    with caplog.at_level(logging.WARNING):
        ours.generate(ids, attention_mask=(ids != PAD).long(), pad_token_id=PAD, max_new_tokens=2)
    assert "right-padding was detected" in caplog.text


def test_max_time_stops_early():
    _, ours = model_pair("mistral")
    out = ours.generate(torch.randint(3, 97, (1, 5)), max_new_tokens=200, min_new_tokens=200, max_time=0.05)
    assert out.shape[1] < 5 + 200


@pytest.mark.parametrize("family,overrides", [
    ("mistral", {"sliding_window": None}),
    ("ministral", {"sliding_window": 5, "layer_types": ["full_attention", "sliding_attention", "sliding_attention"]}),
], ids=["full", "window-rolls"])
def test_assisted_generation_is_greedy_with_fewer_target_calls(family, overrides):
    _, target = model_pair(family, **overrides)
    # A perturbed copy: agrees with the target often but not always, so drafts get both accepted and rejected.
    assistant = copy.deepcopy(target)
    with torch.no_grad():
        for p in assistant.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ids = torch.randint(3, 97, (1, 6))
    plain = target.generate(ids, max_new_tokens=30, eos_token_id=None, return_dict_in_generate=True, output_scores=True)

    calls = []
    forward = target.forward
    target.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    assisted = target.generate(ids, max_new_tokens=30, eos_token_id=None, assistant_model=assistant,
                               return_dict_in_generate=True, output_scores=True)
    del target.forward
    assert torch.equal(assisted.sequences, plain.sequences)
    for x, y in zip(plain.scores, assisted.scores):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-4)
    assert len(calls) <= 18, f"{len(calls)} target forwards for 30 tokens (plain greedy: 30)"


def test_assisted_generation_stops_on_eos_like_greedy():
    ref, target = model_pair("mistral")
    ids = torch.randint(3, 97, (1, 6))
    eos = eos_that_fires(ref, ids, torch.ones_like(ids))
    plain = target.generate(ids, max_new_tokens=20, eos_token_id=eos)
    assisted = target.generate(ids, max_new_tokens=20, eos_token_id=eos, assistant_model=copy.deepcopy(target))
    assert torch.equal(assisted, plain) and plain[0, -1] == eos


@pytest.mark.parametrize("batched", [False, True], ids=["single", "left-padded-batch"])
def test_beam_sampling_matches_transformers(batched):
    """num_beams > 1 with do_sample: the same seeded draws give the same beams (candidates kept best first)."""
    ref, ours = model_pair("mistral", sliding_window=None)
    ids, mask = prompts(batched)
    eos = eos_that_fires(ref, ids, mask)
    results = []
    for model in (ref, ours):
        torch.manual_seed(7)
        results.append(model.generate(ids, attention_mask=mask, pad_token_id=PAD, eos_token_id=eos, do_sample=True,
                                      num_beams=3, num_return_sequences=2, max_new_tokens=9, temperature=1.3,
                                      top_k=20, return_dict_in_generate=True, output_scores=True, output_logits=True))
    a, b = results
    assert_same(a, b)
    torch.testing.assert_close(b.sequences_scores, a.sequences_scores)
