"""maestrale: Mistral, Mixtral, Ministral and Phi-3 with the transformers API."""

import gc

# Importing torch and these modules makes ~180,000 lasting objects and no garbage; the cycle collector's passes over
# them as they appear would add ~0.15 s to the command line's first answer (~1.6 s).
_collecting = gc.isenabled()
gc.disable()
try:
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
    from .quantization import AwqConfig, BitsAndBytesConfig, GPTQConfig, TorchAoConfig
    from .tokenization import *  # noqa: F401,F403
    from .models import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForQuestionAnswering,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        PreTrainedModel,
    )
finally:
    if _collecting:
        gc.enable()

__version__ = "0.1.0"
