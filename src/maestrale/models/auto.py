"""Auto classes: pick the family's class from the config's model_type."""

from __future__ import annotations

import os
from typing import Any

from ..configs import AutoConfig, PretrainedConfig, config_class_for
from .families import MODEL_MAPPING


class _AutoModel:
    task = "Model"

    def __init__(self):
        raise EnvironmentError(f"{type(self).__name__} is built with from_pretrained or from_config")

    @classmethod
    def model_class(cls, config: PretrainedConfig) -> type:
        config_class_for(config.model_type)  # a clear error for unknown model types
        return MODEL_MAPPING[config.model_type][cls.task]

    @classmethod
    def from_config(cls, config: PretrainedConfig, **kwargs: Any):
        return cls.model_class(config).from_config(config, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any, **kwargs: Any):
        from ..loading import load_pretrained

        if model_args:
            raise TypeError("from_pretrained takes the checkpoint and keyword arguments only")
        return load_pretrained(cls, pretrained_model_name_or_path, **kwargs)


class AutoModel(_AutoModel):
    task = "Model"


class AutoModelForCausalLM(_AutoModel):
    task = "ForCausalLM"


class AutoModelForSequenceClassification(_AutoModel):
    task = "ForSequenceClassification"


class AutoModelForTokenClassification(_AutoModel):
    task = "ForTokenClassification"


class AutoModelForQuestionAnswering(_AutoModel):
    task = "ForQuestionAnswering"


__all__ = ["AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification",
           "AutoModelForTokenClassification", "AutoModelForQuestionAnswering"]
