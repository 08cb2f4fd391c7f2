"""KV caches: a growing cache for full-attention layers and a rolling one for sliding-window layers."""

from __future__ import annotations

import torch


class CacheLayer:
    """Keys and values of one layer, (batch, kv_heads, tokens, head_dim), for the last `kept` tokens seen."""

    def __init__(self, window: int | None = None):
        self.window = window
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.seen = 0  # tokens seen so far; Python int, so no device sync to read it

    @property
    def kept(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def update(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new keys/values; return every key/value the new queries may attend to."""
        if self.keys is not None:
            keys = torch.cat([self.keys, keys], dim=-2)
            values = torch.cat([self.values, values], dim=-2)
        self.seen += keys.shape[-2] - self.kept
        if self.window is None:
            self.keys, self.values = keys, values
        else:
            # A query sees itself and the window - 1 tokens before it, so that many are enough for the next one.
            start = max(keys.shape[-2] - (self.window - 1), 0)
            self.keys, self.values = keys[..., start:, :], values[..., start:, :]
        return keys, values

    def key_start(self) -> int:
        """Position of the first key `update` will return next time."""
        return self.seen - self.kept


class Cache:
    """Per-layer KV cache with the transformers `Cache` interface (update, get_seq_length, reorder_cache, crop)."""

    def __init__(self, layers: list[CacheLayer], shape: tuple[int, int] | None = None):
        self.layers = layers
        self.shape = shape  # (kv_heads, head_dim) of the model the cache was built for

    def __len__(self) -> int:
        return len(self.layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].seen if layer_idx < len(self.layers) else 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.shape is not None and tuple(key_states.shape[1::2]) != self.shape:
            raise ValueError(
                f"past_key_values was built for a model with (kv_heads, head_dim) = {self.shape}, but layer "
                f"{layer_idx} gives {tuple(key_states.shape[1::2])}: pass the cache of this model, or None"
            )
        while len(self.layers) <= layer_idx:
            self.layers.append(CacheLayer())
        return self.layers[layer_idx].update(key_states, value_states)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select batch rows (beam search)."""
        for layer in self.layers:
            if layer.keys is not None:
                layer.keys = layer.keys.index_select(0, beam_idx.to(layer.keys.device))
                layer.values = layer.values.index_select(0, beam_idx.to(layer.values.device))

    def crop(self, max_length: int) -> None:
        """Forget every token from position `max_length` on (assisted decoding rolls back rejected tokens)."""
        for i, layer in enumerate(self.layers):
            drop = layer.seen - max_length
            if drop <= 0:
                continue
            if layer.key_start() > 0:
                raise ValueError(f"cannot crop layer {i}: its rolling cache has already dropped older tokens")
            layer.keys, layer.values = layer.keys[..., : layer.kept - drop, :], layer.values[..., : layer.kept - drop, :]
            layer.seen = max_length


class DynamicCache(Cache):
    """The default cache: grows with the sequence; with a config, sliding-window layers keep only their window."""

    def __init__(self, config=None):
        if config is None:
            super().__init__([])
            return
        window = config.sliding_window
        layers = [CacheLayer(window if kind == "sliding_attention" else None) for kind in config.attention_layer_types]
        super().__init__(layers, (config.num_key_value_heads, config.resolved_head_dim))

