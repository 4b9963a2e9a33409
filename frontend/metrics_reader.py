"""vLLM's metric reader objects (`vllm.v1.metrics.reader`): `Counter`, `Gauge`, `Histogram`,
`Vector`, read out of prometheus_client collectors. `LLM.get_metrics()` returns them in a
`MetricsList`, which also answers `metrics.get("num_requests_running", 0)` like a mapping."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY
from prometheus_client import Metric as PromMetric

_PREFIX = "vllm:"
# Older names vLLM's documentation and scripts still use, mapped to today's.
ALIASES = {
    "gpu_cache_usage": "kv_cache_usage_perc",
    "gpu_cache_usage_perc": "kv_cache_usage_perc",
    "cpu_cache_usage": "kv_cache_usage_perc",
}


@dataclass
class Metric:
    """One metric of one label set (`name` carries the `vllm:` prefix)."""

    name: str
    labels: dict[str, str]


@dataclass
class Counter(Metric):
    """A monotonically increasing integer count."""

    value: int


@dataclass
class Vector(Metric):
    """An ordered array of integer counts (vLLM's shape; ember exports none today)."""

    values: list[int]


@dataclass
class Gauge(Metric):
    """A value that goes up and down."""

    value: float


@dataclass
class Histogram(Metric):
    """Observations in cumulative buckets keyed by their upper bound ("+Inf" included)."""

    count: int
    sum: float
    buckets: dict[str, int]


class MetricsList(list):
    """A `list[Metric]` that also reads like a mapping from bare names to values.

    `get(name, default)` accepts `"vllm:prompt_tokens"`, `"prompt_tokens"` and the older
    aliases (`"gpu_cache_usage"` for `kv_cache_usage_perc`). It returns a counter's or gauge's
    value summed over its label sets (e.g. `request_success` over finish reasons), a vector's
    values, or the `Histogram` itself; `default` when no such metric exists.
    """

    def get(self, name: str, default: Any = None) -> Any:
        bare = name.removeprefix(_PREFIX)
        full = _PREFIX + ALIASES.get(bare, bare)
        found = [metric for metric in self if metric.name == full]
        if not found:
            return default
        first = found[0]
        if isinstance(first, (Counter, Gauge)):
            return sum(metric.value for metric in found)
        if isinstance(first, Vector):
            return first.values
        return first

    def __getitem__(self, key):
        if isinstance(key, str):
            value = self.get(key)
            if value is None:
                raise KeyError(key)
            return value
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            return self.get(key) is not None
        return super().__contains__(key)


def read_metrics(families: Iterable[PromMetric]) -> MetricsList:
    """Convert prometheus_client metric families (`collector.collect()`) whose names start
    with `vllm:` into reader objects, one per label set."""
    collected = MetricsList()
    for family in families:
        if not family.name.startswith(_PREFIX):
            continue
        if family.type == "gauge":
            for sample in _samples(family, ""):
                collected.append(Gauge(family.name, sample.labels, sample.value))
        elif family.type == "counter":
            for sample in _samples(family, "_total"):
                collected.append(Counter(family.name, sample.labels, int(sample.value)))
        elif family.type == "histogram":
            collected.extend(_histograms(family))
    return collected


def get_metrics_snapshot() -> MetricsList:
    """Every `vllm:` metric in prometheus_client's default registry: all live `LLM`s."""
    return read_metrics(REGISTRY.collect())


def _samples(family: PromMetric, suffix: str) -> list:
    name = family.name + suffix
    return [sample for sample in family.samples if sample.name == name]


def _histograms(family: PromMetric) -> list[Histogram]:
    by_labels: dict[frozenset, Histogram] = {}

    def entry(labels: dict[str, str]) -> Histogram:
        key = frozenset(labels.items())
        if key not in by_labels:
            by_labels[key] = Histogram(family.name, dict(labels), 0, 0.0, {})
        return by_labels[key]

    for sample in family.samples:
        if sample.name.endswith("_bucket"):
            labels = {k: v for k, v in sample.labels.items() if k != "le"}
            entry(labels).buckets[sample.labels["le"]] = int(sample.value)
        elif sample.name.endswith("_count"):
            entry(sample.labels).count = int(sample.value)
        elif sample.name.endswith("_sum"):
            entry(sample.labels).sum = sample.value
    return list(by_labels.values())
