"""Engine access with vLLM's names: `llm_engine`, `model_config`, `supported_tasks`,
`collective_rpc` / `apply_model` (one result per rank, functions sent by reference),
`sleep` / `wake_up` (memory released, greedy tokens unchanged), `reset_prefix_cache` and
`start_profile` with vLLM's arguments. Two engines (TP=1 and TP=2, both with sleep mode) and
an engine core in this process without it."""

from __future__ import annotations

import os
import time

import msgspec
import psutil
import pytest
import torch

from ember import LLM, SamplingParams
from ember.engine_access import function_reference, supported_tasks
from ember.enginecore.arg_utils import EngineArgs
from ember.enginecore.core_process import EngineCoreProc
from ember.enginecore.engine_core import EngineCore
from ember.enginecore.messages import EngineCoreReadyInfo, EngineCoreRequest
from tests.helpers import random_prompts, run_engine, write_random_llama

# Big enough that the weights (~70 MB in float32) and a touched KV cache stand out of the
# workers' resident memory; small enough to load in a second.
MODEL_SETTINGS = {
    "vocab_size": 8192,
    "hidden_size": 512,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 1024,
}
KV_CACHE_BYTES = 128 << 20
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
ENGINE_OPTIONS = {"dtype": "float32", "skip_tokenizer_init": True, "max_model_len": 1024}


# ---- functions the workers import by reference (module-level, so they can be found) -------


def rank_times(worker, scale: int, *, offset: int = 0) -> int:
    return worker.rank * scale + offset


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def fill_kv_cache(worker) -> int:
    """Touch every page of the KV cache (CPU caches are mapped lazily); its size in bytes."""
    for cache in worker.model_runner.kv_caches:
        cache.fill_(1.0)
    return sum(c.numel() * c.element_size() for c in worker.model_runner.kv_caches)


def unsendable_result(worker) -> object:
    return object()


def slow_rank(worker, seconds: float) -> int:
    time.sleep(seconds)
    return worker.rank


# ---- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return write_random_llama(tmp_path_factory.mktemp("engine_access"), **MODEL_SETTINGS)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return random_prompts(8, MODEL_SETTINGS["vocab_size"], [40, 95, 130, 17])


@pytest.fixture(scope="module")
def llm(model_dir):
    with LLM(
        model_dir, enable_sleep_mode=True, kv_cache_memory_bytes=KV_CACHE_BYTES, **ENGINE_OPTIONS
    ) as engine:
        yield engine


@pytest.fixture(scope="module")
def llm_tp2(model_dir):
    with LLM(model_dir, tensor_parallel_size=2, enable_sleep_mode=True, **ENGINE_OPTIONS) as engine:
        yield engine


@pytest.fixture(scope="module")
def core(tiny_llama_dir):
    """An engine core with its worker in this process, without sleep mode. Synchronous: its
    utilities are called here between steps, where the engine-core process would take in the
    step in flight first (`EngineCore.drain`)."""
    args = EngineArgs(
        model=tiny_llama_dir, dtype="float32", max_model_len=256, async_scheduling=False
    )
    engine_core = EngineCore(args.create_engine_config())
    yield engine_core
    engine_core.shutdown()


@pytest.fixture(scope="module")
def greedy_reference(llm, prompts) -> list[list[int]]:
    return _greedy(llm, prompts)


def _greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    return [list(output.outputs[0].token_ids) for output in outputs]


def _workers_rss(llm: LLM) -> int:
    """Resident bytes of the engine's worker processes (the engine core's children)."""
    workers = psutil.Process(llm.engine.process.pid).children()
    assert workers
    return sum(worker.memory_info().rss for worker in workers)


# ---- llm_engine, model_config, supported_tasks ---------------------------------------------


def test_model_config_and_llm_engine_answer_what_vllm_scripts_read(llm, model_dir):
    config = llm.model_config
    assert llm.llm_engine.get_model_config() is config
    assert llm.llm_engine.model_config is config
    assert config.model == config.served_model_name == model_dir
    assert config.max_model_len == 1024
    assert config.dtype is torch.float32
    assert config.runner_type == "generate"
    assert (config.seed, config.trust_remote_code, config.revision) == (0, False, None)
    assert config.enable_sleep_mode is True
    assert config.architectures == ["LlamaForCausalLM"]
    assert config.get_vocab_size() == 8192
    assert config.get_head_size() == 64
    assert config.hf_config.num_hidden_layers == 4
    assert type(config.hf_config).__name__ == "LlamaConfig"
    vllm_config = llm.llm_engine.vllm_config
    assert vllm_config.cache_config.num_gpu_blocks == llm.engine.ready_info.num_kv_blocks
    assert vllm_config.parallel_config.world_size == llm.get_world_size() == 1
    assert config.get_num_kv_heads(vllm_config.parallel_config) == 4
    assert llm.llm_engine.get_tokenizer() is None  # skip_tokenizer_init
    assert llm.supported_tasks == llm.llm_engine.get_supported_tasks() == ("generate",)


def test_supported_tasks_are_the_pooling_tasks_of_a_pooling_model():
    info = EngineCoreReadyInfo(
        max_model_len=512,
        num_kv_blocks=10,
        block_size=16,
        dtype="float32",
        vocab_size=100,
        max_num_seqs=8,
        max_num_batched_tokens=512,
        runner="pooling",
        pooling_tasks=["embed", "token_embed"],
    )
    assert supported_tasks(info) == ("embed", "token_embed")


# ---- collective_rpc / apply_model ----------------------------------------------------------


def test_collective_rpc_runs_worker_methods_and_functions_by_reference(llm):
    block_bytes = llm.collective_rpc("kv_cache_block_bytes")
    # 4 layers x K and V x 16 tokens x 4 KV heads x 64 x 4 bytes
    assert block_bytes == [4 * 2 * 16 * 4 * 64 * 4]
    assert llm.collective_rpc(rank_times, args=(3,), kwargs={"offset": 5}) == [5]
    assert llm.llm_engine.collective_rpc(rank_times, timeout=30, args=(1,)) == [0]
    num_parameters = llm.apply_model(count_parameters)
    assert num_parameters == llm.llm_engine.apply_model(count_parameters)
    assert num_parameters[0] > 17_000_000


def test_collective_rpc_errors_name_the_argument_and_the_engine_goes_on(llm):
    with pytest.raises(TypeError, match="method: .* by reference"):
        llm.collective_rpc(lambda worker: worker.rank)
    with pytest.raises(TypeError, match="func: "):
        llm.apply_model(lambda model: 0)
    with pytest.raises(TypeError, match="method must be a str or a callable"):
        llm.collective_rpc(3)
    with pytest.raises(ValueError, match="timeout must be"):
        llm.collective_rpc("check_health", timeout=-1)
    with pytest.raises(TypeError, match="args must be a tuple"):
        llm.collective_rpc("check_health", args=5)
    with pytest.raises(TypeError, match="args and kwargs must be plain data"):
        llm.collective_rpc(rank_times, args=(object(),))
    with pytest.raises(NotImplementedError, match="'no_such_method' is not implemented"):
        llm.collective_rpc("no_such_method")
    with pytest.raises(ValueError, match="public Worker method"):
        llm.collective_rpc("_release")
    with pytest.raises(TypeError, match="cannot be sent back"):
        llm.collective_rpc(unsendable_result)
    assert llm.collective_rpc("check_health") == [None]


def test_collective_rpc_timeout_raises_and_the_late_reply_is_dropped(llm, prompts):
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="timeout=0.5"):
        llm.collective_rpc(slow_rank, timeout=0.5, args=(3.0,))
    assert time.monotonic() - start < 3.0
    # The worker answers the slow call late; the next call still gets its own answer.
    assert llm.collective_rpc(rank_times, args=(2,), kwargs={"offset": 7}) == [7]
    assert len(llm.generate(prompts[:1], GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 12


def test_collective_rpc_returns_one_result_per_rank_at_tp2(llm_tp2):
    assert llm_tp2.collective_rpc(rank_times, args=(10,), kwargs={"offset": 1}) == [1, 11]
    usage = llm_tp2.collective_rpc("get_memory_usage")
    assert [u["rank"] for u in usage] == [0, 1]
    workers = {p.pid for p in psutil.Process(llm_tp2.engine.process.pid).children()}
    assert {u["pid"] for u in usage} == workers
    shards = llm_tp2.apply_model(count_parameters)
    assert len(shards) == 2 and shards[0] == shards[1]  # each rank holds half of each layer
    assert llm_tp2.get_world_size() == 2


def test_a_standalone_engine_core_runs_worker_methods_only(tiny_llama_dir, tmp_path):
    """Clients of a standalone engine core (`--listen`) may be other users: no functions."""
    config = EngineArgs(model=tiny_llama_dir, max_model_len=256).create_engine_config()
    proc = EngineCoreProc(config, f"ipc://{tmp_path}/in", f"ipc://{tmp_path}/out")
    try:
        reference = function_reference(rank_times, "method")
        with pytest.raises(PermissionError, match="Worker methods by name"):
            proc.utility_collective_rpc(msgspec.to_builtins(reference))
    finally:
        proc.context.destroy(linger=0)


# ---- sleep / wake_up -----------------------------------------------------------------------


def test_sleep_without_sleep_mode_raises_naming_enable_sleep_mode(core):
    with pytest.raises(ValueError, match=r"sleep\(level=1\) needs .*enable_sleep_mode=True"):
        core.sleep(1)
    assert not core.is_sleeping
    # Level 0 only pauses scheduling: vLLM allows it without sleep mode.
    core.sleep(0)
    assert core.is_sleeping
    assert core.wake_up(tags=["scheduling"]) is True and not core.is_sleeping


def test_sleep_level_1_releases_the_kv_cache_and_keeps_greedy_tokens(
    llm, prompts, greedy_reference
):
    kv_cache_bytes = llm.collective_rpc(fill_kv_cache)[0]
    assert kv_cache_bytes > 0.9 * KV_CACHE_BYTES
    before = _workers_rss(llm)
    llm.sleep(level=1)
    asleep = _workers_rss(llm)
    assert llm.llm_engine.is_sleeping()
    assert llm.collective_rpc("get_memory_usage")[0]["kv_cache_bytes"] == 0
    assert before - asleep > 0.8 * kv_cache_bytes
    with pytest.raises(RuntimeError, match=r"asleep \(LLM.sleep\(level=1\)\).*wake_up"):
        llm.generate(prompts, GREEDY, use_tqdm=False)
    assert llm.wake_up() is True
    assert not llm.llm_engine.is_sleeping()
    assert _greedy(llm, prompts) == greedy_reference


def test_sleep_level_2_releases_the_weights_and_wake_up_reloads_them(
    llm, prompts, greedy_reference
):
    weights_bytes = llm.collective_rpc("get_memory_usage")[0]["weights_bytes"]
    assert weights_bytes > 60_000_000
    before = _workers_rss(llm)
    llm.sleep(level=2)
    asleep = _workers_rss(llm)
    assert before - asleep > 0.8 * weights_bytes
    with pytest.raises(RuntimeError, match="weights are asleep"):
        llm.apply_model(count_parameters)
    # vLLM's order for a weight update: weights first, then the KV cache.
    assert llm.wake_up(tags=["weights"]) is False
    usage = llm.collective_rpc("get_memory_usage")[0]
    assert usage["weights_bytes"] == weights_bytes and usage["kv_cache_bytes"] == 0
    with pytest.raises(RuntimeError, match="asleep"):
        llm.generate(prompts, GREEDY, use_tqdm=False)
    assert llm.wake_up(tags=["kv_cache"]) is True
    assert _greedy(llm, prompts) == greedy_reference
    llm.collective_rpc("reload_weights")  # vLLM's call after a level-2 wake-up
    assert _greedy(llm, prompts) == greedy_reference


def test_sleep_and_wake_up_errors_name_the_argument(llm):
    with pytest.raises(ValueError, match="level must be 0, 1 or 2"):
        llm.sleep(level=3)
    with pytest.raises(NotImplementedError, match="mode='wait'"):
        llm.sleep(mode="wait")
    with pytest.raises(ValueError, match="mode must be"):
        llm.sleep(mode="later")
    with pytest.raises(ValueError, match="tags must be None or a list"):
        llm.wake_up(tags=["everything"])
    assert not llm.llm_engine.is_sleeping()
    assert llm.wake_up() is True  # awake already: nothing to do


def test_sleep_level_2_at_tp2_releases_each_ranks_shard(llm_tp2, prompts):
    expected = _greedy(llm_tp2, prompts)
    before = llm_tp2.collective_rpc("get_memory_usage")
    llm_tp2.sleep(level=2)
    asleep = llm_tp2.collective_rpc("get_memory_usage")
    for rank_before, rank_asleep in zip(before, asleep):
        assert rank_asleep["weights_bytes"] == 0
        assert rank_before["rss_bytes"] - rank_asleep["rss_bytes"] > (
            0.8 * rank_before["weights_bytes"]
        )
    assert llm_tp2.wake_up() is True
    assert _greedy(llm_tp2, prompts) == expected


# ---- reset_prefix_cache, start_profile -----------------------------------------------------


def test_reset_prefix_cache_takes_vllms_arguments(llm, tmp_path_factory):
    assert llm.reset_prefix_cache() is True
    assert llm.reset_prefix_cache(reset_running_requests=True, reset_connector=True) is True
    with pytest.raises(TypeError, match="reset_running_requests must be a bool"):
        llm.reset_prefix_cache(reset_running_requests="yes")


def test_reset_prefix_cache_preempts_running_requests_when_asked(core):
    prompt = random_prompts(1, 512, [40])[0]
    expected = run_engine(core, [prompt], GREEDY)[0]
    core.add_request(EngineCoreRequest("running", prompt, GREEDY))
    tokens = [t for out in core.step() for t in out.new_token_ids]
    assert core.utility_reset_prefix_cache() is False  # "running" holds blocks
    assert core.utility_reset_prefix_cache(reset_running_requests=True) is True
    assert core.scheduler.num_running == 0 and core.scheduler.num_waiting == 1
    while core.has_unfinished_requests():
        tokens += [t for out in core.step() for t in out.new_token_ids]
    assert tokens == expected  # recomputed from the prompt: the same greedy tokens


def test_start_profile_takes_vllms_arguments(llm, prompts, tmp_path):
    with pytest.raises(ValueError, match="profile_prefix must be"):
        llm.start_profile("bad prefix", profile_dir=str(tmp_path))
    with pytest.raises(ValueError, match="delay_iterations must be"):
        llm.start_profile(profile_dir=str(tmp_path), delay_iterations=-1)
    llm.start_profile("run1", profile_dir=str(tmp_path), max_iterations=2)
    llm.generate(prompts[:2], GREEDY, use_tqdm=False)
    paths = llm.stop_profile()
    assert sorted(os.path.basename(p) for p in paths) == [
        "run1_ember-enginecore.trace.json",
        "run1_ember-worker-0.trace.json",
    ]
    assert all(os.path.getsize(p) > 0 for p in paths)
    # ember's earlier form: the directory as the first argument; a delay never reached.
    llm.start_profile(str(tmp_path / "later"), delay_iterations=10_000)
    llm.generate(prompts[:1], GREEDY, use_tqdm=False)
    assert llm.stop_profile() == []
