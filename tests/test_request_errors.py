"""A failure in one request's processing finishes only that request, with finish reason
"error": non-finite logits in one row of the batch (a model whose embedding of one token is NaN),
and requests the engine cannot run sent straight to its socket. The others run on and match
Hugging Face; the blocks the failed request held are reused without harm."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from ember import LLM, PoolingParams, SamplingParams
from ember.enginecore.messages import EngineCoreRequest
from tests.helpers import hf_greedy, random_prompts, write_random_llama

POISON_TOKEN = 7  # its embedding row is NaN: any prompt holding it gives NaN logits


@pytest.fixture(scope="module")
def poisoned_dir(tmp_path_factory) -> str:
    directory = write_random_llama(tmp_path_factory.mktemp("nan_llama"), seed=4)
    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    tensors["model.embed_tokens.weight"][POISON_TOKEN] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    return directory


@pytest.fixture(scope="module")
def hf_model(poisoned_dir):
    return AutoModelForCausalLM.from_pretrained(poisoned_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=[True, False], ids=["async", "sync"])
def llm(poisoned_dir, request):
    # 12 usable blocks: later requests must reuse the blocks the failed one held. With async
    # scheduling the step after a failure was scheduled before the engine core knew of it.
    with LLM(
        poisoned_dir,
        dtype="float32",
        skip_tokenizer_init=True,
        max_model_len=128,
        num_gpu_blocks_override=13,
        async_scheduling=request.param,
    ) as engine:
        yield engine


def _clean_prompts(count: int, length: int, seed: int) -> list[list[int]]:
    prompts = random_prompts(count, 512, [length], seed=seed)
    return [[t if t != POISON_TOKEN else POISON_TOKEN + 1 for t in p] for p in prompts]


def test_nan_logits_finish_only_that_request_with_error(llm, hf_model):
    clean = _clean_prompts(3, 20, seed=1)
    poisoned = [3, 4, 5, POISON_TOKEN, 9, 10, 11, 12] * 3
    prompts = [clean[0], poisoned, clean[1], clean[2]]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    before = llm.get_metrics()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    after = llm.get_metrics()
    failed = outputs[1].outputs[0]
    assert failed.finish_reason == "error" and failed.token_ids == []
    assert outputs[1].finished
    for index in (0, 2, 3):
        completion = outputs[index].outputs[0]
        assert completion.finish_reason == "length"
        assert completion.token_ids == hf_greedy(hf_model, prompts[index], 12)

    def errors(metrics):
        return sum(
            m.value
            for m in metrics
            if m.name == "vllm:request_success" and m.labels["finished_reason"] == "error"
        )

    assert errors(after) - errors(before) == 1


def test_blocks_of_a_failed_request_are_reused_without_harm(llm, hf_model):
    params = SamplingParams(temperature=0.0, max_tokens=30)  # stops at EOS, as hf_greedy does
    # The poisoned prompt fills several blocks with NaN keys and values, then fails ...
    poisoned = [POISON_TOKEN] + list(range(20, 80))
    assert llm.generate([poisoned], params, use_tqdm=False)[0].outputs[0].finish_reason == "error"
    # The same prompt again is not served from the prefix cache: its blocks left it.
    again = llm.generate([poisoned], params, use_tqdm=False)[0]
    assert again.outputs[0].finish_reason == "error" and again.num_cached_tokens == 0
    # ... and every block gets reused: 12 blocks, requests of 1-5 blocks. Their lengths differ,
    # so a decode batch pads the shorter ones with masked slots of their last block.
    prompts = [p[:n] for p, n in zip(_clean_prompts(6, 45, seed=2), (5, 45, 13, 37, 21, 29))]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf_model, prompt, 30)


def test_requests_the_engine_cannot_run_are_refused_with_error(llm):
    """A client that skipped the frontend's checks gets "error", and the engine serves on."""
    engine = llm.engine
    bad = [
        EngineCoreRequest("bad-empty", [], SamplingParams(max_tokens=2)),
        EngineCoreRequest("bad-vocab", [1, 10**6], SamplingParams(max_tokens=2)),
        EngineCoreRequest("bad-negative", [-5, 3], SamplingParams(max_tokens=2)),
        EngineCoreRequest("bad-long", [3] * 500, SamplingParams(max_tokens=2)),
        EngineCoreRequest("bad-no-params", [1, 2], None),
        EngineCoreRequest("bad-pooling", [1, 2], None, pooling_params=PoolingParams()),
    ]
    engine.add_requests(bad)
    reasons = {}
    while len(reasons) < len(bad):
        outputs = engine.get_outputs(timeout_s=10.0)
        assert outputs is not None, "the engine did not answer the refused requests"
        for output in outputs.outputs:
            reasons[output.request_id] = str(output.finish_reason)
    assert reasons == {request.request_id: "error" for request in bad}
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
