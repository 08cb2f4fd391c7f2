"""Text generation: GenerationConfig, logits processors, stopping criteria, streamers and `generate()`."""

from .configuration import GenerationConfig
from .logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    LogitsWarper,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    PrefixConstrainedLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)
from .stopping_criteria import (
    EosTokenCriteria,
    MaxLengthCriteria,
    MaxTimeCriteria,
    StoppingCriteria,
    StoppingCriteriaList,
    StopStringCriteria,
)
from .streamers import BaseStreamer, TextIteratorStreamer, TextStreamer
from .utils import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput, GenerationMixin

__all__ = [
    "BaseStreamer", "EosTokenCriteria", "GenerateBeamDecoderOnlyOutput", "GenerateDecoderOnlyOutput",
    "GenerationConfig", "GenerationMixin", "LogitsProcessor", "LogitsProcessorList", "LogitsWarper",
    "MaxLengthCriteria", "MaxTimeCriteria", "MinLengthLogitsProcessor", "MinNewTokensLengthLogitsProcessor",
    "MinPLogitsWarper", "NoBadWordsLogitsProcessor", "NoRepeatNGramLogitsProcessor", "PrefixConstrainedLogitsProcessor",
    "RepetitionPenaltyLogitsProcessor", "StopStringCriteria", "StoppingCriteria", "StoppingCriteriaList",
    "TemperatureLogitsWarper", "TextIteratorStreamer", "TextStreamer", "TopKLogitsWarper", "TopPLogitsWarper",
    "TypicalLogitsWarper",
]
