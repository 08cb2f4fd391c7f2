"""The decoder's Linear: nn.Linear's state dict and results; oneDNN's product and stacked weights for decode steps."""

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


def _decode(model, ids, steps=4):
    with torch.inference_mode():
        return model.generate(ids, max_new_tokens=steps, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)


def _storages(model):
    return {p.untyped_storage().data_ptr() for p in model.model.layers[0].parameters()}


def test_decode_stacks_weights_in_place_and_state_dict_stays():
    from parity import model_pair

    ref, ours = model_pair("mistral", attn="sdpa")
    ids = torch.randint(1, 97, (2, 5))
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    assert len(_storages(ours)) == 9  # 7 projections and 2 norms, each its own
    out = _decode(ours, ids)
    assert len(_storages(ours)) == 6  # q/k/v and gate/up now share one tensor each
    after = ours.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    expected = _decode(ref, ids)
    assert torch.equal(out.sequences, expected.sequences)
    for got, want in zip(out.logits, expected.logits):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    ref.load_state_dict(ours.state_dict())  # and back


def test_stacked_weights_follow_training_to_and_assign():
    from parity import model_pair

    ref, ours = model_pair("mistral", attn="sdpa")
    ids = torch.randint(1, 97, (1, 5))
    _decode(ours, ids)  # stacks inside inference_mode: the weights must stay trainable
    for model in (ref, ours):
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        model.eval()
    torch.testing.assert_close(_decode(ours, ids).logits, _decode(ref, ids).logits, rtol=1e-4, atol=1e-4)
    ours.to(torch.float64), ref.to(torch.float64)  # new memory for every weight: stacked again at the next step
    torch.testing.assert_close(_decode(ours, ids).logits, _decode(ref, ids).logits, rtol=1e-6, atol=1e-6)
    ours.to(torch.float32), ref.to(torch.float32)
    state = {k: v.clone() * 0.5 for k, v in ref.state_dict().items()}
    ref.load_state_dict(state)
    ours.load_state_dict(state, assign=True)
    torch.testing.assert_close(_decode(ours, ids).logits, _decode(ref, ids).logits, rtol=1e-4, atol=1e-4)


def test_hooked_or_replaced_projections_run_themselves():
    from parity import model_pair

    _, ours = model_pair("mistral", attn="sdpa")
    seen = []
    ours.model.layers[0].self_attn.k_proj.register_forward_hook(lambda *args: seen.append(1))
    plain = torch.nn.Linear(32, 48, bias=False)
    plain.load_state_dict(ours.model.layers[1].mlp.up_proj.state_dict())
    ours.model.layers[1].mlp.up_proj = plain
    _decode(ours, torch.randint(1, 97, (1, 5)), steps=3)
    assert len(seen) == 3  # prompt and both decode steps
    gate = ours.model.layers[1].mlp.gate_proj.weight
    assert gate.untyped_storage().data_ptr() != plain.weight.untyped_storage().data_ptr()


@pytest.mark.slow
def test_decode_step_under_torch_compile():
    """Inductor lowers oneDNN's product only for weights it packed itself: compiled code keeps F.linear."""
    from parity import model_pair

    _, ours = model_pair("mistral", attn="sdpa", num_hidden_layers=1)  # one layer: compiling three costs 3x
    ids = torch.randint(1, 97, (2, 1))
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(ours)(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)
