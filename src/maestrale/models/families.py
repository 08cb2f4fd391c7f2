"""The public model classes of each family: the shared decoder and heads bound to the family's config."""

from __future__ import annotations

from ..configs import MinistralConfig, MistralConfig, MixtralConfig, Phi3Config
from ..configs.base import PretrainedConfig
from .decoder import DecoderModel
from .heads import ForCausalLM, ForQuestionAnswering, ForSequenceClassification, ForTokenClassification
from .modeling_utils import PreTrainedModel

HEADS = {
    "ForCausalLM": ForCausalLM,
    "ForSequenceClassification": ForSequenceClassification,
    "ForTokenClassification": ForTokenClassification,
    "ForQuestionAnswering": ForQuestionAnswering,
}


# model_type -> {"Model" or a head's task name -> class}, for the Auto classes and the loaders.
MODEL_MAPPING: dict[str, dict[str, type]] = {}
# model_type -> XPreTrainedModel, the family's common base class (isinstance checks as in transformers).
PRETRAINED_CLASSES: dict[str, type] = {}


def _family(prefix: str, config_class: type[PretrainedConfig], **head_attributes: dict) -> tuple[type, ...]:
    """XModel and its four heads, in the order of HEADS; `head_attributes` maps a task to class attributes."""
    family = type(f"{prefix}PreTrainedModel", (PreTrainedModel,), {"config_class": config_class,
                                                                   "__module__": __name__})
    base = type(f"{prefix}Model", (DecoderModel, family), {"config_class": config_class, "__module__": __name__})
    heads = tuple(
        type(f"{prefix}{task}", (head, family), {"config_class": config_class, "base_class": base,
                                                 "__module__": __name__, **head_attributes.get(task, {})})
        for task, head in HEADS.items()
    )
    MODEL_MAPPING[config_class.model_type] = {"Model": base, **dict(zip(HEADS, heads))}
    PRETRAINED_CLASSES[config_class.model_type] = family
    return (base, *heads)


(MistralModel, MistralForCausalLM, MistralForSequenceClassification, MistralForTokenClassification,
 MistralForQuestionAnswering) = _family("Mistral", MistralConfig)
(MinistralModel, MinistralForCausalLM, MinistralForSequenceClassification, MinistralForTokenClassification,
 MinistralForQuestionAnswering) = _family(
    "Ministral", MinistralConfig,
    # transformers keeps the old `transformer.` prefix for this head's weights.
    ForQuestionAnswering={"base_model_prefix": "transformer"},
)
(MixtralModel, MixtralForCausalLM, MixtralForSequenceClassification, MixtralForTokenClassification,
 MixtralForQuestionAnswering) = _family("Mixtral", MixtralConfig)
(Phi3Model, Phi3ForCausalLM, Phi3ForSequenceClassification, Phi3ForTokenClassification,
 Phi3ForQuestionAnswering) = _family("Phi3", Phi3Config)

MistralPreTrainedModel, MinistralPreTrainedModel, MixtralPreTrainedModel, Phi3PreTrainedModel = (
    PRETRAINED_CLASSES[name] for name in ("mistral", "ministral", "mixtral", "phi3"))

__all__ = [cls.__name__ for classes in MODEL_MAPPING.values() for cls in classes.values()] + [
    cls.__name__ for cls in PRETRAINED_CLASSES.values()]
