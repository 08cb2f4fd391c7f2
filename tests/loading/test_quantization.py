"""BitsAndBytesConfig takes transformers' fields and values; from_pretrained(quantization_config=...) refuses what is
not a config, and methods other than bitsandbytes, before touching the checkpoint (quantizing: tests/quantization)."""

import json
import re

import pytest
import torch
import transformers

import maestrale
from maestrale import BitsAndBytesConfig

OPTIONS = [
    {},
    dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype="float16"),
    dict(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True,
         bnb_4bit_quant_storage="bfloat16"),
    dict(load_in_8bit=True, llm_int8_threshold=5.0, llm_int8_skip_modules=["lm_head"],
         llm_int8_enable_fp32_cpu_offload=True, llm_int8_has_fp16_weight=True),
]


@pytest.mark.parametrize("options", OPTIONS)
def test_to_dict_equals_transformers(options):
    ref = transformers.BitsAndBytesConfig(**options).to_dict()
    ours = BitsAndBytesConfig(**options).to_dict()
    assert ours == {key: ref[key] for key in ours}


@pytest.mark.parametrize("name", ["float16", "torch.float16", torch.float16])
def test_compute_dtype_by_name_or_dtype(name):
    # The Mixtral and Mistral doc pages write "torch.float16", which transformers' getattr(torch, ...) rejects.
    assert BitsAndBytesConfig(bnb_4bit_compute_dtype=name).bnb_4bit_compute_dtype == torch.float16


@pytest.mark.parametrize("options, error, message", [
    (dict(load_in_4bit=True, load_in_8bit=True), ValueError, "load_in_4bit and load_in_8bit are both True"),
    (dict(load_in_4bit="yes"), TypeError, "load_in_4bit must be True or False, got 'yes'"),
    (dict(bnb_4bit_use_double_quant=1), TypeError, "bnb_4bit_use_double_quant must be True or False"),
    (dict(bnb_4bit_quant_type="int4"), ValueError, "bnb_4bit_quant_type must be one of ['fp4', 'nf4'], got 'int4'"),
    (dict(bnb_4bit_compute_dtype="torch.int8"), ValueError, "bnb_4bit_compute_dtype 'torch.int8' is not a float"),
    (dict(bnb_4bit_compute_dtype="fp16"), ValueError,
     "bnb_4bit_compute_dtype 'fp16' is not a float dtype; use torch.float16, torch.bfloat16 or torch.float32"),
    (dict(bnb_4bit_quant_storage="int4"), ValueError, "bnb_4bit_quant_storage 'int4' is not supported"),
    (dict(llm_int8_threshold="6"), TypeError, "llm_int8_threshold must be a number, got '6'"),
    (dict(llm_int8_skip_modules="lm_head"), TypeError, "llm_int8_skip_modules must be a list of module names"),
])
def test_bad_values_name_the_field(options, error, message):
    with pytest.raises(error, match=re.escape("BitsAndBytesConfig: " + message)):
        BitsAndBytesConfig(**options)


def test_unknown_field_is_refused():
    with pytest.raises(TypeError, match="bnb_4bit_compute_type"):
        BitsAndBytesConfig(bnb_4bit_compute_type="float16")


# A hub id that cannot be fetched here: the answer comes before any download is tried.
@pytest.mark.parametrize("source", ["mistralai/Mixtral-8x7B-Instruct-v0.1", "missing-folder"])
def test_from_pretrained_refuses_quantization_first(source):
    with pytest.raises(ValueError, match=r"quantization_config=True is not a quantization config: pass the config "
                                         r"object itself, e\.g\. quantization_config=BitsAndBytesConfig"):
        maestrale.AutoModelForCausalLM.from_pretrained(source, quantization_config=True)
    with pytest.raises(NotImplementedError, match="quantization_config asks for eetq quantization"):
        maestrale.AutoModel.from_pretrained(source, quantization_config={"quant_method": "eetq"})
    with pytest.raises(ValueError, match="a gptq dict describes a checkpoint quantized beforehand"):
        maestrale.AutoModel.from_pretrained(source, quantization_config={"quant_method": "gptq", "bits": 4})


def test_config_json_round_trip():
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype="torch.float16", llm_int8_skip_modules=["x"])
    assert BitsAndBytesConfig.from_dict(config.to_dict()) == config
    assert BitsAndBytesConfig.from_dict(transformers.BitsAndBytesConfig(**OPTIONS[2]).to_dict()) == \
        BitsAndBytesConfig(**OPTIONS[2])
    with pytest.raises(ValueError, match=r"quantization_config has keys BitsAndBytesConfig does not know: \['bits'\]"):
        BitsAndBytesConfig.from_dict({"load_in_4bit": True, "bits": 4})


def test_from_pretrained_without_quantization_loads(tmp_path):
    model = maestrale.MistralForCausalLM(maestrale.MistralConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                                 num_hidden_layers=1, num_attention_heads=2,
                                                                 num_key_value_heads=2))
    model.save_pretrained(tmp_path)
    loaded = maestrale.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=None)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_checkpoint_quantized_in_its_config_is_refused_by_name(tmp_path):
    model = maestrale.MistralForCausalLM(maestrale.MistralConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                                 num_hidden_layers=1, num_attention_heads=2,
                                                                 num_key_value_heads=2))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "eetq"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(NotImplementedError, match=r"config\.json asks for eetq quantization"):
        maestrale.AutoModelForCausalLM.from_pretrained(tmp_path)
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}  # with float weights
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"quantization_config says awq, but no tensor of .* is the qweight of a layer"):
        maestrale.AutoModelForCausalLM.from_pretrained(tmp_path)
