"""Per-request sampling: OpenAI's parameters over generation's logits warpers, one torch.Generator per sequence."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..generation.logits_process import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper


@dataclass
class SamplingParams:
    """What a request asks of its tokens; temperature 0 decodes greedily (argmax, as generate(do_sample=False))."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self):
        bounds = {  # field: (whether it holds, what it must be)
            "max_tokens": (self.max_tokens >= 1, ">= 1"),
            "temperature": (0 <= self.temperature <= 2, "in [0, 2]"),
            "top_p": (0 < self.top_p <= 1, "in (0, 1]"),
            "n": (self.n >= 1, ">= 1"),
            "presence_penalty": (-2 <= self.presence_penalty <= 2, "in [-2, 2]"),
            "frequency_penalty": (-2 <= self.frequency_penalty <= 2, "in [-2, 2]"),
            "top_logprobs": (0 <= self.top_logprobs <= 20, "in [0, 20]"),
        }
        for name, (ok, bound) in bounds.items():
            if not ok:
                raise ValueError(f"{name} must be {bound}, got {getattr(self, name)!r}")

    def warpers(self) -> LogitsProcessorList:
        warpers = LogitsProcessorList()
        if self.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(self.temperature))
        if self.top_p < 1.0:
            warpers.append(TopPLogitsWarper(self.top_p))
        return warpers


@dataclass
class Sampled:
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None  # the likeliest (token id, logprob), best first


class Sampler:
    """Next tokens for a batch of sequences from their last logits (batch, vocab), in a few batched calls and one
    copy of the tokens to the host (a GPU waits once per step, not once per row).

    Penalties follow OpenAI: a token's logit drops by frequency_penalty per time it occurs in the output so far,
    and by presence_penalty once if it occurs at all. Rows that share temperature and top_p share one warper call;
    a seeded row draws from its own generator, the others from torch's default one. Log-probabilities are the
    model's (before penalties and temperature), as OpenAI reports them.
    """

    def __call__(self, seqs: list, logits: torch.Tensor) -> list[Sampled]:
        params = [seq.params for seq in seqs]
        plain, rest = [], []
        for i, p in enumerate(params):
            (plain if self._plain_greedy(p) else rest).append(i)
        if not rest:  # every row, as is: no copy of (batch, vocab) logits
            tokens = logits.argmax(-1)
        else:
            tokens = torch.empty(len(seqs), dtype=torch.long, device=logits.device)
            if plain:
                tokens[plain] = logits[plain].argmax(-1)
            self._sample(seqs, rest, logits[rest].float(), tokens)
        tokens = tokens.tolist()
        out = [Sampled(token) for token in tokens]
        rows = [i for i, p in enumerate(params) if p.logprobs]
        if rows:
            logprobs = logits[rows].float().log_softmax(-1)
            chosen = logprobs.gather(1, torch.tensor([[tokens[i]] for i in rows], device=logits.device))[:, 0]
            k = max(params[i].top_logprobs for i in rows)
            values, ids = (t.tolist() for t in logprobs.topk(k)) if k else ([[]] * len(rows), [[]] * len(rows))
            for i, lp, top_values, top_ids in zip(rows, chosen.tolist(), values, ids):
                top = params[i].top_logprobs
                out[i] = Sampled(tokens[i], lp, list(zip(top_ids[:top], top_values[:top])) if top else None)
        return out

    @staticmethod
    def _plain_greedy(params: SamplingParams) -> bool:
        return (params.temperature == 0 and not params.logprobs and not params.presence_penalty
                and not params.frequency_penalty)

    @staticmethod
    def _sample(seqs: list, rows: list[int], scores: torch.Tensor, tokens: torch.Tensor) -> None:
        """Write the tokens of `rows` (their float logits `scores`) into `tokens`, without waiting on the device."""
        params = [seqs[i].params for i in rows]
        penalized = [j for j, p in enumerate(params) if p.presence_penalty or p.frequency_penalty]
        if penalized:
            vocab, device = scores.shape[-1], scores.device
            outputs = [seqs[rows[j]].output_ids for j in penalized]
            # Each output token, offset by its row's place, counted in one bincount over (rows, vocab).
            flat = torch.tensor([r * vocab + t for r, ids in enumerate(outputs) for t in ids], dtype=torch.long)
            counts = torch.bincount(flat.to(device), minlength=len(penalized) * vocab).view(-1, vocab).float()
            coefficients = torch.tensor([[params[j].frequency_penalty, params[j].presence_penalty]
                                         for j in penalized], device=device)
            scores[penalized] -= coefficients[:, :1] * counts + coefficients[:, 1:] * (counts > 0)
        groups: dict[tuple[float, float], list[int]] = {}
        for j, p in enumerate(params):
            groups.setdefault((p.temperature, p.top_p), []).append(j)
        for (temperature, _), members in groups.items():
            index = torch.tensor([rows[j] for j in members], device=tokens.device)
            if temperature == 0:
                tokens[index] = scores[members].argmax(-1)
                continue
            probs = params[members[0]].warpers()(None, scores[members]).softmax(-1)
            generators = [seqs[rows[j]].generator for j in members]
            unseeded = [k for k, g in enumerate(generators) if g is None]
            drawn = torch.empty(len(members), dtype=torch.long, device=tokens.device)
            if unseeded:
                drawn[unseeded] = torch.multinomial(probs[unseeded], 1)[:, 0]
            for k, generator in enumerate(generators):  # a seeded row draws from its own: its seed repeats its text
                if generator is not None:
                    drawn[k] = torch.multinomial(probs[k], 1, generator=generator)[0]
            tokens[index] = drawn
