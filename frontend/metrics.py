"""The metrics of one `LLM`, kept in prometheus_client objects with vLLM's names: scheduler
gauges and engine-wide counters set from the engine core's `SchedulerStats`, and per-request
counts and latencies observed here, in the user's process, as outputs arrive.

Called by the `OutputProcessor` (each output, each finished request) and by `LLM` (stats,
`get_metrics()`). Each `LLM` has its own registry, labelled `engine=<n>`; one collector in
prometheus_client's default `REGISTRY` shows every live `LLM`'s metrics to a scraper
(`prometheus_client.start_http_server(port)` or `generate_latest()`).
"""

from __future__ import annotations

import itertools
import threading
import time
import weakref
from dataclasses import dataclass

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge as PromGauge
from prometheus_client import Histogram as PromHistogram
from prometheus_client import Metric as PromMetric

from ember.enginecore.messages import EngineCoreOutput
from ember.enginecore.stats import SchedulerStats

_TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                   2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
_TPOT_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                   5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
_REQUEST_BUCKETS_S = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                      50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip


def _token_buckets(max_model_len: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_model_len (vLLM's 1-2-5 series)."""
    buckets = []
    for exponent in itertools.count():
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_model_len:
                return buckets
            buckets.append(value)
    return buckets


@dataclass(slots=True)
class RequestStateStats:
    """`RequestOutput.metrics`: the timestamps of one request (vLLM v1's names).

    arrival_time is wall-clock (`time.time()`) when `generate` received it; queued_ts and
    scheduled_ts are the engine core's `time.monotonic()` when it queued and first scheduled it;
    first_token_ts and last_token_ts are this process's `time.monotonic()` when its first and
    latest tokens arrived; first_token_latency is seconds from arrival to the first token.
    """

    num_generation_tokens: int = 0
    arrival_time: float = 0.0
    queued_ts: float = 0.0
    scheduled_ts: float = 0.0
    first_token_ts: float = 0.0
    last_token_ts: float = 0.0
    first_token_latency: float = 0.0

    @property
    def queue_time_s(self) -> float:
        return max(self.scheduled_ts - self.queued_ts, 0.0) if self.scheduled_ts else 0.0

    @property
    def time_per_output_token_s(self) -> float:
        """Mean seconds between output tokens after the first (0 with one token)."""
        if self.num_generation_tokens < 2:
            return 0.0
        return (self.last_token_ts - self.first_token_ts) / (self.num_generation_tokens - 1)


class EngineMetrics:
    """The prometheus_client metrics of one `LLM` (one engine), in a registry of its own."""

    _engine_ids = itertools.count()

    def __init__(self, model_name: str, max_model_len: int):
        self.registry = CollectorRegistry(auto_describe=True)
        self.engine_index = next(self._engine_ids)
        labels = {"model_name": model_name, "engine": str(self.engine_index)}
        names = list(labels)
        self._labels = labels

        def gauge(name: str, documentation: str):
            return PromGauge(name, documentation, names, registry=self.registry).labels(**labels)

        def counter(name: str, documentation: str):
            return PromCounter(name, documentation, names, registry=self.registry).labels(**labels)

        def histogram(name: str, documentation: str, buckets):
            return PromHistogram(
                name, documentation, names, registry=self.registry, buckets=buckets
            ).labels(**labels)

        self.num_requests_running = gauge("vllm:num_requests_running", "Requests running.")
        self.num_requests_waiting = gauge("vllm:num_requests_waiting", "Requests waiting.")
        self.kv_cache_usage_perc = gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage; 1 means 100 percent."
        )
        self.prefix_cache_queries = counter(
            "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache."
        )
        self.prefix_cache_hits = counter(
            "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache."
        )
        self.num_preemptions = counter("vllm:num_preemptions", "Preemptions by the scheduler.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Generation tokens produced.")
        self._request_success = PromCounter(
            "vllm:request_success",
            "Finished requests, by finish reason.",
            [*names, "finished_reason"],
            registry=self.registry,
        )
        for reason in ("stop", "length", "abort", "error"):  # shown at 0 before any finish
            self._request_success.labels(**labels, finished_reason=reason)
        self.time_to_first_token = histogram(
            "vllm:time_to_first_token_seconds", "Time to first token.", _TTFT_BUCKETS_S
        )
        self.time_per_output_token = histogram(
            "vllm:time_per_output_token_seconds",
            "Mean time per output token after the first, per request.",
            _TPOT_BUCKETS_S,
        )
        self.e2e_request_latency = histogram(
            "vllm:e2e_request_latency_seconds", "End-to-end request latency.", _REQUEST_BUCKETS_S
        )
        self.request_queue_time = histogram(
            "vllm:request_queue_time_seconds", "Time requests spent waiting.", _REQUEST_BUCKETS_S
        )
        token_buckets = _token_buckets(max_model_len)
        self.request_prompt_tokens = histogram(
            "vllm:request_prompt_tokens", "Prompt length of finished requests.", token_buckets
        )
        self.request_generation_tokens = histogram(
            "vllm:request_generation_tokens",
            "Generation length of finished requests.",
            token_buckets,
        )
        # Plain totals for the periodic log line, and the engine-wide counters' last values.
        self.total_prompt_tokens = 0
        self.total_generation_tokens = 0
        self.last_scheduler_stats = SchedulerStats()
        _LIVE_ENGINES.add(self)

    # ---- observations (from the output processor) ---------------------------------------

    def observe_output(
        self, stats: RequestStateStats, output: EngineCoreOutput, num_prompt_tokens: int
    ) -> None:
        """One engine output of a request: new tokens, and its first-token timings."""
        num_new = len(output.new_token_ids)
        if not num_new:
            return
        now = time.monotonic()
        if stats.num_generation_tokens == 0:
            stats.first_token_ts = now
            stats.first_token_latency = max(time.time() - stats.arrival_time, 0.0)
            stats.queued_ts, stats.scheduled_ts = output.queued_ts, output.scheduled_ts
            self.time_to_first_token.observe(stats.first_token_latency)
            self.prompt_tokens.inc(num_prompt_tokens)
            self.total_prompt_tokens += num_prompt_tokens
        stats.num_generation_tokens += num_new
        stats.last_token_ts = now
        self.generation_tokens.inc(num_new)
        self.total_generation_tokens += num_new

    def observe_finished(
        self, stats: RequestStateStats, finish_reason: str, num_prompt_tokens: int
    ) -> None:
        """A finished request: its reason, lengths and latencies."""
        self._request_success.labels(**self._labels, finished_reason=finish_reason).inc()
        self.e2e_request_latency.observe(max(time.time() - stats.arrival_time, 0.0))
        self.request_prompt_tokens.observe(num_prompt_tokens)
        self.request_generation_tokens.observe(stats.num_generation_tokens)
        if stats.scheduled_ts:
            self.request_queue_time.observe(stats.queue_time_s)
        if stats.num_generation_tokens >= 2:
            self.time_per_output_token.observe(stats.time_per_output_token_s)

    def update_scheduler_stats(self, stats: SchedulerStats) -> None:
        """Set the gauges; advance the engine-wide counters by what is new since last time."""
        last = self.last_scheduler_stats
        self.num_requests_running.set(stats.num_running_reqs)
        self.num_requests_waiting.set(stats.num_waiting_reqs)
        self.kv_cache_usage_perc.set(stats.kv_cache_usage)
        self.prefix_cache_queries.inc(
            max(stats.prefix_cache_queries - last.prefix_cache_queries, 0)
        )
        self.prefix_cache_hits.inc(max(stats.prefix_cache_hits - last.prefix_cache_hits, 0))
        self.num_preemptions.inc(max(stats.num_preemptions - last.num_preemptions, 0))
        self.last_scheduler_stats = stats

    def close(self) -> None:
        """Stop showing this engine in the default registry."""
        _LIVE_ENGINES.discard(self)


class _LiveEnginesCollector:
    """The one collector in prometheus_client's default REGISTRY: merges the families of every
    live `EngineMetrics` (their samples differ by the `engine` label)."""

    def __init__(self) -> None:
        self.engines: weakref.WeakSet[EngineMetrics] = weakref.WeakSet()
        self.lock = threading.Lock()
        self.registered = False

    def add(self, engine: EngineMetrics) -> None:
        with self.lock:
            self.engines.add(engine)
            if not self.registered:
                REGISTRY.register(self)
                self.registered = True

    def discard(self, engine: EngineMetrics) -> None:
        with self.lock:
            self.engines.discard(engine)

    def describe(self) -> list:
        return []  # names vary with nothing; no duplicate check against other collectors

    def collect(self):
        merged: dict[str, PromMetric] = {}
        with self.lock:
            engines = list(self.engines)
        for engine in engines:
            for family in engine.registry.collect():
                target = merged.get(family.name)
                if target is None:
                    target = PromMetric(family.name, family.documentation, family.type)
                    merged[family.name] = target
                target.samples.extend(family.samples)
        yield from merged.values()


# Process-wide by nature: the default registry is, and every LLM of the process shows in it.
_LIVE_ENGINES = _LiveEnginesCollector()
