"""The continuous-batching engine: requests in, one model step at a time, each sequence's new tokens and text out."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .block_manager import BlockManager
from .runner import ModelRunner
from .sampling import Sampled, Sampler, SamplingParams
from .scheduler import Scheduler, Sequence

DEFAULT_KV_CACHE_MEMORY = 1 << 30  # bytes of keys and values when neither num_blocks nor kv_cache_memory is given


@dataclass
class StepOutput:
    """What one step produced for one sequence (choice `index` of request `request_id`)."""

    request_id: str
    index: int
    token_ids: list[int]
    text: str  # new text since the last output (held back while it may be the start of a stop string)
    logprobs: list[Sampled] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length" or "abort" once the sequence is done
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0


def check_request(prompt_token_ids: list[int], params: SamplingParams, max_model_len: int) -> None:
    """ValueError, naming the fix, when the request cannot fit a context of `max_model_len` tokens."""
    if not prompt_token_ids:
        raise ValueError("the prompt is empty")
    if len(prompt_token_ids) + params.max_tokens > max_model_len:
        raise ValueError(f"the prompt has {len(prompt_token_ids)} tokens and max_tokens is {params.max_tokens}: "
                         f"together more than the {max_model_len} tokens of context this server allows; "
                         "shorten the prompt or lower max_tokens")


class _Text:
    """Incremental detokenisation of one sequence's output, cut at the first stop string.

    A step decodes only the tokens since the last two settled points, where the text ended in a whole character:
    output_ids[prefix:] less output_ids[prefix:read] is the new text. Decoding from `prefix`, not `read`, gives the
    first new token its context (a SentencePiece word's leading space, the rest of a character split over byte
    tokens), so the text equals decode(output_ids) at every step.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.text, self.sent = "", 0
        self.settled = 0  # how much of the text later tokens cannot change
        self.prefix = self.read = 0

    def windows(self, output_ids: list[int]) -> tuple[list[int], list[int]]:
        """The two runs of ids whose texts update() takes (the engine decodes all its rows' runs in one call)."""
        return output_ids[self.prefix : self.read], output_ids[self.prefix :]

    def update(self, output_ids: list[int], known: str | None, window: str | None) -> bool:
        """Take in the new tokens, given the texts of windows(output_ids) (None without a tokenizer); True when the
        text now contains a stop string (the text ends before it)."""
        if self.tokenizer is None:
            return False
        searched = self.settled  # no stop string lies within the settled text: it would have stopped
        self.text = self.text[: self.settled] + window[len(known) :]
        if not self.text.endswith("\ufffd"):  # else the last character's bytes are not all in
            self.settled, self.prefix, self.read = len(self.text), self.read, len(output_ids)
        cuts = [i for i in (self.text.find(s, max(0, searched - len(s) + 1)) for s in self.stop) if i >= 0]
        if cuts:
            self.text = self.text[: min(cuts)]
        return bool(cuts)

    def delta(self, final: bool) -> str:
        end = len(self.text)
        if not final:
            # Hold back what may be the start of a stop string, or characters whose bytes are incomplete.
            end = min(end - max(map(len, self.stop), default=1) + 1, self.settled)
        end = max(end, self.sent)
        piece, self.sent = self.text[self.sent : end], end
        return piece


class LLMEngine:
    """Schedules requests over a paged KV cache and steps the model; `step()` is the whole engine loop body.

    The cache holds `num_blocks` blocks of `block_size` tokens, or as many as fit in `kv_cache_memory` bytes.
    A step computes at most `max_num_batched_tokens` tokens, so a long prompt is prefilled over several steps while
    the running sequences keep decoding.
    """

    def __init__(self, model, tokenizer=None, *, block_size: int = 16, num_blocks: int | None = None,
                 kv_cache_memory: int | None = None, max_num_seqs: int = 64, max_num_batched_tokens: int = 512,
                 max_model_len: int | None = None):
        config = model.config
        if num_blocks is None:
            dtype = next(model.parameters()).dtype
            memory = DEFAULT_KV_CACHE_MEMORY if kv_cache_memory is None else kv_cache_memory
            num_blocks = memory // ModelRunner.block_bytes(config, block_size, dtype)
            if num_blocks < 1:
                raise ValueError(f"kv_cache_memory={memory} bytes holds no block of {block_size} tokens "
                                 f"({ModelRunner.block_bytes(config, block_size, dtype)} bytes): give it more")
        for name, value in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens)):
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        self.model, self.tokenizer = model, tokenizer
        self.blocks = BlockManager(num_blocks, block_size)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens)
        limit = max_model_len or getattr(config, "max_position_embeddings", None) or num_blocks * block_size
        self.max_model_len = min(limit, num_blocks * block_size)
        self.runner = ModelRunner(model, num_blocks, block_size, max_num_seqs, self.max_model_len)
        self.sampler = Sampler()
        eos = model.generation_config.eos_token_id
        self.eos_token_ids = set([] if eos is None else [eos] if isinstance(eos, int) else eos)
        self.requests: dict[str, list[Sequence]] = {}
        self._texts: dict[Sequence, _Text] = {}
        self._pending: list[tuple[StepOutput, _Text, Sequence]] = []  # outputs whose texts settle() fills in
        # Where the steps' time goes, for /metrics: seconds by part, and what the steps computed. On CUDA the model
        # part is the launch; the wait for the GPU falls in "sample", whose argmax copies the tokens to the host.
        # "texts" is settle()'s, within the next step's "model" part when that step calls it (while the GPU runs).
        self.step_seconds: Counter[str] = Counter()
        self.step_counts: Counter[str] = Counter()

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Queue a request; it joins the running batch at a coming step. ValueError when it cannot fit."""
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already running")
        check_request(prompt_token_ids, params, self.max_model_len)
        seqs = []
        for index in range(params.n):
            generator = None
            if params.seed is not None:
                generator = torch.Generator(self.model.device).manual_seed(params.seed + index)
            seq = Sequence(request_id, index, list(prompt_token_ids), params, generator)
            self._texts[seq] = _Text(self.tokenizer, tuple(params.stop))
            seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = seqs

    def abort(self, request_id: str) -> None:
        """Drop a request now, freeing its blocks; unknown or finished ids are ignored (texts of its outputs that
        are still pending are settled as usual)."""
        for seq in self.requests.pop(request_id, []):
            self.scheduler.finish(seq, "abort")
            self._texts.pop(seq, None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def step(self, while_running: Callable[[], None] | None = None, defer_texts: bool = False) -> list[StepOutput]:
        """Run one model step over the scheduled sequences; outputs of the sequences that produced a token.

        `while_running` is called once the model's work is launched, before the host waits for its tokens: on CUDA
        what it does overlaps the GPU's step (the server settles and hands out the previous step's outputs then).
        With `defer_texts`, the outputs of rows without stop strings come back with their texts empty until
        settle(), which the next step calls once its model work is launched (their tokens and finish reasons are
        final at once, and finished sequences leave the batch).
        """
        start = time.perf_counter()
        batch = self.scheduler.schedule()
        if not batch:
            return []
        scheduled = time.perf_counter()
        logits = self.runner.run([seq.token_ids[seq.num_computed : seq.num_computed + n] for seq, n in batch],
                                 [seq.num_computed for seq, _ in batch], [seq.block_table for seq, _ in batch])
        self.settle()  # before this step's tokens come in: each text takes its tokens in order
        if while_running is not None:
            while_running()
        ran = time.perf_counter()
        ready, rows = [], []
        for row, (seq, n) in enumerate(batch):
            seq.num_computed += n
            self.blocks.register(seq)
            if seq.num_pending == 0:
                ready.append(seq)
                rows.append(row)
        if len(rows) < len(batch):  # else every row, as is: no copy of (batch, vocab) logits
            logits = logits[rows]
        samples = self.sampler(ready, logits) if ready else []
        sampled = time.perf_counter()
        for seq, s in zip(ready, samples):
            seq.token_ids.append(s.token_id)
        now = [seq for seq in ready if not defer_texts or seq.params.stop]  # finishing on the text
        stopped = dict(zip(now, self._decode([self._texts[seq] for seq in now], [seq.output_ids for seq in now])))
        outputs = [self._append(seq, s, stopped.get(seq)) for seq, s in zip(ready, samples)]
        seconds, counts = self.step_seconds, self.step_counts
        seconds["schedule"] += scheduled - start
        seconds["model"] += ran - scheduled
        seconds["sample"] += sampled - ran
        seconds["append"] += time.perf_counter() - sampled
        decodes = sum(n == 1 for _, n in batch)
        counts["steps"] += 1
        counts["decode_rows"] += decodes
        counts["prefill_rows"] += len(batch) - decodes
        counts["prefill_tokens"] += sum(n for _, n in batch if n > 1)
        return outputs

    def settle(self) -> None:
        """Fill in the texts of the outputs that step(defer_texts=True) left pending."""
        if not self._pending:
            return
        begin = time.perf_counter()
        pending, self._pending = self._pending, []
        # No token came in since their step: a step settles before it appends its tokens.
        self._decode([text for _, text, _ in pending], [seq.output_ids for _, _, seq in pending])
        for out, text, _ in pending:
            out.text = text.delta(final=out.finish_reason is not None)
        self.step_seconds["texts"] += time.perf_counter() - begin

    def _decode(self, texts: list[_Text], outputs: list[list[int]]) -> list[bool]:
        """Each text takes in its output's new tokens, all rows' runs decoded in one call of the tokenizer; True where
        the text now holds a stop string."""
        decoded = [None] * 2 * len(texts)
        if self.tokenizer is not None and texts:
            runs = [run for text, ids in zip(texts, outputs) for run in text.windows(ids)]
            decoded = self.tokenizer.batch_decode(runs, skip_special_tokens=True)
        return [text.update(ids, *decoded[2 * i : 2 * i + 2]) for i, (text, ids) in enumerate(zip(texts, outputs))]

    def _append(self, seq: Sequence, sampled: Sampled, stopped: bool | None) -> StepOutput:
        """The output of `seq`'s new token (appended): finish checks and its text; `stopped` says whether the text
        took the token and now holds a stop string, None where the text waits for settle()."""
        text, num_output = self._texts[seq], len(seq.token_ids) - seq.num_prompt_tokens
        params, token, reason = seq.params, sampled.token_id, None
        if stopped:
            reason = "stop"
        elif (token in self.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
            reason = "stop"
        elif num_output >= params.max_tokens or len(seq.token_ids) >= self.max_model_len:
            reason = "length"
        delta = "" if stopped is None else text.delta(final=reason is not None)
        out = StepOutput(seq.request_id, seq.index, [token], delta, [sampled] if params.logprobs else [], reason,
                         seq.num_prompt_tokens, num_output)
        if stopped is None:  # the record keeps the text until settle(), past the sequence's finish or abort
            self._pending.append((out, text, seq))
        if reason is not None:
            self.scheduler.finish(seq, reason)
            del self._texts[seq]
            siblings = self.requests.get(seq.request_id, [])
            if all(s.finish_reason is not None for s in siblings):
                self.requests.pop(seq.request_id, None)
        return out
