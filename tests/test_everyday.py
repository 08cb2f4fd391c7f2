"""Everyday transformers code, run unchanged with transformers and with maestrale on the same weights and compared.

Each snippet is a function `snippet(lib, env)`: `lib` is the `transformers` or the `maestrale` module, `env` holds the
shared local folders (a model with SmolLM2's tokenizer, a 3-label classifier, one causal LM per family) and a scratch
folder of its own. It returns plain values (text, numbers, tensors, lists, dicts),
which must agree. To cover another piece of everyday code, write it once as a snippet below, against `lib`.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers

import maestrale
from parity import model_pair

SNIPPETS = {}


def snippet(fn):
    SNIPPETS[fn.__name__] = fn
    return fn


PROMPT = "The quick brown fox"
CHAT = [{"role": "user", "content": "Name a colour."}]


def load(lib, env, task="AutoModelForCausalLM", folder=None, **kwargs):
    return getattr(lib, task).from_pretrained(folder or env.folder, **kwargs)


def tokenizer(lib, env):
    return lib.AutoTokenizer.from_pretrained(env.folder)


# ----- configs -----
@snippet
def config_save_and_reload(lib, env):
    config = lib.AutoConfig.from_pretrained(env.folder)
    config.save_pretrained(env.scratch)
    again = lib.AutoConfig.from_pretrained(env.scratch)
    diff = again.to_diff_dict()
    diff.pop("transformers_version", None)
    return [type(again).__name__, diff, json.loads(json.dumps(again.to_dict()["rope_parameters"]))]


@snippet
def config_edit_fields(lib, env):
    config = lib.AutoConfig.from_pretrained(env.folder)
    config.update({"use_cache": False, "hidden_act": "gelu"})
    config.num_labels = 4
    return [config.use_cache, config.hidden_act, config.num_labels, config.id2label, config.label2id,
            str(config.dtype), config.rope_scaling]


@snippet
def config_unused_kwargs(lib, env):
    config, unused = lib.AutoConfig.from_pretrained(env.folder, return_unused_kwargs=True, foo="bar",
                                                    output_hidden_states=True)
    return [unused, config.output_hidden_states]


# ----- causal LM forward, loss, cache -----
@snippet
def causal_lm_logits_and_loss(lib, env):
    model, tok = load(lib, env), tokenizer(lib, env)
    inputs = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs, labels=inputs["input_ids"])
    return [out.logits, out.loss, str(model.dtype), model.main_input_name, model.num_parameters()]


@snippet
def incremental_decoding_with_cache(lib, env):
    model, tok = load(lib, env), tokenizer(lib, env)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        first = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], past_key_values=first.past_key_values, use_cache=True)
    return [step.logits, step.past_key_values.get_seq_length()]


# ----- generation -----
@snippet
def greedy_generate(lib, env):
    model, tok = load(lib, env), tokenizer(lib, env)
    inputs = tok(PROMPT, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    return [out, tok.decode(out[0], skip_special_tokens=True)]


@snippet
def chat_template_generate(lib, env):
    model, tok = load(lib, env), tokenizer(lib, env)
    inputs = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    return tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@snippet
def batched_generate_left_padding(lib, env):
    model, tok = load(lib, env), tokenizer(lib, env)
    tok.padding_side = "left"
    inputs = tok(["Hi", PROMPT], return_tensors="pt", padding=True)
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    return tok.batch_decode(out, skip_special_tokens=True)


@snippet
def sampled_generate(lib, env):
    model, tok = load(lib, env), tokenizer(lib, env)
    inputs = tok(PROMPT, return_tensors="pt")
    torch.manual_seed(0)
    return model.generate(**inputs, max_new_tokens=6, do_sample=True, top_k=20, temperature=0.8)


@snippet
def beam_search(lib, env):
    model, tok = load(lib, env), tokenizer(lib, env)
    inputs = tok(PROMPT, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False,
                         return_dict_in_generate=True, output_scores=True)
    return [out.sequences, out.sequences_scores]


@snippet
def text_streamer(lib, env):
    model, tok = load(lib, env), tokenizer(lib, env)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        model.generate(**tok(PROMPT, return_tensors="pt"), max_new_tokens=5, do_sample=False,
                       streamer=lib.TextStreamer(tok, skip_prompt=True))
    return printed.getvalue()


# ----- pipeline -----
@snippet
def pipeline_plain_prompt(lib, env):
    pipe = lib.pipeline("text-generation", model=str(env.folder))
    return pipe(PROMPT, max_new_tokens=5, do_sample=False)


@snippet
def pipeline_chat(lib, env):
    pipe = lib.pipeline("text-generation", model=load(lib, env), tokenizer=tokenizer(lib, env))
    return [pipe(CHAT, max_new_tokens=5, do_sample=False), pipe([CHAT, CHAT], max_new_tokens=2, do_sample=False,
                                                               return_full_text=False)]


# ----- classification training -----
@snippet
def classification_training_steps(lib, env):
    model = load(lib, env, "AutoModelForSequenceClassification", env.classifier)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.tensor([[5, 17, 3, 88, 41, 9], [7, 7, 12, 90, 1, 33]])
    losses = []
    for _ in range(3):
        loss = model(ids, labels=torch.tensor([2, 0])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return [losses, model.config.problem_type]


@snippet
def regression_head_from_classifier(lib, env):
    model = load(lib, env, "AutoModelForSequenceClassification", env.classifier, num_labels=1,
                 ignore_mismatched_sizes=True)
    torch.manual_seed(0)
    with torch.no_grad():  # the fresh head: each library draws its own numbers, so set them the same way
        model.score.weight.normal_(0, 0.02)
    out = model(torch.tensor([[5, 17, 3], [7, 7, 12]]), labels=torch.tensor([0.5, -1.0]))
    return [model.config.num_labels, out.logits, out.loss, model.config.problem_type]


@snippet
def adapter_style_grads_with_reentrant_checkpointing(lib, env):
    model = load(lib, env)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    for name, param in model.named_parameters():
        param.requires_grad_("v_proj" in name)
    model.enable_input_require_grads()
    ids = torch.tensor([[5, 17, 3, 88, 41, 9]])
    model(ids, labels=ids).loss.backward()
    return model.get_decoder().layers[0].self_attn.v_proj.weight.grad


@snippet
def every_family_logits_and_greedy(lib, env):
    out = {}
    ids = torch.tensor([[5, 17, 3, 88, 41, 9]])
    for family, folder in env.families.items():
        model = lib.AutoModelForCausalLM.from_pretrained(folder)
        with torch.no_grad():
            logits = model(ids).logits
        out[family] = [type(model).__name__, logits, model.generate(ids, max_new_tokens=4, do_sample=False)]
    return out


# ----- save and load -----
@snippet
def save_and_reload(lib, env):
    model = load(lib, env)
    model.save_pretrained(env.scratch / "saved")
    again = load(lib, env, folder=env.scratch / "saved", use_safetensors=True)
    ids = torch.tensor([[5, 17, 3, 88]])
    with torch.no_grad():
        return [again(ids).logits, sorted(p.name for p in (env.scratch / "saved").iterdir())]


@snippet
def save_a_given_state_dict(lib, env):
    model = load(lib, env)
    state = {name: tensor * 0.5 for name, tensor in model.state_dict().items()}
    model.save_pretrained(env.scratch / "halved", state_dict=state)
    again = load(lib, env, folder=env.scratch / "halved")
    return again.model.norm.weight


@snippet
def model_identity(lib, env):
    model = load(lib, env)
    family = lib.MistralPreTrainedModel
    return [model.name_or_path == str(env.folder), isinstance(model, family), isinstance(model.model, family),
            type(model.get_decoder()).__name__, model.get_input_embeddings().weight.shape]


@snippet
def tokenizer_round_trip(lib, env):
    tok = tokenizer(lib, env)
    ids = tok(PROMPT).input_ids
    tok.save_pretrained(env.scratch / "tok")
    again = lib.AutoTokenizer.from_pretrained(env.scratch / "tok")
    return [ids, again(PROMPT).input_ids, again.decode(ids), again.apply_chat_template(CHAT, tokenize=False)]


# ----- running them -----
@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    ref, _ = model_pair("mistral", "ForSequenceClassification", num_labels=3)
    folder = tmp_path_factory.mktemp("classifier")
    ref.save_pretrained(folder)
    return folder


def assert_same(got, expected, where="output"):
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor), where
        assert got.shape == expected.shape, where
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=where)
    elif isinstance(expected, float):
        assert math.isclose(got, expected, rel_tol=1e-5), (where, got, expected)
    elif isinstance(expected, dict):
        assert set(got) == set(expected), (where, sorted(set(got) ^ set(expected)))
        for key in expected:
            assert_same(got[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(expected), (where, got, expected)
        for i, (a, b) in enumerate(zip(got, expected)):
            assert_same(a, b, f"{where}[{i}]")
    else:
        assert got == expected, (where, got, expected)


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """A small random causal LM of each family, saved by transformers."""
    overrides = {"mistral": dict(sliding_window=4), "mixtral": dict(num_local_experts=4),
                 "ministral": dict(sliding_window=3,
                                   layer_types=["full_attention", "sliding_attention", "full_attention"]),
                 "phi3": dict(pad_token_id=0, eos_token_id=2)}
    folders = {}
    for family, fields in overrides.items():
        ref, _ = model_pair(family, **fields)
        folders[family] = tmp_path_factory.mktemp(family)
        ref.save_pretrained(folders[family])
    return folders


@pytest.mark.parametrize("name", SNIPPETS)
def test_snippet_matches_transformers(name, chat_folder, classifier, families, tmp_path):
    results = []
    for lib in (transformers, maestrale):
        scratch = tmp_path / lib.__name__
        scratch.mkdir()
        torch.manual_seed(0)
        env = SimpleNamespace(folder=Path(chat_folder), classifier=classifier, families=families, scratch=scratch)
        results.append(SNIPPETS[name](lib, env))
    assert_same(results[1], results[0])
