"""Backward passes equal transformers', with and without gradient checkpointing; training lowers the loss."""

import pytest
import torch

from parity import model_pair

CASES = {
    "mistral-window": ("mistral", {"sliding_window": 4}),
    "ministral": ("ministral", {"sliding_window": 4, "layer_types": ["full_attention", "sliding_attention"] * 1
                                + ["sliding_attention"]}),
    "mixtral": ("mixtral", {"num_local_experts": 4, "output_router_logits": True}),
    "phi3": ("phi3", {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_match_transformers(case, checkpointing):
    family, overrides = CASES[case]
    ref, ours = model_pair(family, "ForCausalLM", attn="sdpa", pad_token_id=0, **overrides)
    ref.train(), ours.train()
    if checkpointing:
        ref.gradient_checkpointing_enable()
        ours.gradient_checkpointing_enable()
        assert ours.is_gradient_checkpointing
    ids = torch.randint(1, 97, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    labels = ids.masked_fill(mask == 0, -100)
    ref(ids, attention_mask=mask, labels=labels).loss.backward()
    ours(ids, attention_mask=mask, labels=labels).loss.backward()
    ref_grads = dict(ref.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, ref_grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_gradient_checkpointing_changes_nothing_and_turns_off():
    _, ours = model_pair("mistral", "ForCausalLM", sliding_window=4)
    ours.train()
    ids = torch.randint(1, 97, (2, 10))
    ours(ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in ours.named_parameters()}
    ours.zero_grad()
    ours.gradient_checkpointing_enable()
    out = ours(ids, labels=ids)
    assert out.past_key_values is None  # no cache while recomputing layers
    out.loss.backward()
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, plain[name], msg=name)
    ours.gradient_checkpointing_disable()
    assert not ours.is_gradient_checkpointing


@pytest.mark.parametrize("family", ["mistral", "mixtral", "phi3"])
def test_a_few_optimizer_steps_lower_the_loss(family):
    overrides = {"num_local_experts": 4, "router_jitter_noise": 0.1} if family == "mixtral" else {}
    if family == "phi3":
        overrides = {"resid_pdrop": 0.1, "attention_dropout": 0.1}
    _, ours = model_pair(family, "ForCausalLM", **overrides)
    ours.train()
    ids = torch.randint(1, 97, (4, 16))
    optimizer = torch.optim.AdamW(ours.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = ours(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_dropout_only_in_training():
    _, ours = model_pair("phi3", "ForCausalLM", resid_pdrop=0.5, attention_dropout=0.5)
    ids = torch.randint(1, 97, (1, 8))
    ours.eval()
    assert torch.equal(ours(ids).logits, ours(ids).logits)
    ours.train()
    assert not torch.equal(ours(ids).logits, ours(ids).logits)
