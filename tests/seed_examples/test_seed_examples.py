"""The code examples of the Mistral, Mixtral, Ministral and Phi-3 doc pages (shared/seed-examples), run as written
with `transformers` replaced by `maestrale` and the hub ids by the tiny local folders of conftest.py. Each copy
here says what it changed. Those the docs got wrong either run anyway or stop with an error saying what to change."""

import re
import runpy
from pathlib import Path

import pytest
import torch

import maestrale

HERE = Path(__file__).parent
GENERATE = ["000_00", "000_02", "001_00", "001_01", "001_02", "001_05", "003_00", "003_01", "003_02", "003_05",
            "004_00", "004_02"]
BUILD = {"000_01": "MinistralModel", "001_04": "MixtralModel", "003_04": "MistralModel", "004_01": "Phi3Model"}
QUANTIZATION_TRUE = "quantization_config=True is not a quantization config: pass the config object itself"
FAILS = {"001_03": (ValueError, QUANTIZATION_TRUE), "003_03": (ValueError, QUANTIZATION_TRUE)}


def test_every_copy_is_run():
    assert sorted(p.stem for p in HERE.glob("0*.py")) == sorted(GENERATE + list(BUILD) + list(FAILS))


def run_example(name: str, folder: Path, monkeypatch, source: str | None = None) -> dict:
    """Run a copy (or `source`, an edited copy) from the fixture root, where its "./tiny-..." folders are."""
    monkeypatch.chdir(folder)
    if source is None:
        return runpy.run_path(str(HERE / f"{name}.py"), run_name="__main__")
    script = folder / f"{name}_edited.py"
    script.write_text(source)
    return runpy.run_path(str(script), run_name="__main__")


@pytest.mark.parametrize("name", GENERATE)
def test_generate_examples_run(name, seed_fixtures, monkeypatch, capsys):
    scope = run_example(name, seed_fixtures, monkeypatch)
    prompt = scope["model_inputs"] if "model_inputs" in scope else scope["inputs"]
    prompt_ids = prompt["input_ids"]
    output = next(scope[key] for key in ("generated_ids", "generate_ids", "outputs") if key in scope)
    source = (HERE / f"{name}.py").read_text()
    limit = re.search(r"max_new_tokens=(\d+)|max_length=(\d+)", source)
    longest = prompt_ids.shape[1] + int(limit[1]) if limit[1] else int(limit[2])
    assert isinstance(output, torch.Tensor) and output.shape[0] == 1
    assert prompt_ids.shape[1] < output.shape[1] <= longest
    assert torch.equal(output[:, : prompt_ids.shape[1]].cpu(), prompt_ids.cpu())  # the ids out of a BatchEncoding
    # (.cpu(): on CUDA, 003_02 as written moves the model back to the CPU after its inputs went to CUDA)
    assert isinstance(scope["tokenizer"].batch_decode(output)[0], str)
    if name == "000_00":
        assert scope["model"].dtype == torch.bfloat16 and scope["model"].config._attn_implementation == "sdpa"
    if name in ("001_02", "003_02"):  # as written: float16, flash_attention_2 (torch's SDPA kernel on CPU)
        assert scope["model"].dtype == torch.float16
        assert scope["model"].config._attn_implementation == "flash_attention_2"
    if name == "004_00":  # Phi-3's template with its special tokens, printed back by batch_decode
        text = capsys.readouterr().out
        assert text.startswith("<|user|>\nCan you provide ways to eat combinations of bananas and dragonfruits?<|end|>")
        assert "<|assistant|>" in text


@pytest.mark.parametrize("name", sorted(BUILD))
def test_config_examples_build_the_model(name, seed_fixtures, monkeypatch):
    scope = run_example(name, seed_fixtures, monkeypatch)
    model = scope["model"]
    assert type(model) is getattr(maestrale, BUILD[name])
    assert scope["configuration"] is model.config
    if BUILD[name].startswith("Mixtral"):  # as in transformers, Mixtral's config leaves head_dim unset
        assert model.config.head_dim is None
    elif name != "004_01":  # Phi-3 has no head_dim field
        assert model.config.head_dim == model.config.hidden_size // model.config.num_attention_heads
    hidden = model(torch.tensor([[1, 2, 3]])).last_hidden_state
    assert hidden.shape == (1, 3, model.config.hidden_size)


@pytest.mark.parametrize("model_class", ["MinistralModel", "MixtralModel", "MistralModel"])
def test_default_configs_build_the_documented_model(model_class):
    """The copies shrink the config; the defaults themselves build the full-size model (on the meta device here),
    with transformers' parameter count; transformers' MinistralModel(MinistralConfig()) crashes on head_dim=None."""
    import transformers

    config_class = model_class.replace("Model", "Config")
    with torch.device("meta"):
        ours = getattr(maestrale, model_class)(getattr(maestrale, config_class)())
        ref = getattr(transformers, model_class)(getattr(transformers, config_class)(head_dim=128))
    assert ours.num_parameters() == ref.num_parameters() > 7e9


@pytest.mark.parametrize("name", sorted(FAILS))
def test_broken_examples_say_what_to_change(name, seed_fixtures, monkeypatch):
    error, message = FAILS[name]
    with pytest.raises(error, match=re.escape(message)):
        run_example(name, seed_fixtures, monkeypatch)


@pytest.mark.parametrize("name", ["001_03", "003_03"])
def test_quantization_examples_after_the_fix(name, seed_fixtures, monkeypatch):
    """Passing the BitsAndBytesConfig the example built, as the error asks, runs the example quantized: 4-bit NF4
    layers computing in float16 (the docs write the dtype as the string "torch.float16")."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (test extra)")
    source = (HERE / f"{name}.py").read_text()
    fixed = source.replace("quantization_config=True", "quantization_config=quantization_config")
    scope = run_example(name, seed_fixtures, monkeypatch, fixed)
    model = scope["model"]
    assert scope["quantization_config"].bnb_4bit_compute_dtype == torch.float16
    assert model.is_loaded_in_4bit and model.config.quantization_config is scope["quantization_config"]
    layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert layers and all(m.weight.quant_type == "nf4" and m.compute_dtype == torch.float16 for m in layers)
    assert type(model.lm_head).__name__ == "Linear"
    assert scope["generated_ids"].shape[1] > scope["model_inputs"]["input_ids"].shape[1]
