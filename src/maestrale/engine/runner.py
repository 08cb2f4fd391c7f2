"""The model step of the server: run sequences' new tokens against their KV blocks, through the model's own forward.

Keys and values live in one paged pool per layer, (num_blocks * block_size, kv_heads, head_dim); a sequence's
block table says which slots hold its tokens. A forward over several sequences is packed: their new tokens back to
back in one row, no padding. PagedCache writes each new token's keys/values to its slot and hands the attention each
sequence's whole keys (past and new), back to back; PackedAttention lets each query see only its own sequence's keys,
causally and within the layer's window: flash attention's variable-length kernel on CUDA in half precision; elsewhere
SDPA, the decoding rows padded into one call and each longer run in its own.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ..cache import Cache
from ..models.attention import _flash_kernel
from .decode import PagedDecoder


def to_device(values: list[int] | np.ndarray, device: torch.device) -> torch.Tensor:
    """Integers as an int64 tensor on `device`, copied from pinned memory without waiting on the GPU's queued work (a
    list index, or a pageable copy, would wait for the work queued before it until the host could go on)."""
    host = torch.as_tensor(values, dtype=torch.long)
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host


class Packing(NamedTuple):
    """A packed forward's sequences: cumulative counts of their new tokens and of their whole keys (int32, on the
    device, as flash attention takes them), their maxima, and the counts themselves (numpy, on the host)."""

    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    counts: np.ndarray
    lengths: np.ndarray


class PackedAttention:
    """The mask of one attention kind in a packed forward, which also attends (the model's layers ask it to): a query
    sees the keys of its own sequence at positions up to its own, and within `window` of it."""

    def __init__(self, packing: Packing, window: int | None):
        self.packing, self.window = packing, window
        self._layout = None

    def attend(self, q, k, v, scaling: float) -> torch.Tensor:
        """Attention of q, (batch, heads, tokens, head_dim) holding the packed tokens in order (one row of all, or a
        row each), to keys and values (1, kv_heads, keys, head_dim); the output in q's layout."""
        p, (b, heads, s, d) = self.packing, q.shape
        tokens = q.transpose(1, 2).reshape(-1, heads, d)
        if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            out = _flash_kernel(tokens, k[0].transpose(0, 1), v[0].transpose(0, 1), p.cu_q, p.cu_k, p.max_q, p.max_k,
                                0.0, scaling, self.window)
            return out.view(b, s, heads, d).transpose(1, 2)
        # Elsewhere SDPA: the one-query rows (decoding) padded into one call, each longer run in its own.
        if self._layout is None:  # built once for the layers of this kind
            self._layout = self._rows(q.device)
        (rows_q, rows_k, rows_mask), runs = self._layout
        kv_heads = k.shape[1]
        gqa = heads != kv_heads
        out = torch.empty_like(tokens)
        if rows_q is not None:
            keys, values = (t[0][:, rows_k].transpose(0, 1) for t in (k, v))  # (rows, kv_heads, keys, head_dim)
            # One query a row: a group's heads become its KV head's queries (no copies of the keys per head).
            grouped = tokens[rows_q].view(-1, kv_heads, heads // kv_heads, d)
            out[rows_q] = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=rows_mask,
                                                         scale=scaling).flatten(1, 2)
        for (q0, q1, k0, k1), mask in runs:
            out[q0:q1] = F.scaled_dot_product_attention(tokens[q0:q1].transpose(0, 1)[None], k[:, :, k0:k1],
                                                        v[:, :, k0:k1], attn_mask=mask, scale=scaling,
                                                        enable_gqa=gqa)[0].transpose(0, 1)
        return out.view(b, s, heads, d).transpose(1, 2)

    def _rows(self, device):
        """SDPA's inputs: the one-query rows' (query indices, key indices (rows, keys), mask (rows, 1, 1, keys)) and
        each longer run's (query and key bounds, mask (queries, keys))."""
        counts, lengths = self.packing.counts, self.packing.lengths
        ends_q, ends_k = np.cumsum(counts), np.cumsum(lengths)
        window = self.window or int(lengths.max()) + 1

        def allowed(query_pos, key_pos):
            return (key_pos <= query_pos) & (key_pos > query_pos - window)

        single = np.flatnonzero(counts == 1)
        rows = None, None, None
        if len(single):
            key_pos = np.arange(int(lengths[single].max()))[None]
            query_pos = (lengths[single] - 1)[:, None]
            keys = np.minimum(ends_k[single, None] - lengths[single, None] + key_pos, ends_k[-1] - 1)
            mask = allowed(query_pos, key_pos)[:, None, None]
            rows = tuple(torch.from_numpy(a).to(device) for a in (ends_q[single] - 1, keys, mask))
        runs = []
        for i in np.flatnonzero(counts > 1):
            query_pos = (lengths[i] - counts[i] + np.arange(counts[i]))[:, None]
            bounds = (ends_q[i] - counts[i], ends_q[i], ends_k[i] - lengths[i], ends_k[i])
            runs.append((tuple(map(int, bounds)), torch.from_numpy(allowed(query_pos, np.arange(lengths[i])[None]))
                         .to(device)))
        return rows, runs


class PagedCache(Cache):
    """A Cache over the paged pools for one packed forward: `write` (new tokens,) and `read` (keys,) are slots; the
    new tokens come as one row of all, or as a row each."""

    def __init__(self, pools: list[tuple[torch.Tensor, torch.Tensor]], write: torch.Tensor, read: torch.Tensor,
                 packing: Packing):
        super().__init__([], tuple(pools[0][0].shape[1:]))
        self.pools, self.write, self.read, self.packing = pools, write, read, packing

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.read.shape[0] - self.write.shape[0]

    def attention_masks(self, windows: dict[str, int | None]) -> dict[str, PackedAttention]:
        """The model's masks, one per attention kind (its window): the packed sequences' own attention."""
        return {kind: PackedAttention(self.packing, window) for kind, window in windows.items()}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = self.pools[layer_idx]
        keys[self.write] = key_states.transpose(1, 2).flatten(0, 1)
        values[self.write] = value_states.transpose(1, 2).flatten(0, 1)
        return keys[self.read].transpose(0, 1)[None], values[self.read].transpose(0, 1)[None]


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
        blocks already and its new tokens go right after them. On CUDA the sequences decoding one token run the
        decode step's graphs (PagedDecoder); all others (all of them elsewhere) share one packed forward."""
        decodes = [i for i, t in enumerate(new_tokens) if len(t) == 1] if self.decoder is not None else []
        packed = [i for i, t in enumerate(new_tokens) if self.decoder is None or len(t) > 1]
        parts = []
        # The decode graph first: the GPU runs it while the host launches the packed forward's many kernels.
        if decodes:
            parts.append((decodes, self.decoder.run([new_tokens[i][0] for i in decodes],
                                                    [num_cached[i] for i in decodes],
                                                    [block_tables[i] for i in decodes])))
        if packed:
            parts.append((packed, self._forward(*([values[i] for i in packed]
                                                  for values in (new_tokens, num_cached, block_tables)))))
        if len(parts) == 1:  # every row, in order: its logits as they are
            return parts[0][1]
        logits = parts[0][1].new_empty(len(new_tokens), parts[0][1].shape[-1])
        for rows, out in parts:
            logits[to_device(rows, logits.device)] = out
        return logits

    def _forward(self, new_tokens, num_cached, block_tables) -> torch.Tensor:
        """One forward over the rows' new tokens back to back (no padding), indices built in whole arrays and sent
        to the device in one copy, which waits for no queued work."""
        batch = len(new_tokens)
        counts = np.array([len(t) for t in new_tokens])
        lengths = np.array(num_cached) + counts
        tables = np.zeros((batch, max(map(len, block_tables))), dtype=np.int64)
        for row, table in enumerate(block_tables):
            tables[row, : len(table)] = table
        sequence_q, sequence_k = np.repeat(np.arange(batch), counts), np.repeat(np.arange(batch), lengths)
        ends_q, ends_k = np.cumsum(counts), np.cumsum(lengths)
        # A query is its sequence's token at (its place in the sequence's run) + the tokens cached before the run.
        position_q = np.arange(ends_q[-1]) - np.repeat(ends_q - counts, counts) + np.repeat(lengths - counts, counts)
        position_k = np.arange(ends_k[-1]) - np.repeat(ends_k - lengths, lengths)

        def slots(sequence, position):
            return tables[sequence, position // self.block_size] * self.block_size + position % self.block_size

        ids = np.fromiter((t for tokens in new_tokens for t in tokens), dtype=np.int64, count=int(ends_q[-1]))
        host = [ids, position_q, slots(sequence_q, position_q), ends_q - 1, slots(sequence_k, position_k),
                np.concatenate([[0], ends_q, [0], ends_k])]
        device = to_device(np.concatenate(host), self.model.device)
        ids, position_q, write, last, read, cu = device.split([len(a) for a in host])
        cu = cu.to(torch.int32)
        packing = Packing(cu[: batch + 1], cu[batch + 1 :], int(counts.max()), int(lengths.max()), counts, lengths)
        cache = PagedCache(self.pools, write, read, packing)
        if counts.max() == 1:  # decoding rows only: a row each, so the model's products take their decode path
            out = self.model(ids[:, None], position_ids=position_q[:, None], past_key_values=cache, use_cache=True,
                             logits_to_keep=1)
            return out.logits[:, -1]
        out = self.model(ids[None], position_ids=position_q[None], past_key_values=cache, use_cache=True,
                         logits_to_keep=last)
        return out.logits[0]
