"""The scheduler and block manager as plain Python (no model, or a model-free worker), and
preemption end to end."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.enginecore.arg_utils import EngineArgs
from ember.enginecore.block_pool import hash_block_tokens
from ember.enginecore.engine_core import EngineCore
from ember.enginecore.kv_cache_manager import KVCacheManager
from ember.enginecore.messages import FinishReason
from ember.enginecore.request import Request, RequestStatus
from ember.enginecore.scheduler import Scheduler
from ember.workers.config import SchedulerConfig
from ember.workers.sampling_params import SamplingParams
from ember.workers.scheduler_output import ModelRunnerOutput
from tests.helpers import random_prompts, run_engine, write_random_llama


def _scheduler(num_blocks=64, block_size=4, budget=16, max_num_seqs=8):
    config = SchedulerConfig(
        max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=256
    )
    return Scheduler(config, KVCacheManager(num_blocks, block_size))


def _request(request_id, prompt_len, max_tokens=4, first_token=10):
    return Request(
        request_id=request_id,
        prompt_token_ids=list(range(first_token, first_token + prompt_len)),
        sampling_params=SamplingParams(temperature=0.0, max_tokens=max_tokens),
        eos_token_ids=(2,),
    )


def _sample_everything(scheduler, output, token=7):
    """Pretend the model ran: every request that reached its last token samples `token`."""
    req_ids = [
        r
        for r in output.num_scheduled_tokens
        if scheduler.requests[r].num_computed_tokens == scheduler.requests[r].num_tokens
    ]
    return scheduler.update_from_output(
        output, ModelRunnerOutput(req_ids=req_ids, sampled_token_ids=[token] * len(req_ids))
    )


def test_long_prompt_is_chunked_within_the_token_budget():
    scheduler = _scheduler(budget=16)
    scheduler.add_request(_request("long", 40))
    scheduler.add_request(_request("short", 5, first_token=100))
    first = scheduler.schedule()
    assert first.num_scheduled_tokens == {"long": 16}
    assert _sample_everything(scheduler, first) == []
    second = scheduler.schedule()
    assert second.num_scheduled_tokens == {"long": 16}
    _sample_everything(scheduler, second)
    third = scheduler.schedule()  # the last 8 prompt tokens, and the short prompt joins
    assert third.num_scheduled_tokens == {"long": 8, "short": 5}
    outputs = _sample_everything(scheduler, third)
    assert [o.request_id for o in outputs] == ["long", "short"]
    fourth = scheduler.schedule()  # both decode one token
    assert fourth.num_scheduled_tokens == {"long": 1, "short": 1}
    assert {c.req_id: c.num_computed_tokens for c in fourth.scheduled_cached_reqs} == {
        "long": 40,
        "short": 5,
    }


def test_max_num_seqs_caps_the_running_batch():
    scheduler = _scheduler(budget=100, max_num_seqs=2)
    for i in range(3):
        scheduler.add_request(_request(str(i), 3))
    assert sorted(scheduler.schedule().num_scheduled_tokens) == ["0", "1"]
    assert scheduler.num_waiting == 1


def test_request_finishes_on_max_tokens_and_frees_its_blocks():
    scheduler = _scheduler()
    scheduler.add_request(_request("a", 6, max_tokens=2))
    free_before = scheduler.kv_cache_manager.block_pool.num_free_blocks
    _sample_everything(scheduler, scheduler.schedule())
    outputs = _sample_everything(scheduler, scheduler.schedule())
    assert outputs[0].finish_reason is FinishReason.LENGTH
    assert not scheduler.has_unfinished_requests()
    assert scheduler.kv_cache_manager.block_pool.num_free_blocks == free_before
    assert scheduler.schedule().finished_req_ids == ["a"]


def test_eos_stops_unless_ignored():
    scheduler = _scheduler()
    scheduler.add_request(_request("a", 3))
    outputs = _sample_everything(scheduler, scheduler.schedule(), token=2)
    assert outputs[0].finish_reason is FinishReason.STOP


def test_newest_request_is_preempted_when_blocks_run_out():
    scheduler = _scheduler(num_blocks=5, block_size=4, budget=64)  # 4 usable blocks
    scheduler.add_request(_request("old", 7, max_tokens=20))
    scheduler.add_request(_request("new", 7, max_tokens=20, first_token=100))
    _sample_everything(scheduler, scheduler.schedule())  # 2 blocks each, 8 tokens each now
    _sample_everything(scheduler, scheduler.schedule())  # the 8th token fits in block 2
    output = scheduler.schedule()  # the 9th token needs a 3rd block: "new" gives way
    assert output.num_scheduled_tokens == {"old": 1}
    assert "new" not in output.finished_req_ids  # workers keep its state for the resume
    assert scheduler.num_preemptions == 1
    assert scheduler.waiting[0].request_id == "new"
    assert scheduler.waiting[0].num_computed_tokens == 0


def test_abort_frees_blocks_and_tells_the_workers():
    scheduler = _scheduler()
    scheduler.add_request(_request("a", 9))
    scheduler.schedule()
    scheduler.finish_requests(["a", "unknown"], FinishReason.ABORT)
    assert scheduler.kv_cache_manager.block_pool.num_free_blocks == 63
    assert scheduler.schedule().finished_req_ids == ["a"]


def test_preempted_requests_produce_the_same_tokens(tmp_path):
    model_dir = write_random_llama(tmp_path)
    prompts = random_prompts(6, 512, [20, 30, 25], seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    seeded = SamplingParams(temperature=1.0, max_tokens=40, ignore_eos=True, seed=11)
    results = []
    for num_blocks in (None, 24):  # 23 usable blocks of 4 tokens: far fewer than 6 x 70 tokens
        args = EngineArgs(
            model=model_dir,
            dtype="float32",
            block_size=4,
            max_model_len=80,
            num_gpu_blocks_override=num_blocks,
        )
        core = EngineCore(args.create_engine_config())
        results.append(run_engine(core, prompts, [params] * 5 + [seeded]))
        if num_blocks:
            assert core.scheduler.num_preemptions > 0
        core.shutdown()
    assert results[0] == results[1]


def test_long_prefill_token_threshold_caps_each_prefill_chunk():
    config = SchedulerConfig(
        max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256, long_prefill_token_threshold=6
    )
    scheduler = Scheduler(config, KVCacheManager(64, 4))
    scheduler.add_request(_request("short", 3))
    scheduler.add_request(_request("long", 20, first_token=100))
    first = scheduler.schedule()
    assert first.num_scheduled_tokens == {"short": 3, "long": 6}
    _sample_everything(scheduler, first)
    second = scheduler.schedule()  # a decode, and the long prompt's next 6 tokens
    assert second.num_scheduled_tokens == {"short": 1, "long": 6}


def test_prefix_cache_hit_skips_computed_blocks():
    scheduler = _scheduler(budget=64)
    scheduler.add_request(_request("first", 10, max_tokens=1))
    _sample_everything(scheduler, scheduler.schedule())  # finished; its blocks stay cached
    scheduler.add_request(_request("second", 11, max_tokens=2))  # the same 10 tokens, and one
    output = scheduler.schedule()
    (new,) = output.scheduled_new_reqs
    assert new.num_computed_tokens == 8  # two full blocks found, the rest computed
    assert output.num_scheduled_tokens == {"second": 3}
    outputs = _sample_everything(scheduler, output)
    assert outputs[0].num_cached_tokens == 8  # on the first output ...
    assert _sample_everything(scheduler, scheduler.schedule())[0].num_cached_tokens == 0  # only
    stats = scheduler.kv_cache_manager.prefix_cache_stats
    assert (stats.requests, stats.queries, stats.hits) == (2, 21, 8)


def test_preempted_request_resumes_from_its_cached_blocks():
    scheduler = _scheduler(num_blocks=7, block_size=4, budget=64)  # 6 usable blocks
    scheduler.add_request(_request("old", 8, max_tokens=8))  # 16 tokens: 4 blocks
    scheduler.add_request(_request("new", 8, max_tokens=20, first_token=100))
    while not scheduler.num_preemptions:  # both grow to 3 blocks; old's 4th preempts new
        _sample_everything(scheduler, scheduler.schedule())
    assert scheduler.waiting[0].request_id == "new"
    # new's blocks went to the free queue last block first; old's 4th block evicted new's
    # 3rd, and its 2 prompt blocks stay cached: the resume finds them.
    while "old" in scheduler.requests:
        _sample_everything(scheduler, scheduler.schedule())
    (resumed,) = scheduler.schedule().scheduled_new_reqs
    assert resumed.req_id == "new" and resumed.num_computed_tokens == 8
    assert scheduler.requests["new"].num_cached_tokens == 0  # as first scheduled


def test_engine_refuses_to_start_when_one_request_cannot_fit(tiny_llama_dir):
    args = EngineArgs(
        model=tiny_llama_dir, dtype="float32", max_model_len=256, num_gpu_blocks_override=16
    )
    with pytest.raises(ValueError, match=r"holds 240 tokens, fewer than one request of max_m"):
        EngineCore(args.create_engine_config())
    args = EngineArgs(model=tiny_llama_dir, dtype="float32", kv_cache_memory_bytes=4096)
    with pytest.raises(ValueError, match="raise kv_cache_memory_bytes"):
        EngineCore(args.create_engine_config())


# ---- the scheduler and KV manager against a model-free worker ------------------------------


class ShadowWorker:
    """Stands in for the model runner, with a "KV cache" that remembers, per slot, a digest of
    the tokens up to that position. Like the model runner it keeps per-request state from the
    scheduler's deltas, writes every scheduled position through the block table (all writes
    of a step before any read, as each attention layer does), and derives the next token from
    what it reads back through the block table. A wrong block table, a stale cache hit, or a
    hit on another request's blocks changes the tokens."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.slots: dict[int, int] = {}
        self.states: dict[str, tuple[list[int], list[int], list[int]]] = {}

    def execute_model(self, output) -> ModelRunnerOutput:
        for req_id in output.finished_req_ids:
            self.states.pop(req_id, None)
        for new in output.scheduled_new_reqs:
            tokens = list(new.prompt_token_ids) + list(new.output_token_ids)
            self.states[new.req_id] = (tokens, list(new.block_ids), [new.num_computed_tokens])
        for cached in output.scheduled_cached_reqs:
            _, block_ids, computed = self.states[cached.req_id]
            block_ids.extend(cached.new_block_ids)
            computed[0] = cached.num_computed_tokens
        for req_id, count in output.num_scheduled_tokens.items():
            tokens, block_ids, computed = self.states[req_id]
            for position in range(computed[0], computed[0] + count):
                self.slots[self._slot(block_ids, position)] = hash(tuple(tokens[: position + 1]))
        req_ids, sampled = [], []
        for req_id, count in output.num_scheduled_tokens.items():
            tokens, block_ids, computed = self.states[req_id]
            end = computed[0] + count
            if end == len(tokens):
                seen = tuple(self.slots[self._slot(block_ids, p)] for p in range(end))
                tokens.append(_next_token(seen))
                req_ids.append(req_id)
                sampled.append(tokens[-1])
        return ModelRunnerOutput(req_ids=req_ids, sampled_token_ids=sampled)

    def _slot(self, block_ids: list[int], position: int) -> int:
        block_id = block_ids[position // self.block_size]
        assert block_id != 0, "the null block was used"
        return block_id * self.block_size + position % self.block_size


def _next_token(digests: tuple[int, ...]) -> int:
    return 3 + hash(digests) % 5


def _reference_tokens(prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        digests = tuple(hash(tuple(tokens[: p + 1])) for p in range(len(tokens)))
        tokens.append(_next_token(digests))
    return tokens[len(prompt) :]


_SHARED_PREFIXES = [[], [9, 8, 7, 6, 5, 4, 3, 9, 8], [9, 8, 7, 6, 1, 1]]


@settings(max_examples=300, deadline=None)
@given(
    prompts=st.lists(
        st.tuples(
            st.sampled_from(_SHARED_PREFIXES),
            st.lists(st.integers(3, 6), max_size=8),
            st.integers(1, 10),
        ).filter(lambda p: p[0] or p[1]),
        min_size=1,
        max_size=10,
    ),
    block_size=st.sampled_from([2, 4]),
    spare_blocks=st.sampled_from([0, 2, 6, 100]),
    budget=st.sampled_from([3, 8, 64]),
    long_prefill_threshold=st.sampled_from([0, 5]),
    max_num_seqs=st.sampled_from([2, 16]),
    enable_caching=st.booleans(),
    overlapped=st.booleans(),
    eos_token_ids=st.sampled_from([(), (5,)]),
)
def test_tokens_do_not_depend_on_budget_chunking_caching_or_preemption(
    prompts,
    block_size,
    spare_blocks,
    budget,
    long_prefill_threshold,
    max_num_seqs,
    enable_caching,
    overlapped,
    eos_token_ids,
):
    """`overlapped`: async scheduling, the worker one step ahead of the scheduler's updates,
    as far as it can be (each step is scheduled, and run, before the output of the step
    before is taken in). With an EOS token, requests stop early while their next step runs."""
    max_len = max(len(prefix) + len(suffix) + max_tokens for prefix, suffix, max_tokens in prompts)
    num_blocks = 1 + -(-max_len // block_size) + spare_blocks  # one request always fits
    config = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        max_model_len=256,
        long_prefill_token_threshold=long_prefill_threshold,
    )
    kv_cache_manager = KVCacheManager(num_blocks, block_size, enable_caching)
    scheduler = Scheduler(config, kv_cache_manager)
    worker = ShadowWorker(block_size)
    for index, (prefix, suffix, max_tokens) in enumerate(prompts):
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        scheduler.add_request(Request(str(index), prefix + suffix, params, eos_token_ids))
    produced: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    in_flight = None  # (scheduler output, what the worker returned for it)
    for _ in range(10_000):
        if in_flight is None:
            if not scheduler.has_unfinished_requests():
                break
            output = scheduler.schedule()
            in_flight = (output, worker.execute_model(output))
        following = None
        if overlapped:
            output = scheduler.schedule(overlapped=True)
            if output.num_scheduled_tokens:
                following = (output, worker.execute_model(output))
            else:
                scheduler.finished_req_ids.update(output.finished_req_ids)
        for output, _ in filter(None, (in_flight, following)):
            assert sum(output.num_scheduled_tokens.values()) <= budget
            assert len(scheduler.running) <= max_num_seqs
        for out in scheduler.update_from_output(*in_flight):
            produced[out.request_id].extend(out.new_token_ids)
        in_flight = following
    assert not scheduler.has_unfinished_requests()
    for index, (prefix, suffix, max_tokens) in enumerate(prompts):
        expected = _reference_tokens(prefix + suffix, max_tokens)
        stops = [i for i, token in enumerate(expected) if token in eos_token_ids]
        if stops:
            expected = expected[: stops[0] + 1]
        assert produced[str(index)] == expected
    assert kv_cache_manager.block_pool.num_free_blocks == num_blocks - 1  # nothing leaked
    assert not kv_cache_manager.req_to_blocks and not kv_cache_manager.num_cached_blocks


def _priority_scheduler(num_blocks=64, block_size=4, budget=64, max_num_seqs=8):
    config = SchedulerConfig(
        max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=256,
        policy="priority",
    )  # fmt: skip
    return Scheduler(config, KVCacheManager(num_blocks, block_size))


def _prioritised(request_id, prompt_len, priority, arrival, **kwargs):
    request = _request(request_id, prompt_len, **kwargs)
    request.priority, request.arrival_time = priority, arrival
    return request


def test_priority_policy_schedules_waiting_requests_by_priority_then_arrival():
    scheduler = _priority_scheduler(max_num_seqs=2)
    scheduler.add_request(_prioritised("late-low", 3, priority=5, arrival=1.0))
    scheduler.add_request(_prioritised("high", 3, priority=-1, arrival=3.0, first_token=50))
    scheduler.add_request(_prioritised("early-low", 3, priority=5, arrival=0.5, first_token=90))
    output = scheduler.schedule()
    assert list(output.num_scheduled_tokens) == ["high", "early-low"]
    assert [r.request_id for r in scheduler.waiting] == ["late-low"]


def test_priority_policy_preempts_the_lowest_priority_request():
    scheduler = _priority_scheduler(num_blocks=5, block_size=4)  # 4 usable blocks
    scheduler.add_request(_prioritised("low", 7, priority=1, arrival=0.0, max_tokens=20))
    scheduler.add_request(
        _prioritised("high", 7, priority=0, arrival=1.0, max_tokens=20, first_token=100)
    )
    _sample_everything(scheduler, scheduler.schedule())  # 2 blocks each, 8 tokens each now
    _sample_everything(scheduler, scheduler.schedule())
    output = scheduler.schedule()  # the 9th token needs a 3rd block: "low" gives way
    assert output.num_scheduled_tokens == {"high": 1}
    assert scheduler.waiting[0].request_id == "low"
    # Under "fcfs" the newest ("high") would have been preempted instead.
    fcfs = _scheduler(num_blocks=5, block_size=4, budget=64)
    fcfs.add_request(_prioritised("low", 7, priority=1, arrival=0.0, max_tokens=20))
    fcfs.add_request(
        _prioritised("high", 7, priority=0, arrival=1.0, max_tokens=20, first_token=100)
    )
    _sample_everything(fcfs, fcfs.schedule())
    _sample_everything(fcfs, fcfs.schedule())
    assert fcfs.schedule().num_scheduled_tokens == {"low": 1}


# ---- async scheduling: the scheduler a step ahead of the outputs -------------------------


def _one_output(scheduler, output, request_id, token):
    return scheduler.update_from_output(
        output, ModelRunnerOutput(req_ids=[request_id], sampled_token_ids=[token])
    )


def test_overlapped_steps_never_cache_a_block_whose_last_token_is_still_coming():
    scheduler = _scheduler(block_size=4)
    request = _request("a", prompt_len=3, max_tokens=8)
    scheduler.add_request(request)
    prefill = scheduler.schedule()  # positions 0-2; samples position 3's token
    assert request.num_output_placeholders == 1
    decode = scheduler.schedule(overlapped=True)  # position 3, its token not yet known here
    assert decode.num_scheduled_tokens == {"a": 1}
    assert request.num_output_placeholders == 2
    # Block 0 is full once position 3 runs, but its hash needs that token: not cached yet.
    assert request.block_hashes == []
    assert scheduler.kv_cache_manager.num_cached_blocks["a"] == 0
    _one_output(scheduler, prefill, "a", 7)
    scheduler.schedule(overlapped=True)  # the next step caches block 0 by its known tokens
    expected = hash_block_tokens(None, (10, 11, 12, 7), None)
    assert request.block_hashes[:1] == [expected]
    assert scheduler.kv_cache_manager.block_pool.get_cached_block(expected) is not None


def test_overlapped_steps_stop_where_the_coming_tokens_reach_max_tokens():
    scheduler = _scheduler()
    short = _request("short", prompt_len=3, max_tokens=1)
    longer = _request("longer", prompt_len=3, max_tokens=2, first_token=40)
    scheduler.add_request(short)
    scheduler.add_request(longer)
    prefill = scheduler.schedule()
    # "short" is done by the token in flight; "longer" needs one more.
    assert scheduler.schedule(overlapped=True).num_scheduled_tokens == {"longer": 1}
    assert scheduler.schedule(overlapped=True).num_scheduled_tokens == {}
    outputs = scheduler.update_from_output(
        prefill, ModelRunnerOutput(req_ids=["short", "longer"], sampled_token_ids=[7, 7])
    )
    assert [o.finish_reason for o in outputs] == [FinishReason.LENGTH, None]
    assert short.num_output_placeholders == 0 and longer.num_output_placeholders == 1


def test_overlapped_steps_do_not_preempt():
    # 3 usable blocks of 4 tokens: two requests of 4 and 3 tokens fill 2; the third block goes
    # to whichever first grows past its block.
    scheduler = _scheduler(num_blocks=4, block_size=4)
    first, second = _request("a", 4, max_tokens=8), _request("b", 4, max_tokens=8, first_token=40)
    scheduler.add_request(first)
    scheduler.add_request(second)
    scheduler.schedule()
    overlapped = scheduler.schedule(overlapped=True)  # "a" takes the last block, "b" waits
    assert overlapped.num_scheduled_tokens == {"a": 1}
    assert scheduler.num_preemptions == 0 and second.status is RequestStatus.RUNNING
