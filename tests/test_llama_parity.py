"""Greedy parity with Hugging Face `generate` (float32) through the in-process engine core."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM

from ember.enginecore.arg_utils import EngineArgs
from ember.enginecore.engine_core import EngineCore
from ember.workers.sampling_params import SamplingParams
from ember.workers.tokenizer_loader import load_tokenizer
from tests.helpers import hf_greedy, random_prompts, run_engine, write_random_llama

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a land far away, there lived a",
    "def fibonacci(n):",
    "List three colours:",
    "Water boils at",
    (
        "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog."
        " And then the fox said"
    ),
    "1, 2, 3, 4,",
    "<|im_start|>user\nWhat is the tallest mountain in the world?<|im_end|>\n<|im_start|>assistant\n",
]
GREEDY_32 = SamplingParams(temperature=0.0, max_tokens=32)


@pytest.fixture(scope="module")
def smollm2_core(default_gguf):
    core = EngineCore(EngineArgs(model=default_gguf, dtype="float32").create_engine_config())
    yield core
    core.shutdown()


@pytest.fixture(scope="module")
def smollm2_prompt_ids(smollm2_core):
    tokenizer = load_tokenizer(smollm2_core.config.model.tokenizer, revision=None)
    return [tokenizer(p).input_ids for p in PROMPTS]


def test_smollm2_gguf_batch_matches_hf_greedy(smollm2_core, smollm2_prompt_ids, hf_smollm2):
    ember_tokens = run_engine(smollm2_core, smollm2_prompt_ids, GREEDY_32)
    for prompt, tokens in zip(smollm2_prompt_ids, ember_tokens):
        assert tokens == hf_greedy(hf_smollm2, prompt, 32)


def test_same_prompt_alone_and_in_batch_of_16(smollm2_core, smollm2_prompt_ids):
    target = smollm2_prompt_ids[1]
    alone = run_engine(smollm2_core, [target], GREEDY_32)[0]
    batch = smollm2_prompt_ids + smollm2_prompt_ids[::-1]
    batch[5] = target
    together = run_engine(smollm2_core, batch, GREEDY_32)
    assert together[5] == alone
    assert len(alone) > 0


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"max_shard_size": "60KB"},
        {"tie_word_embeddings": True},
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
        {"num_key_value_heads": 4, "attention_bias": True, "mlp_bias": True},
    ],
    ids=["gqa", "sharded", "tied", "llama3-rope", "mha-bias"],
)
def test_random_llama_safetensors_matches_hf_greedy(tmp_path, variant):
    model_dir = write_random_llama(tmp_path, **variant)
    if "max_shard_size" in variant:
        assert (tmp_path / "model.safetensors.index.json").exists()
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    # Small blocks and a small token budget: prompts span blocks and prefill in several chunks.
    config = EngineArgs(
        model=model_dir, dtype="float32", block_size=4, max_num_batched_tokens=64
    ).create_engine_config()
    core = EngineCore(config)
    try:
        prompts = random_prompts(8, 512, [5, 17, 33, 64, 90, 2, 48, 71], seed=1)
        ember_tokens = run_engine(core, prompts, GREEDY_32)
    finally:
        core.shutdown()
    for prompt, tokens in zip(prompts, ember_tokens):
        assert tokens == hf_greedy(hf_model, prompt, 32)
