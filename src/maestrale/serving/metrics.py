"""Counters and latency histograms of the server, in Prometheus' text format."""

from __future__ import annotations

import bisect
import time
from collections import Counter

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self, name: str, help_text: str):
        self.name, self.help = name, help_text
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        total = 0
        for bound, count in zip((*BUCKETS, "+Inf"), self.counts):
            total += count
            out.append(f'{self.name}_bucket{{le="{bound}"}} {total}')
        return out + [f"{self.name}_sum {self.sum}", f"{self.name}_count {total}"]


class _Timing:
    """One request's clock: time to first token, time between tokens, end-to-end latency."""

    def __init__(self, metrics: "Metrics"):
        self.metrics = metrics
        self.start = self.last = time.monotonic()
        self.tokens = 0

    def token(self, count: int) -> None:
        now = time.monotonic()
        m = self.metrics
        (m.time_between_tokens if self.tokens else m.time_to_first_token).observe(now - self.last)
        self.last, self.tokens = now, self.tokens + count
        m.generation_tokens += count

    def done(self, now: float) -> None:
        self.metrics.request_latency.observe(now - self.start)


class Metrics:
    def __init__(self):
        self.requests = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: Counter[str] = Counter()
        self.time_to_first_token = Histogram("maestrale_time_to_first_token_seconds",
                                             "Time from a request's arrival to its first token.")
        self.time_between_tokens = Histogram("maestrale_time_per_output_token_seconds",
                                             "Time between two output tokens of a request.")
        self.request_latency = Histogram("maestrale_e2e_request_latency_seconds",
                                         "Time from a request's arrival to its last token.")

    def request_started(self, prompt_tokens: int) -> _Timing:
        self.requests += 1
        self.prompt_tokens += prompt_tokens
        return _Timing(self)

    def choice_finished(self, reason: str, count: int = 1) -> None:
        self.finished[reason] += count

    def render(self, engine: dict, in_flight: int) -> str:
        """The Prometheus exposition of these metrics and of the engine's counters (its queue, KV blocks, steps: what
        the engine process sent last)."""
        def metric(name, kind, help_text, value, labels=""):
            return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name}{labels} {value}"]

        lines = metric("maestrale_requests_total", "counter", "Requests received.", self.requests)
        lines += ["# HELP maestrale_request_choices_finished_total Choices finished, by reason.",
                  "# TYPE maestrale_request_choices_finished_total counter"]
        lines += [f'maestrale_request_choices_finished_total{{finish_reason="{reason}"}} {count}'
                  for reason, count in sorted(self.finished.items())]
        lines += metric("maestrale_prompt_tokens_total", "counter", "Prompt tokens received.", self.prompt_tokens)
        lines += metric("maestrale_generation_tokens_total", "counter", "Tokens generated.", self.generation_tokens)
        lines += metric("maestrale_requests_in_flight", "gauge", "Requests received and not yet answered.", in_flight)
        lines += metric("maestrale_num_requests_running", "gauge", "Sequences in the running batch.",
                        engine["running"])
        lines += metric("maestrale_num_requests_waiting", "gauge", "Sequences waiting for the batch (queue length).",
                        engine["waiting"])
        lines += metric("maestrale_kv_blocks_used", "gauge", "KV-cache blocks in use.", engine["kv_blocks_used"])
        lines += metric("maestrale_kv_blocks_total", "gauge", "KV-cache blocks in all.", engine["kv_blocks_total"])
        lines += metric("maestrale_preemptions_total", "counter", "Sequences preempted for want of blocks.",
                        engine["preemptions"])
        lines += metric("maestrale_prefix_cache_hit_tokens_total", "counter", "Prompt tokens found in the prefix "
                        "cache.", engine["prefix_hits"])
        lines += ["# HELP maestrale_engine_step_seconds_total Time of the engine's steps, by part.",
                  "# TYPE maestrale_engine_step_seconds_total counter"]
        lines += [f'maestrale_engine_step_seconds_total{{part="{part}"}} {seconds}'
                  for part, seconds in sorted(engine["step_seconds"].items())]
        lines += ["# HELP maestrale_engine_step_work_total What the engine's steps computed: steps, decode rows, "
                  "prefill chunks (rows) and their tokens.", "# TYPE maestrale_engine_step_work_total counter"]
        lines += [f'maestrale_engine_step_work_total{{kind="{kind}"}} {count}'
                  for kind, count in sorted(engine["step_counts"].items())]
        # The engine thread's CPU time (less the waits inside torch), and its time waiting for requests; the rest of
        # its wall time is waiting for the GPU.
        lines += metric("maestrale_engine_thread_cpu_seconds_total", "counter", "CPU time of the engine process's "
                        "main thread.", engine["engine_cpu_seconds"])
        lines += metric("maestrale_engine_idle_seconds_total", "counter", "Time the engine waited for requests.",
                        engine["engine_idle_seconds"])
        for histogram in (self.time_to_first_token, self.time_between_tokens, self.request_latency):
            lines += histogram.lines()
        return "\n".join(lines) + "\n"
