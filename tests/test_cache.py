"""KV cache layers against a plain torch.cat reference: growth past the spare room, rolling windows, crop, reorder."""

import pytest
import torch

from maestrale import cache
from maestrale.cache import CacheLayer, DynamicCache
from parity import model_pair


class CatLayer:
    """What a layer must hold: every token so far (or the last window - 1), concatenated."""

    def __init__(self, window=None):
        self.window, self.keys, self.values = window, None, None

    def update(self, k, v):
        keys = k if self.keys is None else torch.cat([self.keys, k], dim=-2)
        values = v if self.values is None else torch.cat([self.values, v], dim=-2)
        keep = keys.shape[-2] if self.window is None else self.window - 1
        self.keys, self.values = keys[..., -keep:, :], values[..., -keep:, :]
        return keys, values


@pytest.mark.parametrize("window", [None, 5])
def test_layer_holds_what_cat_holds_across_reallocations(window, monkeypatch):
    monkeypatch.setattr(cache, "ROOM", 3)  # reallocate often
    torch.manual_seed(0)
    ours, ref = CacheLayer(window), CatLayer(window)
    for step, new in enumerate([7, 1, 1, 1, 2, 1, 1, 1, 1, 4, 1]):
        k, v = torch.randn(2, 3, new, 4), torch.randn(2, 3, new, 4)
        for got, want in zip(ours.update(k, v), ref.update(k, v)):
            assert torch.equal(got, want), step
        assert torch.equal(ours.keys, ref.keys) and torch.equal(ours.values, ref.values)
        assert ours.kept == ref.keys.shape[-2] and ours.key_start() == ours.seen - ours.kept


def test_crop_reorder_and_assigned_tensors():
    torch.manual_seed(0)
    kv = DynamicCache()
    keys = torch.randn(3, 2, 6, 4)
    kv.update(keys, keys + 1, 0)
    kv.crop(4)
    assert kv.get_seq_length() == 4 and torch.equal(kv.layers[0].keys, keys[..., :4, :])
    k, _ = kv.update(keys[..., 5:, :], keys[..., 5:, :] + 1, 0)  # writes over the cropped slot
    assert torch.equal(k, torch.cat([keys[..., :4, :], keys[..., 5:, :]], dim=-2))
    kv.reorder_cache(torch.tensor([2, 0, 0]))
    assert torch.equal(kv.layers[0].values, (k + 1)[[2, 0, 0]])
    layer = kv.layers[0]
    layer.keys, layer.values = keys, keys + 1  # as the engine hands its cache back
    assert layer.kept == 6
    k, v = layer.update(keys[..., :1, :], keys[..., :1, :])
    assert torch.equal(k, torch.cat([keys, keys[..., :1, :]], dim=-2)) and v.shape[-2] == 7


def test_backward_through_two_cached_forwards():
    """Autograd keeps views of the first step's keys; the second step must not write into them."""
    layer = CacheLayer()
    x = torch.randn(1, 1, 3, 4, requires_grad=True)
    k1, _ = layer.update(x * 2, x * 3)
    first = k1.pow(2).sum()  # saves k1 for the backward
    k2, _ = layer.update(x[..., :1, :] * 4, x[..., :1, :])
    (first + k2.pow(2).sum()).backward()
    assert x.grad is not None


# ----- against transformers' caches on the same weights -----
FULL = ("mistral", {"sliding_window": None})
MIXED = ("ministral", {"sliding_window": 5, "layer_types": ["full_attention", "sliding_attention", "sliding_attention"]})


def _pair(spec):
    family, overrides = spec
    return model_pair(family, **overrides)


def _close(a, b):
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5)


def test_dynamic_crop_negative_drops_the_last_tokens_as_transformers():
    import transformers
    ref, ours = _pair(FULL)
    ids = torch.randint(3, 97, (2, 9))
    theirs, mine = transformers.DynamicCache(config=ref.config), DynamicCache(ours.config)
    ref(ids, past_key_values=theirs), ours(ids, past_key_values=mine)
    theirs.crop(-2)
    mine.crop(-2)
    assert mine.get_seq_length() == theirs.get_seq_length() == 7
    _close(ref(ids[:, 7:], past_key_values=theirs), ours(ids[:, 7:], past_key_values=mine))
    mine.crop(0)  # transformers 5: remove nothing
    assert mine.get_seq_length() == 9


@pytest.mark.parametrize("spec", [FULL, MIXED], ids=["full", "sliding-layers"])
def test_static_cache_gives_transformers_logits_in_forward_and_generate(spec):
    import transformers
    import maestrale
    ref, ours = _pair(spec)
    ids = torch.randint(3, 97, (2, 9))
    theirs = transformers.StaticCache(config=ref.config, max_cache_len=32)
    mine = maestrale.StaticCache(config=ours.config, max_cache_len=32)
    _close(ref(ids[:, :6], past_key_values=theirs), ours(ids[:, :6], past_key_values=mine))
    for t in range(6, 9):
        _close(ref(ids[:, t:t + 1], past_key_values=theirs), ours(ids[:, t:t + 1], past_key_values=mine))
    assert mine.get_seq_length() == int(theirs.get_seq_length()) == 9
    assert [mine.get_max_length(i) for i in range(3)] == [theirs.get_max_length(i) for i in range(3)]
    assert mine.get_max_length() == theirs.get_max_length() == 32
    theirs.reset()
    mine.reset()
    assert mine.get_seq_length() == int(theirs.get_seq_length()) == 0
    _close(ref(ids[:, :4], past_key_values=theirs), ours(ids[:, :4], past_key_values=mine))  # reusable after reset

    kwargs = dict(max_new_tokens=8, eos_token_id=None, return_dict_in_generate=True, output_scores=True)
    a = ref.generate(ids, past_key_values=transformers.StaticCache(config=ref.config, max_cache_len=40), **kwargs)
    b = ours.generate(ids, past_key_values=maestrale.StaticCache(config=ours.config, max_cache_len=40), **kwargs)
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.scores, b.scores):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-4)
    assert b.past_key_values.get_seq_length() == 16


def test_static_cache_refuses_to_overflow_with_a_clear_error():
    import maestrale
    _, ours = _pair(FULL)
    with pytest.raises(ValueError, match="max_cache_len=8"):
        ours.generate(torch.randint(3, 97, (1, 5)), max_new_tokens=6, eos_token_id=None,
                      past_key_values=maestrale.StaticCache(config=ours.config, max_cache_len=8))


@pytest.mark.parametrize("spec", [FULL, MIXED], ids=["full", "sliding-layers"])
def test_batch_repeat_interleave_and_select_as_transformers(spec):
    import transformers
    ref, ours = _pair(spec)
    ids = torch.randint(3, 97, (2, 7))
    theirs, mine = transformers.DynamicCache(config=ref.config), DynamicCache(ours.config)
    ref(ids, past_key_values=theirs), ours(ids, past_key_values=mine)
    theirs.batch_repeat_interleave(3)
    mine.batch_repeat_interleave(3)
    step = torch.randint(3, 97, (6, 1))
    _close(ref(step, past_key_values=theirs), ours(step, past_key_values=mine))
    keep = torch.tensor([5, 0])
    theirs.batch_select_indices(keep)
    mine.batch_select_indices(keep)
    _close(ref(step[keep], past_key_values=theirs), ours(step[keep], past_key_values=mine))


def test_forward_takes_and_returns_the_cache_under_both_names():
    import transformers
    ref, ours = _pair(MIXED)
    ids = torch.randint(3, 97, (2, 6))
    theirs, mine = transformers.DynamicCache(config=ref.config), DynamicCache(ours.config)
    a, b = ref(ids, cache=theirs), ours(ids, cache=mine)
    _close(a, b)
    assert a.cache is theirs and b.cache is mine and b.past_key_values is mine
    assert b["cache"] is mine and "cache" in b and b.get("cache") is mine
    _close(ref(ids[:, :1], cache=theirs), ours(ids[:, :1], cache=mine))
    base_theirs = ref.model(ids, cache=transformers.DynamicCache(config=ref.config))
    base_mine = ours.model(ids, cache=DynamicCache(ours.config))
    torch.testing.assert_close(base_mine.last_hidden_state, base_theirs.last_hidden_state, rtol=1e-5, atol=1e-5)
    assert base_mine.cache.get_seq_length() == base_theirs.cache.get_seq_length() == 6
    with pytest.raises(ValueError, match="cache"):
        ours(ids, cache=DynamicCache(), past_key_values=DynamicCache())
