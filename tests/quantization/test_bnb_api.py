"""A quantized model as transformers exposes it: memory footprint, is_loaded_in_4bit/8bit, dequantize(), .to();
generate() with every strategy and streamers (also through the static decoder); training through a frozen
quantized base with gradients reaching the head and an added adapter, with gradient checkpointing."""

import pytest
import torch
from torch import nn

from quantized import OPTIONS, PROMPT, load_both


def test_memory_footprint_and_flags(family_folder):
    ref, ours = load_both(family_folder("mistral"), OPTIONS["nf4"])
    params = ours.get_memory_footprint(return_buffers=False)
    assert params == ref.get_memory_footprint(return_buffers=False)
    buffers = sum(b.numel() * b.element_size() for b in ours.buffers())
    assert ours.get_memory_footprint() == params + buffers
    linears = [m for m in ours.modules() if type(m).__name__ == "Linear4bit"]
    packed = sum(m.in_features * m.out_features for m in linears) // 2  # two 4-bit values per byte
    float_bytes = sum(p.numel() * 4 for n, p in ours.named_parameters() if not n.endswith(".weight")
                      or type(ours.get_submodule(n.removesuffix(".weight"))).__name__ != "Linear4bit")
    assert params == packed + float_bytes
    assert ours.is_loaded_in_4bit and not ours.is_loaded_in_8bit and ours.is_quantized
    _, eight = load_both(family_folder("mistral"), OPTIONS["int8"])
    assert eight.is_loaded_in_8bit and not eight.is_loaded_in_4bit


@pytest.mark.parametrize("option", ["nf4-double", "int8"])
def test_dequantize_like_transformers(option, family_folder):
    ref, ours = load_both(family_folder("phi3"), OPTIONS[option])
    with torch.no_grad():  # in training mode, which bitsandbytes never repacks for (its CPU-packed layout, AVX512-BF16
        quantized = ours.train()(PROMPT).logits  # machines) and runs in float32 like the dequantized layers
    ours.eval()
    assert ref.dequantize() is not None and ours.dequantize() is ours
    assert not ours.is_quantized and not ours.is_loaded_in_4bit and not hasattr(ours.config, "quantization_config")
    assert all(type(m).__name__ not in ("Linear4bit", "Linear8bitLt") for m in ours.modules())
    a, b = ref.state_dict(), ours.state_dict()
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    with torch.no_grad():
        torch.testing.assert_close(ours(PROMPT).logits, ref(PROMPT).logits, rtol=1e-5, atol=1e-5)
        if option == "nf4-double":  # dequantized 4-bit weights give the quantized layers' products
            torch.testing.assert_close(ours(PROMPT).logits, quantized, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="the model is not quantized"):
        ours.dequantize()


def test_to_moves_but_does_not_cast(family_folder):
    ref, ours = load_both(family_folder("mistral"), OPTIONS["nf4"])
    with torch.no_grad():
        before = ours(PROMPT).logits
        assert ours.to("cpu") is ours
        torch.testing.assert_close(ours(PROMPT).logits, before, rtol=0, atol=0)
    for cast in (lambda m: m.to(torch.float16), lambda m: m.to("cpu", torch.bfloat16), lambda m: m.to(dtype=torch.float32),
                 lambda m: m.half(), lambda m: m.float()):
        with pytest.raises(ValueError):
            cast(ref)
        with pytest.raises(ValueError, match=r"MistralForCausalLM\.to\(dtype\): a quantized model cannot change its "
                                             r"dtype; load it again with from_pretrained\(\.\.\., dtype=\.\.\.\)"):
            cast(ours)


class Collect:
    """A streamer that keeps what generate() puts."""

    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        self.ended = True


@pytest.mark.parametrize("option", ["nf4", "int8"])
def test_generate_strategies_and_streamer(option, family_folder):
    ref, ours = load_both(family_folder("mixtral"), OPTIONS[option])
    ids = PROMPT[:1]
    for kwargs in (dict(do_sample=True, temperature=0.9, top_k=20, num_return_sequences=2),
                   dict(num_beams=3, num_return_sequences=2), dict(do_sample=False)):
        torch.manual_seed(3)
        a = ref.generate(ids, max_new_tokens=8, pad_token_id=0, **kwargs)
        torch.manual_seed(3)
        b = ours.generate(ids, max_new_tokens=8, pad_token_id=0, **kwargs)
        assert torch.equal(a, b), kwargs
    streamer = Collect()
    out = ours.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, streamer=streamer)
    assert streamer.ended and torch.equal(torch.cat([c.reshape(-1) for c in streamer.chunks]), out[0])


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("family, option", [("mistral", "nf4-double"), ("phi3", "fp4"), ("mixtral", "nf4"),
                                            ("ministral", "int8")])
def test_static_decoder_runs_quantized_layers(family, option, device, family_folder):
    """The engine's step (eager on CPU, a CUDA graph on CUDA) asks each quantized layer for its product: the same
    tokens as the reference path. On CUDA, 8-bit models keep the reference path."""
    _, ours = load_both(family_folder(family), OPTIONS[option], device_map=device)
    prompt = PROMPT.to(device)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    ref = ours.generate(prompt, cache_implementation="dynamic", **kwargs)
    if device == "cuda" and option == "int8":
        assert torch.equal(ours.generate(prompt, **kwargs).sequences, ref.sequences)
        assert "_static_decoder" not in ours.__dict__
        with pytest.raises(ValueError, match="8-bit bitsandbytes layers on CUDA"):
            ours.generate(prompt, cache_implementation="static", **kwargs)
        return
    fast = ours.generate(prompt, cache_implementation="static", **kwargs)
    assert "_static_decoder" in ours.__dict__
    assert torch.equal(ref.sequences, fast.sequences)
    for a, b in zip(ref.logits, fast.logits):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def add_adapters(model, seed: int) -> list[nn.Parameter]:
    """A rank-4 adapter beside every q_proj (what QLoRA adds), the same in both libraries for the same seed."""
    torch.manual_seed(seed)
    params = []
    for layer in model.model.layers:
        proj = layer.self_attn.q_proj
        proj.adapter = nn.Sequential(nn.Linear(proj.in_features, 4, bias=False), nn.Linear(4, proj.out_features,
                                                                                             bias=False))
        proj.register_forward_hook(lambda module, args, out: out + module.adapter(args[0]))
        params += list(proj.adapter.parameters())
    return params


@pytest.mark.parametrize("option", ["nf4-double", "int8"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_through_a_quantized_base(option, checkpointing, family_folder):
    ref, ours = load_both(family_folder("mistral"), OPTIONS[option])
    ref_adapters, our_adapters = add_adapters(ref, 5), add_adapters(ours, 5)
    for model in (ref, ours):
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
    labels = PROMPT.clone()
    ref(PROMPT, labels=labels).loss.backward()
    ours(PROMPT, labels=labels).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in our_adapters + [ours.lm_head.weight])
    assert all(p.grad is None for m in ours.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")
               for p in m.parameters(recurse=False))
    for a, b in zip(ref_adapters, our_adapters):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.lm_head.weight.grad, ref.lm_head.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.model.embed_tokens.weight.grad, ref.model.embed_tokens.weight.grad,
                               rtol=1e-4, atol=1e-5)
