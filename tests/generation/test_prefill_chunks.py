"""Chunked prefill (generate(prefill_chunk_size=N); on CUDA also by itself where a sliding window is shorter than
the prompt): the tokens and scores of transformers running the prompt in one forward, and a rolling cache that never
holds more than the window and one chunk."""

from types import SimpleNamespace

import pytest
import torch

from maestrale import GenerationConfig
from maestrale.cache import ROOM
from maestrale.generation.utils import AUTO_FLASH_PREFILL_CHUNK, AUTO_PREFILL_CHUNK
from parity import model_pair
from test_generate import FAMILIES, PAD, prompts


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request):
    family, overrides = FAMILIES[request.param]
    return model_pair(family, attn="sdpa", **overrides)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("chunk", [1, 3, 5])
def test_chunked_prefill_matches_one_forward(pair, chunk, cache, monkeypatch):
    """Left-padded prompts of 7 tokens in chunks shorter than, equal to and longer than the windows (4 to 6)."""
    ref, ours = pair
    ids, mask = prompts(True)
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=PAD, eos_token_id=None,
                  output_scores=True, return_dict_in_generate=True)
    lengths = []  # of the inputs the model's forward sees: the prompt's chunks first (a hook would stop "static")
    forward = ours.forward
    monkeypatch.setattr(ours, "forward",
                        lambda ids, *args, **kw: lengths.append(ids.shape[1]) or forward(ids, *args, **kw))
    a = ref.generate(ids, **kwargs)
    b = ours.generate(ids, prefill_chunk_size=chunk, cache_implementation=cache, **kwargs)
    chunks = -(-ids.shape[1] // chunk)
    assert lengths[:chunks] == [chunk] * (chunks - 1) + [ids.shape[1] - chunk * (chunks - 1)]
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(torch.stack(b.scores), torch.stack(a.scores), rtol=1e-5, atol=1e-5)


def test_long_prompt_keeps_only_the_window():
    """A 700-token prompt in chunks of 16 with a window of 8: the same first tokens as one forward, and the rolling
    layers' buffers hold window - 1 + chunk + ROOM tokens, not the prompt."""
    ref, ours = model_pair("mistral", attn="sdpa", sliding_window=8, max_position_embeddings=1024)
    ids = torch.randint(3, 97, (1, 700), generator=torch.Generator().manual_seed(3))
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=PAD, eos_token_id=None, output_scores=True,
                  return_dict_in_generate=True)
    a = ref.generate(ids, **kwargs)
    b = ours.generate(ids, prefill_chunk_size=16, **kwargs)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(torch.stack(b.scores), torch.stack(a.scores), rtol=1e-5, atol=1e-5)
    for layer in b.past_key_values.layers:
        assert layer.kept == 7 and layer._keys.shape[-2] <= 7 + 16 + ROOM < ids.shape[1]


def test_bad_chunk_sizes_and_combinations_are_refused():
    _, ours = model_pair("mistral", sliding_window=4)
    ids = torch.randint(3, 97, (1, 9))
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="prefill_chunk_size must be a positive integer"):
            ours.generate(ids, max_new_tokens=2, prefill_chunk_size=bad)
    with pytest.raises(ValueError, match="prefill_chunk_size=4 cannot be combined with output_attentions"):
        ours.generate(ids, max_new_tokens=2, prefill_chunk_size=4, output_attentions=True,
                      return_dict_in_generate=True)


def test_automatic_chunks_on_cuda_follow_the_backend(monkeypatch):
    """On CUDA a prompt longer than the window prefills in chunks by itself: sdpa's short (its mask is dense),
    flash_attention_2's longer (its kernels skip what is outside the window); a prompt within the window, or within
    one chunk, in one forward; prefill_chunk_size set wins."""
    _, ours = model_pair("mistral", sliding_window=4)
    monkeypatch.setattr(type(ours), "device", property(lambda self: torch.device("cuda")))
    run = SimpleNamespace(config=GenerationConfig(), past=0)
    long, mid = 2 * AUTO_FLASH_PREFILL_CHUNK, AUTO_FLASH_PREFILL_CHUNK - 1
    assert (ours._prefill_chunk(run, long), ours._prefill_chunk(run, mid), ours._prefill_chunk(run, 3)) == (
        AUTO_PREFILL_CHUNK, AUTO_PREFILL_CHUNK, None)
    ours.set_attn_implementation("flash_attention_2")
    assert (ours._prefill_chunk(run, long), ours._prefill_chunk(run, mid), ours._prefill_chunk(run, 3)) == (
        AUTO_FLASH_PREFILL_CHUNK, None, None)
    assert ours._prefill_chunk(SimpleNamespace(config=GenerationConfig(prefill_chunk_size=16), past=0), long) == 16
