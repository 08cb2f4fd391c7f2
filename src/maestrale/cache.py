"""KV caches: a growing cache for full-attention layers and a rolling one for sliding-window layers."""

from __future__ import annotations

import torch


ROOM = 256  # tokens of spare room a layer's buffers get each time they are (re)allocated


class CacheLayer:
    """Keys and values of one layer, (batch, kv_heads, tokens, head_dim), for the last `kept` tokens seen.

    They live in buffers with room for ROOM more tokens, so a decode step writes its token in place instead of
    copying the whole cache (torch.cat); a full buffer is replaced by a larger one every ROOM tokens. `keys` and
    `values` are views of the buffers; assigning them (as the engine does) hands the layer new buffers.
    """

    def __init__(self, window: int | None = None):
        self.window = window
        self.seen = 0  # tokens seen so far; Python int, so no device sync to read it
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None
        self._start = self._end = 0  # the kept tokens are buffer[..., start:end, :]

    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._keys is None else self._keys[..., self._start : self._end, :]

    @keys.setter
    def keys(self, keys: torch.Tensor | None) -> None:
        self._keys, self._start, self._end = keys, 0, 0 if keys is None else keys.shape[-2]

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._values is None else self._values[..., self._start : self._end, :]

    @values.setter
    def values(self, values: torch.Tensor | None) -> None:
        self._values, self._start, self._end = values, 0, 0 if values is None else values.shape[-2]

    @property
    def kept(self) -> int:
        return 0 if self._keys is None else self._end - self._start

    def update(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new keys/values; return every key/value the new queries may attend to."""
        kept, new = self.kept, keys.shape[-2]
        # Autograd may hold views of the buffers for a backward: then they are never written again (as with cat).
        tracked = keys.requires_grad or values.requires_grad
        if self._keys is None or self._end + new > self._keys.shape[-2] or tracked:
            capacity = kept + new + (0 if tracked else ROOM)
            self._keys = self._moved(self.keys, keys, capacity)
            self._values = self._moved(self.values, values, capacity)
            self._start, self._end = 0, kept
        self._keys[..., self._end : self._end + new, :] = keys
        self._values[..., self._end : self._end + new, :] = values
        self._end += new
        self.seen += new
        keys, values = self.keys, self.values
        if self.window is not None:
            # A query sees itself and the window - 1 tokens before it, so that many are enough for the next one.
            self._start = max(self._end - (self.window - 1), self._start)
        return keys, values

    @staticmethod
    def _moved(old: torch.Tensor | None, like: torch.Tensor, capacity: int) -> torch.Tensor:
        """A buffer of `capacity` tokens shaped and typed like `like`, starting with the tokens of `old`."""
        b, h, _, d = like.shape
        buffer = like.new_empty(b, h, capacity, d)
        if old is not None:
            buffer[..., : old.shape[-2], :] = old
        return buffer

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep batch rows `rows` (beam search), with the buffers' spare room."""
        rows = rows.to(self._keys.device)
        self._keys, self._values = self._keys.index_select(0, rows), self._values.index_select(0, rows)

    def drop_last(self, tokens: int) -> None:
        self._end -= tokens
        self.seen -= tokens

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
            if layer.kept:
                layer.reorder(beam_idx)

    def crop(self, max_length: int) -> None:
        """Forget every token from position `max_length` on (assisted decoding rolls back rejected tokens)."""
        for i, layer in enumerate(self.layers):
            drop = layer.seen - max_length
            if drop <= 0:
                continue
            if layer.key_start() > 0:
                raise ValueError(f"cannot crop layer {i}: its rolling cache has already dropped older tokens")
            layer.drop_last(drop)


class DynamicCache(Cache):
    """The default cache: grows with the sequence; with a config, sliding-window layers keep only their window."""

    def __init__(self, config=None):
        if config is None:
            super().__init__([])
            return
        window = config.sliding_window
        layers = [CacheLayer(window if kind == "sliding_attention" else None) for kind in config.attention_layer_types]
        super().__init__(layers, (config.num_key_value_heads, config.resolved_head_dim))

