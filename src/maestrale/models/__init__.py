"""Model definitions: one shared decoder, four families, task heads and Auto classes."""

from .auto import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)
from .families import *  # noqa: F401,F403  the 20 family classes
from .families import MODEL_MAPPING
from .modeling_utils import PreTrainedModel
from .outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    ModelOutput,
    MoeCausalLMOutputWithPast,
    MoeModelOutputWithPast,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutputWithPast,
    TokenClassifierOutput,
)
