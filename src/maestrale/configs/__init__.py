"""Configurations of the four families and AutoConfig."""

from __future__ import annotations

import os
from typing import Any

from .base import CONFIG_NAME, PretrainedConfig, pretrained_config_dict
from .families import CONFIG_MAPPING, MinistralConfig, MistralConfig, MixtralConfig, Phi3Config

PreTrainedConfig = PretrainedConfig  # transformers 5 spelling


def refuse_remote_code(kwargs: dict[str, Any]) -> None:
    """maestrale never runs code shipped with a checkpoint."""
    if kwargs.pop("trust_remote_code", False):
        raise ValueError(
            "trust_remote_code=True is refused: maestrale never runs code from a checkpoint. "
            "It supports the model types " + ", ".join(sorted(CONFIG_MAPPING)) + " natively; drop the argument."
        )


def config_class_for(model_type: str | None, source: str = "the config") -> type[PretrainedConfig]:
    if model_type not in CONFIG_MAPPING:
        raise ValueError(
            f"{source} has model_type {model_type!r}, which maestrale does not support; "
            f"supported: {', '.join(sorted(CONFIG_MAPPING))}"
        )
    return CONFIG_MAPPING[model_type]


class AutoConfig:
    """Picks the config class from `model_type`."""

    def __init__(self):
        raise EnvironmentError("AutoConfig is built with AutoConfig.from_pretrained or AutoConfig.for_model")

    @staticmethod
    def for_model(model_type: str, **kwargs: Any) -> PretrainedConfig:
        return config_class_for(model_type, "for_model")(**kwargs)

    @staticmethod
    def from_pretrained(pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any):
        """The family config of a folder or hub repo (config.json, or a GGUF file's metadata with gguf_file=)."""
        refuse_remote_code(kwargs)
        data, source = pretrained_config_dict(pretrained_model_name_or_path, kwargs)
        # AutoConfig records where the config came from; the family classes' from_pretrained do not (transformers).
        return config_class_for(data.get("model_type"), source).from_dict(
            data, name_or_path=str(pretrained_model_name_or_path), **kwargs)


__all__ = [
    "AutoConfig", "PretrainedConfig", "PreTrainedConfig", "MistralConfig", "MixtralConfig", "MinistralConfig",
    "Phi3Config", "CONFIG_MAPPING", "CONFIG_NAME",
]
