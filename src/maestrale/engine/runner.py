"""The model step of the server: run sequences' new tokens against their KV blocks, through the model's own forward.

Keys and values live in one paged pool per layer, (num_blocks * block_size, kv_heads, head_dim); a sequence's
block table says which slots hold its tokens. For a forward over several sequences, PagedCache writes each new
token's keys/values to its slot and hands the attention every sequence's keys right-aligned on a shared axis,
left-padded to the longest. The model sees what generate() gives it for a left-padded batch (an attention_mask
over past + new tokens, position_ids), so its masks (causal, sliding window, padding) give each sequence exactly
its own attention: a sequence's tokens keep one fixed offset on that axis, so distances, and windows, are exact.
"""

from __future__ import annotations

import numpy as np
import torch

from ..cache import Cache
from .decode import PagedDecoder

MAX_PADDING = 0.25  # of a prefill forward's queries or keys


class PagedCache(Cache):
    """A Cache over the paged pools for one forward: `write` (batch, new) and `read` (batch, keys) are slot
    indices; -1 in `write` marks a padding query, whose keys/values are not stored."""

    def __init__(self, pools: list[tuple[torch.Tensor, torch.Tensor]], write: torch.Tensor, read: torch.Tensor):
        super().__init__([], tuple(pools[0][0].shape[1:]))
        self.pools, self.read = pools, read
        self.keep = write >= 0
        self.write = write[self.keep]
        self.past = read.shape[1] - write.shape[1]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.past

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = self.pools[layer_idx]
        keys[self.write] = key_states.transpose(1, 2)[self.keep]
        values[self.write] = value_states.transpose(1, 2)[self.keep]
        return keys[self.read].transpose(1, 2), values[self.read].transpose(1, 2)


class ModelRunner:
    """Owns the KV pools and runs steps: prefill chunks through the model's forward; decoding rows, on CUDA, through
    the engine's decode step in CUDA graphs (PagedDecoder), elsewhere through the forward too."""

    def __init__(self, model, num_blocks: int, block_size: int, max_num_seqs: int, max_model_len: int):
        config = model.config
        self.model, self.block_size = model, block_size
        dtype = next(model.parameters()).dtype
        shape = (num_blocks * block_size, config.num_key_value_heads, config.resolved_head_dim)
        self.pools = [(torch.zeros(shape, dtype=dtype, device=model.device),
                       torch.zeros(shape, dtype=dtype, device=model.device))
                      for _ in range(config.num_hidden_layers)]
        self.decoder = None
        # 8-bit bitsandbytes layers split outliers on the host, which a CUDA graph cannot capture.
        if model.device.type == "cuda" and not model.is_loaded_in_8bit:
            self.decoder = PagedDecoder(model, self.pools, block_size, max_num_seqs, -(-max_model_len // block_size))
            self.decoder.capture()  # compiles and captures every batch-size bucket before the first request

    @staticmethod
    def block_bytes(config, block_size: int, dtype: torch.dtype) -> int:
        """Bytes one block of keys and values takes across all layers."""
        per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.resolved_head_dim
        return per_token * block_size * dtype.itemsize

    @torch.inference_mode()
    def run(self, new_tokens: list[list[int]], num_cached: list[int], block_tables: list[list[int]]) -> torch.Tensor:
        """Logits (batch, vocab) after each sequence's last new token; sequence i has num_cached[i] tokens in its
        blocks already and its new tokens go right after them. Sequences decoding one token share a forward;
        longer chunks (prefills) share forwards of similar lengths (`_prefill_groups`), so no forward pads a
        decode row to a prefill's length, nor a short prefill to a long one."""
        decodes = [i for i, tokens in enumerate(new_tokens) if len(tokens) == 1]
        groups = ([decodes] if decodes else []) + self._prefill_groups(new_tokens, num_cached)
        logits = [None] * len(new_tokens)
        for group in groups:
            tokens, cached, tables = ([values[i] for i in group] for values in (new_tokens, num_cached, block_tables))
            if group is decodes and self.decoder is not None:
                out = self.decoder.run([t[0] for t in tokens], cached, tables)
            else:
                out = self._forward(tokens, cached, tables)
            if len(groups) == 1:  # one forward for every row: its logits as they are
                return out
            for i, row in zip(group, out):
                logits[i] = row
        return torch.stack(logits)

    @staticmethod
    def _prefill_groups(new_tokens: list[list[int]], num_cached: list[int]) -> list[list[int]]:
        """The prefill chunks (more than one new token) in groups that share one left-padded forward: longest
        first, a chunk joins the current group while at most MAX_PADDING of the group's queries, and of its keys,
        would be padding. One forward per group rather than per chunk: each forward costs every layer's launches
        and Python however few its tokens, and stalls the decoding rows."""
        new = {i: len(tokens) for i, tokens in enumerate(new_tokens) if len(tokens) > 1}
        total = {i: num_cached[i] + n for i, n in new.items()}

        def fits(group: list[int]) -> bool:
            return all(sum(length[i] for i in group) >= (1 - MAX_PADDING) * len(group) * max(length[i] for i in group)
                       for length in (new, total))

        groups = []
        for i in sorted(new, key=lambda i: (new[i], total[i]), reverse=True):
            if groups and fits(groups[-1] + [i]):
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups

    def _forward(self, new_tokens, num_cached, block_tables) -> torch.Tensor:
        """One left-padded forward over the rows' new tokens; the indices built in whole arrays, not row by row
        (per-row torch calls cost ~0.7 ms a row on the host, before the GPU can start)."""
        batch, new = len(new_tokens), max(map(len, new_tokens))
        counts = np.array([len(t) for t in new_tokens])
        cached = np.array(num_cached)
        lengths = cached + counts
        total = int(lengths.max())
        input_ids = np.zeros((batch, new), dtype=np.int64)
        tables = np.zeros((batch, max(map(len, block_tables))), dtype=np.int64)
        for row, (tokens, table) in enumerate(zip(new_tokens, block_tables)):
            input_ids[row, new - len(tokens) :] = tokens
            tables[row, : len(table)] = table
        rows = np.arange(batch)[:, None]

        def slots(positions):  # the slot of each row's token at each position (>= 0)
            return tables[rows, positions // self.block_size] * self.block_size + positions % self.block_size

        # Query j of a row is its token at cached + j - (new - count); key j, its token at j - (total - length).
        query_pos = cached[:, None] + np.arange(new)[None] - (new - counts)[:, None]
        is_query = query_pos >= cached[:, None]
        key_pos = np.arange(total)[None] - (total - lengths)[:, None]
        is_key = key_pos >= 0
        positions = np.where(is_query, query_pos, 0)
        write = np.where(is_query, slots(positions), -1)
        read = np.where(is_key, slots(np.maximum(key_pos, 0)), 0)
        input_ids, positions, write, read, mask = map(torch.from_numpy, (input_ids, positions, write, read,
                                                                           is_key.astype(np.int64)))
        device = self.model.device
        cache = PagedCache(self.pools, write.to(device), read.to(device))
        out = self.model(input_ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]
