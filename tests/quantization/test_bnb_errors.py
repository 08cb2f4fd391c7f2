"""Bad quantization inputs each end in a one-line error naming the field (or the package) and the fix; the core
import of maestrale pulls in no bitsandbytes."""

import re
import subprocess
import sys

import pytest

import maestrale
from maestrale import BitsAndBytesConfig


def one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


def test_import_does_not_load_bitsandbytes():
    code = "import sys, maestrale; maestrale.AutoModelForCausalLM; print('bitsandbytes' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_missing_bitsandbytes_names_the_extra(family_folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now fails as if not installed
    with pytest.raises(ImportError) as excinfo:
        maestrale.AutoModelForCausalLM.from_pretrained(family_folder("mistral"),
                                                       quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    assert one_line(excinfo) == ("quantization_config=BitsAndBytesConfig(...) needs the bitsandbytes package, which "
                                 "is not installed: pip install 'maestrale[bnb]'")


@pytest.mark.parametrize("options, error, message", [
    (dict(load_in_4bit=True, load_in_8bit=True), ValueError,
     "BitsAndBytesConfig: load_in_4bit and load_in_8bit are both True; set only one of them"),
    (dict(load_in_4bit=True, bnb_4bit_quant_type="nf3"), ValueError,
     "BitsAndBytesConfig: bnb_4bit_quant_type must be one of ['fp4', 'nf4'], got 'nf3'"),
    (dict(load_in_4bit=True, bnb_4bit_compute_dtype="int8"), ValueError,
     "BitsAndBytesConfig: bnb_4bit_compute_dtype 'int8' is not a float dtype; use torch.float16, torch.bfloat16 or "
     "torch.float32 (or their names, e.g. 'float16')"),
])
def test_bad_config_fields(options, error, message):
    with pytest.raises(error) as excinfo:
        BitsAndBytesConfig(**options)
    assert one_line(excinfo) == message


@pytest.mark.parametrize("options, message", [
    (dict(load_in_4bit=True, llm_int8_skip_modules=["lm_head", "o_prj"]),
     "BitsAndBytesConfig: llm_int8_skip_modules names 'o_prj', which matches no module of MistralForCausalLM; use "
     "names such as 'lm_head' or 'self_attn.o_proj'"),
    (dict(), "BitsAndBytesConfig: neither load_in_4bit nor load_in_8bit is True; set one of them, or drop "
             "quantization_config"),
])
def test_bad_loading_options(options, message, family_folder):
    with pytest.raises(ValueError) as excinfo:
        maestrale.AutoModelForCausalLM.from_pretrained(family_folder("mistral"),
                                                       quantization_config=BitsAndBytesConfig(**options))
    assert one_line(excinfo) == message


def test_skip_patterns_match_as_in_transformers(family_folder):
    """Prefix at a module boundary, regex, or suffix: each of these matches, so none is refused."""
    model = maestrale.AutoModelForCausalLM.from_pretrained(
        family_folder("mistral"), quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, llm_int8_skip_modules=["model.layers.1", r"model\.layers\.[02]\.mlp", "v_proj"]))
    kinds = {name: type(m).__name__ for name, m in model.named_modules() if name.endswith("_proj")}
    assert kinds["model.layers.1.self_attn.q_proj"] == kinds["model.layers.0.mlp.up_proj"] == "Linear"
    assert kinds["model.layers.2.self_attn.v_proj"] == "Linear"
    assert kinds["model.layers.0.self_attn.q_proj"] == kinds["model.layers.2.self_attn.o_proj"] == "Linear4bit"
    assert type(model.lm_head).__name__ == "Linear4bit"  # an explicit list replaces the default one


@pytest.mark.parametrize("value, error, message", [
    (True, ValueError, "quantization_config=True is not a quantization config: pass the config object itself, e.g. "
                       "quantization_config=BitsAndBytesConfig(load_in_4bit=True)"),
    ({"quant_method": "eetq"}, NotImplementedError,
     "quantization_config asks for eetq quantization, which maestrale does not implement"),
    ({"quant_method": "gptq", "bits": 4}, ValueError,
     "quantization_config: a gptq dict describes a checkpoint quantized beforehand"),
])
def test_from_pretrained_refuses_before_reading(value, error, message):
    with pytest.raises(error, match=re.escape(message)) as excinfo:
        maestrale.AutoModelForCausalLM.from_pretrained("no-such-folder", quantization_config=value)
    one_line(excinfo)
