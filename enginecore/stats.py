"""The engine core's scheduler statistics: a snapshot sent to every client with each batch of
outputs (and answered to the `get_scheduler_stats` utility call), from which the frontend's
metrics (`ember.metrics`) set their gauges and engine-wide counters."""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from ember.enginecore.engine_core import EngineCore


class SchedulerStats(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """Gauges now, and counters since the engine core started (all clients together)."""

    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    kv_cache_usage: float = 0.0  # fraction of usable KV blocks held by requests, 0..1
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of which found
    num_preemptions: int = 0


def scheduler_stats(core: EngineCore) -> SchedulerStats:
    """A snapshot of `core`'s scheduler and KV-cache manager (a few attribute reads)."""
    scheduler = core.scheduler
    prefix_cache = core.kv_cache_manager.prefix_cache_stats
    return SchedulerStats(
        num_running_reqs=scheduler.num_running,
        num_waiting_reqs=scheduler.num_waiting,
        kv_cache_usage=core.kv_cache_manager.usage,
        prefix_cache_queries=prefix_cache.queries,
        prefix_cache_hits=prefix_cache.hits,
        num_preemptions=scheduler.num_preemptions,
    )
