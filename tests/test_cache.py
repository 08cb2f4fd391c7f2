"""KV cache layers against a plain torch.cat reference: growth past the spare room, rolling windows, crop, reorder."""

import pytest
import torch

from maestrale import cache
from maestrale.cache import CacheLayer, DynamicCache


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
