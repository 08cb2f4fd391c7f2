"""Stopping criteria: `__call__(input_ids, scores) -> BoolTensor (batch,)`, True where a row is done."""

from __future__ import annotations

import time

import torch


class StoppingCriteria:
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None, **kwargs) -> torch.BoolTensor:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(input_ids, scores)")


class StoppingCriteriaList(list):
    """A row is done as soon as any criterion says so."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for criterion in self:
            done = done | criterion(input_ids, scores, **kwargs)
        return done

    @property
    def max_length(self) -> int | None:
        return next((c.max_length for c in self if isinstance(c, MaxLengthCriteria)), None)


class MaxLengthCriteria(StoppingCriteria):
    """Done once the sequence (prompt included) holds max_length tokens."""

    def __init__(self, max_length: int, max_position_embeddings: int | None = None):
        self.max_length = max_length
        self.max_position_embeddings = max_position_embeddings

    def __call__(self, input_ids, scores, **kwargs):
        done = input_ids.shape[-1] >= self.max_length  # a shape: no device sync
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class MaxTimeCriteria(StoppingCriteria):
    """Done once max_time seconds have passed since `initial_timestamp` (default: creation)."""

    def __init__(self, max_time: float, initial_timestamp: float | None = None):
        self.max_time = max_time
        self.initial_timestamp = time.time() if initial_timestamp is None else initial_timestamp

    def __call__(self, input_ids, scores, **kwargs):
        done = time.time() - self.initial_timestamp > self.max_time
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class EosTokenCriteria(StoppingCriteria):
    """Done when the last token is one of the eos ids."""

    def __init__(self, eos_token_id: int | list[int] | torch.Tensor):
        if not isinstance(eos_token_id, torch.Tensor):
            eos_token_id = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        self.eos_token_id = eos_token_id.reshape(-1)

    def __call__(self, input_ids, scores, **kwargs):
        if self.eos_token_id.device != input_ids.device:
            self.eos_token_id = self.eos_token_id.to(input_ids.device)
        return torch.isin(input_ids[:, -1], self.eos_token_id)


class StopStringCriteria(StoppingCriteria):
    """Done when the decoded text contains a stop string that the last token helped complete.

    Only the tail of each row is decoded: enough tokens to hold the longest stop string, since every token that can
    take part in a match spells at least one character. A match must end in the last token's text (as in transformers:
    it must overlap the final token), so an earlier occurrence neither stops generation again nor hides a new one.
    This reads tokens on the host each step.
    """

    def __init__(self, tokenizer, stop_strings: str | list[str]):
        self.stop_strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
        if not self.stop_strings or not all(isinstance(s, str) and s for s in self.stop_strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {stop_strings!r}")
        self.tokenizer = tokenizer
        self.tail = max(len(s) for s in self.stop_strings) + 1

    def _ends_in_last_token(self, text: str, before: int) -> bool:
        """Does an occurrence of a stop string end after the first `before` characters (in the last token)?"""
        for stop in self.stop_strings:
            # The occurrence starting last is the one ending last.
            at = text.rfind(stop)
            if at >= 0 and at + len(stop) > before:
                return True
        return False

    def __call__(self, input_ids, scores, **kwargs):
        done = []
        for row in input_ids[:, -self.tail:].tolist():
            text = self.tokenizer.decode(row)
            done.append(self._ends_in_last_token(text, len(self.tokenizer.decode(row[:-1]))))
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)
