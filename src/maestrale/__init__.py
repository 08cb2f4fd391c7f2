"""maestrale: Mistral, Mixtral, Ministral and Phi-3 with the transformers API."""

from .cache import Cache, DynamicCache, StaticCache
from .configs import (
    AutoConfig,
    MinistralConfig,
    MistralConfig,
    MixtralConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedConfig,
)
from .models import *  # noqa: F401,F403
from .generation import *  # noqa: F401,F403  after models, whose heads import generation
from .pipelines import TextGenerationPipeline, pipeline
from .quantization import BitsAndBytesConfig, TorchAoConfig
from .tokenization import *  # noqa: F401,F403
from .models import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    PreTrainedModel,
)

__version__ = "0.1.0"
