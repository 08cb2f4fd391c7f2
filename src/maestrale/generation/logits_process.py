"""Logits processors: functions of (input_ids, scores) -> scores, applied in order before picking a token.

Each works on a whole batch with tensor ops only, so a decode step never waits on the host for them.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

NEG_INF = -math.inf


def _as_id_tensor(token_ids: int | list[int] | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    if isinstance(token_ids, torch.Tensor):
        return token_ids.reshape(-1).to(device) if device is not None else token_ids.reshape(-1)
    return torch.tensor([token_ids] if isinstance(token_ids, int) else list(token_ids), device=device)


class LogitsProcessor:
    """Base class: `__call__(input_ids (batch, seq), scores (batch, vocab)) -> scores`."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(input_ids, scores)")


LogitsWarper = LogitsProcessor  # the old name of the sampling-only processors


class LogitsProcessorList(list):
    """Applies its processors in order."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.FloatTensor:
        for processor in self:
            scores = processor(input_ids, scores, **kwargs) if kwargs else processor(input_ids, scores)
        return scores


# ----- sampling warpers -----
class TemperatureLogitsWarper(LogitsProcessor):
    def __init__(self, temperature: float):
        if not isinstance(temperature, (float, int)) or temperature <= 0:
            raise ValueError(f"temperature must be a positive float, got {temperature!r}; for greedy use do_sample=False")
        self.temperature = float(temperature)

    def __call__(self, input_ids, scores):
        return scores / self.temperature


class TopKLogitsWarper(LogitsProcessor):
    """Keep the k highest scores (ties with the k-th included)."""

    def __init__(self, top_k: int, filter_value: float = NEG_INF, min_tokens_to_keep: int = 1):
        if not isinstance(top_k, int) or top_k <= 0:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
        self.top_k = max(top_k, min_tokens_to_keep)
        self.filter_value = filter_value

    def __call__(self, input_ids, scores):
        kth = torch.topk(scores, min(self.top_k, scores.shape[-1])).values[..., -1:]
        return scores.masked_fill(scores < kth, self.filter_value)


class TopPLogitsWarper(LogitsProcessor):
    """Nucleus sampling: keep the smallest set of top tokens whose probability reaches top_p."""

    def __init__(self, top_p: float, filter_value: float = NEG_INF, min_tokens_to_keep: int = 1):
        top_p = float(top_p)
        if not 0.0 <= top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        if not isinstance(min_tokens_to_keep, int) or min_tokens_to_keep < 1:
            raise ValueError(f"min_tokens_to_keep must be a positive integer, got {min_tokens_to_keep!r}")
        self.top_p, self.filter_value, self.min_tokens_to_keep = top_p, filter_value, min_tokens_to_keep

    def __call__(self, input_ids, scores):
        ascending, order = torch.sort(scores)
        # Drop the low tail whose cumulated mass stays within 1 - top_p; always keep the best min_tokens_to_keep.
        drop = ascending.softmax(-1).cumsum(-1) <= 1 - self.top_p
        drop[..., -self.min_tokens_to_keep:] = False
        return scores.masked_fill(drop.scatter(-1, order, drop), self.filter_value)


class MinPLogitsWarper(LogitsProcessor):
    """Keep tokens whose probability is at least min_p times the top token's."""

    def __init__(self, min_p: float, filter_value: float = NEG_INF, min_tokens_to_keep: int = 1):
        if not 0.0 <= min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {min_p!r}")
        if not isinstance(min_tokens_to_keep, int) or min_tokens_to_keep < 1:
            raise ValueError(f"min_tokens_to_keep must be a positive integer, got {min_tokens_to_keep!r}")
        self.min_p, self.filter_value, self.min_tokens_to_keep = min_p, filter_value, min_tokens_to_keep

    def __call__(self, input_ids, scores):
        probs = scores.softmax(-1)
        drop = probs < self.min_p * probs.amax(-1, keepdim=True)
        keep = torch.topk(probs, min(self.min_tokens_to_keep, probs.shape[-1]), dim=-1).indices
        drop.scatter_(-1, keep, False)
        return scores.masked_fill(drop, self.filter_value)


class TypicalLogitsWarper(LogitsProcessor):
    """Typical decoding: keep the tokens whose surprisal is closest to the entropy, up to probability mass `mass`."""

    def __init__(self, mass: float = 0.9, filter_value: float = NEG_INF, min_tokens_to_keep: int = 1):
        mass = float(mass)
        if not 0.0 < mass < 1.0:
            raise ValueError(f"typical_p must be in (0, 1), got {mass!r}")
        if not isinstance(min_tokens_to_keep, int) or min_tokens_to_keep < 1:
            raise ValueError(f"min_tokens_to_keep must be a positive integer, got {min_tokens_to_keep!r}")
        self.mass, self.filter_value, self.min_tokens_to_keep = mass, filter_value, min_tokens_to_keep

    def __call__(self, input_ids, scores):
        log_probs = scores.log_softmax(-1)
        entropy = -(log_probs * log_probs.exp()).nansum(-1, keepdim=True)
        distance, order = torch.sort((-log_probs - entropy).abs())
        cumulative = scores.gather(-1, order).softmax(-1).cumsum(-1)
        last = (cumulative < self.mass).sum(-1, keepdim=True).clamp_(max=distance.shape[-1] - 1)
        drop = distance > distance.gather(-1, last)
        drop[..., : self.min_tokens_to_keep] = False
        return scores.masked_fill(drop.scatter(-1, order, drop), self.filter_value)


# ----- processors used by every strategy -----
class RepetitionPenaltyLogitsProcessor(LogitsProcessor):
    """Divide positive (multiply negative) scores of tokens already in the sequence by `penalty`, once per token.

    `prompt_ignore_length` (an int or one per row) skips that many leading positions, e.g. left padding.
    """

    def __init__(self, penalty: float, prompt_ignore_length: int | torch.Tensor | None = None):
        if not isinstance(penalty, (float, int)) or penalty <= 0:
            raise ValueError(f"repetition_penalty must be a positive float, got {penalty!r}")
        self.penalty = float(penalty)
        self.prompt_ignore_length = prompt_ignore_length

    def __call__(self, input_ids, scores):
        vocab = scores.shape[-1]
        skip = self.prompt_ignore_length
        if isinstance(skip, int):
            input_ids = input_ids[:, skip:]
        elif skip is not None:
            # Ignored positions point at an extra column that is cut off below.
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            input_ids = input_ids.masked_fill(positions < skip.to(input_ids.device)[:, None], vocab)
        padded = torch.nn.functional.pad(scores, (0, 1))
        ids = input_ids.clamp(max=vocab)
        seen = padded.gather(-1, ids)
        seen = torch.where(seen < 0, seen * self.penalty, seen / self.penalty)
        return padded.scatter(-1, ids, seen)[..., :vocab]


class NoRepeatNGramLogitsProcessor(LogitsProcessor):
    """Forbid any token that would repeat an n-gram already in the sequence."""

    def __init__(self, ngram_size: int):
        if not isinstance(ngram_size, int) or ngram_size <= 0:
            raise ValueError(f"no_repeat_ngram_size must be a positive integer, got {ngram_size!r}")
        self.ngram_size = ngram_size

    def __call__(self, input_ids, scores):
        n, length = self.ngram_size, input_ids.shape[-1]
        if length < n:
            return scores
        # Every n-gram whose first n-1 tokens equal the last n-1 tokens bans its final token.
        ngrams = input_ids.unfold(1, n, 1)
        matches = (ngrams[..., :-1] == input_ids[:, length + 1 - n:].unsqueeze(1)).all(-1)
        vocab = scores.shape[-1]
        banned = torch.zeros(scores.shape[0], vocab + 1, dtype=torch.bool, device=scores.device)
        banned.scatter_(1, torch.where(matches, ngrams[..., -1].clamp(max=vocab), vocab), True)
        return scores.masked_fill(banned[:, :vocab], NEG_INF)


class NoBadWordsLogitsProcessor(LogitsProcessor):
    """Forbid token sequences: a one-token word always, a longer word's last token when its prefix just occurred.

    A one-token bad word equal to an eos token is left allowed, so generation can still end.
    """

    def __init__(self, bad_words_ids: list[list[int]], eos_token_id: int | list[int] | torch.Tensor | None = None):
        if not isinstance(bad_words_ids, list) or not bad_words_ids or not all(
            isinstance(word, list) and word and all(isinstance(t, int) and t >= 0 for t in word) for word in bad_words_ids
        ):
            raise ValueError(f"bad_words_ids must be a non-empty list of non-empty lists of token ids, got {bad_words_ids!r}")
        eos = set() if eos_token_id is None else set(_as_id_tensor(eos_token_id).tolist())
        words = {tuple(word) for word in bad_words_ids if not (len(word) == 1 and word[0] in eos)}
        self.single = sorted(word[0] for word in words if len(word) == 1)
        self.by_prefix_length: dict[int, list[tuple[int, ...]]] = {}
        for word in sorted(words):
            if len(word) > 1:
                self.by_prefix_length.setdefault(len(word) - 1, []).append(word)
        self.all_ids = sorted({t for word in words for t in word})
        self._tensors: dict[torch.device, tuple] = {}

    def _prepared(self, scores: torch.Tensor) -> tuple:
        """Device tensors of the words, built once per device."""
        device = scores.device
        if device not in self._tensors:
            outside = [t for t in self.all_ids if t >= scores.shape[-1]]
            if outside:
                raise ValueError(f"bad_words_ids hold ids {outside} outside the vocabulary (size {scores.shape[-1]})")
            single = torch.zeros(scores.shape[-1], dtype=torch.bool, device=device)
            single[self.single] = True
            groups = [(torch.tensor([w[:-1] for w in ws], device=device), torch.tensor([w[-1] for w in ws], device=device))
                      for ws in self.by_prefix_length.values()]
            self._tensors[device] = (single, groups)
        return self._tensors[device]

    def __call__(self, input_ids, scores):
        single, groups = self._prepared(scores)
        hits = single.expand_as(scores).to(torch.int32)
        for prefixes, last_tokens in groups:
            if prefixes.shape[1] > input_ids.shape[1]:
                continue
            completes = (input_ids[:, None, -prefixes.shape[1]:] == prefixes).all(-1)  # (batch, words)
            hits = hits.index_add(1, last_tokens, completes.to(torch.int32))
        return scores.masked_fill(hits > 0, NEG_INF)


class MinLengthLogitsProcessor(LogitsProcessor):
    """Forbid eos while the whole sequence (prompt included) is shorter than min_length."""

    def __init__(self, min_length: int, eos_token_id: int | list[int] | torch.Tensor, device: str = "cpu"):
        if not isinstance(min_length, int) or min_length < 0:
            raise ValueError(f"min_length must be a non-negative integer, got {min_length!r}")
        self.min_length = min_length
        self.eos_token_id = _as_id_tensor(eos_token_id, device)

    def __call__(self, input_ids, scores):
        if input_ids.shape[-1] >= self.min_length:  # a shape, so no device sync
            return scores
        scores = scores.clone()
        scores[:, self.eos_token_id.to(scores.device)] = NEG_INF
        return scores


class MinNewTokensLengthLogitsProcessor(MinLengthLogitsProcessor):
    """Forbid eos until min_new_tokens tokens follow the prompt."""

    def __init__(self, prompt_length_to_skip: int, min_new_tokens: int,
                 eos_token_id: int | list[int] | torch.Tensor, device: str = "cpu"):
        if not isinstance(min_new_tokens, int) or min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be a non-negative integer, got {min_new_tokens!r}")
        super().__init__(prompt_length_to_skip + min_new_tokens, eos_token_id, device)
        self.prompt_length_to_skip, self.min_new_tokens = prompt_length_to_skip, min_new_tokens


class PrefixConstrainedLogitsProcessor(LogitsProcessor):
    """Allow only the tokens `prefix_allowed_tokens_fn(batch_id, sequence)` returns (a host call per row and step)."""

    def __init__(self, prefix_allowed_tokens_fn: Callable[[int, torch.Tensor], list[int]], num_beams: int):
        self.prefix_allowed_tokens_fn = prefix_allowed_tokens_fn
        self.num_beams = num_beams

    def __call__(self, input_ids, scores):
        mask = torch.full_like(scores, NEG_INF)
        for row, sequence in enumerate(input_ids):
            allowed = self.prefix_allowed_tokens_fn(row // self.num_beams, sequence)
            if len(allowed) == 0:
                raise ValueError(f"prefix_allowed_tokens_fn returned no allowed token for batch id {row // self.num_beams}")
            mask[row, allowed] = 0
        constrained = scores + mask
        # A prompt whose every beam has only forbidden continuations falls back to the bare mask (as transformers).
        stuck = constrained.amax(-1).isneginf().view(-1, self.num_beams).all(-1)
        return torch.where(stuck.repeat_interleave(self.num_beams)[:, None], mask, constrained)
