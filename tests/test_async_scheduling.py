"""Async scheduling (`LLM(async_scheduling=True)`, vLLM's option): the engine core schedules
and submits the next step before the output of the one the workers run, which feed each
request the token they sampled themselves. Greedy tokens against HF `transformers` through the
real processes (one worker and two tensor-parallel ranks); sampled tokens, logprobs,
preemption and aborts against the synchronous engine core in-process, where the worker runs
each step as it is submitted, so it is always a step ahead of the engine core's outputs."""

from __future__ import annotations

import pytest
import torch

from ember import LLM, SamplingParams
from ember.enginecore.arg_utils import EngineArgs
from ember.enginecore.engine_core import EngineCore
from ember.enginecore.messages import EngineCoreRequest, FinishReason
from ember.workers.weight_memory import loaded_weight_bytes
from tests.helpers import hf_greedy, random_prompts, write_random_llama

VOCAB_SIZE = 512
MAX_TOKENS = [1, 2, 7, 23, 40, 5]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return write_random_llama(tmp_path_factory.mktemp("async_llama"), max_position_embeddings=256)


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return random_prompts(6, VOCAB_SIZE, [12, 37, 5, 64, 20, 9], seed=7)


@pytest.fixture(scope="module")
def hf_tokens(hf_model, prompts) -> list[list[int]]:
    return [hf_greedy(hf_model, p, n) for p, n in zip(prompts, MAX_TOKENS)]


def _engine_core(model_dir: str, async_scheduling: bool, **options) -> EngineCore:
    options = {"dtype": "float32", "max_model_len": 128, **options}
    args = EngineArgs(model=model_dir, async_scheduling=async_scheduling, **options)
    return EngineCore(args.create_engine_config())


def _run(core: EngineCore, requests: list[EngineCoreRequest], abort_after: dict | None = None):
    """Run requests to the end: per request, its token ids, logprobs and finish reason.
    `abort_after`: {request id: n}, aborted once it has n tokens (a step of it is in flight)."""
    for request in requests:
        core.add_request(request)
    results = {r.request_id: {"ids": [], "logprobs": [], "finish": None} for r in requests}
    abort_after = dict(abort_after or {})
    while core.has_unfinished_requests():
        for out in core.step():
            result = results[out.request_id]
            result["ids"].extend(out.new_token_ids)
            if out.new_logprobs is not None:
                result["logprobs"].extend(out.new_logprobs.logprobs)
            if out.finish_reason is not None:
                result["finish"] = out.finish_reason
        for request_id, count in list(abort_after.items()):
            if len(results[request_id]["ids"]) >= count:
                for out in core.abort_requests([request_id]):
                    results[out.request_id]["finish"] = out.finish_reason
                del abort_after[request_id]
    return results


@pytest.mark.parametrize("tensor_parallel_size", [1, 2])
def test_greedy_tokens_equal_hf_through_the_processes(
    model_dir, prompts, hf_tokens, tensor_parallel_size
):
    """Requests of 1 to 40 tokens, some ended by EOS while their next step runs."""
    with LLM(
        model_dir,
        dtype="float32",
        skip_tokenizer_init=True,
        max_model_len=128,
        async_scheduling=True,
        tensor_parallel_size=tensor_parallel_size,
    ) as llm:
        assert llm.llm_engine.vllm_config.scheduler_config.async_scheduling is True
        params = [SamplingParams(temperature=0.0, max_tokens=n) for n in MAX_TOKENS]
        outputs = llm.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outputs] == hf_tokens
        # A stop token ends one request a step early; the others are untouched.
        stop = hf_tokens[4][3]
        params[4] = SamplingParams(temperature=0.0, max_tokens=40, stop_token_ids=[stop])
        outputs = llm.generate(prompts, params, use_tqdm=False)
        ids = [o.outputs[0].token_ids for o in outputs]
        assert ids[4] == hf_tokens[4][: hf_tokens[4].index(stop) + 1]
        assert ids[:4] + ids[5:] == hf_tokens[:4] + hf_tokens[5:]
        # The workers answer a call made right after (the step left in flight is taken in
        # first), and the engine goes on.
        assert [rank["total"] > 0 for rank in llm.apply_model(loaded_weight_bytes)] == [
            True
        ] * tensor_parallel_size
        again = llm.generate(prompts[:2], params[:2], use_tqdm=False)
        assert [o.outputs[0].token_ids for o in again] == hf_tokens[:2]


def _sampled_requests(prompts: list[list[int]]) -> list[EngineCoreRequest]:
    params = [
        SamplingParams(temperature=1.0, seed=3, max_tokens=30, logprobs=3),
        SamplingParams(temperature=0.8, top_k=20, seed=5, max_tokens=25, repetition_penalty=1.3),
        SamplingParams(temperature=0.0, max_tokens=18, presence_penalty=1.5, logprobs=2),
        SamplingParams(temperature=1.0, seed=9, max_tokens=12, min_tokens=10),
        SamplingParams(temperature=0.7, seed=1, max_tokens=33, frequency_penalty=0.8),
        SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
    ]
    return [EngineCoreRequest(f"s{i}", p, q) for i, (p, q) in enumerate(zip(prompts, params))]


def test_sampled_tokens_logprobs_and_penalties_equal_the_synchronous_engine(model_dir, prompts):
    results = []
    for async_scheduling in (False, True):
        core = _engine_core(model_dir, async_scheduling)
        try:
            results.append(_run(core, _sampled_requests(prompts)))
            assert core.in_flight is None and not core.kv_cache_manager.req_to_blocks
        finally:
            core.shutdown()
    assert results[1] == results[0]
    assert [len(results[0][f"s{i}"]["logprobs"]) for i in (0, 2)] == [30, 18]


def test_preemption_and_aborts_leave_the_other_requests_as_they_were(model_dir, prompts):
    """A cache of 27 blocks of 4 tokens for 6 requests of up to 104 tokens: requests are
    preempted (in the steps scheduled with nothing in flight) and recomputed; two requests
    are aborted while a step of theirs runs."""
    requests = [
        EngineCoreRequest(
            f"r{i}", p, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
        )
        for i, p in enumerate(prompts)
    ]
    core = _engine_core(model_dir, False)
    try:
        reference = _run(core, requests)
    finally:
        core.shutdown()
    core = _engine_core(
        model_dir, True, block_size=4, num_gpu_blocks_override=28, max_model_len=104
    )
    try:
        results = _run(core, requests, abort_after={"r1": 3, "r3": 10})
        assert core.scheduler.num_preemptions > 0
        assert core.kv_cache_manager.block_pool.num_free_blocks == 27  # nothing leaked
    finally:
        core.shutdown()
    for request_id in ("r1", "r3"):
        aborted = results.pop(request_id)
        assert aborted["finish"] is FinishReason.ABORT
        ids = reference.pop(request_id)["ids"]
        assert aborted["ids"] == ids[: len(aborted["ids"])]
    assert results == reference


def test_steps_wait_for_the_tokens_a_grammar_needs(default_gguf):
    """A request under structured outputs needs each token before its next row of allowed
    tokens: while one runs, no step is overlapped, and its text is one of the choices."""
    from ember.workers.structured_outputs_params import StructuredOutputsParams
    from ember.workers.tokenizer_loader import load_tokenizer

    core = _engine_core(default_gguf, True, dtype="auto")
    choices = ["yes", "no"]
    overlapped = []
    submit = core._submit_overlapped

    def watched():
        result = submit()
        overlapped.append((core.scheduler.requests.keys() >= {"g"}, result is not None))
        return result

    core._submit_overlapped = watched
    try:
        constrained = SamplingParams(
            temperature=0.0,
            max_tokens=8,
            structured_outputs=StructuredOutputsParams(choice=choices),
        )
        plain = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
        # "p" joins once "g" has its first token: its grammar's first compile can take longer
        # than all of "p" (about 1 s on 2 cores), which then never ran beside "g".
        results = {"g": {"ids": []}, "p": {"ids": []}}
        core.add_request(EngineCoreRequest("g", [1, 504, 3057, 30, 2], constrained))
        while not results["g"]["ids"] and core.has_unfinished_requests():
            for out in core.step():
                results[out.request_id]["ids"].extend(out.new_token_ids)
        core.add_request(EngineCoreRequest("p", [1, 504, 3057, 30, 2], plain))
        while core.has_unfinished_requests():
            for out in core.step():
                results[out.request_id]["ids"].extend(out.new_token_ids)
    finally:
        core.shutdown()
    tokenizer = load_tokenizer(core.config.model.tokenizer, revision=None)
    assert tokenizer.decode(results["g"]["ids"], skip_special_tokens=True) in choices
    assert len(results["p"]["ids"]) == 30
    assert any(grammar_present for grammar_present, _ in overlapped)
    assert not any(submitted for grammar_present, submitted in overlapped if grammar_present)
    assert any(submitted for _, submitted in overlapped)  # overlapped once "g" was done
