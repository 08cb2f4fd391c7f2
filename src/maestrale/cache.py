"""KV caches: a growing cache for full-attention layers, a rolling one for sliding-window layers, a fixed-size one."""

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
            capacity = self._capacity(kept + new, tracked)
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

    def _capacity(self, needed: int, tracked: bool) -> int:
        """Tokens the new buffers hold; `needed` of them are used at once."""
        return needed + (0 if tracked else ROOM)

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

    def max_length(self) -> int:
        return -1 if self.window is None else self.window

    def reset(self) -> None:
        """Forget every token; the buffers stay for the next sequence."""
        self._start = self._end = self.seen = 0

    def repeat_rows(self, repeats: int) -> None:
        self._keys = self._keys.repeat_interleave(repeats, 0)
        self._values = self._values.repeat_interleave(repeats, 0)

    def key_start(self) -> int:
        """Position of the first key `update` will return next time."""
        return self.seen - self.kept


class StaticCacheLayer(CacheLayer):
    """A full-attention layer whose buffers hold exactly `max_cache_len` tokens, allocated once."""

    def __init__(self, max_cache_len: int):
        super().__init__()
        self.max_cache_len = max_cache_len

    def _capacity(self, needed: int, tracked: bool) -> int:
        if needed > self.max_cache_len:
            raise ValueError(f"StaticCache(max_cache_len={self.max_cache_len}) cannot hold {needed} tokens: build it "
                             "with a max_cache_len of at least the prompt plus max_new_tokens")
        return self.max_cache_len

    def max_length(self) -> int:
        return self.max_cache_len


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

    def get_max_length(self, layer_idx: int | None = None) -> int:
        """The most tokens a layer keeps (of all layers by default), as in transformers; -1: no limit."""
        if layer_idx is not None:
            return self.layers[layer_idx].max_length() if layer_idx < len(self.layers) else -1
        return max((layer.max_length() for layer in self.layers), default=-1)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select batch rows (beam search)."""
        for layer in self.layers:
            if layer.kept:
                layer.reorder(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only batch rows `indices`."""
        self.reorder_cache(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat each batch row `repeats` times in place (row 0 `repeats` times, then row 1, ...)."""
        for layer in self.layers:
            if layer.kept:
                layer.repeat_rows(repeats)

    def reset(self) -> None:
        """Empty every layer (get_seq_length() becomes 0), keeping the layers and their buffers."""
        for layer in self.layers:
            layer.reset()

    def crop(self, max_length: int) -> None:
        """Forget the last -max_length tokens if it is negative, else every token from position max_length on.

        transformers 5 takes the negative form (and 0, a no-op) and refuses positive values; those keep its older
        meaning, which assisted decoding uses to roll back rejected tokens.
        """
        if max_length == 0:
            return
        for i, layer in enumerate(self.layers):
            drop = -max_length if max_length < 0 else layer.seen - max_length
            drop = min(drop, layer.seen)
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



class StaticCache(Cache):
    """A cache of fixed size, built as in transformers: `StaticCache(config=model.config, max_cache_len=...)`.

    Full-attention layers allocate `max_cache_len` tokens on their first update and never grow (overflowing raises);
    sliding-window layers roll as in DynamicCache, since they never hold more than the window.
    """

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return min(super().get_max_length(layer_idx), self.max_cache_len)

    def __init__(self, config, max_cache_len: int):
        if not isinstance(max_cache_len, int) or max_cache_len < 1:
            raise ValueError(f"StaticCache: max_cache_len must be a positive integer, got {max_cache_len!r}")
        self.max_cache_len = max_cache_len
        window = config.sliding_window
        layers = [CacheLayer(window) if kind == "sliding_attention" else StaticCacheLayer(max_cache_len)
                  for kind in config.attention_layer_types]
        super().__init__(layers, (config.num_key_value_heads, config.resolved_head_dim))



def cache_argument(past_key_values: Cache | None, cache: Cache | None) -> Cache | None:
    """The cache a forward was given, under its older name past_key_values or transformers' newer name cache."""
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the cache once: as cache= (transformers' new name) or as past_key_values=")
    return cache if cache is not None else past_key_values
