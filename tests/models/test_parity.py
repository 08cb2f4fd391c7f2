"""Every family against transformers on the same random weights: logits, hidden states, attentions, losses."""

import pytest
import torch

from parity import model_pair

FULL, SLIDE = "full_attention", "sliding_attention"
LONGROPE = {"type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6], "long_factor": [2.0, 3.0, 5.0, 9.0]}

CASES = {
    "mistral-gqa": ("mistral", {}),
    "mistral-mha": ("mistral", {"num_key_value_heads": 4}),
    "mistral-mqa-window4": ("mistral", {"num_key_value_heads": 1, "sliding_window": 4}),
    "mistral-linear-rope-window7": ("mistral", {"sliding_window": 7, "rope_scaling": {"type": "linear", "factor": 2.0}}),
    "mistral-dynamic-rope": ("mistral", {"max_position_embeddings": 12, "rope_scaling": {"type": "dynamic", "factor": 2.0}}),
    "mistral-yarn": ("mistral", {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}}),
    "ministral-mixed": ("ministral", {"sliding_window": 5, "layer_types": [FULL, SLIDE, SLIDE]}),
    "ministral-default-types": ("ministral", {"sliding_window": 6}),
    "mixtral-4x2": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "mixtral-8x1-window6": ("mixtral", {"num_local_experts": 8, "num_experts_per_tok": 1, "sliding_window": 6}),
    "phi3": ("phi3", {}),
    "phi3-window8": ("phi3", {"sliding_window": 8, "num_key_value_heads": 2}),
    # original_max_position_embeddings 16: the 10-token batches stay short, the 24-token ones switch to long factors.
    "phi3-longrope": ("phi3", {"max_position_embeddings": 64, "original_max_position_embeddings": 16,
                               "rope_scaling": LONGROPE}),
}


def batch(seq_len: int, padding: str, vocab: int = 97):
    ids = torch.randint(1, vocab, (3, seq_len))
    mask = torch.ones_like(ids)
    if padding == "left":
        mask[0, :3], mask[2, :1] = 0, 0
    elif padding == "right":
        mask[0, -3:], mask[2, -1:] = 0, 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def assert_close(actual, expected, where=None, atol=1e-5):
    if where is not None:
        actual, expected = actual[where], expected[where]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("seq_len", [10, 24])
def test_causal_lm_matches_transformers(case, padding, seq_len):
    family, overrides = CASES[case]
    ref, ours = model_pair(family, "ForCausalLM", attn="eager", pad_token_id=0, **overrides)
    ids, mask = batch(seq_len, padding)
    labels = ids.masked_fill(mask == 0, -100)
    moe = family == "mixtral"
    kwargs = dict(attention_mask=mask, labels=labels, output_hidden_states=True, output_attentions=True,
                  **({"output_router_logits": True} if moe else {}))
    with torch.no_grad():
        expected, actual = ref(ids, **kwargs), ours(ids, **kwargs)
    real = mask.bool()
    assert_close(actual.logits, expected.logits, real)
    assert len(actual.hidden_states) == len(expected.hidden_states) == ref.config.num_hidden_layers + 1
    for a, e in zip(actual.hidden_states, expected.hidden_states):
        assert_close(a, e, real)
    assert len(actual.attentions) == ref.config.num_hidden_layers
    for a, e in zip(actual.attentions, expected.attentions):
        assert a.shape == e.shape
        assert_close(a.transpose(1, 2), e.transpose(1, 2), real)  # rows of real queries
    assert_close(actual.loss, expected.loss)
    if moe:
        assert_close(actual.aux_loss, expected.aux_loss)
        for a, e in zip(actual.router_logits, expected.router_logits):
            assert_close(a, e, real.reshape(-1))


@pytest.mark.parametrize("case", ["mistral-gqa", "mistral-mqa-window4", "ministral-mixed", "mixtral-4x2", "phi3-window8"])
def test_sdpa_matches_eager_reference(case):
    family, overrides = CASES[case]
    ref, ours = model_pair(family, "ForCausalLM", attn="sdpa", pad_token_id=0, **overrides)
    ids, mask = batch(20, "left")
    with torch.no_grad():
        expected, actual = ref(ids, attention_mask=mask), ours(ids, attention_mask=mask)
    assert_close(actual.logits, expected.logits, mask.bool())
    with torch.no_grad():  # no mask at all: the causal fast path
        assert_close(ours(ids).logits, ref(ids).logits)


@pytest.mark.parametrize("case", ["mistral-gqa", "mistral-mqa-window4", "ministral-mixed", "mixtral-8x1-window6",
                                  "phi3-window8"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_cached_decoding_matches_full_forward(case, attn):
    """Prefill then one token at a time, long after the sliding window has rolled over."""
    family, overrides = CASES[case]
    ref, ours = model_pair(family, "ForCausalLM", attn=attn, pad_token_id=0, **overrides)
    ids, mask = batch(22, "left")
    with torch.no_grad():
        full = ref(ids, attention_mask=mask).logits
        prefill = 5
        out = ours(ids[:, :prefill], attention_mask=mask[:, :prefill], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        position = mask.cumsum(-1) - 1
        for t in range(prefill, ids.shape[1]):
            out = ours(ids[:, t:t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache, use_cache=True,
                       position_ids=position[:, t:t + 1])
            steps.append(out.logits)
        # the prefill ran with default positions: compare it only on the row without left padding
    stepped = torch.cat(steps, dim=1)
    assert_close(stepped[1], full[1])
    window = overrides.get("sliding_window")
    if window:  # the rolling cache holds window - 1 tokens per sliding layer, never more
        sliding = [layer for layer in cache.layers if layer.window is not None]
        assert sliding and all(layer.kept == window - 1 for layer in sliding)


def test_left_padded_decoding_with_position_ids_matches_transformers():
    ref, ours = model_pair("mistral", "ForCausalLM", attn="sdpa", pad_token_id=0, sliding_window=4)
    ids, mask = batch(16, "left")
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask, position_ids=position).logits
        out = ours(ids[:, :6], attention_mask=mask[:, :6], position_ids=position[:, :6])
        steps = [out.logits]
        for t in range(6, 16):
            out = ours(ids[:, t:t + 1], attention_mask=mask[:, : t + 1], position_ids=position[:, t:t + 1],
                       past_key_values=out.past_key_values)
            steps.append(out.logits)
    assert_close(torch.cat(steps, 1), expected, mask.bool())


@pytest.mark.parametrize("family", ["mistral", "ministral", "mixtral", "phi3"])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_sequence_classification(family, padding):
    overrides = {"num_local_experts": 4} if family == "mixtral" else {}
    ids, mask = batch(12, padding)
    for num_labels, labels in [(3, torch.tensor([0, 2, 1])), (1, torch.randn(3)), (2, torch.rand(3, 2))]:
        ref, ours = model_pair(family, "ForSequenceClassification", pad_token_id=0, num_labels=num_labels, **overrides)
        with torch.no_grad():
            expected = ref(ids, attention_mask=mask, labels=labels)
            actual = ours(ids, attention_mask=mask, labels=labels)
        assert actual.logits.shape == (3, num_labels)
        assert_close(actual.logits, expected.logits)
        assert_close(actual.loss, expected.loss)


@pytest.mark.parametrize("family", ["mistral", "ministral", "mixtral", "phi3"])
def test_token_classification_and_question_answering(family):
    overrides = {"num_local_experts": 4} if family == "mixtral" else {}
    ids, mask = batch(12, "right")
    ref, ours = model_pair(family, "ForTokenClassification", pad_token_id=0, num_labels=5, **overrides)
    labels = torch.randint(0, 5, ids.shape).masked_fill(mask == 0, -100)
    with torch.no_grad():
        expected, actual = ref(ids, attention_mask=mask, labels=labels), ours(ids, attention_mask=mask, labels=labels)
    assert_close(actual.logits, expected.logits)
    assert_close(actual.loss, expected.loss)

    start, end = torch.tensor([1, 4, 30]), torch.tensor([3, 8, 2])  # 30 is out of range: ignored
    if family == "phi3":
        # transformers has no Phi3ForQuestionAnswering: rebuild the head on its base model.
        return _phi3_question_answering(ids, mask, start, end)
    ref, ours = model_pair(family, "ForQuestionAnswering", pad_token_id=0, **overrides)
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask, start_positions=start, end_positions=end)
        actual = ours(ids, attention_mask=mask, start_positions=start, end_positions=end)
    for name in ("start_logits", "end_logits", "loss"):
        assert_close(getattr(actual, name), getattr(expected, name))


def _phi3_question_answering(ids, mask, start, end):
    import maestrale

    ref, base = model_pair("phi3", "Model", pad_token_id=0)
    ours = maestrale.Phi3ForQuestionAnswering(base.config).eval()
    ours.model.load_state_dict(ref.state_dict())
    with torch.no_grad():
        hidden = ref(ids, attention_mask=mask).last_hidden_state
        start_logits, end_logits = ours.qa_outputs(hidden).unbind(-1)
        actual = ours(ids, attention_mask=mask, start_positions=start, end_positions=end)
    assert_close(actual.start_logits, start_logits)
    assert_close(actual.end_logits, end_logits)
    seq_len = ids.shape[1]
    expected_loss = sum(
        torch.nn.functional.cross_entropy(logits, positions.clamp(0, seq_len), ignore_index=seq_len)
        for logits, positions in ((start_logits, start), (end_logits, end))
    ) / 2
    assert_close(actual.loss, expected_loss)


@pytest.mark.parametrize("family", ["mistral", "mixtral"])
def test_base_model_and_inputs_embeds(family):
    overrides = {"num_local_experts": 4} if family == "mixtral" else {}
    ref, ours = model_pair(family, "Model", **overrides)
    ids, mask = batch(9, "right")
    embeds = ref.embed_tokens(ids).detach()
    with torch.no_grad():
        expected = ref(inputs_embeds=embeds, attention_mask=mask)
        actual = ours(inputs_embeds=embeds, attention_mask=mask)
    assert_close(actual.last_hidden_state, expected.last_hidden_state, mask.bool())
    assert type(actual).__name__ == type(expected).__name__


@pytest.mark.parametrize("keep", [1, 3, torch.tensor([0, 4, 7])])
def test_logits_to_keep(keep):
    ref, ours = model_pair("mistral")
    ids, _ = batch(9, "none")
    with torch.no_grad():
        expected, actual = ref(ids, logits_to_keep=keep).logits, ours(ids, logits_to_keep=keep).logits
    assert actual.shape == expected.shape
    assert_close(actual, expected)


def test_outputs_by_attribute_key_and_tuple():
    _, ours = model_pair("mixtral", num_local_experts=4)
    ids, _ = batch(5, "none")
    out = ours(ids, labels=ids, output_router_logits=True)
    assert list(out.keys()) == ["loss", "aux_loss", "logits", "past_key_values", "router_logits"]
    assert out["logits"] is out.logits is out[2]
    loss, aux, logits, cache, router = out.to_tuple()
    assert torch.equal(loss, out.loss) and len(router) == 3
    as_tuple = ours(ids, labels=ids, output_router_logits=True, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[2], out.logits)
    assert torch.allclose(out.loss, ours(ids, labels=ids).loss + 0.001 * out.aux_loss)
