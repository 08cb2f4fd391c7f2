"""The engine loop in a process of its own, fed and read from asyncio over a pipe: requests and aborts go in as
commands between steps, each step's outputs come back in one message to the awaiting requests' queues.

In one process the engine thread and the HTTP event loop take turns on one GIL, so under many streams the host's
Python work of both bounds the step. Here the HTTP process tokenizes, applies chat templates and writes SSE; the
engine process owns the model, the scheduler, sampling and detokenization.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable

from ..engine.llm_engine import LLMEngine, StepOutput, check_request
from ..engine.sampling import SamplingParams
from .metrics import Metrics

logger = logging.getLogger(__name__)


def _put_all(puts: list[tuple[asyncio.Queue, object]]) -> None:
    for q, item in puts:
        q.put_nowait(item)


class QueueFull(Exception):
    """More requests are in flight than the server takes."""


class EngineDead(Exception):
    """The engine process has exited; the server cannot answer until it is restarted."""


class _EngineLoop:
    """The engine process's side: runs `engine.step()` while there is work, takes the commands a reader thread
    receives, and sends each step's outputs, with the engine's counters for /metrics, in one message."""

    def __init__(self, conn):
        self.conn = conn
        self.engine: LLMEngine | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        # Not yet sent: outputs (their texts settled by the engine before sending), and failed requests' (id,
        # exception).
        self._outputs: list[StepOutput] = []
        self._errors: list[tuple[str, Exception]] = []
        self._idle_seconds = 0.0

    def receive(self) -> None:
        """Take the server's commands as they come, so its writes never wait on a step; without a server (its end of
        the pipe closed: it died), exit at once rather than hold the model's memory."""
        try:
            while True:
                command = self.conn.recv()
                self._commands.put(command)
                self._wake.set()
                if command[0] == "stop":
                    return
        except (EOFError, OSError):
            os._exit(1)

    def run(self, overlap: bool) -> None:
        """Step while there is work; with `overlap` (CUDA: on CPU it would only delay them by a step), the previous
        step's outputs get their texts and are sent while the model's work of the next one runs."""
        engine = self.engine
        while not self._stopping:
            self._take_commands()
            if self._stopping:
                break
            if not engine.has_unfinished():
                self._send(always=True)  # the counters once idle: aborted requests' blocks freed
                idle = time.perf_counter()
                self._wake.wait()
                self._wake.clear()
                self._idle_seconds += time.perf_counter() - idle
                continue
            try:
                outputs = engine.step(while_running=self._send if overlap else None, defer_texts=True)
            except Exception as e:  # a failed step fails the requests in it, not the server
                logger.exception("engine step failed")
                for request_id in list(engine.requests):
                    engine.abort(request_id)
                    self._errors.append((request_id, RuntimeError(f"the model step failed: {e}")))
                continue
            self._send()  # a step that ran no model left the previous outputs unsent
            self._outputs = outputs
            if not overlap:
                self._send()
        self._send(always=True)

    def _take_commands(self) -> None:
        while not self._commands.empty():
            command, *args = self._commands.get()
            if command == "add":
                request_id, prompt, params = args
                try:
                    self.engine.add_request(request_id, prompt, params)
                except ValueError as e:
                    self._errors.append((request_id, e))
            elif command == "abort":
                self.engine.abort(*args)
            else:
                self._stopping = True

    def _send(self, always: bool = False) -> None:
        self.engine.settle()
        if self._outputs or self._errors or always:
            # The outputs as tuples of their fields: pickled ~10x faster than the dataclasses (256 in 0.06 ms).
            outputs = [tuple(vars(out).values()) for out in self._outputs]
            self.conn.send((outputs, self._errors, self.counters()))
            self._outputs, self._errors = [], []

    def counters(self) -> dict:
        engine = self.engine
        return {"running": len(engine.scheduler.running), "waiting": len(engine.scheduler.waiting),
                "kv_blocks_used": engine.blocks.num_used, "kv_blocks_total": engine.blocks.num_blocks,
                "preemptions": engine.scheduler.preemptions, "prefix_hits": engine.blocks.prefix_hits,
                "step_seconds": dict(engine.step_seconds), "step_counts": dict(engine.step_counts),
                "engine_cpu_seconds": time.thread_time(), "engine_idle_seconds": self._idle_seconds}


def _engine_process(conn, build: Callable[[], LLMEngine]) -> None:
    """The engine process's main: build the engine, say what the server needs of it, serve the pipe."""
    # Ctrl-C and SIGTERM reach the whole process group: the server drains its requests, then sends "stop".
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # A step detokenises ~2 short runs a row in one batch_decode; the tokenizers library's thread pool costs more
    # than it saves there (0.17-0.24 ms a batch of 192 against 0.14 ms without, on 2 cores; on a 16-core H200 host
    # the engine process's threads other than the loop's took 2.4 ms of CPU a step). A user's own setting stands.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    loop = _EngineLoop(conn)
    threading.Thread(target=loop.receive, name="maestrale-engine-commands", daemon=True).start()
    try:
        engine = loop.engine = build()
    except Exception as e:  # noqa: BLE001 (handed to the server, which raises it)
        try:
            conn.send(("failed", e))
        except Exception:  # noqa: BLE001 (an exception that does not pickle)
            conn.send(("failed", RuntimeError(f"{type(e).__name__}: {e}")))
        return
    conn.send(("ready", {"max_model_len": engine.max_model_len, "eos_token_ids": engine.eos_token_ids,
                         "num_blocks": engine.blocks.num_blocks, "block_size": engine.blocks.block_size,
                         "counters": loop.counters()}))
    loop.run(overlap=engine.runner.model.device.type == "cuda")


class AsyncEngine:
    """The LLMEngine that `build()` returns (called in the engine process; a module-level function or a
    functools.partial of one, since the process is spawned), driven from asyncio; `generate` is what a request
    handler awaits. start() returns once the engine is built."""

    def __init__(self, build: Callable[[], LLMEngine], max_pending: int):
        self.build, self.max_pending = build, max_pending
        self.metrics = Metrics()
        self.counters: dict = {}  # the engine's, as of its last message (see _EngineLoop.counters)
        self.error: str | None = None  # why the engine process is gone, once it is
        self.max_model_len = 0
        self.eos_token_ids: set[int] = set()
        self.num_blocks = self.block_size = 0
        self._process = None
        self._conn = None
        self._send_lock = threading.Lock()
        self._stopping = False
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue, int]] = {}
        self._ids = itertools.count()
        self._reader = threading.Thread(target=self._read, name="maestrale-engine-outputs", daemon=True)

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    def start(self) -> None:
        """Start the engine process and wait until it has built the engine (a second call does nothing); raises what
        building it raised there."""
        if self._process is not None:
            return
        context = multiprocessing.get_context("spawn")  # CUDA cannot run in a forked child
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_engine_process, args=(child, self.build), name="maestrale-engine",
                                        daemon=True)
        self._process.start()
        child.close()  # the engine's end lives in the engine process: its exit closes the pipe
        try:
            status, info = self._conn.recv()
        except EOFError:
            self._process.join()
            raise RuntimeError(f"the engine process exited with code {self._process.exitcode} while building the "
                               "engine; its output above says why") from None
        if status == "failed":
            self._process.join()
            raise info
        for name, value in info.items():
            setattr(self, name, value)
        self._reader.start()
        # Also on an exit that skips stop(): before multiprocessing's own exit handler (registered earlier, so run
        # later) would wait for the engine process, which ignores SIGTERM.
        atexit.register(self.stop)

    def stop(self) -> None:
        """Stop the engine process once its requests are done (the server drains them first)."""
        if self._process is None or self._stopping:
            return
        self._stopping = True
        if self.error is None:
            self._send("stop")
        self._reader.join()
        self._process.join(timeout=30)
        if self._process.is_alive():
            logger.error("the engine process did not stop within 30 s; killing it")
            self._process.kill()
            self._process.join()

    def _read(self) -> None:
        """Hand each step's outputs to their requests' queues; fail them all if the engine process dies."""
        try:
            while True:
                outputs, errors, self.counters = self._conn.recv()
                if outputs or errors:
                    self._deliver_all([(fields[0], StepOutput(*fields)) for fields in outputs] + errors)
        except (EOFError, OSError):
            pass
        if self._stopping:
            return
        self._process.join(timeout=5)
        code = self._process.exitcode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        self.error = f"the engine process {how}; its output says why; restart the server"
        logger.error(self.error)
        self._deliver_all([(request_id, RuntimeError(self.error)) for request_id in list(self._streams)])

    def _deliver_all(self, items: list[tuple[str, object]]) -> None:
        """Hand outputs to their requests' queues: one wake-up of each event loop, not one per output."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for request_id, item in items:
            stream = self._streams.get(request_id)
            if stream is not None:
                by_loop.setdefault(stream[0], []).append((stream[1], item))
        for loop, puts in by_loop.items():
            loop.call_soon_threadsafe(_put_all, puts)

    def _send(self, *command) -> None:
        try:
            with self._send_lock:
                self._conn.send(command)
        except OSError:  # the engine process is gone; _read fails the requests
            pass

    def check(self, prompts: list[list[int]], params: SamplingParams) -> None:
        """Raise before generate() when the prompts cannot run: EngineDead, QueueFull, or ValueError naming the
        fix."""
        if self.error is not None:
            raise EngineDead(self.error)
        if self.in_flight + len(prompts) > self.max_pending:
            raise QueueFull(f"{self.in_flight} requests are in flight, the most this server takes is "
                            f"{self.max_pending}; retry later")
        for prompt in prompts:
            check_request(prompt, params, self.max_model_len)

    async def generate(self, prompts: list[list[int]],
                       params: SamplingParams) -> AsyncIterator[list[tuple[int, StepOutput]]]:
        """(prompt index, output) for each step of each of the prompts' n choices, until all are finished (check()
        them first): each time, all the outputs that have arrived, so a response that fell behind the engine
        catches up in one write.

        Leaving early (a client that disconnects) aborts what is left, which frees its blocks before the next step.
        """
        loop, q = asyncio.get_running_loop(), asyncio.Queue()
        base = f"r{next(self._ids)}"
        ids = [f"{base}-{i}" for i in range(len(prompts))]
        for i, request_id in enumerate(ids):
            self._streams[request_id] = (loop, q, i)
        if self.error is not None:  # the engine died after check(), before the streams above could be failed
            for request_id in ids:
                del self._streams[request_id]
            raise EngineDead(self.error)
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
