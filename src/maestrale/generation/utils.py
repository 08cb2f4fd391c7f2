"""`generate()`: prepare inputs once, then run one of three loops — decode (greedy or sampling), beam search, assisted.

The decode loop does a fixed amount of Python per step: one forward on the new token, the processors, a write into a
preallocated token buffer, and at most one host sync (the stop check, skipped when nothing but the length can stop
generation). Masks and position ids are views or a +1 on small tensors, never rebuilt from the whole sequence.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..cache import Cache, DynamicCache
from ..engine import decoder_for
from ..models.outputs import ModelOutput
from .configuration import GenerationConfig
from .logits_process import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    ExponentialDecayLengthPenalty,
    ForcedBOSTokenLogitsProcessor,
    ForcedEOSTokenLogitsProcessor,
    InfNanRemoveLogitsProcessor,
    LogitNormalization,
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    PrefixConstrainedLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    SuppressTokensAtBeginLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopHLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)
from .stopping_criteria import (
    EosTokenCriteria,
    MaxTimeCriteria,
    StoppingCriteriaList,
    StopStringCriteria,
)
from .streamers import BaseStreamer

logger = logging.getLogger(__name__)

# `cache` is transformers' newer name of `past_key_values`.
MODEL_INPUTS = ("input_ids", "attention_mask", "past_key_values", "cache", "inputs_embeds")
# Prompt tokens a prefill chunk holds on CUDA (see _prefill_chunk): products of this many rows still run near the
# device's matrix rate, and each chunk computes 2048 x (window + 2048) scores of which a window's worth are used.
AUTO_PREFILL_CHUNK = 2048
# flash_attention_2's kernels skip the keys outside the window instead of masking a dense square, so its chunks are
# longer: fewer, longer products (Mistral-7B's 32k prompt on an H200: 0.990 s in chunks of 2,048, 0.960 s in 8,192).
AUTO_FLASH_PREFILL_CHUNK = 8192


@dataclass(repr=False, eq=False)
class GenerateDecoderOnlyOutput(ModelOutput):
    sequences: torch.LongTensor | None = None
    scores: tuple[torch.FloatTensor, ...] | None = None
    logits: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple | None = None
    hidden_states: tuple | None = None
    past_key_values: Cache | None = None


@dataclass(repr=False, eq=False)
class GenerateBeamDecoderOnlyOutput(ModelOutput):
    sequences: torch.LongTensor | None = None
    sequences_scores: torch.FloatTensor | None = None
    scores: tuple[torch.FloatTensor, ...] | None = None
    logits: tuple[torch.FloatTensor, ...] | None = None
    beam_indices: torch.LongTensor | None = None
    attentions: tuple | None = None
    hidden_states: tuple | None = None
    past_key_values: Cache | None = None


@dataclass
class _Run:
    """What the loops share, prepared once by `generate`."""

    config: GenerationConfig
    processors: LogitsProcessorList
    criteria: StoppingCriteriaList
    cache: Cache
    mask: torch.Tensor | None  # (batch, prompt) 2-D padding mask, None when nothing is padded
    positions: torch.Tensor | None  # (batch, prompt) position ids, None when they are plain 0..n-1
    past: int  # prompt tokens already in the cache
    max_length: int
    eos: torch.Tensor | None
    pad: torch.Tensor | None
    streamer: BaseStreamer | None
    embeds: torch.Tensor | None = None  # the prompt as inputs_embeds, fed instead of its token ids
    start: int = 0  # leading sequence positions with no token id (the embeddings-only prompt); outputs skip them

    def forward_kwargs(self) -> dict[str, Any]:
        """Model inputs that stay the same at every step."""
        return dict(past_key_values=self.cache, use_cache=True, return_dict=True,
                    output_attentions=self.config.output_attentions or None,
                    output_hidden_states=self.config.output_hidden_states or None)


class GenerationMixin:
    """Adds `generate()` to causal LMs; `model.generation_config` comes from the loader or, lazily, from the config."""

    @property
    def generation_config(self) -> GenerationConfig:
        if self.__dict__.get("_generation_config") is None:
            self.__dict__["_generation_config"] = GenerationConfig.from_model_config(self.config)
        return self.__dict__["_generation_config"]

    @generation_config.setter
    def generation_config(self, value: GenerationConfig) -> None:
        self.__dict__["_generation_config"] = value

    @classmethod
    def can_generate(cls) -> bool:
        return True

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | Mapping | None = None,
        generation_config: GenerationConfig | None = None,
        logits_processor: LogitsProcessorList | None = None,
        stopping_criteria: StoppingCriteriaList | None = None,
        prefix_allowed_tokens_fn: Callable[[int, torch.Tensor], list[int]] | None = None,
        synced_gpus: bool | None = None,
        assistant_model: torch.nn.Module | None = None,
        streamer: BaseStreamer | None = None,
        tokenizer: Any = None,
        **kwargs: Any,
    ) -> GenerateDecoderOnlyOutput | GenerateBeamDecoderOnlyOutput | torch.LongTensor:
        """Continue each prompt; keyword arguments override fields of `generation_config` (default: the model's).

        `inputs` is a (batch, seq) tensor of token ids or a mapping holding `input_ids` (and `attention_mask`), e.g.
        what a tokenizer or `apply_chat_template(..., return_tensors="pt")` returns.
        """
        config = copy.deepcopy(generation_config if generation_config is not None else self.generation_config)
        model_inputs = config.update(**kwargs)
        config.check_supported()
        unknown = set(model_inputs) - set(MODEL_INPUTS)
        if unknown:
            raise TypeError(f"generate() got unknown arguments {sorted(unknown)}: they are neither GenerationConfig "
                            f"fields nor the model inputs {list(MODEL_INPUTS)}")
        if "cache" in model_inputs:
            if model_inputs.get("past_key_values") is not None:
                raise ValueError("pass the cache once: as cache= (transformers' new name) or as past_key_values=")
            model_inputs["past_key_values"] = model_inputs.pop("cache")
        embeds = model_inputs.get("inputs_embeds")
        input_ids, mask, start = _input_ids_and_mask(inputs, model_inputs, config, self.device)
        cache = model_inputs.get("past_key_values")

        eos = None if config.eos_token_id is None else torch.tensor(config.eos_token_id, device=input_ids.device).reshape(-1)
        pad_id = config.pad_token_id if config.pad_token_id is not None else (None if eos is None else int(eos[0]))
        pad = None if pad_id is None else torch.tensor(pad_id, device=input_ids.device)
        if mask is None:
            mask = _infer_mask(input_ids, pad_id, eos) if embeds is None else torch.ones_like(input_ids)
        _warn_right_padding(input_ids, mask, pad_id)
        self._check_generate_args(config, input_ids, assistant_model, streamer, tokenizer, embeds, cache)

        prompt_len = input_ids.shape[1]
        max_length = _max_length(config, prompt_len, getattr(self.config, "max_position_embeddings", None))
        expand = max(config.num_beams, config.num_return_sequences)
        if expand > 1:
            input_ids, mask = input_ids.repeat_interleave(expand, 0), mask.repeat_interleave(expand, 0)
            embeds = None if embeds is None else embeds.repeat_interleave(expand, 0)
        positions = None
        if not bool(mask.all()):  # one sync, once: padding needs its mask and shifted positions at every step
            positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        else:
            mask = None
        if cache is None:
            # Assisted decoding rolls back rejected drafts; a rolling window cannot give back what it dropped,
            # so there every layer keeps all its tokens (masks still apply the window, so results are the same).
            assisted = assistant_model is not None or config.prompt_lookup_num_tokens is not None
            cache = DynamicCache() if assisted else DynamicCache(self.config)
        past = cache.get_seq_length()
        if positions is None and past:
            positions = torch.arange(prompt_len, device=input_ids.device)[None]

        processors = self._logits_processors(config, prompt_len, max_length, start, mask, eos,
                                             prefix_allowed_tokens_fn, logits_processor)
        criteria = StoppingCriteriaList()
        if config.max_time is not None:
            criteria.append(MaxTimeCriteria(config.max_time))
        if config.stop_strings is not None:
            criteria.append(StopStringCriteria(tokenizer, config.stop_strings))
        if eos is not None:
            criteria.append(EosTokenCriteria(eos))
        criteria = _merge(criteria, stopping_criteria or [])

        run = _Run(config, processors, criteria, cache, mask, positions, past, max_length, eos, pad, streamer,
                   None if embeds is None else embeds.to(self.device), start)
        if streamer is not None:
            streamer.put(input_ids[:, start:].cpu())
        if assistant_model is not None:
            return self._assisted_decode(input_ids, run, _AssistantDrafts(assistant_model, config.num_assistant_tokens))
        if config.prompt_lookup_num_tokens is not None:
            drafts = _PromptLookupDrafts(config.prompt_lookup_num_tokens, config.max_matching_ngram_size or 2)
            return self._assisted_decode(input_ids, run, drafts)
        if config.num_beams > 1:
            return self._beam_search(input_ids, run)
        return self._decode(input_ids, run)

    # ----- preparation -----
    def _check_generate_args(self, config, input_ids, assistant_model, streamer, tokenizer, embeds, cache) -> None:
        if streamer is not None and config.num_beams > 1:
            raise ValueError("a streamer cannot follow beam search (beams change their past); set num_beams=1 or drop streamer")
        if config.stop_strings is not None and tokenizer is None:
            raise ValueError("stop_strings need the tokenizer: pass generate(..., stop_strings=..., tokenizer=tokenizer)")
        if not config.use_cache:
            raise ValueError("maestrale always decodes with a KV cache; use_cache=False is not supported in generate()")
        if embeds is not None and cache is not None and cache.get_seq_length():
            raise ValueError("inputs_embeds cannot continue a filled past_key_values: pass the new tokens as input_ids")
        if assistant_model is not None or config.prompt_lookup_num_tokens is not None:
            how = "assistant_model" if assistant_model is not None else "prompt_lookup_num_tokens"
            if assistant_model is not None and config.prompt_lookup_num_tokens is not None:
                raise ValueError("pass either assistant_model or prompt_lookup_num_tokens, not both")
            if config.num_beams > 1 or config.do_sample:
                raise ValueError(f"assisted generation ({how}) in maestrale is greedy only: set num_beams=1 and "
                                 "do_sample=False")
            if input_ids.shape[0] > 1:
                raise ValueError(f"assisted generation ({how}) takes one prompt at a time, got a batch of "
                                 f"{input_ids.shape[0]}")
            if embeds is not None:
                raise ValueError(f"assisted generation ({how}) needs the prompt as input_ids, not inputs_embeds")
        if assistant_model is not None:
            if assistant_model.config.vocab_size != self.config.vocab_size:
                raise ValueError(f"assistant_model has vocab_size {assistant_model.config.vocab_size}, the model "
                                 f"{self.config.vocab_size}: the assistant must share the tokenizer")

    def _logits_processors(self, config, prompt_len, max_length, start, mask, eos, prefix_allowed_tokens_fn,
                           user) -> LogitsProcessorList:
        """The processors the config asks for, in transformers' order, with the user's merged in before the warpers.

        Processors see token ids only, so lengths lose the `start` positions of an embeddings-only prompt.
        """
        prompt_len, max_length = prompt_len - start, max_length - start
        processors = LogitsProcessorList()
        if config.sequence_bias is not None:
            processors.append(SequenceBiasLogitsProcessor(config.sequence_bias))
        if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
            # Left padding is not part of the text: skip it.
            skip = None if mask is None else (mask != 0).int().argmax(1)
            processors.append(RepetitionPenaltyLogitsProcessor(float(config.repetition_penalty), skip))
        if config.no_repeat_ngram_size:
            processors.append(NoRepeatNGramLogitsProcessor(config.no_repeat_ngram_size))
        if config.bad_words_ids is not None:
            processors.append(NoBadWordsLogitsProcessor(config.bad_words_ids, eos))
        min_length = max((config.min_length or 0) - start, 0)
        if config.min_new_tokens:
            min_length = prompt_len + config.min_new_tokens
        if eos is not None and min_length > 0:
            processors.append(MinLengthLogitsProcessor(min_length, eos))
        if prefix_allowed_tokens_fn is not None:
            processors.append(PrefixConstrainedLogitsProcessor(prefix_allowed_tokens_fn, config.num_beams))
        if config.forced_bos_token_id is not None:
            processors.append(ForcedBOSTokenLogitsProcessor(config.forced_bos_token_id))
        if config.forced_eos_token_id is not None:
            processors.append(ForcedEOSTokenLogitsProcessor(max_length, config.forced_eos_token_id))
        if config.remove_invalid_values:
            processors.append(InfNanRemoveLogitsProcessor())
        if config.exponential_decay_length_penalty is not None:
            if eos is None:
                raise ValueError("exponential_decay_length_penalty pushes eos up: set eos_token_id too")
            processors.append(ExponentialDecayLengthPenalty(config.exponential_decay_length_penalty, eos, prompt_len))
        if config.suppress_tokens is not None:
            processors.append(SuppressTokensLogitsProcessor(config.suppress_tokens))
        if config.begin_suppress_tokens is not None:
            # With a one-token prompt and a forced bos, the first free token is the one after it.
            begin = prompt_len + (prompt_len <= 1 and config.forced_bos_token_id is not None)
            processors.append(SuppressTokensAtBeginLogitsProcessor(config.begin_suppress_tokens, begin))
        processors = _merge(processors, user or [])
        if config.do_sample:
            # Beam sampling must keep enough candidates for every beam to survive an eos.
            keep = (len(eos) + 1 if eos is not None else 2) if config.num_beams > 1 else 1
            if config.temperature is not None and config.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(float(config.temperature)))
            if config.top_h is not None:
                processors.append(TopHLogitsWarper(config.top_h))
            if config.top_k:
                processors.append(TopKLogitsWarper(config.top_k, min_tokens_to_keep=keep))
            if config.top_p is not None and config.top_p < 1.0:
                processors.append(TopPLogitsWarper(config.top_p, min_tokens_to_keep=keep))
            if config.min_p is not None:
                processors.append(MinPLogitsWarper(config.min_p, min_tokens_to_keep=keep))
            if config.typical_p is not None and config.typical_p < 1.0:
                processors.append(TypicalLogitsWarper(config.typical_p, min_tokens_to_keep=keep))
            if config.epsilon_cutoff:
                processors.append(EpsilonLogitsWarper(config.epsilon_cutoff, min_tokens_to_keep=keep))
            if config.eta_cutoff:
                processors.append(EtaLogitsWarper(config.eta_cutoff, min_tokens_to_keep=keep))
        if config.renormalize_logits:
            processors.append(LogitNormalization())  # last, so beam scores stay log-probabilities
        return processors

    def _prefill(self, input_ids: torch.Tensor, run: _Run, model=None):
        """Run the prompt (the part not yet in the cache), in chunks where `_prefill_chunk` says; keep only the last
        position's logits. Earlier chunks go through the model itself, the last through `model` (the static decoder
        takes its cache from there)."""
        model = model or self
        past = run.past
        end = past + (run.embeds.shape[1] if run.embeds is not None else input_ids.shape[1] - past)
        chunk = self._prefill_chunk(run, end - past) or end - past
        for start in range(past, end, chunk):
            stop = min(start + chunk, end)
            out = (model if stop == end else self)(
                None if run.embeds is not None else input_ids[:, start:stop],
                inputs_embeds=None if run.embeds is None else run.embeds[:, start - past : stop - past],
                attention_mask=None if run.mask is None else run.mask[:, :stop],
                position_ids=None if run.positions is None else run.positions[:, start:stop],
                logits_to_keep=1,
                **run.forward_kwargs(),
            )
        return out

    def _prefill_chunk(self, run: _Run, new: int) -> int | None:
        """Prompt tokens per prefill forward, None for one forward: prefill_chunk_size, or on CUDA, where a sliding
        window is shorter than the prompt, AUTO_PREFILL_CHUNK (AUTO_FLASH_PREFILL_CHUNK under flash_attention_2). A
        chunk's queries attend to the keys the rolling cache holds (the window behind them) and to each other, so the
        mask and the cache follow the window, not the prompt's square."""
        config = run.config
        chunk = config.prefill_chunk_size
        per_token_outputs = [name for name in ("output_attentions", "output_hidden_states") if getattr(config, name)]
        if chunk is not None and per_token_outputs:
            raise ValueError(f"prefill_chunk_size={chunk} cannot be combined with {' and '.join(per_token_outputs)}: "
                             "the prompt's attentions and hidden states would come chunk by chunk; drop one of them")
        if chunk is None and self.device.type == "cuda" and not per_token_outputs:
            kinds = self.config.attention_layer_types
            window = self.config.sliding_window if "sliding_attention" in kinds else None
            if window is not None and window < run.past + new:
                flash = self.config._attn_implementation == "flash_attention_2"
                chunk = AUTO_FLASH_PREFILL_CHUNK if flash else AUTO_PREFILL_CHUNK
        return chunk if chunk is not None and chunk < new else None

    # ----- greedy and sampling -----
    def _decode(self, input_ids: torch.Tensor, run: _Run) -> GenerateDecoderOnlyOutput | torch.LongTensor:
        config = run.config
        batch, length = input_ids.shape
        tokens = input_ids.new_empty(batch, run.max_length)
        tokens[:, :length] = input_ids
        mask = _grown(run.mask, run.max_length)
        position = None if run.positions is None else run.positions[:, -1:]
        unfinished = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
        replace_finished = run.pad is not None and any(hasattr(c, "eos_token_id") for c in run.criteria)
        record = _Record(config)

        forward = decoder_for(self, input_ids, run) or self  # on CUDA, a static cache and CUDA-graph steps
        outputs = self._prefill(input_ids, run, forward)
        while True:
            logits = outputs.logits[:, -1].float()
            scores = run.processors(tokens[:, run.start:length], logits)
            if config.do_sample:
                next_tokens = torch.multinomial(scores.softmax(-1), num_samples=1).squeeze(1)
            else:
                next_tokens = scores.argmax(-1)
            if replace_finished:
                next_tokens = torch.where(unfinished, next_tokens, run.pad)
            tokens[:, length] = next_tokens
            length += 1
            record.add(scores, logits, outputs)
            if run.streamer is not None:
                run.streamer.put(next_tokens.cpu())
            if run.criteria:
                unfinished &= ~run.criteria(tokens[:, run.start:length], record.scores)
                if not unfinished.any():  # the one host sync of a step
                    break
            if length == run.max_length:
                break
            if position is not None:
                position = position + 1
            outputs = forward(
                next_tokens[:, None],
                attention_mask=None if mask is None else mask[:, :length],
                position_ids=position,
                **run.forward_kwargs(),
            )
        if run.streamer is not None:
            run.streamer.end()
        sequences = tokens[:, run.start:length]
        if not config.return_dict_in_generate:
            return sequences
        if forward is not self:
            forward.export(run.cache)
        return GenerateDecoderOnlyOutput(sequences=sequences, past_key_values=run.cache, **record.fields())

    # ----- beam search -----
    def _beam_search(self, input_ids: torch.Tensor, run: _Run) -> GenerateBeamDecoderOnlyOutput | torch.LongTensor:
        """Keep the num_beams best running hypotheses and the num_beams best finished ones, per prompt.

        Each step scores every (beam, token) continuation, takes the top (1 + #eos) * num_beams of them (so enough
        stay alive after some end), sends those that stop to the finished pool (scored with the length penalty)
        and continues with the best that did not. Everything is batched; the loop syncs once per step.
        """
        config = run.config
        beams, prompt_len, max_length = config.num_beams, input_ids.shape[1], run.max_length
        batch = input_ids.shape[0] // beams
        device = input_ids.device
        n_eos = 0 if run.eos is None else run.eos.numel()
        candidates = max(2, 1 + n_eos) * beams
        is_top = torch.arange(candidates, device=device) < beams
        if run.eos is None:
            fill = -1
        else:
            fill = int(run.pad) if run.pad is not None and int(run.pad) != 0 else int(run.eos[0])
        penalty, early = config.length_penalty, config.early_stopping

        def pick(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            """Rows `index` (batch, k) along the beam dimension of t (batch, beams, ...)."""
            return torch.take_along_dim(t, index.view(*index.shape, *([1] * (t.dim() - 2))), dim=1)

        running = torch.full((batch, beams, max_length), fill, dtype=torch.long, device=device)
        running[:, :, :prompt_len] = input_ids.view(batch, beams, prompt_len)
        running_scores = torch.zeros(batch, beams, device=device)
        running_scores[:, 1:] = -1e9  # all beams start equal: only the first may spawn continuations at step one
        running_origin = torch.full((batch, beams, max_length - prompt_len), -1, dtype=torch.int32, device=device)
        done, done_scores, done_origin = running.clone(), torch.full((batch, beams), -1e9, device=device), running_origin.clone()
        is_done = torch.zeros(batch, beams, dtype=torch.bool, device=device)
        improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)
        row_offset = torch.arange(batch, device=device)[:, None] * beams
        mask = _grown(run.mask, max_length)
        position = None if run.positions is None else run.positions[:, -1:]
        record = _Record(config)

        outputs = self._prefill(input_ids, run)
        length = prompt_len
        while True:
            logits = outputs.logits[:, -1].float()
            seen = running[:, :, run.start:length].reshape(batch * beams, length - run.start)
            log_probs = run.processors(seen, logits.log_softmax(-1))
            record.add(log_probs, logits, outputs)
            vocab = log_probs.shape[-1]
            totals = (log_probs.view(batch, beams, vocab) + running_scores[..., None]).view(batch, beams * vocab)
            if config.do_sample:
                flat_index = torch.multinomial(totals.softmax(-1), num_samples=candidates)
                # best first, as topk gives them: the order decides which continuations survive
                top_scores, order = totals.gather(1, flat_index).sort(-1, descending=True)
                flat_index = flat_index.gather(1, order)
            else:
                top_scores, flat_index = torch.topk(totals, candidates)
            source = flat_index // vocab
            cand = pick(running, source)
            cand[:, :, length] = flat_index % vocab
            cand_origin = pick(running_origin, source)
            cand_origin[:, :, length - prompt_len] = (source + row_offset).int()
            stops = run.criteria(cand[:, :, run.start : length + 1].reshape(batch * candidates, length + 1 - run.start),
                                 record.scores)
            stops = stops.view(batch, candidates) | (length + 1 >= max_length)

            # Running beams: the best continuations that did not stop.
            alive_scores = top_scores + stops.float() * -1e9
            best = torch.topk(alive_scores, beams).indices
            running, running_scores, running_origin = pick(cand, best), pick(alive_scores, best), pick(cand_origin, best)

            # Finished pool: merge in the stopped continuations among the top num_beams, if they beat what is there.
            ended_scores = top_scores / ((length + 1 - prompt_len) ** penalty)
            ended_scores += (is_done.all(-1, keepdim=True) & (early is True)).float() * -1e9
            ended_scores += (~improvable).float() * -1e9
            ended_scores += (~(stops & is_top)) * -1e9
            merged_scores = torch.cat([done_scores, ended_scores], 1)
            best = torch.topk(merged_scores, beams).indices
            done = pick(torch.cat([done, cand], 1), best)
            done_scores = pick(merged_scores, best)
            done_origin = pick(torch.cat([done_origin, cand_origin], 1), best)
            is_done = pick(torch.cat([is_done, stops & is_top], 1), best)

            run.cache.reorder_cache(running_origin[:, :, length - prompt_len].reshape(-1))
            length += 1
            # Can a running beam still beat the worst finished one? (transformers' heuristic, for identical output)
            best_length = max_length - prompt_len if early == "never" and penalty > 0 else length - prompt_len
            best_running = running_scores[:, :1] / (best_length ** penalty)
            worst_done = torch.where(is_done, done_scores.min(1, keepdim=True).values, -1e9)
            improvable = improvable & (best_running > worst_done).any(-1, keepdim=True)
            keep_going = improvable.any() & ~(is_done.all() & (early is True)) & ~stops.all()
            if not keep_going:  # the one host sync of a step
                break
            if position is not None:
                position = position + 1
            outputs = self(
                running[:, :, length - 1].reshape(-1, 1),
                attention_mask=None if mask is None else mask[:, :length],
                position_ids=position,
                **run.forward_kwargs(),
            )

        keep = config.num_return_sequences
        sequences, scores = done[:, :keep].reshape(batch * keep, -1), done_scores[:, :keep].reshape(-1)
        origin = done_origin[:, :keep].reshape(batch * keep, -1)
        generated = int((origin >= 0).sum(1).max())
        sequences, origin = sequences[:, run.start : prompt_len + generated], origin[:, :generated]
        if not config.return_dict_in_generate:
            return sequences
        return GenerateBeamDecoderOnlyOutput(
            sequences=sequences, sequences_scores=scores if config.output_scores else None, beam_indices=origin,
            past_key_values=run.cache, **record.fields(),
        )

    # ----- assisted (speculative) decoding -----
    def _assisted_decode(self, input_ids: torch.Tensor, run: _Run,
                         drafter) -> GenerateDecoderOnlyOutput | torch.LongTensor:
        """Greedy decoding where a drafter (a small assistant, or n-grams of the prompt) proposes tokens and the model
        checks them all in one forward.

        The model keeps its own pick at every position, so the result is exactly greedy decoding; each round costs
        one model forward and yields the accepted drafts plus one token. Rejected drafts are cropped from the cache.
        """
        config = run.config
        if run.mask is not None or run.past:
            raise ValueError("assisted generation takes one unpadded prompt and no past_key_values")
        length = input_ids.shape[1]
        tokens = input_ids.new_empty(1, run.max_length)
        tokens[:, :length] = input_ids
        record = _Record(config)
        finished = False
        while not finished:
            drafts = drafter(tokens, length, run.max_length - length - 1)
            seen = run.cache.get_seq_length()
            out = self(tokens[:, seen:length + drafts], logits_to_keep=drafts + 1, **run.forward_kwargs())
            new = 0
            for i in range(drafts + 1):
                logits = out.logits[:, i].float()
                scores = run.processors(tokens[:, :length + i], logits)
                choice = scores.argmax(-1)
                agrees = i < drafts and bool(choice == tokens[:, length + i])
                tokens[:, length + i] = choice
                new += 1
                record.add(scores, logits, None)
                if run.streamer is not None:
                    run.streamer.put(choice.cpu())
                if (run.criteria and bool(run.criteria(tokens[:, :length + new], record.scores).all())) \
                        or length + new == run.max_length:
                    finished = True
                    break
                if not agrees:
                    break
            length += new
            # Keep in the caches only tokens that are now part of the sequence (the newest is fed next round).
            run.cache.crop(length - 1)
            drafter.keep(length - 1, all_accepted=new == drafts + 1)
        if run.streamer is not None:
            run.streamer.end()
        sequences = tokens[:, :length]
        if not config.return_dict_in_generate:
            return sequences
        return GenerateDecoderOnlyOutput(sequences=sequences, past_key_values=run.cache, **record.fields())

    def compute_transition_scores(
        self,
        sequences: torch.Tensor,
        scores: tuple[torch.Tensor, ...],
        beam_indices: torch.Tensor | None = None,
        normalize_logits: bool = False,
    ) -> torch.Tensor:
        """The score of each generated token, (rows, generated): from generate()'s `scores` (or `logits`).

        With beam search pass the output's `beam_indices`, which tell the beam each step's token came from; steps past
        a row's end (index -1) score 0. `normalize_logits=True` log-softmaxes each step's scores first.
        """
        if beam_indices is None:
            beam_indices = torch.arange(scores[0].shape[0], device=scores[0].device)[:, None].expand(-1, len(scores))
        stacked = torch.stack(scores, 1)  # (rows of the step tensors, steps, vocab)
        if normalize_logits:
            stacked = stacked.log_softmax(-1)
        ended = beam_indices < 0
        steps = int((~ended).sum(-1).max())
        ended, rows = ended[:, :steps], beam_indices[:, :steps].clamp(min=0)
        chosen = sequences[:, sequences.shape[-1] - steps:].to(stacked.device)
        picked = stacked[rows, torch.arange(steps, device=stacked.device), chosen]
        return picked.masked_fill(ended, 0.0)


class _AssistantDrafts:
    """Drafts from a small model of the same vocabulary, run greedily; it drafts more after a round all accepted."""

    def __init__(self, assistant: torch.nn.Module, count: int):
        self.assistant, self.count, self.cache = assistant, count, DynamicCache()

    def __call__(self, tokens: torch.Tensor, length: int, room: int) -> int:
        """Write up to `room` drafts after tokens[:, :length]; return how many."""
        drafts = min(self.count, room)
        for i in range(drafts):  # feed whatever the assistant has not seen yet
            seen = self.cache.get_seq_length()
            out = self.assistant(tokens[:, seen:length + i], past_key_values=self.cache, use_cache=True,
                                 logits_to_keep=1, return_dict=True)
            tokens[:, length + i] = out.logits[:, -1].argmax(-1)
        return drafts

    def keep(self, length: int, all_accepted: bool) -> None:
        self.cache.crop(length)
        self.count = self.count + 2 if all_accepted else max(1, self.count - 1)


class _PromptLookupDrafts:
    """Prompt lookup: the tokens that followed the earliest earlier occurrence of the sequence's last n-gram
    (n from max_ngram down to 1), up to `count` of them."""

    def __init__(self, count: int, max_ngram: int):
        self.count, self.max_ngram = count, max_ngram

    def __call__(self, tokens: torch.Tensor, length: int, room: int) -> int:
        sequence = tokens[0, :length]
        for n in range(min(self.max_ngram, length - 1), 0, -1):
            hits = (sequence.unfold(0, n, 1) == sequence[-n:]).all(-1).nonzero().flatten().tolist()
            for at in hits:
                start = at + n
                end = min(start + self.count, length, start + room)
                if start < end:
                    tokens[0, length:length + end - start] = sequence[start:end].clone()
                    return end - start
        return 0

    def keep(self, length: int, all_accepted: bool) -> None:
        pass


class _Record:
    """The per-step tensors `return_dict_in_generate` asks for; nothing is kept otherwise."""

    def __init__(self, config: GenerationConfig):
        on = config.return_dict_in_generate
        self.scores = [] if on and config.output_scores else None
        self.logits = [] if on and config.output_logits else None
        self.attentions = [] if on and config.output_attentions else None
        self.hidden_states = [] if on and config.output_hidden_states else None

    def add(self, scores: torch.Tensor, logits: torch.Tensor, outputs) -> None:
        if self.scores is not None:
            self.scores.append(scores)
        if self.logits is not None:
            self.logits.append(logits)
        if self.attentions is not None:
            self.attentions.append(outputs.attentions)
        if self.hidden_states is not None:
            self.hidden_states.append(outputs.hidden_states)

    def fields(self) -> dict[str, tuple | None]:
        return {name: None if value is None else tuple(value)
                for name, value in vars(self).items()}


# ----- helpers -----
def _input_ids_and_mask(inputs, model_inputs: dict, config: GenerationConfig, device: torch.device):
    """input_ids (batch, seq), the attention mask if given, and how many leading positions have no token id.

    They come from a tensor, a mapping (BatchEncoding) or keyword arguments. A prompt given only as inputs_embeds
    gets placeholder ids, which nothing but the cache positions sees (as transformers, outputs hold new tokens only).
    """
    mask = model_inputs.get("attention_mask")
    if isinstance(inputs, Mapping):
        if "input_ids" not in inputs:
            raise ValueError(f"generate() got a mapping without input_ids (keys: {sorted(inputs)}); pass the tokenizer's output")
        mask = inputs.get("attention_mask") if mask is None else mask
        inputs = inputs["input_ids"]
    if inputs is not None and model_inputs.get("input_ids") is not None:
        raise ValueError("pass the prompt once: either as the first argument of generate() or as input_ids=")
    input_ids = inputs if inputs is not None else model_inputs.get("input_ids")
    embeds = model_inputs.get("inputs_embeds")
    if embeds is not None:
        if not isinstance(embeds, torch.Tensor) or embeds.dim() != 3:
            raise ValueError("inputs_embeds must be a (batch, sequence, hidden_size) tensor, got "
                             f"{tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__}")
        if mask is not None and tuple(mask.shape) != tuple(embeds.shape[:2]):
            raise ValueError(f"attention_mask must have the shape of inputs_embeds' first two dimensions "
                             f"{tuple(embeds.shape[:2])}, got {tuple(mask.shape)}")
        if input_ids is not None and tuple(input_ids.shape) != tuple(embeds.shape[:2]):
            raise ValueError(f"input_ids {tuple(input_ids.shape)} must be the ids of inputs_embeds "
                             f"{tuple(embeds.shape[:2])}, or left out")
        start = 0 if input_ids is not None else embeds.shape[1]
        if input_ids is None:
            input_ids = torch.zeros(embeds.shape[:2], dtype=torch.long)
        return input_ids.to(device), None if mask is None else mask.to(device), start
    if input_ids is None:
        if config.bos_token_id is None:
            raise ValueError("generate() needs input_ids, or a bos_token_id in the generation config to start from")
        input_ids = torch.tensor([[config.bos_token_id]])
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch tensor of token ids, got {type(input_ids).__name__}; "
                        "tokenize with return_tensors='pt'")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be 2-D (batch, sequence), got shape {tuple(input_ids.shape)}; "
                         "for one prompt use input_ids[None]")
    if mask is not None and mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(mask.shape)}")
    input_ids = input_ids.to(device)
    return input_ids, None if mask is None else mask.to(device), 0


def _infer_mask(input_ids: torch.Tensor, pad_id: int | None, eos: torch.Tensor | None) -> torch.Tensor:
    """Without a mask, pad tokens are padding, unless pad is also an eos token (then nothing is)."""
    if pad_id is None or (eos is not None and bool((eos == pad_id).any())):
        return torch.ones_like(input_ids)
    return (input_ids != pad_id).long() if bool((input_ids == pad_id).any()) else torch.ones_like(input_ids)


def _warn_right_padding(input_ids: torch.Tensor, mask: torch.Tensor, pad_id: int | None) -> None:
    if pad_id is not None and input_ids.shape[0] > 1 and bool((mask[:, -1] == 0).any()):
        logger.warning("A decoder-only architecture is being used, but right-padding was detected! For correct "
                       "generation results, please set `padding_side='left'` when initializing the tokenizer.")


def _max_length(config: GenerationConfig, prompt_len: int, max_positions: int | None) -> int:
    if config.max_new_tokens is not None:
        max_length = prompt_len + config.max_new_tokens
    elif config.max_length is not None:
        max_length = config.max_length
    else:
        warnings.warn("Using the model-agnostic default `max_length` (=20) to control the generation length. "
                      "We recommend setting `max_new_tokens` to control the maximum length of the generation.",
                      UserWarning, stacklevel=3)
        max_length = prompt_len + 20
        if max_positions is not None:
            max_length = min(max_length, max_positions)
    if prompt_len >= max_length:
        raise ValueError(f"Input length of input_ids is {prompt_len}, but `max_length` is set to {max_length}. "
                         "Increase `max_length` or, better, set `max_new_tokens`.")
    return max_length


def _grown(mask: torch.Tensor | None, max_length: int) -> torch.Tensor | None:
    """The padding mask extended with ones to max_length, so each step takes a view instead of concatenating."""
    if mask is None:
        return None
    grown = mask.new_ones(mask.shape[0], max_length)
    grown[:, : mask.shape[1]] = mask
    return grown


def _merge(defaults: list, custom: list):
    """The defaults, each replaced by a custom entry of the same type if there is one, then the other custom ones."""
    merged = type(defaults)()
    for default in defaults:
        replacement = next((c for c in custom if type(c) is type(default)), None)
        if replacement is not None:
            logger.warning(f"a custom {type(default).__name__} was passed to generate() and also built from the "
                           "generation config; the custom one is used")
        merged.append(replacement if replacement is not None else default)
    merged.extend(c for c in custom if c not in merged)
    return merged
