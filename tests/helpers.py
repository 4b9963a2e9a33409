"""Test helpers: random models written with transformers, and greedy references."""

from __future__ import annotations

import random

import torch

from ember.enginecore.engine_core import EngineCore
from ember.enginecore.messages import EngineCoreRequest
from ember.workers.config import ModelConfig
from ember.workers.model_loader.gguf_files import gguf_model_dir
from ember.workers.sampling_params import SamplingParams


def default_model_config(
    gguf_path: str, dtype: str = "float32", quantization: str | None = None
) -> ModelConfig:
    """The `ModelConfig` of the embedded SmolLM2 GGUF, for loading it without an engine."""
    return ModelConfig(
        model=gguf_path,
        model_dir=gguf_model_dir(gguf_path),
        architecture="LlamaForCausalLM",
        dtype=dtype,
        max_model_len=2048,
        vocab_size=49152,
        eos_token_ids=(2,),
        gguf_file=gguf_path,
        quantization=quantization,
    )


def quantized_activations(x: torch.Tensor, levels: int = 32767) -> torch.Tensor:
    """x [M, K] as the C matmuls see it: each group of 32 in steps of max|x| / levels, rounded
    to nearest even (`kernels/block_matmul.py`: 32767, `kernels/tile_matmul.py`: 16383)."""
    groups = x.float().unflatten(-1, (-1, 32))
    amax = groups.abs().amax(-1, keepdim=True)
    step = amax / levels
    # levels / amax as one division, as C has it (a number over a tensor is its reciprocal
    # times the number in torch, which rounds differently)
    inverse = torch.where(amax > 0, torch.full_like(amax, levels) / amax, torch.zeros_like(amax))
    return (torch.round(groups * inverse) * step).flatten(-2)


def random_group_weight(n: int, k: int, bits: int, scale_dtype: torch.dtype, seed: int):
    """(codes, scale, offset, dense) of a random [n, k] weight of `bits`-bit groups."""
    generator = torch.Generator().manual_seed(seed)
    groups = k // 32
    scale = (torch.rand(n, groups, generator=generator) * 0.02 + 1e-3).to(scale_dtype)
    if bits == 4:
        q = torch.randint(0, 16, (n, k), generator=generator)
        offset = (torch.randn(n, groups, generator=generator) * 0.1).to(scale_dtype)
        codes = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)
        dense = q.float().unflatten(-1, (groups, 32)) * scale.float()[..., None]
        dense = (dense + offset.float()[..., None]).flatten(-2)
        return codes, scale, offset, dense
    q = torch.randint(-127, 128, (n, k), generator=generator)
    dense = (q.float().unflatten(-1, (groups, 32)) * scale.float()[..., None]).flatten(-2)
    return q.to(torch.int8), scale, None, dense


def write_random_llama(
    path, *, seed: int = 0, max_shard_size: str | None = None, **overrides
) -> str:
    """Save a small random LlamaForCausalLM (safetensors) and return its directory.

    The weights are drawn wider than a trained model's (initializer_range) so that greedy
    choices are not near-ties that summation order could flip.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = {**_BASE_SETTINGS, "rope_theta": 10000.0, **overrides}
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


# ---- random models of every architecture, and prompt log-probabilities --------------------

_BASE_SETTINGS = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "initializer_range": 0.2,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
_LAYER_TYPES = ["sliding_attention", "full_attention"]
_MOE = {"num_experts_per_tok": 2}
# architecture -> (transformers config class, settings over _BASE_SETTINGS). Each turns on the
# options the architecture is about: a sliding window shorter than the prompts, soft caps that
# bite, biases, norms, partial rotary, a dense layer among MoE layers, Granite's multipliers.
RANDOM_MODEL_SETTINGS: dict[str, tuple[str, dict]] = {
    "LlamaForCausalLM": ("LlamaConfig", {}),
    "MistralForCausalLM": ("MistralConfig", {"sliding_window": 16}),
    "Qwen2ForCausalLM": ("Qwen2Config", {}),
    "Qwen3ForCausalLM": ("Qwen3Config", {"head_dim": 32, "attention_bias": True}),
    "Gemma2ForCausalLM": (
        "Gemma2Config",
        {
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "attn_logit_softcapping": 5.0,
            "final_logit_softcapping": 10.0,
            "sliding_window": 16,
            "layer_types": _LAYER_TYPES,
            "tie_word_embeddings": True,
        },
    ),
    "Gemma3ForCausalLM": (
        "Gemma3TextConfig",
        {
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "sliding_window": 16,
            "layer_types": _LAYER_TYPES,
            "rope_scaling": {"rope_type": "linear", "factor": 2.0},
            "tie_word_embeddings": True,
        },
    ),
    "Phi3ForCausalLM": ("Phi3Config", {"partial_rotary_factor": 0.5}),
    "OPTForCausalLM": (
        "OPTConfig",
        {"ffn_dim": 128, "word_embed_proj_dim": 64, "init_std": 0.2, "tie_word_embeddings": True},
    ),
    "GPT2LMHeadModel": (
        "GPT2Config",
        {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 512, "tie_word_embeddings": True},
    ),
    "GPTNeoXForCausalLM": ("GPTNeoXConfig", {"rotary_pct": 0.5, "num_key_value_heads": 4}),
    "MixtralForCausalLM": ("MixtralConfig", {"num_local_experts": 4, **_MOE}),
    "Qwen2MoeForCausalLM": (
        "Qwen2MoeConfig",
        {
            "num_experts": 4,
            "moe_intermediate_size": 64,
            "shared_expert_intermediate_size": 96,
            "mlp_only_layers": [1],
            **_MOE,
        },
    ),
    "Qwen3MoeForCausalLM": (
        "Qwen3MoeConfig",
        {"head_dim": 16, "num_experts": 4, "moe_intermediate_size": 64, **_MOE},
    ),
    "GraniteMoeForCausalLM": (
        "GraniteMoeConfig",
        {
            "num_local_experts": 4,
            "embedding_multiplier": 2.0,
            "attention_multiplier": 0.1,
            "residual_multiplier": 0.5,
            "logits_scaling": 2.0,
            **_MOE,
        },
    ),
}


def write_random_model(
    path, architecture: str, *, seed: int = 0, max_shard_size: str | None = None, **overrides
) -> str:
    """Save a small random model of `architecture` (safetensors) and return its directory.

    Weights are drawn wide (initializer_range 0.2) so that greedy choices are not near-ties,
    and parameters that transformers initialises to a constant (norm weights, biases, routers)
    are perturbed so that a wrong norm offset or a dropped bias shows.
    """
    import transformers

    config_class_name, settings = RANDOM_MODEL_SETTINGS[architecture]
    config = getattr(transformers, config_class_name)(**{**_BASE_SETTINGS, **settings, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            if param.numel() > 1 and bool((param == param.flatten()[0]).all()):
                param.add_(torch.randn(param.shape, generator=generator) * 0.2)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(path), **kwargs)
    return str(path)


def forward_prompts(
    model, prompts: list[list[int]], block_size: int = 4, split: float = 0.5
) -> list[torch.Tensor]:
    """Logits [len(prompt), vocab] (float32) of an ember model at every prompt position.

    Two forwards over all prompts laid out flat in a paged KV cache with shuffled blocks: the
    first `split` of each prompt, then the rest as a chunk over the cached part (every prompt
    needs at least two tokens).
    """
    from ember.kernels.attention import AttentionMetadata
    from ember.workers.layers.attention import Attention

    blocks_per_prompt = [-(-len(p) // block_size) for p in prompts]
    num_blocks = sum(blocks_per_prompt) + 1
    free = (torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(0)) + 1).tolist()
    block_tables = [[free.pop() for _ in range(n)] for n in blocks_per_prompt]
    dtype = next(model.parameters()).dtype
    for layer in (m for m in model.modules() if isinstance(m, Attention)):
        shape = (2, num_blocks, block_size, layer.num_kv_heads, layer.head_dim)
        layer.kv_cache = torch.zeros(shape, dtype=dtype)
    firsts = [max(1, int(len(p) * split)) for p in prompts]
    width = max(len(t) for t in block_tables)
    block_table = torch.tensor([t + [0] * (width - len(t)) for t in block_tables])
    logits: list[list[torch.Tensor]] = [[] for _ in prompts]
    for step in range(2):
        spans = [(0, f) if step == 0 else (f, len(p)) for p, f in zip(prompts, firsts)]
        input_ids, positions, starts = [], [], [0]
        for prompt, (start, end) in zip(prompts, spans):
            input_ids += prompt[start:end]
            positions += range(start, end)
            starts.append(starts[-1] + end - start)
        positions_t = torch.tensor(positions)
        req_index = torch.repeat_interleave(
            torch.arange(len(prompts)), torch.tensor([e - s for s, e in spans])
        )
        slots = block_table[req_index, positions_t // block_size] * block_size
        seq_lens = [end for _, end in spans]
        query_lens = [end - start for start, end in spans]
        metadata = AttentionMetadata(
            slot_mapping=slots + positions_t % block_size,
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            block_table=block_table,
            num_decodes=0,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=starts,
            seq_lens_cpu=seq_lens,
        )
        with torch.inference_mode():
            hidden = model(torch.tensor(input_ids), positions_t, metadata)
            step_logits = model.compute_logits(hidden)
        for i in range(len(prompts)):
            logits[i].append(step_logits[starts[i] : starts[i + 1]])
    return [torch.cat(parts) for parts in logits]


def ember_prompt_logprobs(
    model_dir: str, prompts: list[list[int]], dtype: str = "float32", **engine_kwargs
) -> list[torch.Tensor]:
    """log_softmax of ember's logits at every position of each prompt, the model built
    in-process with `get_model` ([len(prompt), vocab] each)."""
    from ember.enginecore.arg_utils import EngineArgs
    from ember.workers.model_loader.loader import get_model

    config = EngineArgs(model=model_dir, dtype=dtype, **engine_kwargs).create_engine_config()
    model = get_model(config.model, torch.device("cpu"))
    return [logits.log_softmax(-1) for logits in forward_prompts(model, prompts)]


def hf_prompt_logprobs(model, prompts: list[list[int]]) -> list[torch.Tensor]:
    """log_softmax of a Hugging Face model's logits at every position of each prompt."""
    with torch.no_grad():
        return [model(torch.tensor([p])).logits[0].float().log_softmax(-1) for p in prompts]


def assert_logprobs_close(
    ember: list[torch.Tensor], reference: list[torch.Tensor], atol: float = 1e-3
) -> None:
    for i, (mine, theirs) in enumerate(zip(ember, reference)):
        assert mine.shape == theirs.shape, f"prompt {i}: {mine.shape} vs {theirs.shape}"
        diff = (mine - theirs).abs().max().item()
        assert diff <= atol, f"prompt {i}: log-probabilities differ by up to {diff:.2e}"


def assert_diverges_only_at_near_ties(ours: list, reference: list, near_tie: float) -> int:
    """Greedy outputs of two numerically different but equivalent paths (another summation
    order, bfloat16 partial sums over ranks, AMX tiles against AVX-512 ones): each pair is the
    same tokens, or its first difference is a near-tie of the reference's own step (the token
    we took within `near_tie` nats of the reference's choice, in its top log-probabilities;
    after that the texts go their own ways). Returns how many pairs are identical."""
    identical = 0
    for mine, theirs in zip(ours, reference, strict=True):
        a, b = list(mine.outputs[0].token_ids), list(theirs.outputs[0].token_ids)
        step = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if step is None:
            identical += 1
            continue
        top = theirs.outputs[0].logprobs[step]
        assert a[step] in top, f"step {step}: {a[step]} not among the reference's top {top}"
        gap = top[b[step]].logprob - top[a[step]].logprob
        assert gap <= near_tie, (
            f"step {step}: {a[step]} is {gap:.3f} below the reference's {b[step]}"
        )
    return identical


def cache_facts(model) -> list[list]:
    """[cache dtype, k_scale, v_scale] of each attention layer (`LLM.apply_model`; lists, as
    they come back from the workers)."""
    from ember.workers.layers.attention import Attention

    return [
        [str(m.kv_cache.dtype), m.k_scale.item(), m.v_scale.item()]
        for m in model.modules()
        if isinstance(m, Attention)
    ]
