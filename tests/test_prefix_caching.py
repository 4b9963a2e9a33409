"""Prefix caching and preemption end to end: the same greedy tokens with caching on or off, at
any token budget, under preemption; hit rates and `num_cached_tokens` as the engine reports
them; `reset_prefix_cache`. A small random Llama runs through an in-process `EngineCore`; the
default model runs through `LLM` where the issue asks for it."""

from __future__ import annotations

import random

import pytest

from ember import LLM, SamplingParams
from ember.enginecore.arg_utils import EngineArgs
from ember.enginecore.engine_core import EngineCore
from ember.enginecore.messages import EngineCoreRequest
from tests.helpers import random_prompts, write_random_llama

BLOCK_SIZE = 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return write_random_llama(tmp_path_factory.mktemp("prefix_llama"), seed=5)


def _core(model_dir: str, **overrides) -> EngineCore:
    overrides.setdefault("max_model_len", 512)
    args = EngineArgs(model=model_dir, dtype="float32", **overrides)
    return EngineCore(args.create_engine_config())


def _run(
    core: EngineCore, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
) -> tuple[list[list[int]], list[int]]:
    """Token ids and `num_cached_tokens` (sent with the first output) of each prompt."""
    params_list = params if isinstance(params, list) else [params] * len(prompts)
    base = f"r{random.getrandbits(32)}-"
    for i, (prompt, request_params) in enumerate(zip(prompts, params_list)):
        core.add_request(EngineCoreRequest(f"{base}{i}", prompt, request_params))
    tokens: dict[str, list[int]] = {f"{base}{i}": [] for i in range(len(prompts))}
    cached: dict[str, int] = {}
    while core.has_unfinished_requests():
        for output in core.step():
            if not tokens[output.request_id]:
                cached[output.request_id] = output.num_cached_tokens
            tokens[output.request_id].extend(output.new_token_ids)
    ids = [f"{base}{i}" for i in range(len(prompts))]
    return [tokens[i] for i in ids], [cached[i] for i in ids]


def _prompts_sharing_prefixes(count: int, seed: int) -> list[list[int]]:
    """Prompts built from 3 prefixes of 40-70 tokens and a distinct tail of 1-30 tokens."""
    rng = random.Random(seed)
    prefixes = random_prompts(3, 512, [40, 57, 70], seed=seed)
    return [
        prefixes[i % 3] + [rng.randrange(3, 512) for _ in range(rng.randrange(1, 31))]
        for i in range(count)
    ]


GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def test_greedy_tokens_equal_with_prefix_caching_on_and_off_at_any_budget(model_dir):
    prompts = _prompts_sharing_prefixes(12, seed=1)
    results = {}
    for caching, budget in [(False, 2048), (True, 2048), (True, 64), (True, 16)]:
        core = _core(model_dir, enable_prefix_caching=caching, max_num_batched_tokens=budget)
        tokens, cached = _run(core, prompts, GREEDY)
        results[caching, budget] = tokens
        if caching:
            assert sum(cached) > 0
            again, cached_again = _run(core, prompts, GREEDY)  # everything but a tail cached
            assert again == tokens
            assert all(
                c == (len(p) - 1) // BLOCK_SIZE * BLOCK_SIZE for c, p in zip(cached_again, prompts)
            )
        else:
            assert sum(cached) == 0
        core.shutdown()
    reference = results[False, 2048]
    for key, tokens in results.items():
        assert tokens == reference, key


def test_shared_system_prompt_hits_and_second_call_computes_only_the_last_partial_block(
    model_dir,
):
    rng = random.Random(7)
    system_prompt = random_prompts(1, 512, [200], seed=11)[0]
    # Tails of 1-15 tokens after the 200 shared ones: no prompt is a whole number of blocks.
    prompts = [
        system_prompt + [rng.randrange(3, 512) for _ in range(rng.choice([1, 5, 9, 12, 15]))]
        for _ in range(32)
    ]
    assert all(len(p) % BLOCK_SIZE for p in prompts)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    core = _core(model_dir)
    first_tokens, first_cached = _run(core, prompts, params)
    stats = core.utility_get_stats()
    assert stats["prefix_cache_requests"] == 32
    assert stats["prefix_cache_hit_rate"] >= 0.85, stats
    assert first_cached[0] == 0 and all(c == 192 for c in first_cached[1:])

    prefill_tokens: dict[str, int] = {}
    execute_model = core.executor.execute_model

    def counting_execute_model(scheduler_output):
        for new in scheduler_output.scheduled_new_reqs:
            prefill_tokens[new.req_id] = len(new.prompt_token_ids) - new.num_computed_tokens
        return execute_model(scheduler_output)

    core.executor.execute_model = counting_execute_model
    second_tokens, second_cached = _run(core, prompts, params)
    assert second_tokens == first_tokens
    assert second_cached == [len(p) // BLOCK_SIZE * BLOCK_SIZE for p in prompts]
    assert sorted(prefill_tokens.values()) == sorted(len(p) % BLOCK_SIZE for p in prompts)
    core.shutdown()


def test_small_kv_budget_preempts_yet_64_requests_match_an_unconstrained_run(model_dir):
    prompts = _prompts_sharing_prefixes(64, seed=3)
    params = [
        SamplingParams(temperature=0.0, max_tokens=8 + i % 17, ignore_eos=True)
        if i % 8
        else SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True, seed=i)
        for i in range(64)
    ]
    results = []
    # 29 usable blocks of 16 tokens hold 5-10 of these requests (each needs 3-6 blocks).
    for num_blocks in (None, 30):
        core = _core(model_dir, max_model_len=128, num_gpu_blocks_override=num_blocks)
        results.append(_run(core, prompts, params)[0])
        if num_blocks:
            assert core.utility_get_stats()["num_preemptions"] > 0
        assert core.kv_cache_manager.block_pool.num_free_blocks == (
            core.config.cache.num_kv_blocks - 1
        )
        core.shutdown()
    assert results[0] == results[1]
    assert all(len(t) == p.max_tokens for t, p in zip(results[0], params))


def test_reset_prefix_cache_forgets_cached_blocks_only_when_none_are_held(model_dir):
    prompts = [list(range(3, 60))]
    core = _core(model_dir)
    tokens, _ = _run(core, prompts, GREEDY)
    assert _run(core, prompts, GREEDY) == (tokens, [48])
    core.add_request(EngineCoreRequest("holder", list(range(100, 140)), GREEDY))
    core.step()
    assert core.utility_reset_prefix_cache() is False  # "holder" holds blocks
    core.abort_requests(["holder"])
    assert core.utility_reset_prefix_cache() is True
    assert _run(core, prompts, GREEDY) == (tokens, [0])
    core.shutdown()


@pytest.mark.slow
def test_default_model_greedy_equal_with_caching_on_off_and_budgets_16_64_2048(default_gguf):
    system = "You are a concise assistant. Answer in one short sentence, and never use lists. "
    prompts = [
        system + "What is the capital of France?",
        system + "Name a primary color.",
        system + "What is 2 + 2?",
        "The quick brown fox",
    ]
    params = SamplingParams(temperature=0.0, max_tokens=16)
    results = {}
    for caching, budget in [(False, 2048), (True, 2048), (True, 64), (True, 16)]:
        with LLM(
            default_gguf,
            dtype="float32",
            enable_prefix_caching=caching,
            max_num_batched_tokens=budget,
        ) as llm:
            outputs = llm.generate(prompts, params, use_tqdm=False)
            results[caching, budget] = [o.outputs[0].token_ids for o in outputs]
            if caching and budget == 2048:
                # The system prompt's full blocks are shared within the call ...
                assert outputs[0].num_cached_tokens == 0
                assert all(o.num_cached_tokens >= 16 for o in outputs[1:3])
                # Each request wrote the full blocks of its prompt that it did not find.
                for output in outputs:
                    num_full = len(output.prompt_token_ids) // 16 * 16
                    assert output.num_cache_creation_tokens == num_full - output.num_cached_tokens
                assert outputs[0].num_cache_creation_tokens >= 16
                again = llm.generate(prompts, params, use_tqdm=False)  # ... and across calls
                assert [o.outputs[0].token_ids for o in again] == results[caching, budget]
                for output in again:
                    num_prompt_tokens = len(output.prompt_token_ids)
                    assert output.num_cached_tokens == (num_prompt_tokens - 1) // 16 * 16
                    assert output.num_cache_creation_tokens == (
                        num_prompt_tokens // 16 * 16 - output.num_cached_tokens
                    )
                stats = llm.engine.call_utility("get_stats")
                assert stats["prefix_cache_hits"] > 0
                assert llm.reset_prefix_cache() is True
                fresh = llm.generate(prompts[:1], params, use_tqdm=False)
                assert fresh[0].num_cached_tokens == 0
                assert (
                    fresh[0].num_cache_creation_tokens == len(fresh[0].prompt_token_ids) // 16 * 16
                )
            elif not caching:
                assert all(o.num_cached_tokens == 0 for o in outputs)
                assert all(o.num_cache_creation_tokens == 0 for o in outputs)
    reference = results[False, 2048]
    for key, tokens in results.items():
        assert tokens == reference, key
