"""Streamers: receive token ids as `generate()` picks them and turn them into text.

They only call `tokenizer.decode`, so any tokenizer works. Text is released up to its last complete, non-blank
character: a trailing U+FFFD (a multi-byte character still missing bytes) waits for the token that completes it, and
trailing spaces wait for what follows them, since decoding may still drop a space before punctuation.
"""

from __future__ import annotations

import asyncio
from queue import Queue
from typing import Any

import torch

HELD_BACK = "\ufffd \t"  # an incomplete character, or blanks whose fate depends on the next token


class BaseStreamer:
    def put(self, value: torch.Tensor) -> None:
        raise NotImplementedError

    def end(self) -> None:
        raise NotImplementedError


class TextStreamer(BaseStreamer):
    """Prints text to stdout as it is generated; `skip_prompt=True` leaves out the prompt.

    Only batch size 1. Extra keyword arguments go to `tokenizer.decode` (e.g. skip_special_tokens=True).
    """

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, **decode_kwargs: Any):
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.decode_kwargs = decode_kwargs
        self.token_cache: list[int] = []
        self.print_len = 0  # characters of the decoded cache already released
        self.next_tokens_are_prompt = True

    def put(self, value: torch.Tensor) -> None:
        if value.dim() > 1 and value.shape[0] > 1:
            raise ValueError("TextStreamer only supports batch size 1")
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.next_tokens_are_prompt = False
        self.token_cache.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
        if text.endswith("\n"):
            # A finished line: release it and start afresh, so decoding cost stays bounded by the line length.
            printable = text[self.print_len:]
            self.token_cache, self.print_len = [], 0
        else:
            end = len(text.rstrip(HELD_BACK))
            printable = text[self.print_len:end]
            self.print_len = max(self.print_len, end)
        self.on_finalized_text(printable)

    def end(self) -> None:
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs) if self.token_cache else ""
        printable = text[self.print_len:]
        self.token_cache, self.print_len = [], 0
        self.next_tokens_are_prompt = True
        self.on_finalized_text(printable, stream_end=True)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        print(text, flush=True, end="" if not stream_end else None)


class TextIteratorStreamer(TextStreamer):
    """Yields text pieces from another thread: run `generate(..., streamer=s)` in a thread and iterate `s`.

    `timeout` (seconds) bounds each wait for the next piece; queue.Empty is raised when it passes.
    """

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, timeout: float | None = None, **decode_kwargs: Any):
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        self.text_queue: Queue = Queue()
        self.stop_signal = None
        self.timeout = timeout

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.text_queue.put(text, timeout=self.timeout)
        if stream_end:
            self.text_queue.put(self.stop_signal, timeout=self.timeout)

    def __iter__(self):
        return self

    def __next__(self) -> str:
        value = self.text_queue.get(timeout=self.timeout)
        if value is self.stop_signal:
            raise StopIteration
        return value


class AsyncTextIteratorStreamer(TextStreamer):
    """Yields text pieces to asyncio code: create it inside the event loop, run `generate` in a thread, `async for`.

    `timeout` (seconds) bounds each wait for the next piece; TimeoutError is raised when it passes.
    """

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, timeout: float | None = None, **decode_kwargs: Any):
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        self.text_queue: asyncio.Queue = asyncio.Queue()
        self.stop_signal = None
        self.timeout = timeout
        self.loop = asyncio.get_running_loop()  # generate() runs in another thread: pieces cross over through it

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.loop.call_soon_threadsafe(self.text_queue.put_nowait, text)
        if stream_end:
            self.loop.call_soon_threadsafe(self.text_queue.put_nowait, self.stop_signal)

    def __aiter__(self):
        return self

    async def __anext__(self) -> str:
        value = await asyncio.wait_for(self.text_queue.get(), self.timeout)
        if value is self.stop_signal:
            raise StopAsyncIteration
        return value
