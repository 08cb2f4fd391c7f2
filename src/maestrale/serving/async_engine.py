"""The engine loop in a background thread, fed and read from asyncio: requests go in as commands between steps,
each step's outputs come back to the awaiting request's queue."""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator

from ..engine.llm_engine import LLMEngine, StepOutput
from ..engine.sampling import SamplingParams
from .metrics import Metrics

logger = logging.getLogger(__name__)


def _put_all(puts: list[tuple[asyncio.Queue, object]]) -> None:
    for q, item in puts:
        q.put_nowait(item)


class QueueFull(Exception):
    """More requests are in flight than the server takes."""


class AsyncEngine:
    """Runs `engine.step()` in a thread while there is work; `generate` is what a request handler awaits."""

    def __init__(self, engine: LLMEngine, max_pending: int):
        self.engine, self.max_pending = engine, max_pending
        self.metrics = Metrics()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue, int]] = {}
        self._undelivered: list[tuple[str, object]] = []  # the last step's outputs, handed out during the next
        # On CUDA a step's model work runs while the host hands out the previous outputs; on CPU it would only delay
        # them by a step.
        self._overlap = engine.runner.model.device.type == "cuda"
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="maestrale-engine", daemon=True)

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join()

    def _loop(self) -> None:
        engine = self.engine
        while not self._stopping:
            while not self._commands.empty():
                command, *args = self._commands.get()
                if command == "add":
                    request_id, prompt, params = args
                    try:
                        engine.add_request(request_id, prompt, params)
                    except ValueError as e:
                        self._deliver(request_id, e)
                else:
                    engine.abort(*args)
            if not engine.has_unfinished():
                self._flush()
                idle = time.perf_counter()
                self._wake.wait()
                self._wake.clear()
                self.metrics.engine_idle_seconds += time.perf_counter() - idle
                continue
            try:
                # Waking the event loop hands it the GIL, which the engine thread then waits to get back: done while
                # the GPU runs the next step, that wait costs nothing.
                outputs = engine.step(while_running=self._flush if self._overlap else None)
            except Exception as e:  # a failed step fails the requests in it, not the server
                self._flush()
                logger.exception("engine step failed")
                for request_id in list(engine.requests):
                    engine.abort(request_id)
                    self._deliver(request_id, RuntimeError(f"the model step failed: {e}"))
                continue
            self._flush()  # a step that ran no model
            self._undelivered = [(out.request_id, out) for out in outputs]
            if not self._overlap:
                self._flush()
            self.metrics.engine_cpu_seconds = time.thread_time()
        self._flush()

    def _flush(self) -> None:
        items, self._undelivered = self._undelivered, []
        if items:
            self._deliver_all(items)

    def _deliver(self, request_id: str, item) -> None:
        self._deliver_all([(request_id, item)])

    def _deliver_all(self, items: list[tuple[str, object]]) -> None:
        """Hand a step's outputs to their requests' queues: one wake-up of each event loop, not one per output."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for request_id, item in items:
            stream = self._streams.get(request_id)
            if stream is not None:
                by_loop.setdefault(stream[0], []).append((stream[1], item))
        for loop, puts in by_loop.items():
            loop.call_soon_threadsafe(_put_all, puts)

    def _send(self, *command) -> None:
        self._commands.put(command)
        self._wake.set()

    def check(self, prompts: list[list[int]], params: SamplingParams) -> None:
        """Raise before generate() when the prompts cannot run: QueueFull, or ValueError naming the fix."""
        if self.in_flight + len(prompts) > self.max_pending:
            raise QueueFull(f"{self.in_flight} requests are in flight, the most this server takes is "
                            f"{self.max_pending}; retry later")
        for prompt in prompts:
            self.engine.check_request(prompt, params)

    async def generate(self, prompts: list[list[int]],
                       params: SamplingParams) -> AsyncIterator[list[tuple[int, StepOutput]]]:
        """(prompt index, output) for each step of each of the prompts' n choices, until all are finished (check()
        them first): each time, all the outputs that have arrived, so a response that fell behind the engine
        catches up in one write.

        Leaving early (a client that disconnects) aborts what is left, which frees its blocks at the next step.
        """
        loop, q = asyncio.get_running_loop(), asyncio.Queue()
        base = f"r{next(self._ids)}"
        ids = [f"{base}-{i}" for i in range(len(prompts))]
        for i, request_id in enumerate(ids):
            self._streams[request_id] = (loop, q, i)
        timing = self.metrics.request_started(sum(map(len, prompts)))
        left = len(prompts) * params.n
        try:
            for request_id, prompt in zip(ids, prompts):
                self._send("add", request_id, prompt, params)
            while left:
                arrived = [await q.get()]
                while not q.empty():
                    arrived.append(q.get_nowait())
                batch = []
                for out in arrived:
                    if isinstance(out, Exception):
                        raise out
                    timing.token(len(out.token_ids))
                    if out.finish_reason is not None:
                        left -= 1
                        self.metrics.choice_finished(out.finish_reason)
                    batch.append((self._streams[out.request_id][2], out))
                yield batch
        finally:
            if left:
                for request_id in ids:
                    self._send("abort", request_id)
                self.metrics.choice_finished("abort", left)
            for request_id in ids:
                del self._streams[request_id]
            timing.done(time.monotonic())
