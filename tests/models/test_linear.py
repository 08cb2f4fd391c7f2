"""The decoder's Linear: nn.Linear's parameters and results, with oneDNN's product only for decode steps without autograd."""

import pytest
import torch
import torch.nn.functional as F

from maestrale.models import linear
from maestrale.models.linear import Linear

pytestmark = pytest.mark.skipif(not linear._ONEDNN, reason="this torch build has no oneDNN")


def test_state_dict_is_nn_linears():
    torch.manual_seed(0)
    ours, theirs = Linear(8, 5), torch.nn.Linear(8, 5)
    theirs.load_state_dict(ours.state_dict())
    assert list(ours.state_dict()) == ["weight", "bias"] and isinstance(ours, torch.nn.Linear)


@pytest.mark.parametrize("shape", [(1, 1, 64), (8, 1, 64), (3, 64)])
def test_decode_steps_take_onednn_and_round_like_f_linear(shape, monkeypatch):
    torch.manual_seed(0)
    layer, x = Linear(64, 40), torch.randn(shape)
    calls = []
    onednn = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(linear.torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(a) or onednn(*a))
    with torch.no_grad():
        out = layer(x)
    assert len(calls) == (x.shape[-2] == 1)  # only one position per row
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-6)


def test_autograd_and_other_dtypes_keep_f_linear(monkeypatch):
    monkeypatch.setattr(linear.torch.ops.mkldnn, "_linear_pointwise", None)  # would raise if called
    layer, x = Linear(16, 4), torch.randn(2, 1, 16)
    layer(x).sum().backward()
    assert layer.weight.grad is not None
    with torch.no_grad():
        assert layer.to(torch.float64)(x.double()).dtype == torch.float64
