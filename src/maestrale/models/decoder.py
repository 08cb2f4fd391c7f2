"""The one decoder all four families share, and the declaration of how each family differs."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..cache import Cache, DynamicCache, cache_argument
from . import kernels
from .attention import Attention, AttentionMask
from .mlp import GatedMLP, SparseMoeBlock
from .modeling_utils import PreTrainedModel
from .outputs import BaseModelOutputWithPast, MoeModelOutputWithPast
from .rotary import RotaryEmbedding


@dataclass(frozen=True)
class Family:
    """What a family changes in the shared decoder."""

    fused_projections: bool = False  # Phi-3: qkv_proj and gate_up_proj
    sparse_moe: bool = False  # Mixtral: router + experts instead of one MLP


FAMILIES = {
    "mistral": Family(),
    "ministral": Family(),  # its per-layer full/sliding pattern comes from config.layer_types
    "mixtral": Family(sparse_moe=True),
    "phi3": Family(fused_projections=True),
}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS normalisation in float32, scaled by `weight` after the cast back (transformers' order of rounding)."""
    if kernels.fused(x, weight) and x.stride(-1) == 1:
        return kernels.rms_norm(x, weight, eps)
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.variance_epsilon)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + ffn(norm(x)); Phi-3 adds dropout on both residual branches."""

    def __init__(self, config, layer_idx: int, family: Family):
        super().__init__()
        self.self_attn = Attention(config, layer_idx, fused_qkv=family.fused_projections)
        self.mlp = SparseMoeBlock(config) if family.sparse_moe else GatedMLP(config, family.fused_projections)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.resid_dropout = nn.Dropout(getattr(config, "resid_pdrop", 0.0))

    def forward(self, x, rotary, mask, cache, backend):
        attn_out, attn_weights = self.self_attn(self.input_layernorm(x), rotary, mask, cache, backend)
        x = x + self.resid_dropout(attn_out)
        ffn_out = self.mlp(self.post_attention_layernorm(x))
        router_logits = None
        if isinstance(ffn_out, tuple):
            ffn_out, router_logits = ffn_out
        return x + self.resid_dropout(ffn_out), attn_weights, router_logits


def _check_inputs(config, input_ids, inputs_embeds, attention_mask, position_ids, past_key_values) -> None:
    """Shape, rank and dtype checks; they read metadata only, so they cost no device sync."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    if input_ids is not None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be 2-D (batch, sequence), got shape {tuple(input_ids.shape)}")
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        batch, seq = input_ids.shape
    else:
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
            raise ValueError(
                f"inputs_embeds must be (batch, sequence, hidden_size={config.hidden_size}), "
                f"got shape {tuple(inputs_embeds.shape)}"
            )
        if not inputs_embeds.dtype.is_floating_point:
            raise TypeError(f"inputs_embeds must be floating point, got dtype {inputs_embeds.dtype}")
        batch, seq = inputs_embeds.shape[:2]
    if seq == 0:
        raise ValueError("the input sequence is empty")
    if past_key_values is not None:
        if not isinstance(past_key_values, Cache):
            raise TypeError(f"past_key_values must be a maestrale Cache (e.g. DynamicCache), got {type(past_key_values).__name__}")
        expected = (config.num_key_value_heads, config.resolved_head_dim)
        if past_key_values.shape not in (None, expected) or len(past_key_values) > config.num_hidden_layers:
            raise ValueError(
                "past_key_values belongs to another model: it has "
                f"{len(past_key_values)} layers of (kv_heads, head_dim) = {past_key_values.shape}, this model "
                f"{config.num_hidden_layers} layers of {expected}"
            )
    past = past_key_values.get_seq_length() if past_key_values is not None else 0
    if attention_mask is not None:
        if attention_mask.shape != (batch, past + seq):
            raise ValueError(
                f"attention_mask must have shape (batch, past + new tokens) = {(batch, past + seq)}, "
                f"got {tuple(attention_mask.shape)}"
            )
    if position_ids is not None and (position_ids.dim() != 2 or position_ids.shape[-1] != seq
                                     or position_ids.shape[0] not in (1, batch)):
        raise ValueError(f"position_ids must have shape ({batch} or 1, {seq}), got {tuple(position_ids.shape)}")


def packed_documents(position_ids, cu_seq_lens_q, cu_seq_lens_k, batch: int, seq: int) -> torch.Tensor | None:
    """(batch, seq) index of the packed sequence each token belongs to, or None for one sequence a row.

    Sequences come from cu_seq_lens (one packed row, as transformers' DataCollatorWithFlattening writes them) or,
    as in transformers, from position_ids: a new sequence starts wherever a position is not the previous one + 1.
    """
    if cu_seq_lens_q is not None or cu_seq_lens_k is not None:
        if cu_seq_lens_k is not None and cu_seq_lens_q is not None and not torch.equal(cu_seq_lens_q, cu_seq_lens_k):
            raise ValueError("cu_seq_lens_q and cu_seq_lens_k differ: packed self-attention needs the same "
                             "boundaries for queries and keys; pass one of them, or both equal")
        bounds = cu_seq_lens_q if cu_seq_lens_q is not None else cu_seq_lens_k
        if batch != 1:
            raise ValueError(f"cu_seq_lens_q/cu_seq_lens_k describe one packed row, but the batch has {batch} rows: "
                             "flatten the batch into one row (input_ids of shape (1, total)), or pass position_ids "
                             "restarting at 0 per sequence instead")
        if bounds.dim() != 1 or int(bounds[0]) != 0 or int(bounds[-1]) != seq:
            raise ValueError(f"cu_seq_lens_q must run from 0 to the row's {seq} tokens, got {bounds.tolist()}")
        tokens = torch.arange(seq, device=bounds.device)
        return torch.bucketize(tokens, bounds[1:-1].to(tokens.dtype), right=True)[None]
    if position_ids is None or seq == 1:
        return None
    steps = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
    documents = (steps != 1).cumsum(-1)
    if not documents[:, -1].any():  # one sequence a row: the masks need not know
        return None
    return documents.expand(batch, -1)


class DecoderModel(PreTrainedModel):
    """Embeddings -> decoder layers -> final norm. Concrete families subclass this with their config class."""

    def __init__(self, config):
        super().__init__(config)
        family = FAMILIES[config.model_type]
        self.is_moe = family.sparse_moe
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config, i, family) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.checkpoint_kwargs = {"use_reentrant": False}
        # Layers sharing an attention kind share one mask; the first of each kind tells where its keys start.
        kinds = config.attention_layer_types
        self.first_layer_of_kind = {kind: kinds.index(kind) for kind in set(kinds)}
        self.post_init()

    def _masks(self, attention_mask, batch, seq, cache, device, position_ids, cu_seq_lens_q,
               cu_seq_lens_k) -> dict[str, AttentionMask]:
        """Each attention kind's mask; `position_ids` as given (None: one sequence a row)."""
        windows = {kind: self.config.sliding_window if kind == "sliding_attention" else None
                   for kind in self.first_layer_of_kind}
        if hasattr(cache, "attention_masks"):  # a cache that lays out and attends its own sequences (the server's)
            return cache.attention_masks(windows)
        past = cache.get_seq_length() if cache is not None else 0
        documents = None if attention_mask is not None or past else packed_documents(
            position_ids, cu_seq_lens_q, cu_seq_lens_k, batch, seq)
        masks = {}
        for kind, first in self.first_layer_of_kind.items():
            key_start = cache.layers[first].key_start() if cache is not None and first < len(cache.layers) else 0
            masks[kind] = AttentionMask(attention_mask, batch, past, seq, key_start, windows[kind], device, documents)
        return masks

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        return_dict: bool | None = None,
        cache_position: torch.LongTensor | None = None,  # accepted for transformers compatibility; unused
        cache: Cache | None = None,  # transformers' newer name of past_key_values
        cu_seq_lens_q: torch.Tensor | None = None,
        cu_seq_lens_k: torch.Tensor | None = None,
        max_length_q: int | None = None,  # accepted as transformers passes them; they follow from cu_seq_lens
        max_length_k: int | None = None,
    ) -> BaseModelOutputWithPast | MoeModelOutputWithPast | tuple:
        config = self.config
        past_key_values = cache_argument(past_key_values, cache)
        _check_inputs(config, input_ids, inputs_embeds, attention_mask, position_ids, past_key_values)
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        if output_router_logits is None:
            output_router_logits = getattr(config, "output_router_logits", False)
        use_cache = config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False  # recomputed layers must not append to a cache twice
        return_dict = config.return_dict if return_dict is None else return_dict

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, seq = inputs_embeds.shape[:2]
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config)
        cache = past_key_values if use_cache else None
        past = cache.get_seq_length() if cache is not None else 0
        # Before the default positions fill in, which are one sequence a row (and need no device sync to say so).
        masks = self._masks(attention_mask, batch, seq, cache, inputs_embeds.device, position_ids, cu_seq_lens_q,
                            cu_seq_lens_k)
        if position_ids is None:
            position_ids = torch.arange(past, past + seq, device=inputs_embeds.device)[None]
        rotary = self.rotary_emb(inputs_embeds, position_ids)
        # Only the explicit softmax can hand back attention weights.
        backend = "eager" if output_attentions else config._attn_implementation

        x = inputs_embeds
        hidden_states, attentions, router_logits = [], [], []
        for layer, kind in zip(self.layers, config.attention_layer_types):
            if output_hidden_states:
                hidden_states.append(x)
            step = partial(layer, rotary=rotary, mask=masks[kind], cache=cache, backend=backend)
            if self.gradient_checkpointing and self.training:
                x, weights, logits = checkpoint(step, x, **self.checkpoint_kwargs)
            else:
                x, weights, logits = step(x)
            attentions.append(weights)
            router_logits.append(logits)
        x = self.norm(x)
        if output_hidden_states:
            hidden_states.append(x)

        fields = dict(
            last_hidden_state=x,
            past_key_values=cache,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )
        if self.is_moe:
            out = MoeModelOutputWithPast(**fields, router_logits=tuple(router_logits) if output_router_logits else None)
        else:
            out = BaseModelOutputWithPast(**fields)
        return out if return_dict else out.to_tuple()
