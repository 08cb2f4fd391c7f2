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


class EpsilonLogitsWarper(LogitsProcessor):
    """Epsilon sampling: drop tokens whose probability is below `epsilon` (the best min_tokens_to_keep stay)."""

    def __init__(self, epsilon: float, filter_value: float = NEG_INF, min_tokens_to_keep: int = 1):
        epsilon = float(epsilon)
        if not 0.0 < epsilon < 1.0:
            raise ValueError(f"epsilon_cutoff must be in (0, 1), got {epsilon!r}")
        if not isinstance(min_tokens_to_keep, int) or min_tokens_to_keep < 1:
            raise ValueError(f"min_tokens_to_keep must be a positive integer, got {min_tokens_to_keep!r}")
        self.epsilon, self.filter_value, self.min_tokens_to_keep = epsilon, filter_value, min_tokens_to_keep

    def _threshold(self, scores: torch.Tensor) -> torch.Tensor | float:
        return self.epsilon

    def __call__(self, input_ids, scores):
        drop = scores.softmax(-1) < self._threshold(scores)
        kth = torch.topk(scores, min(self.min_tokens_to_keep, scores.shape[-1])).values[..., -1:]
        return scores.masked_fill(drop & (scores < kth), self.filter_value)


class EtaLogitsWarper(EpsilonLogitsWarper):
    """Eta sampling: as epsilon sampling with the cutoff min(eta, sqrt(eta) * exp(-entropy)) per row."""

    def __init__(self, epsilon: float, filter_value: float = NEG_INF, min_tokens_to_keep: int = 1,
                 device: str = "cpu"):
        if not 0.0 < float(epsilon) < 1.0:
            raise ValueError(f"eta_cutoff must be in (0, 1), got {epsilon!r}")
        super().__init__(epsilon, filter_value, min_tokens_to_keep)

    def _threshold(self, scores):
        entropy = torch.distributions.Categorical(logits=scores).entropy()
        eta = torch.tensor(self.epsilon, device=scores.device)
        return torch.minimum(eta, eta.sqrt() * torch.exp(-entropy))[..., None]


class TopHLogitsWarper(LogitsProcessor):
    """Top-H: among the 100 best tokens, keep the most likely ones while their entropy stays within top_h * H."""

    top_n = 100  # the candidates considered, as in transformers

    def __init__(self, top_h: float, filter_value: float = NEG_INF):
        if not 0.0 < top_h <= 1.0:
            raise ValueError(f"top_h must be in (0, 1], got {top_h!r}")
        self.top_h, self.filter_value = top_h, filter_value

    def __call__(self, input_ids, scores):
        best, index = torch.topk(scores, min(self.top_n, scores.shape[-1]))
        dist = torch.distributions.Categorical(logits=best)
        probs = dist.probs
        within = torch.cumsum(-probs * probs.log(), -1) <= (dist.entropy() * self.top_h)[:, None]
        within[:, 0] = True
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter(1, index, within)
        return scores.masked_fill(~keep, self.filter_value)


class SequenceBiasLogitsProcessor(LogitsProcessor):
    """Add a bias to a token wherever it would complete a given token sequence (a one-token sequence: always).

    `sequence_bias` is {(ids...): bias} or [[ids, bias], ...] (the JSON form).
    """

    def __init__(self, sequence_bias: dict[tuple[int, ...], float] | list):
        pairs = sequence_bias.items() if isinstance(sequence_bias, dict) else sequence_bias
        if not pairs or not all(
            isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], (list, tuple)) and pair[0]
            and all(isinstance(t, int) and t >= 0 for t in pair[0]) and isinstance(pair[1], (int, float))
            for pair in pairs
        ):
            raise ValueError("sequence_bias must be a non-empty {(token ids...): bias} dict or "
                             f"[[token ids, bias], ...] list, got {sequence_bias!r}")
        self.sequence_bias = {tuple(ids): float(bias) for ids, bias in pairs}
        self._tensors: dict[torch.device, tuple] = {}

    def _prepared(self, scores: torch.Tensor) -> tuple:
        device, vocab = scores.device, scores.shape[-1]
        if device not in self._tensors:
            outside = sorted({t for ids in self.sequence_bias for t in ids if t >= vocab})
            if outside:
                raise ValueError(f"sequence_bias holds ids {outside} outside the vocabulary (size {vocab})")
            single = torch.zeros(vocab, device=device)
            by_prefix_length: dict[int, list] = {}
            for ids, bias in self.sequence_bias.items():
                if len(ids) == 1:
                    single[ids[0]] = bias
                else:
                    by_prefix_length.setdefault(len(ids) - 1, []).append((ids, bias))
            groups = [(torch.tensor([ids[:-1] for ids, _ in group], device=device),
                       torch.tensor([ids[-1] for ids, _ in group], device=device),
                       torch.tensor([bias for _, bias in group], device=device))
                      for group in by_prefix_length.values()]
            self._tensors[device] = (single, groups)
        return self._tensors[device]

    def __call__(self, input_ids, scores):
        single, groups = self._prepared(scores)
        bias = single.expand_as(scores).clone()
        for prefixes, last_tokens, biases in groups:
            if prefixes.shape[1] > input_ids.shape[1]:
                continue
            completes = (input_ids[:, None, -prefixes.shape[1]:] == prefixes).all(-1)  # (batch, sequences)
            bias.index_add_(1, last_tokens, torch.where(completes, biases, 0.0))
        return scores + bias


class SuppressTokensLogitsProcessor(LogitsProcessor):
    """Forbid the given tokens at every step."""

    def __init__(self, suppress_tokens: list[int], device: str = "cpu"):
        self.suppress_tokens = _as_id_tensor(list(suppress_tokens), device)

    def __call__(self, input_ids, scores):
        vocab = torch.arange(scores.shape[-1], device=scores.device)
        return scores.masked_fill(torch.isin(vocab, self.suppress_tokens.to(scores.device)), NEG_INF)


class SuppressTokensAtBeginLogitsProcessor(SuppressTokensLogitsProcessor):
    """Forbid the given tokens at the step where the sequence holds `begin_index` tokens (the first new one)."""

    def __init__(self, begin_suppress_tokens: list[int], begin_index: int, device: str = "cpu"):
        super().__init__(begin_suppress_tokens, device)
        self.begin_index = begin_index

    def set_begin_index(self, begin_index: int) -> None:
        self.begin_index = begin_index

    def __call__(self, input_ids, scores):
        return super().__call__(input_ids, scores) if input_ids.shape[-1] == self.begin_index else scores


class ForcedBOSTokenLogitsProcessor(LogitsProcessor):
    """Force `bos_token_id` as the token that follows a one-token sequence."""

    def __init__(self, bos_token_id: int):
        self.bos_token_id = bos_token_id

    def __call__(self, input_ids, scores):
        if input_ids.shape[-1] != 1:
            return scores
        forced = torch.full_like(scores, NEG_INF)
        forced[:, self.bos_token_id] = 0
        return forced


class ForcedEOSTokenLogitsProcessor(LogitsProcessor):
    """Force an eos token as the last token before max_length."""

    def __init__(self, max_length: int, eos_token_id: int | list[int] | torch.Tensor, device: str = "cpu"):
        self.max_length = max_length
        self.eos_token_id = _as_id_tensor(eos_token_id, device)
        if self.eos_token_id.is_floating_point() or bool((self.eos_token_id < 0).any()):
            raise ValueError(f"forced_eos_token_id must be non-negative token ids, got {eos_token_id!r}")

    def __call__(self, input_ids, scores):
        if input_ids.shape[-1] != self.max_length - 1:
            return scores
        forced = torch.full_like(scores, NEG_INF)
        forced[:, self.eos_token_id.to(scores.device)] = 0
        return forced


class InfNanRemoveLogitsProcessor(LogitsProcessor):
    """Replace NaN by 0 and +-inf by the largest finite values of the dtype, so sampling cannot fail on them."""

    def __call__(self, input_ids, scores):
        finfo = torch.finfo(scores.dtype)
        return torch.nan_to_num(scores, nan=0.0, posinf=finfo.max, neginf=finfo.min)


class ExponentialDecayLengthPenalty(LogitsProcessor):
    """Raise the eos scores by |score| * (factor ** n - 1), n tokens past `start` new tokens; takes (start, factor)."""

    def __init__(self, exponential_decay_length_penalty: tuple[int, float],
                 eos_token_id: int | list[int] | torch.Tensor, input_ids_seq_length: int):
        start, factor = exponential_decay_length_penalty
        self.regulation_start = start + input_ids_seq_length
        self.regulation_factor = factor
        self.eos_token_id = _as_id_tensor(eos_token_id)
        if self.eos_token_id.is_floating_point() or bool((self.eos_token_id < 0).any()):
            raise ValueError(f"eos_token_id must be non-negative token ids, got {eos_token_id!r}")

    def __call__(self, input_ids, scores):
        past_start = input_ids.shape[-1] - self.regulation_start
        if past_start <= 0:
            return scores
        eos = self.eos_token_id.to(scores.device)
        eos_scores = scores[:, eos]
        # |score| makes the push point upwards for negative scores too; -inf (a forbidden eos) stays forbidden.
        boost = (eos_scores.abs() * (self.regulation_factor ** past_start - 1)).masked_fill(~eos_scores.isfinite(), 0.0)
        penalties = torch.zeros_like(scores)
        penalties[:, eos] = boost
        return scores + penalties


class LogitNormalization(LogitsProcessor):
    """log-softmax of the scores (after the other processors, so that beam scores stay log-probabilities)."""

    def __call__(self, input_ids, scores):
        return scores.log_softmax(-1)
