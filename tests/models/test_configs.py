"""Configs: documented defaults equal transformers', legacy keys, JSON round trips, AutoConfig, validation."""

import json

import pytest
import transformers

import maestrale
from maestrale import AutoConfig, MinistralConfig, MistralConfig, MixtralConfig, Phi3Config

NAMES = ["Mistral", "Mixtral", "Ministral", "Phi3"]
# Fields transformers 5.23 fills differently on purpose: Ministral/Mixtral leave head_dim None (the doc says it
# defaults to hidden_size // num_attention_heads, which maestrale applies).
RESOLVED = {"head_dim"}


@pytest.mark.parametrize("name", NAMES)
def test_defaults_match_transformers(name):
    ref = getattr(transformers, f"{name}Config")().to_dict()
    ours = getattr(maestrale, f"{name}Config")().to_dict()
    for key, value in ours.items():
        if key in ref and key not in RESOLVED:
            assert ref[key] == value, key
    model_fields = set(getattr(maestrale, f"{name}Config")._field_defaults())
    missing = {k for k in ref if k not in ours} - {"transformers_version", "_name_or_path", "chunk_size_feed_forward",
                                                    "is_encoder_decoder"}
    assert not missing, missing
    assert model_fields <= set(ours)


def test_head_dim_defaults_to_hidden_over_heads():
    small = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    assert MinistralConfig(**small).head_dim == 16
    mixtral = MixtralConfig(**small)  # transformers leaves Mixtral's head_dim None; the layers use 16
    assert mixtral.head_dim is None and mixtral.resolved_head_dim == 16
    assert MistralConfig(**small, head_dim=32).head_dim == 32


def test_legacy_rope_keys_from_hub_configs():
    config = MistralConfig(rope_theta=1e6, rope_scaling=None)
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 1e6}
    config = MistralConfig(rope_scaling={"type": "linear", "factor": 2.0})
    assert config.rope_parameters["rope_type"] == "linear" and config.rope_parameters["rope_theta"] == 10000.0
    config = MistralConfig(rope_scaling={"type": "dynamic", "factor": 4.0})
    assert config.rope_parameters["factor"] == 4.0
    config = MistralConfig(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})
    assert config.rope_parameters["original_max_position_embeddings"] == 32
    # Phi-3-mini-128k style: "su" or "longrope", original length at the top level.
    factors = {"short_factor": [1.0] * 48, "long_factor": [2.0] * 48}
    for kind in ("su", "longrope"):
        config = Phi3Config(rope_scaling={"type": kind, **factors}, max_position_embeddings=131072,
                            original_max_position_embeddings=4096)
        assert config.rope_parameters["rope_type"] == "longrope"
        assert config.rope_parameters["original_max_position_embeddings"] == 4096
        assert config.rope_parameters["partial_rotary_factor"] == 1.0


def test_rope_parameters_equal_transformers_for_legacy_keys():
    legacy = {"rope_theta": 5e5, "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}}
    ref = transformers.MistralConfig(**legacy).rope_parameters
    ours = MistralConfig(**legacy).rope_parameters
    assert {k: v for k, v in ref.items() if k != "type"} == ours


@pytest.mark.parametrize("name", NAMES)
def test_json_round_trip_and_folder(tmp_path, name):
    cls = getattr(maestrale, f"{name}Config")
    config = cls(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, vocab_size=128,
                 pad_token_id=0, num_labels=3)
    again = cls.from_dict(json.loads(config.to_json_string()))
    assert again == config and again.num_labels == 3
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is cls and loaded == config
    # transformers reads what maestrale writes, with the same values.
    ref = transformers.AutoConfig.from_pretrained(tmp_path)
    assert ref.model_type == config.model_type and ref.hidden_size == 64 and ref.num_labels == 3
    assert ref.rope_parameters["rope_theta"] == config.rope_parameters["rope_theta"]


@pytest.mark.parametrize("name", NAMES)
def test_reads_transformers_config_files(tmp_path, name):
    ref = getattr(transformers, f"{name}Config")(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                                 num_hidden_layers=3, sliding_window=8, vocab_size=128, pad_token_id=1)
    ref.save_pretrained(tmp_path)
    ours = AutoConfig.from_pretrained(tmp_path)
    assert ours.model_type == ref.model_type
    for key in ("hidden_size", "num_hidden_layers", "sliding_window", "vocab_size", "pad_token_id", "rms_norm_eps"):
        assert getattr(ours, key) == getattr(ref, key), key


def test_unknown_keys_are_kept():
    config = MistralConfig(my_field=3)
    assert config.my_field == 3 and config.to_dict()["my_field"] == 3


def test_ministral_layer_types_default_and_explicit():
    assert MinistralConfig(num_hidden_layers=3, sliding_window=8).layer_types == ["sliding_attention"] * 3
    assert MinistralConfig(num_hidden_layers=2, sliding_window=None).layer_types == ["full_attention"] * 2
    types = ["full_attention", "sliding_attention"]
    assert MinistralConfig(num_hidden_layers=2, layer_types=types).attention_layer_types == types


def test_auto_config_for_model_and_unknown_type(tmp_path):
    assert isinstance(AutoConfig.for_model("mixtral", num_local_experts=4), MixtralConfig)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    with pytest.raises(ValueError, match="gpt_neox"):
        AutoConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)


@pytest.mark.parametrize(
    "cls, kwargs, culprit",
    [
        (MistralConfig, dict(hidden_size=30, num_attention_heads=4, num_key_value_heads=2), "hidden_size"),
        (MistralConfig, dict(num_attention_heads=32, num_key_value_heads=5), "num_key_value_heads"),
        (MistralConfig, dict(rope_scaling={"type": "wavy", "factor": 2.0}), "wavy"),
        (MistralConfig, dict(rope_scaling={"type": "linear"}), "factor"),
        (MistralConfig, dict(sliding_window=0), "sliding_window"),
        (MistralConfig, dict(hidden_act="swish2"), "hidden_act"),
        (MistralConfig, dict(vocab_size=10, bos_token_id=12), "bos_token_id"),
        (Phi3Config, dict(rope_scaling={"type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 48}),
         "short_factor"),
        (Phi3Config, dict(rope_scaling={"type": "linear", "factor": 2.0}), "linear"),
        (MinistralConfig, dict(num_hidden_layers=2, layer_types=["full_attention", "global"]), "layer_types"),
        (MinistralConfig, dict(num_hidden_layers=2, layer_types=["full_attention"]), "layer_types"),
        (MinistralConfig, dict(num_hidden_layers=1, sliding_window=None, layer_types=["sliding_attention"]),
         "sliding_window"),
        (MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=5), "num_experts_per_tok"),
        (MixtralConfig, dict(num_hidden_layers=0), "num_hidden_layers"),
    ],
)
def test_invalid_values_name_the_field(cls, kwargs, culprit):
    with pytest.raises(ValueError, match=culprit):
        cls(**kwargs)
