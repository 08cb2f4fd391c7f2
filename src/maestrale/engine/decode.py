"""The one decode step, beneath generate() (a static KV cache, one CUDA graph per step) and the server (paged KV
blocks, one CUDA graph per batch-size bucket): `DecodeStep._step` holds the layer math, the two decoders differ only
in how `_attention` addresses the keys and values (kernels.py reads both).

The prompt goes through the model's own forward (SDPA); its keys and values are then copied into preallocated caches,
a ring of exactly the window's size for sliding-window layers. Each later token runs `_step`: per layer one q/k/v
product, rotary with the cache write and flash-decoding attention (kernels.py), the output product and the
feed-forward, whose residual add carries the next layer's norm. At batch 1 on CUDA the products of matrices run
matvec's kernel (the silu gate fused into gate/up's), at larger batches cuBLAS. On CUDA
the glue between the matrix products is fused by torch.compile and the whole step is captured in one CUDA graph, so a
token costs one graph replay; elsewhere the same step runs eagerly (how the CPU tests check it), or on CPU, when
generate() is given a compile_config, as one graph compiled by torch.compile (fused C++ glue around the products).

GGUF blocks kept packed (keep_quantized, CPU) are stacked like float weights, one product per group, and attend
through the same library's decode_attention (quantization/gguf_kernels.py). Weight-only int8 and int4 layers
(TorchAoConfig, GPTQ, AWQ; int4 in CUDA's layout) are stacked too, and on CUDA their gate/up runs with the gate fused
(kernels.py int4_mma_matmul up to 64 rows, int8_row_matmul at batch 1); where their kernels split the inputs in
shares, the float32 partial sums go to the kernel that reads the product (rotary's, the residual adds'), which adds
them up, so the sum costs no launch of its own (gate/up's, gated as summed, keeps its own). Mixtral's experts
quantized by FqnToConfig are stacked on CUDA into one weight per projection that the kernels index by expert
(experts=: the chosen pairs' rows, or each expert once on every row past as many pairs as experts); elsewhere their
module runs them. Other quantized layers (bitsandbytes) are not stacked: the step asks each such layer for its
product, i.e. runs the layer's own forward and kernels, so the tokens are those of the reference path. The glue is
then left uncompiled (Dynamo would not trace bitsandbytes' layers whole), and the graph captures bitsandbytes' 4-bit
kernels with it. 8-bit layers split outlier columns with a host-side check that a CUDA graph cannot capture: on CUDA
they keep the reference path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models.decoder import rms_norm
from ..models.linear import stacked_weight
from ..models.mlp import ACT_FNS
from ..models.outputs import CausalLMOutputWithPast
from ..quantization.bnb import quantized_linears
from ..quantization.gguf_kernels import BlocksWeight, stacked_blocks
from ..quantization.gguf_kernels import decode_attention as blocks_decode_attention
from ..quantization.weight_only import (Int4Weight, Int8Weight, PackedWeight, QuantizedExperts, stacked_experts,
                                        stacked_packed)
from .kernels import decode_attention, matvec, partials_sum, rotary_cache_write, use_triton

MIN_CAPACITY = 256  # full-attention caches hold a power of two >= the longest sequence, so few sizes get captured


def _streamed(x, weights) -> bool:
    """Whether a product runs matvec's kernel: one row (batch-1 decode) by a matrix, on CUDA, where it beats cuBLAS on
    every dense decode product measured (benchmarks/gpu_kernels.py); more rows go to cuBLAS."""
    return x.shape[0] == 1 and isinstance(weights, torch.Tensor) and use_triton(x)


def _product(x, weights, summed: bool = True):
    """x times one weight matrix, or through layers that run their own product (quantized), side by side.
    summed=False: as partial sums (splits, rows, n) for the consumer to add up (partials_sum), float32 where an int8 /
    int4 kernel split the inputs, else the product as (1, rows, n): the split's sum is then no launch of its own."""
    if isinstance(weights, torch.Tensor):
        out = matvec(x, weights) if _streamed(x, weights) else F.linear(x, weights)
    elif isinstance(weights, (Int4Weight, Int8Weight)):  # a split kernel's partial sums stay float32
        out = weights.matmul(x, summed=summed)
        return out if not summed and out.dtype == torch.float32 else out.to(x.dtype)
    elif isinstance(weights, (BlocksWeight, PackedWeight)):  # quantized rows of one or more layers (stacked_*)
        out = weights.matmul(x).to(x.dtype)
    else:
        out = torch.cat([layer(x) for layer in weights], dim=-1)
    return out if summed else out[None]


def _gated(x, gate_up, act, gate):
    """act(gate) * up of gate/up's product, in one kernel where there is one: matvec's (one row by a matrix),
    int4_mma_matmul's and int8_row_matmul's (int4 / int8 weights on CUDA, see their fuses_gate); else the product,
    then `gate` (a compiled _gate)."""
    if _streamed(x, gate_up):
        return matvec(x, gate_up, act)
    if isinstance(gate_up, (Int4Weight, Int8Weight)) and act is F.silu and gate_up.fuses_gate(x):
        return gate_up.matmul(x, act).to(x.dtype)
    return gate(_product(x, gate_up), act)


def _residual_norm(x, out, norm, eps: float):
    """The residual add of a block's output (its partial sums, _product's summed=False); the normed input of the
    next block."""
    x = x + partials_sum(out, x.dtype)
    return x, rms_norm(x, norm, eps)


def _route(h, router, top_k: int):
    probs = F.softmax(F.linear(h, router).float(), dim=-1)
    top_probs, top_experts = probs.topk(top_k, dim=-1)
    return top_probs / top_probs.sum(dim=-1, keepdim=True), top_experts


def _gate(gate_up, act):
    gate, up = gate_up.chunk(2, dim=-1)
    return act(gate) * up


def _mix(x, expert_out, top_weights, next_norm, eps: float):
    """Weighted sum of each token's k expert outputs, added to the residual; the next layer's normed input."""
    tokens, k = top_weights.shape
    mixed = (expert_out * top_weights.reshape(-1, 1)).view(tokens, k, -1).sum(dim=1)
    x = x + mixed.to(x.dtype)
    return x, rms_norm(x, next_norm, eps)


def _dense_experts(x, h, gate_up, down, top_weights, top_experts, act, next_norm, eps: float):
    """Every expert on every token, weighted by the router (zero where not chosen): once the batch routes to most
    experts, this reads each expert's weight once, the fewest bytes there are."""
    gate, up = torch.matmul(h, gate_up.transpose(1, 2)).chunk(2, dim=-1)
    out = torch.matmul(act(gate) * up, down.transpose(1, 2))  # (experts, tokens, hidden)
    weights = torch.zeros(h.shape[0], gate_up.shape[0], device=h.device).scatter(1, top_experts, top_weights)
    x = x + torch.einsum("eth,te->th", out.float(), weights).to(x.dtype)
    return x, rms_norm(x, next_norm, eps)


STEP_PARTS = {f.__name__: f for f in (rms_norm, _residual_norm, _gate, _route, _mix, _dense_experts)}


def _weights(*linears) -> torch.Tensor | tuple:
    """The layers' weights as row blocks of one matrix (laid out once by stacked_weight: no second copy); the layers
    themselves where one holds a weight that is not a plain matrix (quantized): each then runs its own product, unless
    they all hold GGUF blocks of one type, or weight-only int8 / int4 weights of one kind, which are laid out as one
    weight the same way."""
    if any(type(linear.weight) is not torch.nn.Parameter for linear in linears):
        stacked = stacked_blocks(linears)
        if stacked is None:
            stacked = stacked_packed(linears)
        return stacked if stacked is not None else linears
    if len(linears) == 1:
        return linears[0].weight.detach()
    stacked = stacked_weight(linears)
    return stacked if stacked is not None else torch.cat([linear.weight.detach() for linear in linears])


@dataclass
class _LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor | tuple  # a matrix, or quantized layers (see _weights)
    o_proj: torch.Tensor | tuple
    post_norm: torch.Tensor
    gate_up: torch.Tensor | tuple  # (2 * inter, hidden), or (experts, 2 * inter, hidden) for Mixtral
    down: torch.Tensor | tuple
    router: torch.Tensor | None = None
    experts: nn.Module | None = None  # quantized experts (gate_up and down: their stacked weights, or None)

    @classmethod
    def of(cls, layer) -> _LayerWeights:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = _weights(attn.qkv_proj) if hasattr(attn, "qkv_proj") else _weights(attn.q_proj, attn.k_proj, attn.v_proj)
        if hasattr(mlp, "experts"):
            experts, router = mlp.experts, mlp.gate.weight.detach()
            if isinstance(experts, QuantizedExperts):
                gate_up, down = stacked_experts(experts.gate_up_proj, gated=True), stacked_experts(experts.down_proj)
                if gate_up is None or down is None:
                    gate_up = down = None
                ffn = dict(gate_up=gate_up, down=down, router=router, experts=experts)
            else:
                ffn = dict(gate_up=experts.gate_up_proj.detach(), down=experts.down_proj.detach(), router=router)
        else:
            gate_up = _weights(mlp.gate_up_proj) if hasattr(mlp, "gate_up_proj") else _weights(mlp.gate_proj, mlp.up_proj)
            ffn = dict(gate_up=gate_up, down=_weights(mlp.down_proj))
        return cls(layer.input_layernorm.weight.detach(), qkv, _weights(attn.o_proj),
                   layer.post_attention_layernorm.weight.detach(), **ffn)


def capacity_for(length: int) -> int:
    return max(MIN_CAPACITY, 1 << (length - 1).bit_length())


class DecodeStep:
    """The one decode step: every row's next token through all layers, as one function of preallocated buffers
    (`ids`, `positions`, `t`), so it can be compiled and captured. Subclasses own the keys and values: `_attention`
    writes the token's and attends to those a row may see (static ring caches, or the server's paged pools)."""

    def __init__(self, model, dynamic: bool = False):
        config, base = model.config, model.base_model
        self.model = model
        embed = base.embed_tokens  # run as a module: its table may be packed (GGUF, keep_quantized=True)
        self.device, self.dtype = base.norm.weight.device, base.norm.weight.dtype
        self.eps, self.act = config.rms_norm_eps, ACT_FNS[config.hidden_act]
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.resolved_head_dim
        self.scale = self.head_dim**-0.5
        self.top_k = getattr(config, "num_experts_per_tok", None)
        self.rotary = base.rotary_emb
        self.embed = embed
        self.final_norm, self.lm_head = base.norm.weight.detach(), _weights(model.lm_head)
        self.layers = [_LayerWeights.of(layer) for layer in base.layers]
        window = config.sliding_window
        self.window_of = [window if kind == "sliding_attention" else None for kind in config.attention_layer_types]

        self.on_cuda = self.device.type == "cuda"
        compiled = self.on_cuda and not quantized_linears(model)
        compile_ = (lambda f: torch.compile(f, fullgraph=True, dynamic=dynamic)) if compiled else (lambda f: f)
        self.part = {name: compile_(f) for name, f in STEP_PARTS.items()}
        self.fingerprint = self._fingerprint()

    def _fingerprint(self) -> tuple:
        return tuple((p.data_ptr(), p.dtype) for p in self.model.parameters())

    def current(self) -> bool:
        """Whether the model still has the weights this decoder reads (not moved, cast or replaced since)."""
        return self._fingerprint() == self.fingerprint

    def _attention(self, layer: int, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate the fused q/k/v row (or its partial sums, _product's summed=False), store k and v, attend: (batch,
        heads, head_dim)."""
        raise NotImplementedError

    def _step(self) -> torch.Tensor:
        part, eps = self.part, self.eps
        x = self.embed(self.ids)
        cos, sin = self.rotary(x[:, None], self.positions[:, None])
        h = part["rms_norm"](x, self.layers[0].input_norm, eps)
        next_norms = [w.input_norm for w in self.layers[1:]] + [self.final_norm]
        for i, (w, next_norm) in enumerate(zip(self.layers, next_norms)):
            # The products' partial sums are added up by the kernels that read them: rotary's, the residual adds'
            attn = self._attention(i, _product(h, w.qkv, summed=False), cos, sin)
            x, h = part["_residual_norm"](x, _product(attn.flatten(1), w.o_proj, summed=False), w.post_norm, eps)
            if w.router is None:
                ffn = _product(_gated(h, w.gate_up, self.act, part["_gate"]), w.down, summed=False)
                x, h = part["_residual_norm"](x, ffn, next_norm, eps)
                continue
            top_weights, top_experts = part["_route"](h, w.router, self.top_k)
            if w.experts is not None:
                x, h = self._quantized_experts(x, h, w, top_weights, top_experts, next_norm)
                continue
            # Gathered up to one pair per expert (no more bytes than dense), as the model's Experts decode: the same
            # sums, which bitsandbytes' bfloat16 CPU kernels (AVX512-BF16) would turn from ulps into 1e-2 apart.
            if h.shape[0] * self.top_k > w.gate_up.shape[0]:
                x, h = part["_dense_experts"](x, h, w.gate_up, w.down, top_weights, top_experts, self.act, next_norm, eps)
            else:
                experts = top_experts.flatten()
                gated = matvec(h, w.gate_up, self.act, experts, rows_per_x=self.top_k)
                x, h = part["_mix"](x, matvec(gated, w.down, experts=experts), top_weights, next_norm, eps)
        return _product(h, self.lm_head)

    def _quantized_experts(self, x, h, w, top_weights, top_experts, next_norm):
        """Quantized experts' mix added to x, and the next normed input. Stacked (stacked_experts), the chosen pairs
        read their experts' rows (the kernels' experts=); past as many pairs as experts, or on CUDA not stacked (no
        host sync in a graph), each expert runs on every row, weighted by the router (zero where not chosen);
        elsewhere each expert on its own rows (the module)."""
        part, eps, experts = self.part, self.eps, w.experts
        if w.gate_up is not None and h.shape[0] * self.top_k <= experts.num_experts:
            chosen = top_experts.flatten()
            gated = w.gate_up.matmul(h, self.act, experts=chosen, rows_per_x=self.top_k)
            return part["_mix"](x, w.down.matmul(gated, experts=chosen), top_weights, next_norm, eps)
        if w.gate_up is None and not self.on_cuda:
            return part["_residual_norm"](x, experts(h, top_experts, top_weights), next_norm, eps)
        weights = torch.zeros(h.shape[0], experts.num_experts, device=h.device).scatter(1, top_experts, top_weights)
        out = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        for e, (gate_up, down) in enumerate(zip(experts.gate_up_proj, experts.down_proj)):
            out += _product(_gated(h, gate_up, self.act, part["_gate"]), down).float() * weights[:, e:e + 1]
        return part["_residual_norm"](x, out.to(h.dtype), next_norm, eps)

    def _graph(self, pool=None) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The step captured in a CUDA graph, after runs that compile and load every kernel (they write the slot
        the real step writes, with its values): the graph and its logits."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        # Each model and batch size compiles its own kernels; a process may hold more than Dynamo's default of 8.
        with torch.cuda.stream(side), torch._dynamo.config.patch(recompile_limit=64):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            logits = self._step()
        return graph, logits


class StaticDecoder(DecodeStep):
    """Decodes `batch` rows of up to `capacity` tokens; called like the model by generate's decode loop."""

    def __init__(self, model, batch: int, capacity: int, compile_step: bool = False):
        super().__init__(model)
        self.batch, self.capacity = batch, capacity
        device, dtype = self.device, self.dtype
        cache_shape = (batch, self.kv_heads, self.head_dim)
        self.k_cache, self.v_cache = [], []
        for w in self.window_of:
            size = capacity if w is None else min(w, capacity)
            self.k_cache.append(torch.zeros(*cache_shape[:2], size, self.head_dim, device=device, dtype=dtype))
            self.v_cache.append(torch.zeros_like(self.k_cache[-1]))
        self.seq_mask = torch.ones(batch, capacity, dtype=torch.int8, device=device)  # 0 for padding tokens
        # A model with GGUF blocks on CPU has maestrale's kernels built: their attention reads only the valid slots.
        blocks = device.type == "cpu" and dtype == torch.float32 and isinstance(self.lm_head, BlocksWeight)
        self.decode_attention = blocks_decode_attention if blocks else decode_attention
        self.ids = torch.zeros(batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)
        self.t = torch.zeros((), dtype=torch.long, device=device)  # sequence index of the token being decoded
        self.length = 0  # tokens in the cache (host copy of t)

        # On CPU, on request (compile_config): the whole step as one graph, its glue fused into C++ loops around the
        # layers' products. Dynamo traces every layer: minutes on 2 cores the first time, ~40 s with inductor's disk
        # cache warm, so a first short answer is faster eager.
        self.step = torch.compile(self._step, fullgraph=True, dynamic=False) if compile_step else self._step
        self.key = (batch, capacity, dtype, compile_step)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k_cache + self.v_cache)

    def _attention(self, layer, qkv, cos, sin):
        k_cache, v_cache = self.k_cache[layer], self.v_cache[layer]
        q = rotary_cache_write(qkv, cos, sin, k_cache, v_cache, self.t, self.heads)
        return self.decode_attention(q, k_cache, v_cache, self.seq_mask, self.t, self.scale)

    # ----- what generate calls -----
    def __call__(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, **kwargs):
        if self.length == 0:  # the prompt, through the model's own forward
            out = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, **kwargs)
            self._load(past_key_values, attention_mask)
            return out
        self.ids.copy_(input_ids[:, 0])
        if position_ids is None:
            self.positions.fill_(self.length)
        else:
            self.positions.copy_(position_ids[:, 0])
        self.t.fill_(self.length)
        if not self.on_cuda:
            self.logits = self.step()
        else:
            if self.graph is None:
                self.graph, self.logits = self._graph()
            self.graph.replay()
        self.length += 1
        return CausalLMOutputWithPast(logits=self.logits[:, None].clone())

    def _load(self, cache, attention_mask) -> None:
        """Move the prompt's keys and values from the model's cache into the static one (slot = index mod size)."""
        seen = cache.get_seq_length()
        for layer, k_cache, v_cache in zip(cache.layers, self.k_cache, self.v_cache):
            slots = torch.arange(seen - layer.kept, seen, device=k_cache.device) % k_cache.shape[2]
            k_cache.index_copy_(2, slots, layer.keys)
            v_cache.index_copy_(2, slots, layer.values)
            layer.keys = layer.values = None
        self.seq_mask.fill_(1)
        if attention_mask is not None:
            self.seq_mask[:, : attention_mask.shape[1]] = attention_mask
        self.length = seen

    def export(self, cache) -> None:
        """Give the model's cache back what the static one holds (generate returns it as past_key_values)."""
        seen = self.length
        for layer, window, k_cache, v_cache in zip(cache.layers, self.window_of, self.k_cache, self.v_cache):
            kept = seen if window is None else min(seen, window - 1)
            slots = torch.arange(seen - kept, seen, device=k_cache.device) % k_cache.shape[2]
            layer.keys, layer.values, layer.seen = k_cache.index_select(2, slots), v_cache.index_select(2, slots), seen


def batch_buckets(max_batch: int) -> list[int]:
    """The batch sizes PagedDecoder captures: 1, 2, 4, 8, then every multiple of 16, up to max_batch. A batch runs
    the smallest bucket that holds it; past 16 rows a padded row costs the products about what a real one does, so
    the padding stays under 16 rows (powers of two ran 130 rows as 256)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return sizes + [max_batch]


class PagedDecoder(DecodeStep):
    """The server's decode step on CUDA: each row's next token against its KV blocks (the engine's paged pools,
    (num_blocks * block_size, kv_heads, head_dim) per layer), one CUDA graph per batch-size bucket.

    A bucket's graph runs the first `bucket` rows of the buffers; rows past the batch have t = -1, so they write
    and read nothing. The rows' inputs go to the device in one copy: (id, position, t, block table) per row.
    """

    def __init__(self, model, pools: list[tuple[torch.Tensor, torch.Tensor]], block_size: int, max_batch: int,
                 max_blocks: int):
        super().__init__(model, dynamic=True)  # one compile of each part for all buckets
        self.pools = [(k.view(-1, block_size, *k.shape[1:]), v.view(-1, block_size, *v.shape[1:])) for k, v in pools]
        self.spans = [max_blocks * block_size if w is None else w for w in self.window_of]
        self.buckets = batch_buckets(max_batch)
        self.host = torch.zeros(max_batch, 3 + max_blocks, dtype=torch.long, pin_memory=self.on_cuda)
        self.host_rows = self.host.numpy()  # the same memory, filled row by row without torch calls
        self.inputs = torch.zeros_like(self.host, device=self.device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _attention(self, layer, qkv, cos, sin):
        k_pool, v_pool = self.pools[layer]
        q = rotary_cache_write(qkv, cos, sin, k_pool, v_pool, self.t, self.heads, self.tables)
        return decode_attention(q, k_pool, v_pool, None, self.t, self.scale, self.tables, self.spans[layer])

    def _use(self, rows: int) -> None:
        """Point the step's inputs at the buffers' first `rows` rows."""
        inputs = self.inputs[:rows]
        self.ids, self.positions, self.t, self.tables = inputs[:, 0], inputs[:, 1], inputs[:, 2], inputs[:, 3:]

    @torch.no_grad()  # as generate() captures the static decoder's: no autograd graph kept in the CUDA graph's pool
    def capture(self) -> None:
        """Capture every bucket's graph, the largest first so the others reuse its memory."""
        self.inputs[:, 2] = -1
        pool = torch.cuda.graph_pool_handle()
        for rows in reversed(self.buckets):
            self._use(rows)
            self.graphs[rows] = self._graph(pool)

    @torch.inference_mode()
    def run(self, token_ids: list[int], num_cached: list[int], block_tables: list[list[int]]) -> torch.Tensor:
        """Logits (batch, vocab) of each row's token, at index num_cached[i] of its sequence. Off CUDA the step runs
        eagerly on exactly the batch (how the CPU tests check it)."""
        batch = len(token_ids)
        rows = next(b for b in self.buckets if b >= batch) if self.on_cuda else batch
        host = self.host_rows
        host[:batch, 0] = token_ids
        host[:batch, 1] = num_cached
        host[:batch, 2] = num_cached
        host[batch:rows, :3] = (0, 0, -1)
        for row, table in enumerate(block_tables):
            host[row, 3 : 3 + len(table)] = table
        # Asynchronous: the host rows are written again only after the engine has read this step's tokens (a sync).
        self.inputs[:rows].copy_(self.host[:rows], non_blocking=True)
        if not self.on_cuda:
            self._use(rows)
            return self._step()
        graph, logits = self.graphs[rows]
        graph.replay()
        return logits[:batch]


def decoder_for(model, input_ids: torch.Tensor, run) -> StaticDecoder | None:
    """The model's static decoder for this generation, or None where the reference path runs.

    `cache_implementation` picks: "static" always (it runs eagerly off CUDA, compiled on CPU when `compile_config`
    is set), "dynamic" never, None (the default) on CUDA whenever the generation allows it.
    """
    choice = getattr(run.config, "cache_implementation", None)
    if choice not in (None, "static", "dynamic"):
        raise ValueError(f"cache_implementation={choice!r} is not supported; use 'static', 'dynamic' or None")
    if choice == "dynamic" or (choice is None and model.device.type != "cuda"):
        return None
    blockers = {
        "past_key_values": run.past > 0,
        "inputs_embeds": run.embeds is not None,
        "output_attentions": bool(run.config.output_attentions),
        "output_hidden_states": bool(run.config.output_hidden_states),
        "training mode": model.training,
        "a model spread over several devices": len({p.device for p in model.parameters()}) > 1,
        "forward hooks (the step calls no module)": any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()),
        "8-bit bitsandbytes layers on CUDA (not capturable)": model.is_loaded_in_8bit and model.device.type == "cuda",
    }
    found = [name for name, present in blockers.items() if present]
    if found:
        if choice == "static":
            raise ValueError(f"cache_implementation='static' cannot be used with {', '.join(found)}; "
                             "drop them or use cache_implementation='dynamic'")
        return None
    compile_step = model.device.type == "cpu" and getattr(run.config, "compile_config", None) is not None
    key = (input_ids.shape[0], capacity_for(run.max_length), model.base_model.norm.weight.dtype, compile_step)
    decoder = model.__dict__.get("_static_decoder")
    if decoder is None or decoder.key != key or not decoder.current():
        model.__dict__.pop("_static_decoder", None)  # free the old caches and graph first
        decoder = model.__dict__["_static_decoder"] = StaticDecoder(model, key[0], key[1], compile_step)
    decoder.length = 0
    return decoder
