"""GPU fast path beneath generate(): static and rolling KV caches, CUDA-graph decode steps, Triton kernels."""

from .decode import StaticDecoder, decoder_for

__all__ = ["StaticDecoder", "decoder_for"]
