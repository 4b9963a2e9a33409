"""Every architecture against Hugging Face `transformers` on the same random weights: greedy
token ids through `LLM.generate` (three processes), and prompt log-probabilities from one
in-process forward (paged, chunked) within 1e-3. Rope scaling types on Llama likewise."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from ember import LLM, SamplingParams
from tests.helpers import (
    RANDOM_MODEL_SETTINGS,
    assert_logprobs_close,
    ember_prompt_logprobs,
    hf_greedy,
    hf_prompt_logprobs,
    random_prompts,
    write_random_model,
)

ARCHITECTURES = sorted(RANDOM_MODEL_SETTINGS)
# Lengths cross the sliding windows (16) and the block size (4); every prompt has >= 2 tokens.
PROMPTS = random_prompts(8, 512, [5, 17, 33, 64, 90, 3, 48, 71], seed=1)
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def random_models(tmp_path_factory):
    """architecture -> (directory, Hugging Face model), written once per module."""
    cache: dict[str, tuple[str, torch.nn.Module]] = {}

    def get(architecture: str) -> tuple[str, torch.nn.Module]:
        if architecture not in cache:
            path = tmp_path_factory.mktemp(architecture)
            model_dir = write_random_model(path, architecture)
            hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            cache[architecture] = (model_dir, hf_model.eval())
        return cache[architecture]

    return get


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_greedy_generate_matches_hf(architecture, random_models):
    model_dir, hf_model = random_models(architecture)
    # Small blocks and token budget: prompts span blocks and prefill in chunks.
    with LLM(
        model_dir,
        dtype="float32",
        skip_tokenizer_init=True,
        block_size=4,
        max_num_batched_tokens=64,
    ) as llm:
        assert llm.config.model.architecture == architecture
        outputs = llm.generate(
            PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False
        )
    for prompt, output in zip(PROMPTS, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf_model, prompt, MAX_TOKENS)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_prompt_logprobs_match_hf(architecture, random_models):
    model_dir, hf_model = random_models(architecture)
    assert_logprobs_close(
        ember_prompt_logprobs(model_dir, PROMPTS), hf_prompt_logprobs(hf_model, PROMPTS)
    )


@pytest.mark.parametrize(
    "rope_scaling",
    [
        {"rope_type": "linear", "factor": 4.0},
        {"rope_type": "dynamic", "factor": 4.0},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ],
    ids=lambda scaling: scaling["rope_type"],
)
def test_rope_scaling_matches_hf(tmp_path, rope_scaling):
    # Prompts run past original_max_position_embeddings, where yarn and llama3 differ most.
    model_dir = write_random_model(
        tmp_path, "LlamaForCausalLM", max_position_embeddings=128, rope_scaling=rope_scaling
    )
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert_logprobs_close(
        ember_prompt_logprobs(model_dir, PROMPTS), hf_prompt_logprobs(hf_model, PROMPTS)
    )


@pytest.mark.parametrize(
    "architecture,options",
    [
        ("LlamaForCausalLM", {"num_key_value_heads": 1, "tie_word_embeddings": True}),
        (
            "Qwen2ForCausalLM",
            {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1},
        ),
        ("Phi3ForCausalLM", {"sliding_window": 16}),
        ("GPTNeoXForCausalLM", {"use_parallel_residual": False}),
        ("OPTForCausalLM", {"do_layer_norm_before": False, "word_embed_proj_dim": 32}),
        (
            "GPT2LMHeadModel",
            {"scale_attn_by_inverse_layer_idx": True, "activation_function": "gelu"},
        ),
        ("Qwen3MoeForCausalLM", {"decoder_sparse_step": 2, "norm_topk_prob": False}),
    ],
    ids=lambda value: value if isinstance(value, str) else "-".join(value),
)
def test_architecture_options_match_hf(tmp_path, architecture, options):
    model_dir = write_random_model(tmp_path, architecture, **options)
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert_logprobs_close(
        ember_prompt_logprobs(model_dir, PROMPTS), hf_prompt_logprobs(hf_model, PROMPTS)
    )
