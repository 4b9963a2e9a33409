"""The scheduler and block manager as plain Python (no model), and preemption end to end."""

from __future__ import annotations

from ember.enginecore.arg_utils import EngineArgs
from ember.enginecore.engine_core import EngineCore
from ember.enginecore.kv_cache_manager import KVCacheManager
from ember.enginecore.messages import FinishReason
from ember.enginecore.request import Request
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


def _request(request_id, prompt_len, max_tokens=4):
    return Request(
        request_id=request_id,
        prompt_token_ids=list(range(10, 10 + prompt_len)),
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
    scheduler.add_request(_request("short", 5))
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
    scheduler.add_request(_request("new", 7, max_tokens=20))
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
