"""flash_attention_2 and flex_attention against transformers' sdpa on the same weights, and packed rows (several
sequences in one row, restarting position_ids) against each sequence run alone."""

import logging

import pytest
import torch

import maestrale
from maestrale.models import attention
from parity import model_pair

FULL, SLIDE = "full_attention", "sliding_attention"
BACKENDS = ["flash_attention_2", "flex_attention"]
CASES = {  # windows shorter than the sequences, grouped-query heads, mixed layer types
    "mistral-window4": ("mistral", {"sliding_window": 4}),
    "ministral-mixed": ("ministral", {"sliding_window": 3, "layer_types": [FULL, SLIDE, SLIDE]}),
    "phi3-window5": ("phi3", {"sliding_window": 5}),
}


def pair(case: str, backend: str, **extra):
    family, overrides = CASES[case]
    ref, ours = model_pair(family, "ForCausalLM", attn="sdpa", pad_token_id=0, **overrides, **extra)
    ours.set_attn_implementation(backend)
    assert ours.config._attn_implementation == backend
    return ref, ours


def padded_batch(padding: str, seq_len: int = 11):
    torch.manual_seed(1)
    ids = torch.randint(1, 97, (2, seq_len))
    mask = torch.ones_like(ids)
    if padding == "left":
        mask[0, :3] = 0
    else:
        mask[0, -3:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("padding", ["left", "right"])
def test_logits_hidden_states_and_loss_match_transformers(backend, case, padding, monkeypatch):
    ref, ours = pair(case, backend)
    flex_calls = []
    kernel = attention._flex_kernel("cpu")
    spy = lambda *args, **kwargs: flex_calls.append(1) or kernel(*args, **kwargs)  # noqa: E731
    monkeypatch.setattr(attention, "_flex_kernel", lambda device: spy)
    ids, mask = padded_batch(padding)
    labels = ids.masked_fill(mask == 0, -100)
    kwargs = dict(attention_mask=mask, labels=labels, output_hidden_states=True)
    with torch.no_grad():
        expected, actual = ref(ids, **kwargs), ours(ids, **kwargs)
    real = mask.bool()
    close(actual.logits[real], expected.logits[real])
    for a, e in zip(actual.hidden_states, expected.hidden_states, strict=True):
        close(a[real], e[real])
    close(actual.loss, expected.loss)
    with torch.no_grad():  # no mask: the plain causal path
        close(ours(ids).logits, ref(ids).logits)
    assert len(flex_calls) == (2 * len(ref.model.layers) if backend == "flex_attention" else 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_transformers(backend):
    ref, ours = pair("ministral-mixed", backend)
    ref.train(), ours.train()
    ids, mask = padded_batch("left")
    labels = ids.masked_fill(mask == 0, -100)
    ref(ids, attention_mask=mask, labels=labels).loss.backward()
    ours(ids, attention_mask=mask, labels=labels).loss.backward()
    theirs = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        close(p.grad, theirs[name].grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["mistral-window4", "ministral-mixed"])
def test_cached_decoding_matches_transformers(backend, case):
    """A left-padded prefill, then one token at a time long after the window has rolled over."""
    ref, ours = pair(case, backend)
    ids, mask = padded_batch("left", seq_len=14)
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask, position_ids=position).logits
        out = ours(ids[:, :6], attention_mask=mask[:, :6], position_ids=position[:, :6], use_cache=True)
        steps = [out.logits]
        for t in range(6, ids.shape[1]):
            out = ours(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=position[:, t:t + 1],
                       past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    real = mask.bool()
    close(torch.cat(steps, 1)[real], expected[real])


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_within_its_tolerance(backend):
    """bfloat16 rounding moves these logits by ~0.2: ours stay as close to the float32 logits as transformers'."""
    ref, ours = pair("mistral-window4", backend)
    ids, mask = padded_batch("left")
    real = mask.bool()
    with torch.no_grad():
        exact = ref(ids, attention_mask=mask).logits[real]
        ref.to(torch.bfloat16), ours.to(torch.bfloat16)
        expected, actual = ref(ids, attention_mask=mask).logits[real], ours(ids, attention_mask=mask).logits[real]
    assert actual.dtype == torch.bfloat16
    assert (actual.float() - exact).abs().max() <= 1.5 * (expected.float() - exact).abs().max()


LENGTHS = [5, 9, 7]  # each longer than the windows, so the windows and the boundaries both cut


def packed(flash_kwargs: bool = False):
    from transformers import DataCollatorWithFlattening

    torch.manual_seed(2)
    sequences = [torch.randint(1, 97, (n,)).tolist() for n in LENGTHS]
    collate = DataCollatorWithFlattening(return_tensors="pt", return_flash_attn_kwargs=flash_kwargs)
    return sequences, collate([{"input_ids": s} for s in sequences])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["mistral-window4", "ministral-mixed"])
@pytest.mark.parametrize("flash_kwargs", [False, True], ids=["position_ids", "cu_seq_lens"])
def test_packed_row_gives_each_sequence_alone(backend, case, flash_kwargs):
    ref, ours = pair(case, backend)
    sequences, batch = packed(flash_kwargs)
    if flash_kwargs:  # position_ids still carry the rotary positions; the boundaries come from cu_seq_lens
        assert batch["cu_seq_lens_q"].tolist() == [0, 5, 14, 21] and batch["max_length_q"] == max(LENGTHS)
    assert batch["input_ids"].shape == (1, sum(LENGTHS)) and (batch["labels"] == -100).sum() == len(LENGTHS)
    with torch.no_grad():
        out = ours(**batch)
        alone = [ref(torch.tensor([s]), labels=torch.tensor([s])) for s in sequences]
    starts = [0, *torch.tensor(LENGTHS).cumsum(0).tolist()]
    for a, b, run in zip(starts, starts[1:], alone):
        close(out.logits[0, a:b], run.logits[0])
    # The loss ignores the boundaries: the mean over every sequence's own next-token predictions.
    predictions = torch.tensor(LENGTHS) - 1
    close(out.loss, sum(r.loss * n for r, n in zip(alone, predictions)) / predictions.sum())


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_rows_match_transformers_and_train(backend):
    """transformers' sdpa reads packed position_ids through its masks on CPU without a cache: logits, loss and
    gradients equal; a batch of two packed rows packs each row on its own."""
    ref, ours = pair("ministral-mixed", backend)
    _, batch = packed()
    two = dict(input_ids=torch.cat([batch["input_ids"], batch["input_ids"].flip(-1)]),
               position_ids=batch["position_ids"].expand(2, -1))
    with torch.no_grad():
        close(ours(**two, use_cache=False).logits, ref(**two, use_cache=False).logits)
    ref.train(), ours.train()
    ref(**batch, use_cache=False).loss.backward()  # with a cache, transformers' sdpa attends across sequences
    ours(**batch).loss.backward()
    theirs = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        close(p.grad, theirs[name].grad)


def test_packed_errors_name_the_option():
    _, ours = pair("mistral-window4", "flash_attention_2")
    _, batch = packed(flash_kwargs=True)
    two = {k: torch.cat([batch[k]] * 2) for k in ("input_ids", "labels")}
    with pytest.raises(ValueError, match=r"cu_seq_lens_q/cu_seq_lens_k describe one packed row, but the batch has 2"):
        ours(**two, cu_seq_lens_q=batch["cu_seq_lens_q"], cu_seq_lens_k=batch["cu_seq_lens_k"])
    with pytest.raises(ValueError, match="cu_seq_lens_q and cu_seq_lens_k differ"):
        ours(batch["input_ids"], cu_seq_lens_q=batch["cu_seq_lens_q"], cu_seq_lens_k=torch.tensor([0, 21]))
    with pytest.raises(ValueError, match=r"cu_seq_lens_q must run from 0 to the row's 21 tokens"):
        ours(batch["input_ids"], cu_seq_lens_q=torch.tensor([0, 5, 20]))


def test_flex_attention_refuses_attention_dropout():
    _, ours = pair("phi3-window5", "flex_attention", attention_dropout=0.1)
    ours.train()
    with pytest.raises(ValueError, match=r"has no attention dropout, but config.attention_dropout=0.1: set it to 0.0"):
        ours(torch.tensor([[1, 2, 3]]))


def test_backend_names_everywhere(tmp_path, caplog):
    _, ours = pair("mistral-window4", "eager")
    ours.save_pretrained(tmp_path)
    for backend in ["eager", "sdpa", *BACKENDS]:
        loaded = maestrale.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=backend)
        built = maestrale.AutoModelForCausalLM.from_config(ours.config, attn_implementation=backend)
        assert loaded.config._attn_implementation == built.config._attn_implementation == backend
    accepted = r"use one of \['eager', 'sdpa', 'flash_attention_2', 'flex_attention'\]"
    for call in (lambda: ours.set_attn_implementation("flash_attention_3"),
                 lambda: maestrale.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="flash"),
                 lambda: maestrale.AutoModelForCausalLM.from_config(ours.config, attn_implementation="fast")):
        with pytest.raises(ValueError, match=r"attn_implementation='\w+' is not supported; " + accepted):
            call()
    attention._note_once.cache_clear()
    ours.set_attn_implementation("flash_attention_2")
    with caplog.at_level(logging.WARNING, logger="maestrale.models.attention"), torch.no_grad():
        ours(torch.tensor([[1, 2, 3]]))
        ours(torch.tensor([[1, 2, 3]]))
    notes = [r.getMessage() for r in caplog.records]
    assert notes == ["flash-attn runs on CUDA only: attn_implementation='flash_attention_2' on cpu runs on torch's "
                     "SDPA with the same mask"]


def test_flash_attn_refuses_float32(monkeypatch):
    """Where flash-attn would run (CUDA, installed), float32 is refused before any kernel is called."""
    monkeypatch.setattr(attention, "_flash_attn_usable", lambda q: True)
    _, ours = pair("mistral-window4", "flash_attention_2")
    with pytest.raises(ValueError, match=r"flash-attn, which computes in float16 or bfloat16 only, and this model "
                                         r"runs in torch.float32 on CUDA: load it with dtype=torch.bfloat16"):
        ours(torch.tensor([[1, 2, 3]]))


def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout, softmax_scale, causal, window_size):
    """flash-attn's documented semantics, one sequence at a time: causal aligned to the bottom right, a query at
    row i of a sequence of Lq queries and Lk keys sees keys i + Lk - Lq - window_size[0] .. i + Lk - Lq."""
    assert causal and dropout == 0.0 and q.dtype == torch.float16
    out = []
    for a, b, c, d in zip(cu_q, cu_q[1:], cu_k, cu_k[1:]):
        i, j = torch.arange(b - a)[:, None] + (d - c) - (b - a), torch.arange(d - c)[None]
        allowed = (j <= i) & ((j >= i - window_size[0]) if window_size[0] >= 0 else True)
        qs, ks, vs = (t.transpose(0, 1) for t in (q[a:b], k[c:d], v[c:d]))
        out.append(torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=allowed, scale=softmax_scale, enable_gqa=True).transpose(0, 1))
    return torch.cat(out)


def _reference_dense(q, k, v, dropout, softmax_scale, causal, window_size):
    b, s, _, _ = q.shape
    cu = torch.arange(b + 1) * s
    flat = (t.flatten(0, 1) for t in (q, k, v))
    return _reference_varlen(*flat, cu, cu * k.shape[1] // s, s, k.shape[1], dropout, softmax_scale, causal,
                             window_size).view_as(q)


@pytest.mark.parametrize("inputs", ["plain", "left-padded-decode", "packed"])
def test_flash_attn_call_bookkeeping(inputs, monkeypatch):
    """The flash-attn path (CUDA only) on CPU, with a stand-in for its two functions: what it cuts out of padding
    and packed rows, and puts back, gives the tokens their sdpa numbers."""
    import importlib.machinery
    import sys
    import types

    fake = types.ModuleType("flash_attn")
    fake.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)  # others ask importlib about flash_attn
    fake.flash_attn_func, fake.flash_attn_varlen_func = _reference_dense, _reference_varlen
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    monkeypatch.setattr(attention, "_flash_attn_installed", lambda: True)
    monkeypatch.setattr(attention, "_flash_attn_usable", lambda q: True)
    _, ours = pair("ministral-mixed", "sdpa")
    ours.half()  # flash-attn's precision, with 3 more bits than bfloat16: errors of the bookkeeping stand out

    def run(backend):
        ours.set_attn_implementation(backend)
        with torch.no_grad():
            if inputs == "packed":
                _, batch = packed()
                return ours(batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
            if inputs == "plain":
                return ours(torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(3))).logits
            ids, mask = padded_batch("left", seq_len=12)
            out = ours(ids[:, :7], attention_mask=mask[:, :7], use_cache=True)
            steps = [out.logits]
            for t in range(7, 12):
                out = ours(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=out.past_key_values)
                steps.append(out.logits)
            return torch.cat(steps, 1)[mask.bool()]

    expected, actual = run("sdpa").float(), run("flash_attention_2").float()
    torch.testing.assert_close(actual, expected, atol=0.02, rtol=0.01)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA: run on a GPU machine")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_cuda_bfloat16_matches_sdpa_and_packed_rows_match_alone(backend, case):
    """On CUDA in bfloat16 (FlexAttention compiled; flash-attn when installed): padded logits and gradients beside
    transformers' sdpa within bfloat16's error, a packed row of three sequences equal to each run alone, cached
    decoding equal to the full forward. The cases run one after another on the same compiled kernel."""
    ref, ours = pair(case, backend, hidden_size=64)  # head_dim 16: compiled FlexAttention's smallest
    ref, ours = ref.to("cuda", torch.bfloat16), ours.to("cuda", torch.bfloat16)
    ids, mask = (t.cuda() for t in padded_batch("left"))
    real = mask.bool()
    with torch.no_grad():
        expected, actual = ref(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits
    torch.testing.assert_close(actual[real].float(), expected[real].float(), atol=0.1, rtol=0.05)
    torch.manual_seed(2)
    parts = [torch.randint(1, 97, (n,), device="cuda") for n in (5, 9, 4)]
    packed = torch.cat(parts)[None]
    positions = torch.cat([torch.arange(len(p), device="cuda") for p in parts])[None]
    with torch.no_grad():
        logits = ours(packed, position_ids=positions).logits[0]
        alone = torch.cat([ours(p[None]).logits[0] for p in parts])
    torch.testing.assert_close(logits.float(), alone.float(), atol=0.05, rtol=0.05)
    with torch.no_grad():  # token by token through the cache (query offsets move each step) = one full forward
        full = ours(ids[1:]).logits[0]
        out = ours(ids[1:, :4], use_cache=True)
        steps = [out.logits[0]]
        for t in range(4, ids.shape[1]):
            out = ours(ids[1:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits[0])
    torch.testing.assert_close(torch.cat(steps).float(), full.float(), atol=0.1, rtol=0.05)
    ours.train()
    ours(ids, attention_mask=mask, labels=ids.masked_fill(~real, -100)).loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ours.parameters() if p.requires_grad)
