"""`LLM.get_metrics()`: vLLM's reader objects and names, counts that match what was run (token
counts exactly; preemptions against the same workload on an in-process engine core; prefix-cache
hits from the block arithmetic), latency histograms, `RequestOutput.metrics`, the mapping form,
the prometheus_client exposition and the periodic stats line."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import generate_latest

from ember import LLM, SamplingParams
from ember.enginecore.arg_utils import EngineArgs
from ember.enginecore.engine_core import EngineCore
from ember.metrics_reader import Counter, Gauge, Histogram, MetricsList, get_metrics_snapshot
from tests.helpers import random_prompts, run_engine, write_random_llama

BLOCK_SIZE = 16
# 19 usable blocks of 16 tokens: 4 requests of 30 + 60 tokens (6 blocks each) cannot all fit.
ENGINE_OPTIONS = {
    "dtype": "float32",
    "max_model_len": 128,
    "num_gpu_blocks_override": 20,
    "block_size": BLOCK_SIZE,
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return write_random_llama(tmp_path_factory.mktemp("metrics_llama"), seed=3)


@pytest.fixture(scope="module")
def llm(model_dir):
    with LLM(model_dir, skip_tokenizer_init=True, **ENGINE_OPTIONS) as engine:
        yield engine


def _delta(before: MetricsList, after: MetricsList, name: str) -> float:
    return after.get(name, 0) - before.get(name, 0)


def _histogram(metrics: MetricsList, name: str) -> Histogram:
    histogram = metrics.get(name)
    assert isinstance(histogram, Histogram), name
    return histogram


def test_metrics_have_vllms_names_and_types(llm):
    metrics = llm.get_metrics()
    kinds = {metric.name: type(metric) for metric in metrics}
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert kinds["vllm:" + name] is Gauge
    for name in (
        "prefix_cache_queries",
        "prefix_cache_hits",
        "num_preemptions",
        "prompt_tokens",
        "generation_tokens",
    ):
        assert kinds["vllm:" + name] is Counter
    for name in (
        "time_to_first_token_seconds",
        "time_per_output_token_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
        "request_prompt_tokens",
        "request_generation_tokens",
    ):
        assert kinds["vllm:" + name] is Histogram
    # The mapping form of vLLM's documentation, with the older name of kv_cache_usage_perc.
    assert metrics.get("num_requests_running", 0) == 0
    assert metrics.get("gpu_cache_usage", 0) == metrics.get("vllm:kv_cache_usage_perc")
    assert metrics.get("no_such_metric", -1) == -1
    assert "prompt_tokens" in metrics and "no_such_metric" not in metrics


def test_token_counts_and_histograms_match_the_run(llm):
    prompts = random_prompts(6, 512, [5, 9, 17])
    params = [
        SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (1, 2, 3, 4, 5, 6)
    ]
    before = llm.get_metrics()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    after = llm.get_metrics()
    generated = [len(o.outputs[0].token_ids) for o in outputs]
    assert generated == [1, 2, 3, 4, 5, 6]
    assert _delta(before, after, "prompt_tokens") == sum(len(p) for p in prompts)
    assert _delta(before, after, "generation_tokens") == sum(generated)
    assert _delta(before, after, "request_success") == len(prompts)
    by_reason = {
        m.labels["finished_reason"]: m.value for m in after if m.name == "vllm:request_success"
    }
    assert by_reason.get("length", 0) >= len(prompts)

    def count(metrics, name):
        return _histogram(metrics, name).count

    for name in (
        "time_to_first_token_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
        "request_prompt_tokens",
        "request_generation_tokens",
    ):
        assert count(after, name) - count(before, name) == len(prompts), name
    # Requests with two or more tokens have a time per output token.
    assert count(after, "time_per_output_token_seconds") - count(
        before, "time_per_output_token_seconds"
    ) == sum(1 for n in generated if n >= 2)
    prompt_lengths = _histogram(after, "request_prompt_tokens")
    assert prompt_lengths.sum - _histogram(before, "request_prompt_tokens").sum == sum(
        len(p) for p in prompts
    )
    assert prompt_lengths.buckets["+Inf"] == prompt_lengths.count
    ttft = _histogram(after, "time_to_first_token_seconds").sum
    e2e = _histogram(after, "e2e_request_latency_seconds").sum
    assert 0 < ttft <= e2e


def test_request_output_metrics_hold_the_requests_timestamps(llm):
    out = llm.generate(
        [[5, 6, 7, 8]], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False
    )[0]
    stats = out.metrics
    assert stats.num_generation_tokens == len(out.outputs[0].token_ids) == 4
    assert stats.arrival_time > 0 and stats.first_token_latency > 0
    assert 0 < stats.queued_ts <= stats.scheduled_ts
    assert 0 < stats.first_token_ts <= stats.last_token_ts
    assert stats.time_per_output_token_s >= 0


def test_preemptions_counted_in_a_forced_preemption_run(llm, model_dir):
    prompts = random_prompts(4, 512, [30], seed=11)
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    # The oracle: the same scheduler on the same workload, in this process.
    core = EngineCore(EngineArgs(model=model_dir, **ENGINE_OPTIONS).create_engine_config())
    expected_tokens = run_engine(core, prompts, params)
    expected_preemptions = core.scheduler.num_preemptions
    core.shutdown()
    assert expected_preemptions > 0

    usages = []
    update = llm._metrics.update_scheduler_stats

    def spy(stats):
        usages.append(stats.kv_cache_usage)
        update(stats)

    llm._metrics.update_scheduler_stats = spy
    try:
        before = llm.get_metrics()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        after = llm.get_metrics()
    finally:
        del llm._metrics.update_scheduler_stats
    assert [o.outputs[0].token_ids for o in outputs] == expected_tokens
    assert _delta(before, after, "num_preemptions") == expected_preemptions
    # The KV cache filled up while they ran (that is why they were preempted), then emptied.
    assert max(usages) > 0.8 and all(0 <= u <= 1 for u in usages)
    assert after.get("kv_cache_usage_perc") == 0
    assert after.get("num_requests_running") == 0 and after.get("num_requests_waiting") == 0


def test_prefix_cache_hits_counted_in_a_shared_prefix_run(llm):
    assert llm.reset_prefix_cache()
    prefix = random_prompts(1, 512, [4 * BLOCK_SIZE], seed=21)[0]
    tails = random_prompts(4, 512, [5], seed=22)
    prompts = [prefix + tail for tail in tails]
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    before = llm.get_metrics()
    llm.generate(prompts[:1], params, use_tqdm=False)  # computes and caches the prefix
    outputs = llm.generate(prompts[1:], params, use_tqdm=False)
    after = llm.get_metrics()
    # Each later prompt finds the prefix's 4 full blocks.
    assert [o.num_cached_tokens for o in outputs] == [4 * BLOCK_SIZE] * 3
    assert _delta(before, after, "prefix_cache_hits") == 3 * 4 * BLOCK_SIZE
    assert _delta(before, after, "prefix_cache_queries") == sum(len(p) for p in prompts)


def test_metrics_reach_the_prometheus_registry_per_engine(llm, model_dir):
    llm.generate([[9, 10, 11]], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    with LLM(model_dir, skip_tokenizer_init=True, **ENGINE_OPTIONS) as second:
        second.generate([[9, 10]], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
        mine = llm.get_metrics().get("generation_tokens")
        theirs = second.get_metrics().get("generation_tokens")
        assert theirs == 3
        engine = str(second._metrics.engine_index)
        exposition = generate_latest().decode()
        assert f'vllm:generation_tokens_total{{engine="{engine}"' in exposition
        assert exposition.count("# TYPE vllm:generation_tokens_total counter") == 1
        snapshot = [m for m in get_metrics_snapshot() if m.name == "vllm:generation_tokens"]
        values = {m.labels["engine"]: m.value for m in snapshot}
        assert values[engine] == 3 and values[str(llm._metrics.engine_index)] == mine
    engines = {m.labels["engine"] for m in get_metrics_snapshot()}
    assert engine not in engines  # a shut-down LLM leaves the registry


def test_periodic_stats_line_with_disable_log_stats_false(model_dir, caplog):
    with LLM(
        model_dir, skip_tokenizer_init=True, disable_log_stats=False, **ENGINE_OPTIONS
    ) as engine:
        engine._stat_logger.interval_s = 0.0
        with caplog.at_level(logging.INFO, logger="ember.stats"):
            engine.generate(
                [[1, 2, 3]] * 2, SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False
            )
    lines = [r.getMessage() for r in caplog.records if r.name == "ember.stats"]
    assert lines and "Avg generation throughput" in lines[-1]
    assert "Running:" in lines[-1] and "KV cache usage" in lines[-1]
