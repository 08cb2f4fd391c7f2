"""Processors against transformers' on the same scores; GenerationConfig files; streamers; stop strings."""

import json
import threading

import pytest
import torch

import maestrale.generation as ours
from parity import model_pair

VOCAB = 50


def scores_and_ids(batch=4, length=9):
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(batch, VOCAB, generator=g) * 3
    scores[0, :5] = float("-inf")  # already-filtered entries must survive every processor
    ids = torch.randint(0, VOCAB, (batch, length), generator=g)
    ids[1, -3:] = ids[1, :3]  # a repeated n-gram
    return scores, ids


PROCESSORS = [
    ("TemperatureLogitsWarper", (0.7,), {}),
    ("TopKLogitsWarper", (5,), {}),
    ("TopKLogitsWarper", (3,), {"min_tokens_to_keep": 4}),
    ("TopPLogitsWarper", (0.8,), {}),
    ("TopPLogitsWarper", (0.1,), {"min_tokens_to_keep": 3}),
    ("MinPLogitsWarper", (0.1,), {}),
    ("MinPLogitsWarper", (0.9,), {"min_tokens_to_keep": 2}),
    ("TypicalLogitsWarper", (0.6,), {}),
    ("TypicalLogitsWarper", (0.2,), {"min_tokens_to_keep": 3}),
    ("RepetitionPenaltyLogitsProcessor", (1.5,), {}),
    ("RepetitionPenaltyLogitsProcessor", (0.7,), {"prompt_ignore_length": 4}),
    ("RepetitionPenaltyLogitsProcessor", (1.3,), {"prompt_ignore_length": torch.tensor([0, 2, 5, 9])}),
    ("NoRepeatNGramLogitsProcessor", (2,), {}),
    ("NoRepeatNGramLogitsProcessor", (3,), {}),
    ("NoBadWordsLogitsProcessor", ([[4], [7, 8], [1, 2, 3], [9]],), {"eos_token_id": 9}),
    ("MinLengthLogitsProcessor", (12, [3, 4]), {}),
    ("MinNewTokensLengthLogitsProcessor", (5, 3, 6), {}),
    ("EpsilonLogitsWarper", (0.02,), {}),
    ("EpsilonLogitsWarper", (0.3,), {"min_tokens_to_keep": 3}),
    ("EtaLogitsWarper", (0.05,), {}),
    ("EtaLogitsWarper", (0.5,), {"min_tokens_to_keep": 2}),
    ("TopHLogitsWarper", (0.4,), {}),
    ("SequenceBiasLogitsProcessor", ({(4,): -2.0, (11,): 3.5, (1, 2, 6): 5.0, (7, 9): -4.0, (3, 3): 1.0},), {}),
    ("SequenceBiasLogitsProcessor", ([[[1, 2, 8], 2.0], [[5], -1.0]],), {}),
    ("SuppressTokensLogitsProcessor", ([1, 5, 9, 40],), {}),
    ("SuppressTokensAtBeginLogitsProcessor", ([1, 5, 9], 9), {}),
    ("SuppressTokensAtBeginLogitsProcessor", ([1, 5, 9], 4), {}),
    ("ForcedEOSTokenLogitsProcessor", (10, [3, 4]), {}),
    ("ForcedEOSTokenLogitsProcessor", (12, 3), {}),
    ("InfNanRemoveLogitsProcessor", (), {}),
    ("ExponentialDecayLengthPenalty", ((2, 1.5), [3, 4, 0], 3), {}),
    ("ExponentialDecayLengthPenalty", ((8, 1.5), 3, 3), {}),
    ("LogitNormalization", (), {}),
]


@pytest.mark.parametrize("name,args,kwargs", PROCESSORS, ids=[f"{p[0]}-{i}" for i, p in enumerate(PROCESSORS)])
def test_processor_matches_transformers(name, args, kwargs):
    import transformers
    scores, ids = scores_and_ids()
    if name in ("NoBadWordsLogitsProcessor", "SequenceBiasLogitsProcessor"):
        ids[2, -2:] = torch.tensor([1, 2])  # completes the prefix of [1, 2, 3]
        ids[3, -1] = 7
    expected = getattr(transformers, name)(*args, **kwargs)(ids, scores.clone())
    got = getattr(ours, name)(*args, **kwargs)(ids, scores.clone())
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_forced_bos_processor_matches_transformers():
    import transformers
    scores, ids = scores_and_ids()
    for length in (1, 2):
        expected = transformers.ForcedBOSTokenLogitsProcessor(6)(ids[:, :length], scores.clone())
        torch.testing.assert_close(ours.ForcedBOSTokenLogitsProcessor(6)(ids[:, :length], scores.clone()), expected)


def test_prefix_constrained_matches_transformers():
    import transformers
    scores, ids = scores_and_ids()

    def allowed(batch_id, sequence):
        return [int(sequence[-1]) % VOCAB, batch_id]

    expected = transformers.PrefixConstrainedLogitsProcessor(allowed, 2)(ids, scores.clone())
    torch.testing.assert_close(ours.PrefixConstrainedLogitsProcessor(allowed, 2)(ids, scores.clone()), expected)


def test_generation_config_files_round_trip(tmp_path):
    import transformers
    config = ours.GenerationConfig(max_new_tokens=7, do_sample=True, top_p=0.9, eos_token_id=[2, 5], pad_token_id=0)
    config.save_pretrained(tmp_path)
    loaded = ours.GenerationConfig.from_pretrained(tmp_path)
    assert loaded == config and loaded.eos_token_id == [2, 5]
    theirs = transformers.GenerationConfig.from_pretrained(tmp_path)
    assert (theirs.max_new_tokens, theirs.top_p, theirs.eos_token_id) == (7, 0.9, [2, 5])
    # A file written by transformers (as the loader writes it: special token ids) reads back.
    transformers.GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(tmp_path / "hf")
    read = ours.GenerationConfig.from_pretrained(tmp_path / "hf", max_new_tokens=3)
    assert (read.bos_token_id, read.eos_token_id, read.pad_token_id, read.max_new_tokens) == (1, 2, 0, 3)
    assert "transformers_version" not in json.loads(config.to_json_string())


def test_model_generation_config_drives_generate():
    _, model = model_pair("mistral")
    ids = torch.randint(3, 97, (1, 4))
    model.generation_config = ours.GenerationConfig(max_new_tokens=3, eos_token_id=None)
    assert model.generate(ids).shape == (1, 7)
    assert model.generate(ids, max_new_tokens=5).shape == (1, 9)  # keyword arguments override
    assert model.generation_config.max_new_tokens == 3  # and do not leak into the model's config


class ByteTokenizer:
    """Token id = one UTF-8 byte: the harshest case for streaming, as every non-ASCII character spans tokens."""

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids, **kwargs):
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return bytes(ids).decode("utf-8", errors="replace")


TEXT = "Ciao 世界! 🌍🚀 emoji, 漢字 and ü — done.\nNext line 😀."


class Collecting(ours.TextStreamer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pieces = []

    def on_finalized_text(self, text, stream_end=False):
        self.pieces.append(text)


def test_text_streamer_never_splits_a_character():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    streamer = Collecting(tok, skip_prompt=True)
    streamer.put(torch.tensor([ids[:3]]))  # the prompt, skipped
    for i in ids[3:]:
        streamer.put(torch.tensor([i]))
    streamer.end()
    assert "".join(streamer.pieces) == tok.decode(ids[3:])
    assert not any("\ufffd" in piece for piece in streamer.pieces)


def test_text_streamer_prints(capsys):
    tok = ByteTokenizer()
    streamer = ours.TextStreamer(tok)
    for i in tok.encode(TEXT):
        streamer.put(torch.tensor([i]))
    streamer.end()
    assert capsys.readouterr().out == TEXT + "\n"


def test_iterator_streamer_from_a_thread_matches_the_final_decode():
    _, model = model_pair("mistral", vocab_size=256, sliding_window=None)
    tok = ByteTokenizer()
    prompt = torch.tensor([tok.encode("Hi 世")])

    def utf8_friendly(batch_id, sequence):  # emoji and CJK lead bytes plus continuation bytes and ASCII
        return list(range(32, 127)) + list(range(0x80, 0xC0)) + [0xE4, 0xE5, 0xF0, 0x9F]

    streamer = ours.TextIteratorStreamer(tok, skip_prompt=True, timeout=60)
    kwargs = dict(max_new_tokens=40, eos_token_id=None, prefix_allowed_tokens_fn=utf8_friendly)
    thread = threading.Thread(target=model.generate, args=(prompt,), kwargs=dict(streamer=streamer, **kwargs))
    thread.start()
    pieces = list(streamer)
    thread.join()
    final = model.generate(prompt, **kwargs)
    assert "".join(pieces) == tok.decode(final[0, prompt.shape[1]:])


def test_stop_strings_end_generation_where_the_string_completes():
    _, model = model_pair("mistral", vocab_size=256, sliding_window=None)
    tok = ByteTokenizer()
    prompt = torch.tensor([tok.encode("abc")])
    letters = dict(prefix_allowed_tokens_fn=lambda b, s: list(range(97, 123)), eos_token_id=None)
    free = tok.decode(model.generate(prompt, max_new_tokens=30, **letters)[0, 3:])
    stop = free[6:9]
    end = free.index(stop) + len(stop)
    out = model.generate(prompt, max_new_tokens=30, stop_strings=stop, tokenizer=tok, **letters)
    assert tok.decode(out[0, 3:]) == free[:end]


def test_streamer_with_a_real_tokenizer(chat_folder):
    """SmolLM2's byte-level BPE tokenizer (transformers', as chat_folder saved it): emoji and CJK round trip."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(chat_folder)
    ids = tok(TEXT)["input_ids"]
    streamer = Collecting(tok)
    for i in ids:
        streamer.put(torch.tensor([i]))
    streamer.end()
    assert "".join(streamer.pieces) == tok.decode(ids) == TEXT
