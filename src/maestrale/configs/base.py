"""The base configuration: fields declared as annotated class attributes, JSON round trip, validation."""

from __future__ import annotations

import copy
import inspect
import json
import os
import warnings
from typing import Any

import torch

CONFIG_NAME = "config.json"

ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "gelu_new", "relu")
LAYER_TYPES = ("full_attention", "sliding_attention")

# Keys each rope type needs / accepts besides rope_type and rope_theta.
ROPE_KEYS = {
    "default": (set(), {"partial_rotary_factor"}),
    "linear": ({"factor"}, {"partial_rotary_factor"}),
    "dynamic": ({"factor"}, {"partial_rotary_factor", "original_max_position_embeddings"}),
    "yarn": (
        {"factor", "original_max_position_embeddings"},
        {"attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate", "partial_rotary_factor"},
    ),
    "longrope": (
        {"short_factor", "long_factor", "original_max_position_embeddings"},
        {"factor", "attention_factor", "partial_rotary_factor"},
    ),
}

# Fields every config has, whatever the family; family classes declare the rest.
COMMON_DEFAULTS: dict[str, Any] = {
    "return_dict": True,
    "output_hidden_states": False,
    "output_attentions": False,
    "dtype": None,
    "architectures": None,
    "problem_type": None,
}
# Keys __init__ reads besides the declared fields.
INIT_KEYS = {"name_or_path", "_name_or_path", "attn_implementation", "rope_theta", "rope_scaling", "num_labels",
             "id2label", "label2id", "torch_dtype"}
# What to_diff_dict leaves out: the values of a bare transformers config.
BASE_DEFAULTS = {**COMMON_DEFAULTS, "id2label": {0: "LABEL_0", 1: "LABEL_1"}, "label2id": {"LABEL_0": 0, "LABEL_1": 1}}


class PretrainedConfig:
    """Base of the family configs. Subclasses declare their fields as annotated class attributes with defaults."""

    # Class constants are left unannotated: annotated attributes are the config's fields.
    model_type = ""
    # Rope types this family accepts, and legacy names mapped onto them.
    rope_types = ("default", "linear", "dynamic", "yarn", "longrope")
    rope_type_aliases = {}
    default_rope_theta = 10000.0

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # A readable signature for help() and IDEs: the declared fields with their defaults.
        params = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
            for name, default in cls._field_defaults().items()
        ]
        params.append(inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD))
        cls.__signature__ = inspect.Signature(params)

    @classmethod
    def _field_defaults(cls) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            for name in vars(klass).get("__annotations__", {}):
                if name in vars(klass):
                    fields[name] = vars(klass)[name]
        return fields

    def __init__(self, **kwargs: Any):
        kwargs = dict(kwargs)
        for legacy in ("transformers_version", "model_type", "_commit_hash"):
            kwargs.pop(legacy, None)
        if "torch_dtype" in kwargs:
            kwargs.setdefault("dtype", kwargs.pop("torch_dtype"))
        legacy_name = kwargs.pop("_name_or_path", "")  # written by older transformers; an explicit name wins
        self.name_or_path = kwargs.pop("name_or_path", legacy_name)
        self._attn_implementation = kwargs.pop("attn_implementation", None)
        rope_theta = kwargs.pop("rope_theta", None)
        rope_scaling = kwargs.pop("rope_scaling", None)

        num_labels = kwargs.pop("num_labels", None)
        id2label = kwargs.pop("id2label", None)
        kwargs.pop("label2id", None)
        if id2label is None:
            id2label = {i: f"LABEL_{i}" for i in range(2 if num_labels is None else num_labels)}
        self.id2label = {int(k): v for k, v in id2label.items()}

        for name, default in {**COMMON_DEFAULTS, **self._field_defaults()}.items():
            setattr(self, name, kwargs.pop(name) if name in kwargs else copy.deepcopy(default))
        # Unknown keys from a config.json are kept, as transformers keeps them.
        for name, value in kwargs.items():
            setattr(self, name, value)

        if isinstance(self.dtype, str):
            self.dtype = _torch_dtype(self.dtype)
        if hasattr(self, "rope_parameters"):
            self.rope_parameters = self._standardize_rope(self.rope_parameters, rope_scaling, rope_theta)
        self.__post_init__()
        self.validate()

    def __post_init__(self) -> None:
        """Derive fields whose defaults depend on others (family hook)."""

    # ----- labels -----
    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @num_labels.setter
    def num_labels(self, value: int) -> None:
        if value != self.num_labels:  # an id2label of the right size keeps its names
            self.id2label = {i: f"LABEL_{i}" for i in range(value)}

    @property
    def label2id(self) -> dict[str, int]:
        return {v: k for k, v in self.id2label.items()}

    @property
    def use_return_dict(self) -> bool:
        return self.return_dict

    # ----- rope -----
    @property
    def rope_scaling(self) -> dict:
        """The legacy name of `rope_parameters`, which transformers 5 still exposes."""
        return self.rope_parameters

    @rope_scaling.setter
    def rope_scaling(self, value: dict | None) -> None:
        warnings.warn("`rope_scaling` is deprecated: set `rope_parameters` (with `rope_type` and `rope_theta`) "
                      "instead", FutureWarning, stacklevel=2)
        theta = self.rope_parameters.get("rope_theta")
        self.rope_parameters = self._standardize_rope(None, value, theta)
        self.validate()

    def _standardize_rope(self, rope_parameters: dict | None, rope_scaling: dict | None, rope_theta) -> dict:
        """Merge the legacy `rope_theta`/`rope_scaling` keys into one `rope_parameters` dict."""
        params = dict(rope_scaling or rope_parameters or {})
        rope_type = params.pop("type", None)
        rope_type = params.get("rope_type", rope_type) or "default"
        params["rope_type"] = self.rope_type_aliases.get(rope_type, rope_type)
        theta = params.get("rope_theta", rope_theta)
        params["rope_theta"] = float(self.default_rope_theta if theta is None else theta)
        if params["rope_type"] in ("yarn", "longrope"):
            # Phi-3 keeps this at the top level; the rotary code reads it from the rope parameters.
            original = getattr(self, "original_max_position_embeddings", None)
            if original is not None:
                params["original_max_position_embeddings"] = original
            params.setdefault("original_max_position_embeddings", self.max_position_embeddings)
        return params

    def _validate_rope(self) -> None:
        params = self.rope_parameters
        rope_type = params["rope_type"]
        if rope_type not in self.rope_types:
            raise ValueError(
                f"{type(self).__name__}: unknown rope type {rope_type!r} in `rope_parameters`; "
                f"expected one of {list(self.rope_types)}"
            )
        required, optional = ROPE_KEYS[rope_type]
        missing = required - params.keys()
        if missing:
            raise ValueError(f"`rope_parameters` of rope type {rope_type!r} lacks {sorted(missing)}")
        unknown = params.keys() - required - optional - {"rope_type", "rope_theta"}
        if unknown:
            raise ValueError(f"`rope_parameters` of rope type {rope_type!r} has unknown keys {sorted(unknown)}")
        if not params["rope_theta"] > 0:
            raise ValueError(f"`rope_parameters['rope_theta']` must be positive, got {params['rope_theta']}")
        factor = params.get("factor")
        if factor is not None and (not isinstance(factor, (int, float)) or factor < 1):
            raise ValueError(f"`rope_parameters['factor']` must be a number >= 1, got {factor!r}")
        rotary_dim = self.rotary_dim
        if rotary_dim % 2:
            raise ValueError(f"the rotary dimension must be even, got {rotary_dim} (head_dim x partial_rotary_factor)")
        for key in ("short_factor", "long_factor"):
            if key in params:
                value = params[key]
                if not isinstance(value, list) or not all(isinstance(x, (int, float)) for x in value):
                    raise ValueError(f"`rope_parameters['{key}']` must be a list of numbers, got {value!r}")
                if len(value) != rotary_dim // 2:
                    raise ValueError(
                        f"`rope_parameters['{key}']` must have {rotary_dim // 2} entries (rotary dim / 2), "
                        f"got {len(value)}"
                    )

    @property
    def rotary_dim(self) -> int:
        return int(self.resolved_head_dim * self.rope_parameters.get("partial_rotary_factor", 1.0))

    @property
    def resolved_head_dim(self) -> int:
        return getattr(self, "head_dim", None) or self.hidden_size // self.num_attention_heads

    # ----- validation -----
    def validate(self) -> None:
        """Raise a ValueError naming the first invalid field."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{type(self).__name__}.{name} must be a positive integer, got {value!r}")
        if getattr(self, "head_dim", None) is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}), or set head_dim explicitly"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by num_key_value_heads "
                f"({self.num_key_value_heads})"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; expected one of {list(ACTIVATIONS)}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be positive, got {self.rms_norm_eps!r}")
        window = self.sliding_window
        if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window <= 0):
            raise ValueError(f"sliding_window must be a positive integer or None, got {window!r}")
        for name in ("attention_dropout", "resid_pdrop", "embd_pdrop"):
            p = getattr(self, name, 0.0)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p!r}")
        for name in ("bos_token_id", "pad_token_id"):
            token = getattr(self, name)
            if token is not None and not 0 <= token < self.vocab_size:
                raise ValueError(f"{name} ({token}) is outside the vocabulary (vocab_size={self.vocab_size})")
        self._validate_rope()

    # ----- serialisation -----
    def to_dict(self) -> dict[str, Any]:
        out = {k: v.to_dict() if hasattr(v, "to_dict") else copy.deepcopy(v)  # quantization_config
               for k, v in vars(self).items() if not k.startswith("_") and k != "name_or_path"}
        out["id2label"] = dict(self.id2label)
        out["label2id"] = self.label2id
        if out.get("dtype") is not None:
            out["dtype"] = str(out["dtype"]).removeprefix("torch.")
        out["model_type"] = self.model_type
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        """to_dict without the entries that equal a bare config's (transformers' diff: family fields all stay)."""
        return {k: v for k, v in self.to_dict().items() if k not in BASE_DEFAULTS or BASE_DEFAULTS[k] != v}

    def to_json_string(self, use_diff: bool = False) -> str:
        data = self.to_diff_dict() if use_diff else self.to_dict()
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def update(self, config_dict: dict[str, Any]) -> None:
        """Set each key of `config_dict` as an attribute, then validate."""
        for key, value in config_dict.items():
            setattr(self, key, value)
        self.validate()

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        """A config from a dict and overrides; with return_unused_kwargs=True, also the overrides it did not use
        (those that are neither fields nor attributes), as transformers returns them."""
        return_unused_kwargs = kwargs.pop("return_unused_kwargs", False)
        model_type = config_dict.get("model_type")
        if cls.model_type and model_type not in (None, cls.model_type):
            raise ValueError(f"{cls.__name__} cannot read a config of model_type {model_type!r}")
        known = set(cls._field_defaults()) | set(COMMON_DEFAULTS) | INIT_KEYS
        config = cls(**{**config_dict, **{k: v for k, v in kwargs.items() if k in known}})
        if "num_labels" in kwargs:  # an explicit num_labels replaces the file's id2label, as in transformers
            config.num_labels = kwargs["num_labels"]
        unused = {}
        for key, value in kwargs.items():
            if key not in known:
                if hasattr(config, key):
                    setattr(config, key, value)
                else:
                    unused[key] = value
        return (config, unused) if return_unused_kwargs else config

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "PretrainedConfig":
        return cls.from_dict(read_config_dict(path))

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        if os.path.isfile(save_directory):
            raise ValueError(f"save_pretrained needs a directory, but {save_directory} is a file")
        os.makedirs(save_directory, exist_ok=True)
        self.to_json_file(os.path.join(save_directory, CONFIG_NAME))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any):
        """Read config.json (or a GGUF file's metadata with gguf_file=) of a folder or hub repo."""
        data, _ = pretrained_config_dict(pretrained_model_name_or_path, kwargs)
        return cls.from_dict(data, **kwargs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PretrainedConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"

    def get_text_config(self, decoder: bool = True) -> "PretrainedConfig":
        return self


HUB_KWARGS = ("revision", "cache_dir", "local_files_only", "token", "force_download", "subfolder")


def pretrained_config_dict(name_or_path: str | os.PathLike, kwargs: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """(config dict, the file it came from) of a folder or hub repo: its config.json, or with `gguf_file` in
    `kwargs` the metadata of that GGUF file. Pops the hub and gguf options from `kwargs`."""
    from ..loading.hub import resolve_file

    hub_kwargs = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
    gguf_file = kwargs.pop("gguf_file", None)
    if gguf_file is not None:
        from ..loading.gguf import open_gguf

        path = resolve_file(name_or_path, gguf_file, **hub_kwargs)
        return open_gguf(path)[0], str(path)
    path = resolve_file(name_or_path, CONFIG_NAME, **hub_kwargs)
    return read_config_dict(path), str(path)


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"config field dtype {name!r} is not a torch dtype; use a name such as 'bfloat16' or "
                         "'float32'")
    return dtype


def read_config_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Read a config.json, naming the file when it is not valid JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data
