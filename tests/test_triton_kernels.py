"""Each Triton kernel against the plain-torch reference it replaces, on the same inputs.

On a machine without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set
by `tests/conftest.py` before anything imports triton), on small shapes. With a GPU they compile and run on it. Tolerances: float32 1e-5 (attention
2e-5); bfloat16 one bf16 unit in the last place of the value (rtol 1.6e-2, atol 2e-2), as the
kernels round once where torch may round twice (and the interpreter truncates to bf16).
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import pytest
import torch

from ember.kernels.activation import gelu_and_mul_torch, silu_and_mul_torch
from ember.kernels.attention import (
    AttentionMetadata,
    paged_attention_torch,
    write_kv_cache_torch,
)
from ember.kernels.layernorm import fused_add_rms_norm_torch, rms_norm_torch
from ember.kernels.rotary import apply_rotary_emb_torch
from ember.kernels.sampling import apply_top_k_top_p_torch
from ember.workers.cuda_graphs import CudaGraphRunner

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_MODULES = ("activation", "attention", "layernorm", "rotary", "sampling")
TOLERANCES = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.bfloat16: {"atol": 2e-2, "rtol": 1.6e-2},
}
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def triton_kernels():
    """The `<op>_triton` modules; on CPU interpreted (`tests/conftest.py` sets TRITON_INTERPRET
    before anything imports triton)."""
    if importlib.util.find_spec("triton") is None:
        pytest.fail("triton is not installed (make setup installs it)")
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("without a GPU the kernels need TRITON_INTERPRET=1 (set in tests/conftest.py)")
    return {op: importlib.import_module(f"ember.kernels.{op}_triton") for op in TRITON_MODULES}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, **override):
    assert actual.dtype == expected.dtype
    tolerance = {**TOLERANCES[dtype], **override}
    torch.testing.assert_close(actual.float(), expected.float(), **tolerance)


# ---- activations, RMSNorm, rotary ----------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_activations_match_torch(triton_kernels, dtype):
    torch.manual_seed(0)
    kernels = triton_kernels["activation"]
    x = torch.randn(2, 3, 2 * 72, dtype=dtype, device=DEVICE) * 3  # d = 72: a masked tail
    assert_close(kernels.silu_and_mul_triton(x), silu_and_mul_torch(x), dtype)
    for approximate in ("none", "tanh"):
        assert_close(
            kernels.gelu_and_mul_triton(x, approximate), gelu_and_mul_torch(x, approximate), dtype
        )
    assert kernels.silu_and_mul_triton(x[:0]).shape == (0, 3, 72)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_and_fused_residual_add_match_torch(triton_kernels, dtype):
    torch.manual_seed(0)
    kernels = triton_kernels["layernorm"]
    hidden = 96  # not a power of two
    x = torch.randn(7, hidden, dtype=dtype, device=DEVICE)
    residual = torch.randn(7, hidden, dtype=dtype, device=DEVICE)
    weight = torch.randn(hidden, dtype=dtype, device=DEVICE)
    assert_close(kernels.rms_norm_triton(x, weight, 1e-6), rms_norm_torch(x, weight, 1e-6), dtype)
    normed, new_residual = kernels.fused_add_rms_norm_triton(x, residual, weight, 1e-5)
    expected_normed, expected_residual = fused_add_rms_norm_torch(x, residual, weight, 1e-5)
    assert_close(new_residual, expected_residual, dtype)
    assert_close(normed, expected_normed, dtype, atol=4e-2)  # bf16: the sum may round apart
    # The inputs are left as they were.
    torch.testing.assert_close(residual, residual.clone())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox_style", [True, False])
@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (128, 64)])
def test_rotary_matches_torch(triton_kernels, dtype, is_neox_style, head_dim, rotary_dim):
    torch.manual_seed(0)
    kernels = triton_kernels["rotary"]
    num_tokens, num_heads, num_kv_heads = 5, 4, 1
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    angles = torch.outer(torch.arange(100).float(), inv_freq)
    cos_sin_cache = torch.cat((angles.cos(), angles.sin()), dim=-1).to(DEVICE)
    positions = torch.tensor([0, 17, 33, 98, 99], device=DEVICE)
    # Query and key as views into one fused qkv projection, as the models pass them.
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype)
    qkv = qkv.to(DEVICE)
    query = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    key = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim]
    key = key.view(num_tokens, num_kv_heads, head_dim)
    out = kernels.apply_rotary_emb_triton(positions, query, key, cos_sin_cache, is_neox_style)
    expected = apply_rotary_emb_torch(positions, query, key, cos_sin_cache, is_neox_style)
    assert_close(out[0], expected[0], dtype)
    assert_close(out[1], expected[1], dtype)


# ---- top-k / top-p ---------------------------------------------------------------------------


def test_top_k_top_p_keeps_the_same_tokens_as_torch(triton_kernels):
    torch.manual_seed(0)
    kernels = triton_kernels["sampling"]
    vocab_size = 1000
    logits = torch.randn(6, vocab_size, device=DEVICE) * 4
    logits[3, :10] = 2.5  # ties at the k-th value: all kept, as the reference keeps them
    logits[4] = -logits[4].abs() - 50  # only negative values
    top_k = torch.tensor([1, 50, vocab_size, 7, 3, 20], device=DEVICE)
    top_p = torch.tensor([0.9, 0.5, 1.0, 0.01, 0.99, 0.3], device=DEVICE)
    for k, p in ((top_k, None), (None, top_p), (top_k, top_p)):
        out = kernels.apply_top_k_top_p_triton(logits, k, p)
        torch.testing.assert_close(out, apply_top_k_top_p_torch(logits, k, p), atol=0, rtol=0)
    assert kernels.apply_top_k_top_p_triton(logits, None, None) is logits


# ---- paged KV cache: write and attention --------------------------------------------------


def test_write_kv_cache_matches_torch_and_skips_empty_slots(triton_kernels):
    torch.manual_seed(0)
    kernels = triton_kernels["attention"]
    num_blocks, block_size, num_kv_heads, head_dim = 6, 16, 2, 64
    key = torch.randn(5, num_kv_heads, head_dim, device=DEVICE)
    value = torch.randn(5, num_kv_heads, head_dim, device=DEVICE)
    slot_mapping = torch.tensor([17, -1, 0, 95, -1], device=DEVICE)
    expected = torch.zeros(2, num_blocks, block_size, num_kv_heads, head_dim, device=DEVICE)
    actual = expected.clone()
    write_kv_cache_torch(key, value, expected, slot_mapping)
    kernels.write_kv_cache_triton(key, value, actual, slot_mapping)
    torch.testing.assert_close(actual, expected, atol=0, rtol=0)
    assert actual.flatten(1, 2)[:, [1, 2, 94]].eq(0).all()


def build_paged_batch(requests, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=0):
    """A flat batch over a paged cache. `requests` holds (tokens cached before this step, tokens
    this step); single-token requests must come first. Returns (query, key, value, kv_cache
    with the cached part written, metadata)."""
    generator = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-(c + n) // block_size) for c, n in requests) + 2
    kv_cache = torch.zeros(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype)
    free_blocks = (torch.randperm(num_blocks - 1, generator=generator) + 1).tolist()
    tables, slots, queries, keys, values = [], [], [], [], []
    for cached, new in requests:
        total = cached + new
        table = [free_blocks.pop() for _ in range(-(-total // block_size))]
        tables.append(table)
        positions = torch.arange(total)
        req_slots = torch.tensor(table)[positions // block_size] * block_size
        req_slots += positions % block_size
        req_keys = torch.randn(total, num_kv_heads, head_dim, generator=generator).to(dtype)
        req_values = torch.randn(total, num_kv_heads, head_dim, generator=generator).to(dtype)
        write_kv_cache_torch(req_keys[:cached], req_values[:cached], kv_cache, req_slots[:cached])
        slots.append(req_slots[cached:])
        keys.append(req_keys[cached:])
        values.append(req_values[cached:])
        queries.append(torch.randn(new, num_heads, head_dim, generator=generator).to(dtype))
    max_blocks = max(len(t) for t in tables)
    query_lens = [n for _, n in requests]
    seq_lens = [c + n for c, n in requests]
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    metadata = AttentionMetadata(
        slot_mapping=torch.cat(slots).to(DEVICE),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        block_table=torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables]).to(DEVICE),
        num_decodes=sum(1 for n in query_lens if n == 1),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=starts,
        seq_lens_cpu=seq_lens,
    )
    return (
        torch.cat(queries).to(DEVICE),
        torch.cat(keys).to(DEVICE),
        torch.cat(values).to(DEVICE),
        kv_cache.to(DEVICE),
        metadata,
    )


# (cached, new): decodes first (one at a block's last slot, one at a block's first), then
# prefill chunks: one starting mid-block and crossing two block boundaries, a fresh prompt,
# and one continuing after exactly one full block.
MIXED_BATCH = [(15, 1), (16, 1), (3, 1), (9, 30), (0, 21), (16, 5)]


@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim",
    [(2, 2, 64), (4, 1, 128), (8, 1, 64)],
    ids=["gqa1-d64", "gqa4-d128", "gqa8-d64"],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_attention_mixed_batch_matches_torch(
    triton_kernels, num_heads, num_kv_heads, head_dim, dtype
):
    kernels = triton_kernels["attention"]
    query, key, value, kv_cache, metadata = build_paged_batch(
        MIXED_BATCH, num_heads, num_kv_heads, head_dim, 16, dtype
    )
    expected_cache = kv_cache.clone()
    write_kv_cache_torch(key, value, expected_cache, metadata.slot_mapping)
    kernels.write_kv_cache_triton(key, value, kv_cache, metadata.slot_mapping)
    torch.testing.assert_close(kv_cache, expected_cache, atol=0, rtol=0)
    scale = head_dim**-0.5
    out = kernels.paged_attention_triton(query, kv_cache, metadata, scale)
    expected = paged_attention_torch(query, kv_cache, metadata, scale)
    assert_close(out, expected, dtype, **({"atol": 2e-5} if dtype == torch.float32 else {}))


@pytest.mark.parametrize("sliding_window,logits_soft_cap", [(7, None), (None, 5.0), (20, 5.0)])
def test_paged_attention_sliding_window_and_soft_cap_match_torch(
    triton_kernels, sliding_window, logits_soft_cap
):
    kernels = triton_kernels["attention"]
    query, key, value, kv_cache, metadata = build_paged_batch(
        MIXED_BATCH, 4, 1, 64, 16, torch.float32, seed=1
    )
    kernels.write_kv_cache_triton(key, value, kv_cache, metadata.slot_mapping)
    scale = 64**-0.5
    out = kernels.paged_attention_triton(
        query, kv_cache, metadata, scale, sliding_window, logits_soft_cap
    )
    expected = paged_attention_torch(
        query, kv_cache, metadata, scale, sliding_window, logits_soft_cap
    )
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)


def test_paged_attention_decode_only_batch_with_padding_requests(triton_kernels):
    """The shape a CUDA graph replays: decodes, then padding requests of one token over the
    null block 0 (seq_len 1, slot -1) whose rows are computed but never read."""
    kernels = triton_kernels["attention"]
    query, key, value, kv_cache, metadata = build_paged_batch(
        [(40, 1), (0, 1), (31, 1)], 8, 2, 64, 16, torch.float32, seed=2
    )
    kernels.write_kv_cache_triton(key, value, kv_cache, metadata.slot_mapping)
    expected = paged_attention_torch(query, kv_cache, metadata, 0.125)
    num_padding = 2
    padded = AttentionMetadata(
        slot_mapping=torch.cat(
            [metadata.slot_mapping, torch.full((num_padding,), -1, device=DEVICE)]
        ),
        query_start_loc=torch.arange(4 + num_padding, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.cat(
            [metadata.seq_lens, torch.ones(num_padding, dtype=torch.int32, device=DEVICE)]
        ),
        block_table=torch.cat(
            [
                metadata.block_table,
                metadata.block_table.new_zeros(num_padding, metadata.block_table.shape[1]),
            ]
        ),
        num_decodes=3 + num_padding,
        max_query_len=1,
        max_seq_len=metadata.max_seq_len,
        query_start_loc_cpu=list(range(4 + num_padding)),
        seq_lens_cpu=metadata.seq_lens_cpu + [1] * num_padding,
    )
    padded_query = torch.cat([query, torch.randn(num_padding, 8, 64, device=DEVICE)])
    out = kernels.paged_attention_triton(padded_query, kv_cache, padded, 0.125)
    torch.testing.assert_close(out[:3], expected, atol=2e-5, rtol=1e-5)
    assert torch.isfinite(out).all()


# ---- the kernels inside the engine -----------------------------------------------------------


def use_triton_kernels(monkeypatch, triton_kernels) -> None:
    """Make the layers and the sampler call the Triton kernels whatever the device."""
    layers = "ember.workers.layers"
    replacements = {
        f"{layers}.attention.paged_attention": triton_kernels["attention"].paged_attention_triton,
        f"{layers}.attention.write_kv_cache": triton_kernels["attention"].write_kv_cache_triton,
        f"{layers}.layernorm.rms_norm": triton_kernels["layernorm"].rms_norm_triton,
        f"{layers}.layernorm.fused_add_rms_norm": (
            triton_kernels["layernorm"].fused_add_rms_norm_triton
        ),
        f"{layers}.rotary_embedding.apply_rotary_emb": (
            triton_kernels["rotary"].apply_rotary_emb_triton
        ),
        f"{layers}.activation.silu_and_mul": triton_kernels["activation"].silu_and_mul_triton,
        "ember.workers.sampler.apply_top_k_top_p": (
            triton_kernels["sampling"].apply_top_k_top_p_triton
        ),
    }
    for target, kernel in replacements.items():
        monkeypatch.setattr(target, kernel)


ENGINE_PROMPT_LENS = [5, 40, 17, 2]


def engine_workload(max_tokens: list[int]):
    from ember.workers.sampling_params import SamplingParams
    from tests.helpers import random_prompts

    prompts = random_prompts(len(max_tokens), 512, ENGINE_PROMPT_LENS, seed=3)
    params = [
        SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in max_tokens[:-1]
    ] + [
        SamplingParams(
            temperature=1.0, top_k=20, top_p=0.8, seed=5, max_tokens=max_tokens[-1], ignore_eos=True
        )
    ]
    return prompts, params


def tiny_engine(tiny_llama_dir):
    from ember.enginecore.arg_utils import EngineArgs
    from ember.enginecore.engine_core import EngineCore

    # on a GPU machine the kernels take CUDA tensors: the engine runs there (eagerly: the
    # graph test below installs its own runner)
    config = EngineArgs(
        model=tiny_llama_dir,
        dtype="float32",
        device=DEVICE,
        enforce_eager=True,
        max_num_batched_tokens=24,
    ).create_engine_config()
    return EngineCore(config)


def test_engine_steps_through_the_triton_kernels_give_the_torch_paths_tokens(
    triton_kernels, tiny_llama_dir, monkeypatch
):
    """The layers and the sampler call the Triton kernels (interpreted on CPU) instead of the
    torch references, through the model runner's real inputs: chunked prefills mixed with
    decodes, query/key views of the fused qkv projection. Same tokens as the torch path."""
    from tests.helpers import run_engine

    prompts, params = engine_workload([6, 6, 6, 6])
    expected = run_engine(tiny_engine(tiny_llama_dir), prompts, params)
    use_triton_kernels(monkeypatch, triton_kernels)
    assert run_engine(tiny_engine(tiny_llama_dir), prompts, params) == expected


class EagerReplayGraphs(CudaGraphRunner):
    """A CudaGraphRunner whose "graphs" run the model eagerly on the persistent buffers with the
    graph's own metadata, exactly what a captured graph replays (the capture itself needs CUDA).
    Records (decodes in the step, padded batch size) of each replay."""

    def capture(self) -> int:
        self.replays: list[tuple[int, int]] = []
        for batch_size in self.batch_sizes:
            self.graphs[batch_size] = _EagerGraph(self, batch_size)
        return 0

    def fill_buffers(self, input_ids, positions, metadata) -> int:
        batch_size = super().fill_buffers(input_ids, positions, metadata)
        self.replays.append((input_ids.shape[0], batch_size))
        return batch_size


class _EagerGraph:
    def __init__(self, runner: EagerReplayGraphs, batch_size: int):
        self.runner, self.batch_size = runner, batch_size

    def replay(self) -> None:
        runner, size = self.runner, self.batch_size
        metadata = runner.graph_metadata(size)
        runner.outputs[size] = runner.model(
            runner.input_ids[:size], runner.positions[:size], metadata
        )


def test_decode_steps_replayed_from_graph_buffers_give_the_torch_paths_tokens(
    triton_kernels, tiny_llama_dir, monkeypatch
):
    """Decode-only steps go through the graph runner (persistent buffers, padding requests,
    the graph's fixed metadata) and the engine still produces the torch path's tokens."""
    from tests.helpers import run_engine

    prompts, params = engine_workload([7, 3, 5, 6])  # requests finish at different steps
    expected = run_engine(tiny_engine(tiny_llama_dir), prompts, params)
    use_triton_kernels(monkeypatch, triton_kernels)
    core = tiny_engine(tiny_llama_dir)
    model_runner = core.executor.worker.model_runner
    graphs = EagerReplayGraphs(model_runner.model, [1, 2, 4], 8, torch.device(DEVICE))
    graphs.capture()
    model_runner.cuda_graphs = graphs
    assert run_engine(core, prompts, params) == expected
    assert (4, 4) in graphs.replays and (3, 4) in graphs.replays  # 3 decodes padded to 4
