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
    """Next tokens for a batch of sequences from their last logits (batch, vocab).

    Penalties follow OpenAI: a token's logit drops by frequency_penalty per time it occurs in the output so far,
    and by presence_penalty once if it occurs at all. Log-probabilities are the model's (before penalties and
    temperature), as OpenAI reports them.
    """

    def __call__(self, seqs: list, logits: torch.Tensor) -> list[Sampled]:
        # Plain greedy rows share one argmax and one copy to the host (a GPU waits once per step, not per row).
        plain = [i for i, seq in enumerate(seqs) if self._plain_greedy(seq.params)]
        greedy = {}
        if plain:
            tokens = (logits if len(plain) == len(seqs) else logits[plain]).argmax(-1).tolist()
            greedy = dict(zip(plain, tokens))
        return [Sampled(greedy[i]) if i in greedy else self.sample_one(seq, logits[i][None].float())
                for i, seq in enumerate(seqs)]

    @staticmethod
    def _plain_greedy(params: SamplingParams) -> bool:
        return (params.temperature == 0 and not params.logprobs and not params.presence_penalty
                and not params.frequency_penalty)

    def sample_one(self, seq, logits: torch.Tensor) -> Sampled:
        params: SamplingParams = seq.params
        scores = logits
        if params.presence_penalty or params.frequency_penalty:
            counts = torch.bincount(torch.tensor(seq.output_ids, dtype=torch.long, device=logits.device),
                                    minlength=logits.shape[-1])[None].to(logits.dtype)
            scores = scores - params.frequency_penalty * counts - params.presence_penalty * (counts > 0)
        if params.temperature == 0:
            token = int(scores.argmax(-1))
        else:
            probs = params.warpers()(None, scores).softmax(-1)
            token = int(torch.multinomial(probs, 1, generator=seq.generator))
        if not params.logprobs:
            return Sampled(token)
        logprobs = logits.log_softmax(-1)[0]
        top = None
        if params.top_logprobs:
            values, ids = logprobs.topk(params.top_logprobs)
            top = list(zip(ids.tolist(), values.tolist()))
        return Sampled(token, float(logprobs[token]), top)
