"""Decode steps beneath generate() and the server: the GPU static decoder (static and rolling KV caches, CUDA-graph
steps, Triton kernels) and the continuous-batching engine over a paged KV cache."""

from .decode import StaticDecoder, decoder_for
from .llm_engine import LLMEngine, StepOutput
from .sampling import SamplingParams

__all__ = ["LLMEngine", "SamplingParams", "StaticDecoder", "StepOutput", "decoder_for"]
