"""Test helpers: random models written with transformers, and greedy references."""

from __future__ import annotations

import random

import torch

from ember.enginecore.engine_core import EngineCore
from ember.enginecore.messages import EngineCoreRequest
from ember.workers.sampling_params import SamplingParams


def write_random_llama(
    path, *, seed: int = 0, max_shard_size: str | None = None, **overrides
) -> str:
    """Save a small random LlamaForCausalLM (safetensors) and return its directory.

    The weights are drawn wider than a trained model's (initializer_range) so that greedy
    choices are not near-ties that summation order could flip.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = {
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "initializer_range": 0.2,
        "tie_word_embeddings": False,
        "rope_theta": 10000.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    settings.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**settings)).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(path), **kwargs)
    return str(path)


def random_prompts(
    count: int, vocab_size: int, lengths: list[int], seed: int = 0
) -> list[list[int]]:
    rng = random.Random(seed)
    return [
        [rng.randrange(3, vocab_size) for _ in range(lengths[i % len(lengths)])]
        for i in range(count)
    ]


def run_engine(
    core: EngineCore, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
) -> list[list[int]]:
    """Run prompts through an in-process engine core to completion; token ids per prompt."""
    params_list = params if isinstance(params, list) else [params] * len(prompts)
    base = f"r{random.getrandbits(32)}-"
    for i, (prompt, p) in enumerate(zip(prompts, params_list)):
        core.add_request(EngineCoreRequest(f"{base}{i}", prompt, p))
    outputs: dict[str, list[int]] = {f"{base}{i}": [] for i in range(len(prompts))}
    while core.has_unfinished_requests():
        for out in core.step():
            outputs[out.request_id].extend(out.new_token_ids)
    return [outputs[f"{base}{i}"] for i in range(len(prompts))]


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Hugging Face greedy `generate` of one prompt, stopping at EOS like ember does."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=model.generation_config.eos_token_id,
        )
    return out[0, len(prompt) :].tolist()
