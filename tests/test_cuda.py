"""On a CUDA GPU: ember's CUDA path (Triton kernels, with and without CUDA graphs) gives the
CPU path's greedy tokens on the embedded model, float32 on both, prefill and decode mixed.

These cases need a GPU and are skipped on machines without one (the kernels themselves are
checked on CPU, interpreted, in `test_triton_kernels.py`)."""

from __future__ import annotations

import pytest
import torch

from ember import LLM, SamplingParams
from tests.test_llama_parity import PROMPTS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MAX_TOKENS = 32


@pytest.fixture(scope="module")
def cpu_greedy(default_gguf) -> list[list[int]]:
    with LLM(default_gguf, device="cpu", dtype="float32") as llm:
        outputs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "cuda-graphs"])
def test_cuda_greedy_tokens_equal_cpu(default_gguf, cpu_greedy, enforce_eager):
    with LLM(default_gguf, device="cuda", dtype="float32", enforce_eager=enforce_eager) as llm:
        outputs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
        # One request alone: every decode step is a batch of one (graph size 1).
        single = llm.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    assert [o.outputs[0].token_ids for o in outputs] == cpu_greedy
    assert single[0].outputs[0].token_ids == cpu_greedy[0]


def test_cuda_sampling_with_top_k_top_p_is_seeded_and_in_range(default_gguf):
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=7, max_tokens=16)
    with LLM(default_gguf, device="cuda") as llm:
        first = llm.generate(PROMPTS[:2], params)
        again = llm.generate(PROMPTS[:2], params)
        vocab_size = len(llm.get_tokenizer())
    assert [o.outputs[0].token_ids for o in first] == [o.outputs[0].token_ids for o in again]
    assert all(0 <= t < vocab_size for o in first for t in o.outputs[0].token_ids)
