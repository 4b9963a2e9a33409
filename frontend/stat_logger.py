"""The periodic one-line stats log of `LLM(disable_log_stats=False)` (vLLM's
`LoggingStatLogger`): throughput since the last line, running and waiting requests, KV-cache
usage and prefix-cache hit rate. Called by `LLM.generate` as outputs arrive."""

from __future__ import annotations

import logging
import time

from ember.metrics import EngineMetrics

logger = logging.getLogger("ember.stats")

LOG_INTERVAL_S = 5.0


class LoggingStatLogger:
    def __init__(self, metrics: EngineMetrics, interval_s: float = LOG_INTERVAL_S):
        self.metrics = metrics
        self.interval_s = interval_s
        self._reset(time.monotonic())
        if not logging.getLogger("ember").handlers and not logging.getLogger().handlers:
            # The user configured no logging: show the line anyway, as vLLM does.
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("INFO %(asctime)s [ember] %(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False

    def _reset(self, now: float) -> None:
        self.last_log = now
        self.last_prompt_tokens = self.metrics.total_prompt_tokens
        self.last_generation_tokens = self.metrics.total_generation_tokens
        stats = self.metrics.last_scheduler_stats
        self.last_queries, self.last_hits = stats.prefix_cache_queries, stats.prefix_cache_hits

    def maybe_log(self) -> None:
        now = time.monotonic()
        if now - self.last_log >= self.interval_s:
            self.log(now)

    def log(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        elapsed = max(now - self.last_log, 1e-9)
        metrics = self.metrics
        stats = metrics.last_scheduler_stats
        queries = stats.prefix_cache_queries - self.last_queries
        hits = stats.prefix_cache_hits - self.last_hits
        logger.info(
            "Engine %03d: Avg prompt throughput: %.1f tokens/s, Avg generation throughput: "
            "%.1f tokens/s, Running: %d reqs, Waiting: %d reqs, KV cache usage: %.1f%%, "
            "Prefix cache hit rate: %.1f%%",
            metrics.engine_index,
            (metrics.total_prompt_tokens - self.last_prompt_tokens) / elapsed,
            (metrics.total_generation_tokens - self.last_generation_tokens) / elapsed,
            stats.num_running_reqs,
            stats.num_waiting_reqs,
            stats.kv_cache_usage * 100,
            hits / queries * 100 if queries else 0.0,
        )
        self._reset(now)
