"""Continuous batching: which sequences run in the next step, and how many of their tokens."""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

import torch

from .block_manager import BlockManager
from .sampling import SamplingParams

_arrivals = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One stream of tokens: a request's prompt and, as it decodes, its output (a request with n=3 has three)."""

    request_id: str
    index: int  # which of the request's n choices
    token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None
    num_prompt_tokens: int = 0
    num_computed: int = 0  # tokens whose keys/values are in the blocks
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # of the leading full blocks that are findable
    arrival: int = field(default_factory=lambda: next(_arrivals))
    finish_reason: str | None = None

    def __post_init__(self):
        self.num_prompt_tokens = self.num_prompt_tokens or len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_pending(self) -> int:
        """Tokens to run through the model before the next token can be sampled."""
        return len(self.token_ids) - self.num_computed


class Scheduler:
    """Running sequences decode (or continue a chunked prefill) first, oldest first; waiting ones join while the
    step's token budget, max_num_seqs and the free blocks allow. When a running sequence needs a block and none is
    free, the newest running sequence is preempted: its blocks are freed and it waits at the front of the queue,
    to be recomputed (prompt and output so far) when it runs again."""

    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """(sequence, number of its pending tokens to compute) for the next step."""
        budget, scheduled = self.max_num_batched_tokens, []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            count = min(seq.num_pending, budget)
            grown = self.blocks.grow(seq, seq.num_computed + count)
            while not grown and self.running[-1] is not seq:
                self.preempt(self.running[-1])
                grown = self.blocks.grow(seq, seq.num_computed + count)
            if not grown:  # no newer sequence left to free blocks: it waits itself
                self.preempt(seq)
                break
            scheduled.append((seq, count))
            budget -= count
            i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.blocks.allocate(seq):
                break
            self.waiting.popleft()
            self.running.append(seq)
            count = min(seq.num_pending, budget)
            scheduled.append((seq, count))
            budget -= count
        return scheduled

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free_blocks(seq)
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take `seq` out of the batch (done, stopped or aborted) and free its blocks."""
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_blocks(seq)
