"""`kv_cache_dtype="fp8"`: the e4m3 KV cache. The write (torch and Triton) stores key / k_scale
rounded as torch rounds it; every attention path (the torch reference, the C decode kernel per
ISA, Triton interpreted on CPU or compiled on a GPU) reads the e4m3 cache as plain attention
over the dequantized keys and values does; the engine stores float8 with twice bfloat16's
blocks in the same memory and generates what Hugging Face generates with its keys and values
rounded through e4m3 by hooks (and not what it generates without them); the arguments are
checked in the user's process; calculate_kv_scales sets vLLM's scales from the first step.
The fused CPU decode step's e4m3 write and read are checked in tests/test_fused_cpu_decode.py."""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess

import pytest
import torch

import ember.llm
from ember import LLM, SamplingParams
from ember.enginecore.arg_utils import EngineArgs
from ember.enginecore.engine_core import EngineCore
from ember.kernels import attention, attention_cpu
from ember.kernels.attention import (
    FP8_E4M3,
    AttentionMetadata,
    paged_attention_torch,
    to_fp8_e4m3,
    write_kv_cache_torch,
)
from ember.workers.layers.attention import K_SCALE_RANGE, V_SCALE_RANGE, Attention
from tests.helpers import cache_facts, random_prompts, write_random_llama

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_c_kernel = pytest.mark.skipif(
    not attention_cpu.available(),
    reason="the C decode kernel could not be built here (no C compiler)",
)
K_SCALE, V_SCALE = 0.37, 1.9  # scales other than 1.0, so that a scale dropped shows


def _scales(device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.tensor(K_SCALE, device=device),
        torch.tensor(V_SCALE, device=device),
    )


# ---- a paged batch over an e4m3 cache, and the oracle ------------------------------------------


def paged_fp8_batch(
    requests: list[tuple[int, int]],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    query_dtype: torch.dtype = torch.float32,
    block_size: int = 16,
    seed: int = 0,
    device: str = "cpu",
):
    """(query, e4m3 cache with every token of every request written, metadata) of a flat batch;
    `requests` holds (tokens cached before this step, tokens this step), decodes first. Keys
    and values span e4m3's range: a few beyond 448 * scale (saturated), some subnormal."""
    generator = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-(c + n) // block_size) for c, n in requests) + 2
    kv_cache = torch.zeros(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=FP8_E4M3)
    free_blocks = (torch.randperm(num_blocks - 1, generator=generator) + 1).tolist()
    k_scale, v_scale = _scales()
    tables, queries = [], []
    for cached, new in requests:
        total = cached + new
        table = [free_blocks.pop() for _ in range(-(-total // block_size))]
        tables.append(table)
        positions = torch.arange(total)
        slots = torch.tensor(table)[positions // block_size] * block_size + positions % block_size
        keys = torch.randn(total, num_kv_heads, head_dim, generator=generator) * 3
        keys[:, :, :4] *= 0.002  # e4m3 subnormals once divided by the scale
        keys[0, 0, 5] = 400.0  # beyond 448 * k_scale: stored as 448
        values = torch.randn(total, num_kv_heads, head_dim, generator=generator) * 3
        write_kv_cache_torch(keys, values, kv_cache, slots, k_scale=k_scale, v_scale=v_scale)
        queries.append(torch.randn(new, num_heads, head_dim, generator=generator))
    max_blocks = max(len(t) for t in tables)
    starts = [0]
    for _, new in requests:
        starts.append(starts[-1] + new)
    seq_lens = [c + n for c, n in requests]
    metadata = AttentionMetadata(
        slot_mapping=torch.zeros(starts[-1], dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_table=torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables]).to(device),
        num_decodes=sum(1 for _, n in requests if n == 1),
        max_query_len=max(n for _, n in requests),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=starts,
        seq_lens_cpu=seq_lens,
    )
    return torch.cat(queries).to(query_dtype).to(device), kv_cache.to(device), metadata


def dequantized_attention(query, kv_cache, metadata, scale, sliding_window=None, soft_cap=None):
    """The oracle: the whole cache dequantized (e4m3 * scale, float64), then each request's
    query rows against its keys and values read slot by slot."""
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    cache = kv_cache.cpu().flatten(1, 2).double()  # [2, slots, Hkv, D]
    keys_all, values_all = cache[0] * K_SCALE, cache[1] * V_SCALE
    out = torch.empty(query.shape, dtype=torch.float64)
    starts = metadata.query_start_loc_cpu
    block_table = metadata.block_table.cpu()
    for req, seq_len in enumerate(metadata.seq_lens_cpu):
        positions = torch.arange(seq_len)
        slots = block_table[req, positions // block_size] * block_size + positions % block_size
        q = query[starts[req] : starts[req + 1]].cpu().double()
        group = q.shape[1] // num_kv_heads
        keys = keys_all[slots].repeat_interleave(group, dim=1)
        values = values_all[slots].repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, keys) * scale
        if soft_cap is not None:
            scores = torch.tanh(scores / soft_cap) * soft_cap
        query_pos = torch.arange(seq_len - len(q), seq_len)[:, None]
        allowed = positions[None, :] <= query_pos
        if sliding_window is not None:
            allowed &= positions[None, :] > query_pos - sliding_window
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[starts[req] : starts[req + 1]] = torch.einsum(
            "hqk,khd->qhd", scores.softmax(-1), values
        )
    return out.float()


# Two decodes (one at a block's first slot), a chunk starting mid-block across block
# boundaries, a fresh prompt, a chunk after exactly one block.
MIXED_BATCH = [(15, 1), (16, 1), (9, 30), (0, 21), (16, 5)]
DECODES = [(0, 1), (6, 1), (15, 1), (16, 1), (32, 1), (63, 1), (129, 1), (249, 1)]


# ---- the write ---------------------------------------------------------------------------------


def test_write_stores_key_over_scale_clamped_and_rounded_to_e4m3():
    num_blocks, block_size = 3, 4
    key = torch.tensor([[[1.0, -1000.0, 0.3, 1e-4]], [[2.0, 2.0, 2.0, 2.0]], [[0.1, 0, 0, 0]]])
    value = torch.tensor([[[448.0, 449.0, -0.01, float("nan")]], [[5.0] * 4], [[-3.0] * 4]])
    kv_cache = torch.zeros(2, num_blocks, block_size, 1, 4, dtype=FP8_E4M3)
    write_kv_cache_torch(key, value, kv_cache, torch.tensor([5, -1, 0]), k_scale=torch.tensor(0.5))
    flat = kv_cache.flatten(1, 2).float()  # [2, slots, 1, D]
    assert flat[0, 5, 0].tolist() == [2.0, -448.0, 0.625, 0.0]  # 0.6 rounds to e4m3's 0.625
    assert flat[1, 5, 0, :3].tolist() == [448.0, 448.0, -0.009765625] and flat[1, 5, 0, 3].isnan()
    assert flat[0, 0, 0, 0].item() == pytest.approx(0.203125)  # 0.2 in e4m3
    assert flat[:, [1, 2, 3, 4, 6]].eq(0).all()  # the -1 slot wrote nothing
    expected = to_fp8_e4m3(key[0], torch.tensor(0.5))
    assert torch.equal(kv_cache[0].flatten(0, 1)[5].view(torch.uint8), expected.view(torch.uint8))


def test_nonfinite_scrub_zeroes_nan_codes_of_an_fp8_cache():
    from ember.workers.nonfinite import scrub_nonfinite_blocks

    values = torch.tensor([1.0, float("nan"), -2.0, float("-nan")] * 4)
    kv_cache = values.to(FP8_E4M3).view(2, 2, 4, 1, 1)
    scrub_nonfinite_blocks([kv_cache], [[1]])
    assert kv_cache[:, 1].float().flatten().tolist() == [1.0, 0.0, -2.0, 0.0] * 2
    assert kv_cache[:, 0].float().isnan().sum() == 4  # other blocks as they were


# ---- the torch reference and the C kernel --------------------------------------------------


@pytest.mark.parametrize("sliding_window,soft_cap", [(None, None), (7, None), (None, 5.0)])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(4, 2, 64), (8, 1, 32)])
def test_torch_reference_reads_the_fp8_cache_as_dequantized_attention(
    num_heads, num_kv_heads, head_dim, sliding_window, soft_cap
):
    query, kv_cache, metadata = paged_fp8_batch(MIXED_BATCH, num_heads, num_kv_heads, head_dim)
    k_scale, v_scale = _scales()
    scale = head_dim**-0.5
    out = paged_attention_torch(
        query, kv_cache, metadata, scale, sliding_window, soft_cap, k_scale, v_scale
    )
    expected = dequantized_attention(query, kv_cache, metadata, scale, sliding_window, soft_cap)
    # The same e4m3 values dequantized in float32 against float64: float32 rounding only.
    torch.testing.assert_close(out, expected, rtol=2e-5, atol=2e-5)
    # The scales are applied: without them the output differs by far more.
    unscaled = paged_attention_torch(query, kv_cache, metadata, scale, sliding_window, soft_cap)
    assert (unscaled - expected).abs().max() > 0.1


@needs_c_kernel
@pytest.mark.usefixtures("cpu_isa")
@pytest.mark.parametrize("sliding_window", [None, 20])
@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim", [(4, 4, 64), (9, 3, 64), (8, 2, 128), (4, 2, 24)]
)
def test_c_kernel_reads_the_fp8_cache_as_dequantized_attention(
    num_heads, num_kv_heads, head_dim, sliding_window
):
    """Per ISA (AVX-512, AVX2, scalar); head_dim 24 takes the scalar loops under AVX-512."""
    query, kv_cache, metadata = paged_fp8_batch(DECODES, num_heads, num_kv_heads, head_dim)
    k_scale, v_scale = _scales()
    scale = head_dim**-0.5
    out = attention_cpu.paged_decode_attention_cpu(
        query, kv_cache, metadata.block_table, metadata.seq_lens, scale, sliding_window,
        k_scale=k_scale, v_scale=v_scale,
    )  # fmt: skip
    assert out is not None
    expected = dequantized_attention(query, kv_cache, metadata, scale, sliding_window)
    torch.testing.assert_close(out, expected, rtol=2e-5, atol=2e-5)
    reference = paged_attention_torch(
        query, kv_cache, metadata, scale, sliding_window, None, k_scale, v_scale
    )
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


@needs_c_kernel
@pytest.mark.usefixtures("cpu_isa")
@pytest.mark.parametrize("block_size", [16, 64])
def test_c_kernel_merges_the_stretches_of_a_long_request_over_the_fp8_cache(block_size):
    """One long request on two threads: its stretches' sums are merged, then scaled by
    v_scale once."""
    query, kv_cache, metadata = paged_fp8_batch([(999, 1)], 9, 3, 64, block_size=block_size)
    k_scale, v_scale = _scales()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = attention_cpu.paged_decode_attention_cpu(
            query, kv_cache, metadata.block_table, metadata.seq_lens, 0.125, None,
            k_scale=k_scale, v_scale=v_scale,
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert out is not None
    expected = dequantized_attention(query, kv_cache, metadata, 0.125, None)
    torch.testing.assert_close(out, expected, rtol=2e-5, atol=2e-5)


@needs_c_kernel
@pytest.mark.usefixtures("cpu_isa")
def test_c_kernel_widens_every_e4m3_code_as_torch_does():
    """One cached token whose value row is all 256 codes (head_dim 256): the output is that row
    times v_scale, NaN codes included, subnormals and signs exact."""
    kv_cache = torch.zeros(2, 1, 16, 1, 256, dtype=FP8_E4M3)
    codes = torch.arange(256, dtype=torch.uint8).view(FP8_E4M3)
    kv_cache[1, 0, 0, 0] = codes
    query = torch.randn(1, 1, 256)
    v_scale = torch.tensor(0.5)
    out = attention_cpu.paged_decode_attention_cpu(
        query, kv_cache, torch.zeros(1, 1, dtype=torch.int64),
        torch.tensor([1], dtype=torch.int32), 0.1, None, k_scale=None, v_scale=v_scale,
    )  # fmt: skip
    torch.testing.assert_close(out[0, 0], codes.float() * 0.5, rtol=0, atol=0, equal_nan=True)


def test_cpu_dispatch_sends_fp8_batches_under_float32_queries_to_the_c_kernels(monkeypatch):
    calls = []

    def decode_kernel(query, kv_cache, block_table, seq_lens, scale, sliding_window, **scales):
        calls.append(("decode", query.shape[0], kv_cache.dtype, scales["k_scale"].item()))
        return torch.full_like(query, 7.0)

    def prefill_kernel(query, kv_cache, block_table, query_start_loc, seq_lens, scale, **scales):
        calls.append(("prefill", query.shape[0], kv_cache.dtype, scales["k_scale"].item()))
        return torch.full_like(query, 5.0)

    monkeypatch.setattr(attention, "paged_decode_attention_cpu", decode_kernel)
    monkeypatch.setattr(attention, "paged_prefill_attention_cpu", prefill_kernel)
    k_scale, v_scale = _scales()
    query, kv_cache, metadata = paged_fp8_batch(MIXED_BATCH, 4, 2, 32)
    out = attention.paged_attention(query, kv_cache, metadata, 0.2, None, None, k_scale, v_scale)
    assert calls == [("prefill", query.shape[0], FP8_E4M3, pytest.approx(K_SCALE))]
    assert out.eq(5.0).all()
    # with the prefill kernel declining: the decodes from C, the chunks from the reference
    monkeypatch.setattr(attention, "paged_prefill_attention_cpu", lambda *args, **kwargs: None)
    calls.clear()
    out = attention.paged_attention(query, kv_cache, metadata, 0.2, None, None, k_scale, v_scale)
    assert calls == [("decode", 2, FP8_E4M3, pytest.approx(K_SCALE))]
    assert out[:2].eq(7.0).all()
    reference = paged_attention_torch(query, kv_cache, metadata, 0.2, None, None, k_scale, v_scale)
    assert torch.equal(out[2:], reference[2:])  # the chunks from the reference, scaled
    calls.clear()  # bfloat16 queries: the reference alone
    query = query.to(torch.bfloat16)
    out = attention.paged_attention(query, kv_cache, metadata, 0.2, None, None, k_scale, v_scale)
    assert calls == [] and out.dtype == torch.bfloat16
    expected = dequantized_attention(query.float(), kv_cache, metadata, 0.2)
    # bfloat16 math end to end on outputs up to ~8: two bfloat16 units there
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=6e-2)


# ---- Triton (interpreted on CPU, compiled on a GPU) ------------------------------------------


@pytest.fixture(scope="module")
def attention_triton():
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("without a GPU the kernels need TRITON_INTERPRET=1 (set in tests/conftest.py)")
    return importlib.import_module("ember.kernels.attention_triton")


def test_triton_write_stores_the_bytes_of_the_torch_write(attention_triton):
    """Every code: normals, subnormals and their rounding ties, saturation, signs, NaN."""
    torch.manual_seed(0)
    special = [float("nan"), 448.0, 449.0, -464.0, 1e9, -1e9, 0.0, -0.0, 2**-10, 3 * 2**-11]
    values = torch.cat(
        [torch.randn(4096) * 60, torch.linspace(-0.03, 0.03, 2048), torch.tensor(special)]
    )
    values = torch.cat([values, torch.zeros(-len(values) % 32)])
    key = values.view(-1, 2, 16)  # [T, Hkv, D]
    num_tokens = key.shape[0]
    slot_mapping = torch.randperm(num_tokens + 16)[:num_tokens]
    slot_mapping[3] = -1
    kv_cache = torch.zeros(2, num_tokens // 16 + 2, 16, 2, 16, dtype=FP8_E4M3)
    expected = kv_cache.clone()
    k_scale, v_scale = _scales()
    write_kv_cache_torch(key, -key, expected, slot_mapping, k_scale=k_scale, v_scale=v_scale)
    kv_cache = kv_cache.to(DEVICE)
    k_scale, v_scale = _scales(DEVICE)
    attention_triton.write_kv_cache_triton(
        key.to(DEVICE), -key.to(DEVICE), kv_cache, slot_mapping.to(DEVICE),
        k_scale=k_scale, v_scale=v_scale,
    )  # fmt: skip
    assert torch.equal(kv_cache.cpu().view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.parametrize("query_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim,sliding_window,soft_cap",
    [(2, 2, 64, None, None), (8, 2, 64, 7, None), (4, 1, 128, None, 5.0)],
)
def test_triton_attention_reads_the_fp8_cache_as_dequantized_attention(
    attention_triton, num_heads, num_kv_heads, head_dim, sliding_window, soft_cap, query_dtype
):
    query, kv_cache, metadata = paged_fp8_batch(
        MIXED_BATCH, num_heads, num_kv_heads, head_dim, query_dtype, device=DEVICE
    )
    k_scale, v_scale = _scales(DEVICE)
    scale = head_dim**-0.5
    out = attention_triton.paged_attention_triton(
        query, kv_cache, metadata, scale, sliding_window, soft_cap, k_scale, v_scale
    )
    expected = dequantized_attention(
        query.float(), kv_cache, metadata, scale, sliding_window, soft_cap
    )
    # float32: float32 rounding (tf32 is never used for float32 queries); bfloat16: the
    # probabilities and the output rounded to bfloat16 (one unit in the last place)
    tolerance = 3e-5 if query_dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float().cpu(), expected, rtol=tolerance, atol=tolerance)


def _in_process_engine(model_dir: str, **kwargs) -> EngineCore:
    config = EngineArgs(
        model=model_dir, dtype="float32", device="cpu", max_num_batched_tokens=24, **kwargs
    ).create_engine_config()
    return EngineCore(config)


@pytest.mark.slow
@pytest.mark.skipif(
    DEVICE == "cuda", reason="a CPU engine's layers call interpreted kernels (no interpreter here)"
)
def test_engine_steps_through_the_triton_kernels_give_the_torch_paths_tokens_on_fp8(
    attention_triton, tiny_llama_dir, monkeypatch
):
    """The attention layers call the Triton write and attention (interpreted on CPU) on an e4m3
    cache whose scales the first step sets (calculate_kv_scales): chunked prefills beside
    decodes give the tokens of the torch path."""
    from tests.helpers import run_engine
    from tests.test_triton_kernels import engine_workload

    prompts, params = engine_workload([6, 6, 6, 6])
    options = {"kv_cache_dtype": "fp8", "calculate_kv_scales": True}
    expected = run_engine(_in_process_engine(tiny_llama_dir, **options), prompts, params)
    layers = "ember.workers.layers.attention"
    monkeypatch.setattr(f"{layers}.paged_attention", attention_triton.paged_attention_triton)
    monkeypatch.setattr(f"{layers}.write_kv_cache", attention_triton.write_kv_cache_triton)
    core = _in_process_engine(tiny_llama_dir, **options)
    assert run_engine(core, prompts, params) == expected
    layer = core.executor.worker.model_runner.attention_layers[0]
    assert layer.kv_cache.dtype == FP8_E4M3 and layer.k_scale.item() != 1.0


# ---- the engine ------------------------------------------------------------------------------


def test_fp8_cache_holds_twice_the_blocks_of_bfloat16_in_the_same_memory(tiny_llama_dir):
    budget = 3 << 20
    blocks = {}
    for kv_cache_dtype in ("auto", "fp8"):
        config = EngineArgs(
            model=tiny_llama_dir, dtype="bfloat16", device="cpu", kv_cache_memory_bytes=budget,
            kv_cache_dtype=kv_cache_dtype,
        ).create_engine_config()  # fmt: skip
        core = EngineCore(config)
        runner = core.executor.worker.model_runner
        blocks[kv_cache_dtype] = core.config.cache.num_kv_blocks
        assert {cache.dtype for cache in runner.kv_caches} == {
            torch.bfloat16 if kv_cache_dtype == "auto" else FP8_E4M3
        }
        assert sum(c.numel() * c.element_size() for c in runner.kv_caches) <= budget
        core.shutdown()
    assert blocks["fp8"] == 2 * blocks["auto"]


def test_calculate_kv_scales_sets_vllms_scales_from_the_first_step(tiny_llama_dir):
    """k_scale = max |key| / 200 and v_scale = max |value| / 100 of the first step, per layer
    (vLLM's K_SCALE_CONSTANT and V_SCALE_CONSTANT); later steps leave them."""
    from ember.workers.layers.attention import Attention
    from ember.workers.sampling_params import SamplingParams as WorkerSamplingParams
    from tests.helpers import run_engine

    core = _in_process_engine(tiny_llama_dir, kv_cache_dtype="fp8", calculate_kv_scales=True)
    runner = core.executor.worker.model_runner
    seen = {}

    def record(layer, args):
        seen.setdefault(layer, (args[1].abs().max().item(), args[2].abs().max().item()))

    hooks = [layer.register_forward_pre_hook(record) for layer in runner.attention_layers]
    prompts = random_prompts(2, 512, [12, 30], seed=4)
    run_engine(core, prompts, WorkerSamplingParams(temperature=0.0, max_tokens=4))
    for hook in hooks:
        hook.remove()
    assert len(seen) == len(runner.attention_layers) > 1
    for layer, (key_max, value_max) in seen.items():
        assert isinstance(layer, Attention) and not layer.calculate_kv_scales
        assert layer.k_scale.item() == pytest.approx(key_max / K_SCALE_RANGE, rel=1e-6)
        assert layer.v_scale.item() == pytest.approx(value_max / V_SCALE_RANGE, rel=1e-6)
    core.shutdown()


def _e4m3(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return ((x.float() / scale).clamp(-448, 448).to(FP8_E4M3).float() * scale).to(x.dtype)


@contextlib.contextmanager
def keys_and_values_rounded_through_e4m3(model, k_scale: float = 1.0, v_scale: float = 1.0):
    """Hugging Face's Llama with every key (after rotary, as ember caches it) divided by
    k_scale, rounded to e4m3 and multiplied back, and every value the same with v_scale: what
    ember's fp8 cache holds."""
    from transformers.models.llama import modeling_llama

    rotary = modeling_llama.apply_rotary_pos_emb

    def rotary_then_rounded(query, key, *args, **kwargs):
        query, key = rotary(query, key, *args, **kwargs)
        return query, _e4m3(key, k_scale)

    modeling_llama.apply_rotary_pos_emb = rotary_then_rounded
    hooks = [
        layer.self_attn.v_proj.register_forward_hook(lambda module, args, out: _e4m3(out, v_scale))
        for layer in model.model.layers
    ]
    try:
        yield model
    finally:
        modeling_llama.apply_rotary_pos_emb = rotary
        for hook in hooks:
            hook.remove()


def _worst_logprob_gaps(outputs, reference) -> tuple[float, float]:
    """The largest |ember - reference| over the generated tokens' and the prompts' logprobs."""
    worst_generated = worst_prompt = 0.0
    for output, logprobs in zip(outputs, reference):
        sequence = output.prompt_token_ids + list(output.outputs[0].token_ids)
        start = len(output.prompt_token_ids) - 1
        completion = output.outputs[0]
        for row, (token, chosen) in enumerate(zip(completion.token_ids, completion.logprobs)):
            gap = abs(chosen[token].logprob - logprobs[start + row, token].item())
            worst_generated = max(worst_generated, gap)
        for position, entry in enumerate(output.prompt_logprobs[1:], start=1):
            token = sequence[position]
            gap = abs(entry[token].logprob - logprobs[position - 1, token].item())
            worst_prompt = max(worst_prompt, gap)
    return worst_generated, worst_prompt


@pytest.mark.slow
def test_generate_with_fp8_cache_matches_hf_with_keys_and_values_rounded_to_e4m3(tmp_path):
    """Greedy generation on a random Llama (the prefill through the torch reference, the
    decodes through the C kernel): ember's logprobs of its prompts and its tokens are those of
    Hugging Face whose keys and values are rounded through e4m3 (scales 1.0). Tolerance 1e-3:
    float32 summation order gives ~1e-5; the rest covers an e4m3 rounding that the two
    rotaries' last-bit differences could tip at a rounding boundary (none here). Teeth: plain
    HF, without the rounding, differs by far more (~0.5), and the cache really is float8."""
    from transformers import AutoModelForCausalLM

    model_dir = write_random_llama(tmp_path / "model")
    prompts = random_prompts(4, 512, [40, 95, 130, 17], seed=1)
    params = SamplingParams(max_tokens=16, temperature=0.0, logprobs=0, prompt_logprobs=0)
    with LLM(
        model_dir, dtype="float32", kv_cache_dtype="fp8", skip_tokenizer_init=True,
        kv_cache_memory_bytes=4 << 20,
    ) as llm:  # fmt: skip
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        facts = llm.apply_model(cache_facts)
        assert llm.llm_engine.vllm_config.cache_config.cache_dtype == "fp8"
    assert facts == [[["torch.float8_e4m3fn", 1.0, 1.0]] * 2]  # one rank, two layers
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sequences = [o.prompt_token_ids + list(o.outputs[0].token_ids) for o in outputs]

    def hf_logprobs():
        with torch.no_grad():
            return [hf(torch.tensor([s])).logits[0].log_softmax(-1) for s in sequences]

    with keys_and_values_rounded_through_e4m3(hf):
        rounded = hf_logprobs()
    generated_gap, prompt_gap = _worst_logprob_gaps(outputs, rounded)
    assert generated_gap < 1e-3 and prompt_gap < 1e-3, (generated_gap, prompt_gap)
    for output, logprobs in zip(outputs, rounded):  # greedy: HF's choices
        start = len(output.prompt_token_ids) - 1
        tokens = list(output.outputs[0].token_ids)
        assert logprobs[start : start + len(tokens)].argmax(-1).tolist() == tokens
    plain_generated, plain_prompt = _worst_logprob_gaps(outputs, hf_logprobs())
    assert min(plain_generated, plain_prompt) > 0.05, (plain_generated, plain_prompt)


# ---- scales read from the checkpoint -----------------------------------------------------------


class _AttentionBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attention(2, 4, 0.5, 1)


def _model_of_two_blocks() -> torch.nn.Module:
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.layers = torch.nn.ModuleList()
    for _ in range(2):
        layer = torch.nn.Module()
        layer.self_attn = _AttentionBlock()
        model.model.layers.append(layer)
    return model


@pytest.mark.parametrize(
    "suffixes, expected",
    [
        ((".k_scale", ".v_scale"), (0.25, 0.5)),  # llm-compressor, ModelOpt
        ((".k_proj.k_scale", ".v_proj.v_scale"), (0.25, 0.5)),  # older ModelOpt
        ((".k_proj.output_scale", ".v_proj.output_scale"), (0.25, 0.5)),  # older llm-compressor
        ((".kv_scale",), (0.25, 0.25)),  # AutoFP8: one scale for both
    ],
    ids=["k_scale", "modelopt", "output_scale", "kv_scale"],
)
def test_checkpoint_kv_scales_under_each_tools_names_reach_the_attention_layers(suffixes, expected):
    """vLLM's `maybe_remap_kv_scale_name` names, each layer its own values; the query and
    softmax scales of FP8 attention kernels are skipped."""
    from ember.workers.model_loader.weight_utils import load_weights_into

    model = _model_of_two_blocks()
    tensors = []
    for layer in range(2):
        prefix = f"model.layers.{layer}.self_attn"
        for suffix, value in zip(suffixes, (0.25, 0.5)):
            tensors.append((prefix + suffix, torch.tensor(value * (layer + 1))))
        tensors.append((prefix + ".q_scale", torch.tensor(3.0)))
    load_weights_into(model, tensors, {})
    for layer, block in enumerate(model.model.layers):
        attention_layer = block.self_attn.attn
        scales = (attention_layer.k_scale.item(), attention_layer.v_scale.item())
        assert scales == tuple(value * (layer + 1) for value in expected)


@pytest.mark.parametrize(
    "name, tensor, message",
    [
        ("model.layers.0.self_attn.k_scale", torch.ones(2), r"shape \(2,\); ember reads one"),
        ("model.layers.0.self_attn.v_scale", torch.tensor(0.0), "must be > 0, got 0.0"),
        ("model.layers.0.self_attn.k_scale", torch.tensor(float("nan")), "must be > 0"),
        ("model.layers.7.self_attn.k_scale", torch.tensor(1.0), "names no attention layer"),
    ],
    ids=["per-head", "zero", "nan", "no-layer"],
)
def test_a_checkpoint_kv_scale_ember_cannot_use_is_an_error_naming_the_tensor(
    name, tensor, message
):
    from ember.workers.model_loader.weight_utils import load_weights_into

    with pytest.raises(ValueError, match=message) as error:
        load_weights_into(_model_of_two_blocks(), [(name, tensor)], {})
    assert name in str(error.value)


def test_kv_cache_schemes_of_the_tools_are_read_and_others_refused_naming_the_field():
    from ember.workers.layers.quantization.fp8 import FP8Config
    from ember.workers.quantization_settings import compressed_tensors_settings

    FP8Config({"activation_scheme": "static", "kv_cache_scheme": "static"})  # AutoFP8
    scheme = {"type": "float", "num_bits": 8, "strategy": "tensor", "dynamic": False}
    scheme["symmetric"] = True  # llm-compressor's kv_cache_scheme for an FP8 cache
    group = {
        "format": "float-quantized",
        "targets": ["Linear"],
        "weights": {"type": "float", "num_bits": 8, "strategy": "channel", "symmetric": True},
        "input_activations": {"type": "float", "num_bits": 8, "strategy": "token", "dynamic": True},
    }
    config = {"config_groups": {"group_0": group}, "kv_cache_scheme": scheme}
    assert compressed_tensors_settings(config).activation_scheme == "dynamic"
    with pytest.raises(NotImplementedError, match=r"kv_cache_scheme.strategy='attn_head'"):
        compressed_tensors_settings(
            {**config, "kv_cache_scheme": {**scheme, "strategy": "attn_head"}}
        )
    with pytest.raises(NotImplementedError, match=r"kv_cache_scheme.num_bits=4"):
        compressed_tensors_settings({**config, "kv_cache_scheme": {**scheme, "num_bits": 4}})
    with pytest.raises(NotImplementedError, match="kv_cache_scheme='dynamic'"):
        FP8Config({"activation_scheme": "static", "kv_cache_scheme": "dynamic"})


@pytest.mark.slow
def test_an_fp8_cache_uses_the_checkpoints_kv_scales_as_hf_rounded_through_them(tmp_path):
    """A random Llama whose checkpoint carries llm-compressor's `k_scale` / `v_scale` for each
    layer: with kv_cache_dtype="fp8" ember stores keys / k_scale and values / v_scale in e4m3,
    so its logprobs are those of Hugging Face with its keys and values rounded through e4m3
    on those scales (tolerance 1e-3, as the test with scales 1.0 above). Teeth: rounded on
    scales 1.0 instead, HF differs by far more. With the default cache the scales are read
    and ignored: the outputs are plain HF's."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    model_dir = write_random_llama(tmp_path / "model")
    weights_file = os.path.join(model_dir, "model.safetensors")
    tensors = load_file(weights_file)
    k_scale, v_scale = 0.0123, 0.0071  # e4m3's grid far from scale 1.0's on these values
    for layer in range(2):
        tensors[f"model.layers.{layer}.self_attn.k_scale"] = torch.tensor(k_scale)
        tensors[f"model.layers.{layer}.self_attn.v_scale"] = torch.tensor(v_scale)
    save_file(tensors, weights_file, metadata={"format": "pt"})
    prompts = random_prompts(3, 512, [40, 95, 17], seed=2)
    params = SamplingParams(max_tokens=12, temperature=0.0, logprobs=0, prompt_logprobs=0)
    runs = {}
    for cache in ("fp8", "auto"):
        with LLM(
            model_dir, dtype="float32", kv_cache_dtype=cache, skip_tokenizer_init=True,
            kv_cache_memory_bytes=4 << 20,
        ) as llm:  # fmt: skip
            runs[cache] = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
            facts = llm.apply_model(cache_facts)
        dtype = "torch.float8_e4m3fn" if cache == "fp8" else "torch.float32"
        assert facts == [[[dtype, pytest.approx(k_scale), pytest.approx(v_scale)]] * 2]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def hf_logprobs(outputs):
        sequences = [o.prompt_token_ids + list(o.outputs[0].token_ids) for o in outputs]
        with torch.no_grad():
            return [hf(torch.tensor([s])).logits[0].log_softmax(-1) for s in sequences]

    with keys_and_values_rounded_through_e4m3(hf, k_scale, v_scale):
        rounded = hf_logprobs(runs["fp8"])
    assert max(_worst_logprob_gaps(runs["fp8"], rounded)) < 1e-3
    with keys_and_values_rounded_through_e4m3(hf):
        on_unit_scales = hf_logprobs(runs["fp8"])
    assert min(_worst_logprob_gaps(runs["fp8"], on_unit_scales)) > 0.05
    assert max(_worst_logprob_gaps(runs["auto"], hf_logprobs(runs["auto"]))) < 1e-3


# ---- the arguments -----------------------------------------------------------------------------


@pytest.fixture
def no_engine_start(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an engine process was started")

    monkeypatch.setattr(ember.llm, "EngineCoreClient", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"kv_cache_dtype": "fp9"}, ValueError, r"kv_cache_dtype must be one of \('auto', 'fp8'"),
        ({"kv_cache_dtype": "fp8_e5m2"}, NotImplementedError, "kv_cache_dtype='fp8_e5m2'"),
        ({"kv_cache_dtype": "fp8_inc"}, NotImplementedError, "kv_cache_dtype='fp8_inc'"),
        ({"calculate_kv_scales": "yes"}, TypeError, "calculate_kv_scales must be a bool"),
        ({"kv_cache_dtype_skip_layers": ["0"]}, NotImplementedError, "kv_cache_dtype_skip"),
    ],
)
def test_argument_errors_are_raised_before_any_process_starts(
    tiny_llama_dir, no_engine_start, kwargs, error, message
):
    with pytest.raises(error, match=message):
        LLM(tiny_llama_dir, **kwargs)


@pytest.mark.parametrize("value", ["fp8", "fp8_e4m3"])
def test_fp8_and_fp8_e4m3_reach_the_workers_config(tiny_llama_dir, value):
    config = EngineArgs(model=tiny_llama_dir, kv_cache_dtype=value).create_engine_config()
    assert config.cache.cache_dtype == value and not config.cache.calculate_kv_scales
