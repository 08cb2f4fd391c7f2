"""Generation options of transformers 5.24 against transformers on the same random weights; every GenerationConfig
field of transformers is implemented, inert or refused; inputs_embeds, prompt lookup, transition scores, async
streaming and the `cache` name of past_key_values."""

import asyncio
import json
import threading

import pytest
import torch

import maestrale
from maestrale.generation.configuration import DEFAULTS, INERT, REFUSED
from parity import model_pair
from test_generate import PAD, assert_same, both, eos_that_fires, prompts
from test_parts import ByteTokenizer


@pytest.fixture(scope="module")
def pair():
    return model_pair("mistral", sliding_window=None)


@pytest.fixture(scope="module")
def free(pair):
    """The prompts, their eos token and the first tokens greedy decoding picks without options."""
    ref, _ = pair
    ids, mask = prompts(True)
    eos = eos_that_fires(ref, ids, mask)
    new = ref.generate(ids, attention_mask=mask, max_new_tokens=10, pad_token_id=PAD, eos_token_id=None)
    return ids, mask, eos, new[:, ids.shape[1]:]


# Each option is built from the unconstrained greedy tokens `g`, so that it changes the output.
OPTIONS = {
    "suppress_tokens": lambda g: dict(suppress_tokens=[int(g[0, 1]), int(g[1, 2])]),
    "begin_suppress_tokens": lambda g: dict(begin_suppress_tokens=[int(g[0, 0]), int(g[2, 0])]),
    "sequence_bias": lambda g: dict(sequence_bias={(int(g[0, 0]),): -5.0, (int(g[1, 0]), int(g[1, 1])): -20.0,
                                                   (3,): 4.0}),
    "sequence_bias-json-list": lambda g: dict(sequence_bias=[[[int(g[2, 0]), int(g[2, 1])], -30.0]]),
    "renormalize_logits": lambda g: dict(renormalize_logits=True),
    "forced_eos_token_id": lambda g: dict(forced_eos_token_id=int(g[0, 4])),
    "exponential_decay_length_penalty": lambda g: dict(exponential_decay_length_penalty=(2, 1.9)),
    "remove_invalid_values": lambda g: dict(remove_invalid_values=True, bad_words_ids=[[int(g[0, 0])]]),
    "beam-renormalize-sequence_bias": lambda g: dict(num_beams=3, renormalize_logits=True,
                                                     sequence_bias={(int(g[0, 0]),): 3.0}),
}
SAMPLING = {
    "epsilon_cutoff": dict(epsilon_cutoff=0.02),
    "eta_cutoff": dict(eta_cutoff=0.05),
    "top_h": dict(top_h=0.5),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_option_matches_transformers(pair, free, name):
    ref, ours = pair
    ids, mask, eos, g = free
    options = OPTIONS[name](g)
    a, b = both(ref, ours, ids, mask, max_new_tokens=10, eos_token_id=eos, **options)
    assert_same(a, b)
    plain, _ = both(ref, ours, ids, mask, max_new_tokens=10, eos_token_id=eos, num_beams=options.get("num_beams", 1))
    changed = plain.sequences.shape != a.sequences.shape or not torch.equal(plain.sequences, a.sequences)
    assert changed or any(not torch.equal(x, y) for x, y in zip(plain.scores, a.scores)), "the option had no effect"


@pytest.mark.parametrize("name", list(SAMPLING))
def test_sampling_option_matches_transformers(pair, free, name):
    ref, ours = pair
    ids, mask, eos, _ = free
    kwargs = dict(do_sample=True, top_k=0, max_new_tokens=10, eos_token_id=eos, **SAMPLING[name])
    torch.manual_seed(11)
    a = ref.generate(ids, attention_mask=mask, pad_token_id=PAD, return_dict_in_generate=True, output_scores=True,
                     output_logits=True, **kwargs)
    torch.manual_seed(11)
    b = ours.generate(ids, attention_mask=mask, pad_token_id=PAD, return_dict_in_generate=True, output_scores=True,
                      output_logits=True, **kwargs)
    assert_same(a, b)
    assert any(bool(s.isinf().any()) for s in b.scores), "the warper filtered nothing"


@pytest.mark.parametrize("options", [dict(forced_bos_token_id=7), dict(forced_bos_token_id=7, begin_suppress_tokens=[4])],
                         ids=["forced_bos", "forced_bos-then-begin_suppress"])
def test_forced_bos_after_a_one_token_prompt(pair, options):
    ref, ours = pair
    one = torch.tensor([[5], [9]])
    a, b = both(ref, ours, one, torch.ones_like(one), max_new_tokens=5, eos_token_id=None, **options)
    assert_same(a, b)
    assert (b.sequences[:, 1] == 7).all()


def test_options_from_a_generation_config_file_are_applied(pair, free, tmp_path):
    """The issue's case: forced_eos_token_id, suppress_tokens, renormalize_logits read from generation_config.json."""
    import transformers
    ref, ours = pair
    ids, mask, eos, g = free
    fields = dict(forced_eos_token_id=eos, suppress_tokens=[int(g[0, 0])], renormalize_logits=True, max_new_tokens=6,
                  pad_token_id=PAD, eos_token_id=eos)
    (tmp_path / "generation_config.json").write_text(json.dumps(fields))
    ref.generation_config = transformers.GenerationConfig.from_pretrained(tmp_path)
    ours.generation_config = maestrale.GenerationConfig.from_pretrained(tmp_path)
    try:
        a = ref.generate(ids, attention_mask=mask, return_dict_in_generate=True, output_scores=True)
        b = ours.generate(ids, attention_mask=mask, return_dict_in_generate=True, output_scores=True)
    finally:
        ours.generation_config = maestrale.GenerationConfig.from_model_config(ours.config)
        ref.generation_config = transformers.GenerationConfig.from_model_config(ref.config)
    assert torch.equal(a.sequences, b.sequences) and (b.sequences[:, -1] == eos).all()
    for x, y in zip(a.scores, b.scores):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-4)


def test_every_transformers_generation_field_is_implemented_inert_or_refused(pair, tmp_path):
    import transformers
    fields = set(transformers.GenerationConfig().to_dict()) - {"transformers_version", "_from_model_config"}
    unclassified = fields - set(DEFAULTS) - set(INERT) - set(REFUSED)
    assert not unclassified, f"transformers fields maestrale neither implements nor refuses: {sorted(unclassified)}"
    assert not (set(DEFAULTS) & set(INERT)) and not (set(DEFAULTS) & set(REFUSED)) and not (set(INERT) & set(REFUSED))
    _, ours = pair
    ids = torch.randint(3, 97, (1, 4))
    for name, (neutral, _) in REFUSED.items():
        value = next(v for v in (2, 1.5, "on") if v not in neutral)
        with pytest.raises(ValueError, match=name):
            ours.generate(ids, max_new_tokens=2, **{name: value})
        (tmp_path / "generation_config.json").write_text(json.dumps({name: value}))
        with pytest.raises(ValueError, match=name):  # loads (as transformers does), but generate refuses it
            ours.generate(ids, max_new_tokens=2, generation_config=maestrale.GenerationConfig.from_pretrained(tmp_path))
        for value in neutral:  # hub files often spell out the neutral value
            ours.generate(ids, max_new_tokens=2, **{name: value})


def test_inert_fields_change_nothing_in_either_library(pair):
    ref, ours = pair
    ids = torch.randint(3, 97, (1, 4))
    inert = dict(decoder_start_token_id=5, num_assistant_tokens_schedule="heuristic", assistant_confidence_threshold=0.1,
                 assistant_lookbehind=3, target_lookbehind=3, disable_compile=True)
    plain = ref.generate(ids, max_new_tokens=6, eos_token_id=None)
    assert torch.equal(ref.generate(ids, max_new_tokens=6, eos_token_id=None, **inert), plain)
    assert torch.equal(ours.generate(ids, max_new_tokens=6, eos_token_id=None, max_cache_len=64, is_assistant=True,
                                     **inert), plain)


# ----- inputs_embeds -----
@pytest.mark.parametrize("extra", [
    dict(), dict(with_ids=True), dict(num_beams=3), dict(max_length=12), dict(min_length=9), dict(repetition_penalty=1.5),
], ids=["embeds", "embeds-and-ids", "beams", "max_length", "min_length", "repetition_penalty"])
def test_generate_from_inputs_embeds_matches_transformers(pair, free, extra):
    ref, ours = pair
    ids, mask, eos, _ = free
    extra = dict(extra)
    kwargs = dict(inputs_embeds=ref.get_input_embeddings()(ids).detach(), attention_mask=mask, pad_token_id=PAD,
                  return_dict_in_generate=True, output_scores=True, output_logits=True, eos_token_id=eos)
    if extra.pop("with_ids", False):
        kwargs["input_ids"] = ids
    if "max_length" not in extra:
        kwargs["max_new_tokens"] = 8
    kwargs.update(extra)
    a, b = ref.generate(**kwargs), ours.generate(**kwargs)
    assert_same(a, b)
    assert b.sequences.shape[1] < 8 + ids.shape[1] if "input_ids" not in kwargs else torch.equal(b.sequences[:, :7], ids)


# ----- prompt lookup -----
def test_prompt_lookup_is_greedy_with_fewer_forwards():
    # A small vocabulary makes the random model repeat itself, so lookups hit (and sometimes miss).
    ref, ours = model_pair("mistral", sliding_window=None, vocab_size=12)
    g = torch.Generator().manual_seed(1)
    prompt = ours.generate(torch.randint(3, 12, (1, 6), generator=g), max_new_tokens=30, eos_token_id=None)
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=20, eos_token_id=None,
                  return_dict_in_generate=True, output_scores=True)
    plain = ours.generate(prompt, **kwargs)
    theirs = ref.generate(prompt, prompt_lookup_num_tokens=5, **kwargs)
    calls = []
    forward = ours.forward
    ours.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    try:
        looked_up = ours.generate(prompt, prompt_lookup_num_tokens=5, **kwargs)
    finally:
        del ours.forward
    assert torch.equal(looked_up.sequences, plain.sequences) and torch.equal(looked_up.sequences, theirs.sequences)
    for x, y, z in zip(plain.scores, looked_up.scores, theirs.scores):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(y, z, rtol=1e-4, atol=1e-4)
    assert len(calls) < 10, f"{len(calls)} forwards for 20 tokens"
    with pytest.raises(ValueError, match="prompt_lookup_num_tokens"):
        ours.generate(prompt, prompt_lookup_num_tokens=5, do_sample=True, max_new_tokens=3)


# ----- compute_transition_scores -----
@pytest.mark.parametrize("options", [
    dict(), dict(num_beams=3, num_return_sequences=2, eos="fires"), dict(do_sample=True, top_k=10),
], ids=["greedy", "beams", "sampling"])
@pytest.mark.parametrize("normalize", [False, True])
def test_compute_transition_scores_matches_transformers(pair, free, options, normalize):
    ref, ours = pair
    ids, mask, eos, _ = free
    options = dict(options)
    if options.pop("eos", None):
        options["eos_token_id"] = eos
    kwargs = dict(attention_mask=mask, pad_token_id=PAD, return_dict_in_generate=True, output_scores=True,
                  max_new_tokens=6, **options)
    torch.manual_seed(1)
    a = ref.generate(ids, **kwargs)
    torch.manual_seed(1)
    b = ours.generate(ids, **kwargs)
    beams = getattr(a, "beam_indices", None), getattr(b, "beam_indices", None)
    expected = ref.compute_transition_scores(a.sequences, a.scores, beams[0], normalize_logits=normalize)
    got = ours.compute_transition_scores(b.sequences, b.scores, beams[1], normalize_logits=normalize)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# ----- streaming into asyncio -----
def test_async_iterator_streamer_yields_the_generated_text():
    _, model = model_pair("mistral", vocab_size=256, sliding_window=None)
    tok = ByteTokenizer()
    prompt = torch.tensor([tok.encode("Hi")])
    kwargs = dict(max_new_tokens=30, eos_token_id=None, prefix_allowed_tokens_fn=lambda b, s: list(range(32, 127)))

    async def stream():
        streamer = maestrale.AsyncTextIteratorStreamer(tok, skip_prompt=True, timeout=60)
        thread = threading.Thread(target=model.generate, args=(prompt,), kwargs=dict(streamer=streamer, **kwargs))
        thread.start()
        pieces = [piece async for piece in streamer]
        thread.join()
        return pieces

    pieces = asyncio.run(stream())
    assert len(pieces) > 1 and "".join(pieces) == tok.decode(model.generate(prompt, **kwargs)[0, 2:])

    async def nothing_comes():
        streamer = maestrale.AsyncTextIteratorStreamer(tok, timeout=0.05)
        return [piece async for piece in streamer]

    with pytest.raises(TimeoutError):
        asyncio.run(nothing_comes())


# ----- the cache under transformers' newer name -----
def test_generate_takes_and_returns_the_cache_under_both_names(pair):
    import transformers
    ref, ours = pair
    ids = torch.randint(3, 97, (2, 5))
    a = ref.generate(ids, max_new_tokens=4, eos_token_id=None, return_dict_in_generate=True,
                     cache=transformers.DynamicCache(config=ref.config))
    b = ours.generate(ids, max_new_tokens=4, eos_token_id=None, return_dict_in_generate=True,
                      cache=maestrale.DynamicCache(ours.config))
    assert torch.equal(a.sequences, b.sequences)
    assert b.cache is b.past_key_values and b["cache"] is b.cache and "cache" in b
    assert b.cache.get_seq_length() == int(a.cache.get_seq_length()) == 8
    with pytest.raises(ValueError, match="cache"):
        ours.generate(ids, max_new_tokens=2, cache=maestrale.DynamicCache(), past_key_values=maestrale.DynamicCache())
