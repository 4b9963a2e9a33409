"""The C decode-attention kernel over a bfloat16 paged KV cache (`kernels/attention_cpu.py`)
against the torch reference, and its fallback when no compiler is found."""

from __future__ import annotations

import pytest
import torch

from ember.kernels import attention, attention_cpu, cpu_library
from ember.kernels.attention import AttentionMetadata


def _decode_batch(seq_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int):
    torch.manual_seed(len(seq_lens) * 7 + head_dim)
    block_size, num_blocks = 16, 96
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim).bfloat16()
    max_blocks = -(-max(seq_lens) // block_size)
    block_table = torch.stack([torch.randperm(num_blocks)[:max_blocks] for _ in seq_lens])
    query = torch.randn(len(seq_lens), num_heads, head_dim)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    metadata = AttentionMetadata(
        slot_mapping=torch.zeros(len(seq_lens), dtype=torch.int64),
        query_start_loc=torch.arange(len(seq_lens) + 1, dtype=torch.int32),
        seq_lens=lens,
        block_table=block_table,
        num_decodes=len(seq_lens),
        max_query_len=1,
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=list(range(len(seq_lens) + 1)),
        seq_lens_cpu=seq_lens,
    )
    return query, kv_cache, metadata


@pytest.mark.parametrize(
    "num_heads, num_kv_heads, head_dim", [(4, 4, 64), (9, 3, 64), (8, 2, 128), (16, 1, 64)]
)
@pytest.mark.parametrize("sliding_window", [None, 20])
def test_c_kernel_equals_the_torch_reference(num_heads, num_kv_heads, head_dim, sliding_window):
    # Lengths: one token, inside a block, on block boundaries, across many blocks.
    seq_lens = [1, 7, 16, 17, 33, 64, 130, 250]
    query, kv_cache, metadata = _decode_batch(seq_lens, num_heads, num_kv_heads, head_dim)
    scale = head_dim**-0.5
    out = attention_cpu.paged_decode_attention_cpu(
        query, kv_cache, metadata.block_table, metadata.seq_lens, scale, sliding_window
    )
    assert out is not None
    # The reference on the same values in float32 (bfloat16 -> float32 is exact).
    reference = attention._decode_attention(
        query, kv_cache.float(), metadata, scale, sliding_window, None
    )
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def test_decode_attention_dispatches_bf16_caches_to_the_c_kernel(monkeypatch):
    query, kv_cache, metadata = _decode_batch([5, 40], 6, 2, 64)
    calls = []
    kernel = attention_cpu.paged_decode_attention_cpu

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(attention_cpu, "paged_decode_attention_cpu", counted)
    out = attention._decode_attention(query, kv_cache, metadata, 0.125, None, None)
    assert calls == [query.shape]
    reference = attention._decode_attention(query, kv_cache.float(), metadata, 0.125, None, None)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    # A soft cap is the reference's alone.
    attention._decode_attention(query, kv_cache, metadata, 0.125, None, 30.0)
    assert len(calls) == 1


def test_shapes_beyond_the_kernel_and_a_missing_compiler_fall_back(monkeypatch):
    query, kv_cache, metadata = _decode_batch([9, 3], 34, 2, 64)  # 17 query heads per KV head
    assert (
        attention_cpu.paged_decode_attention_cpu(
            query, kv_cache, metadata.block_table, metadata.seq_lens, 0.125, None
        )
        is None
    )
    torch.testing.assert_close(
        attention._decode_attention(query, kv_cache, metadata, 0.125, None, None),
        attention._decode_attention(query, kv_cache.float(), metadata, 0.125, None, None),
        rtol=1e-5,
        atol=1e-5,
    )
    monkeypatch.setattr(cpu_library.shutil, "which", lambda name: None)
    cpu_library.load_c_library.cache_clear()
    attention_cpu._library.cache_clear()
    try:
        assert attention_cpu._library() is None
        query, kv_cache, metadata = _decode_batch([9, 3], 4, 2, 64)
        assert (
            attention_cpu.paged_decode_attention_cpu(
                query, kv_cache, metadata.block_table, metadata.seq_lens, 0.125, None
            )
            is None
        )
    finally:
        cpu_library.load_c_library.cache_clear()
        attention_cpu._library.cache_clear()


def test_openmp_kernels_share_torchs_runtime():
    """The OpenMP kernels link `libgomp.so.1`, and the loader gives them torch's: one thread pool
    in the process, not two competing for the cores."""
    assert attention_cpu._library() is not None
    with open("/proc/self/maps") as maps:
        runtimes = {line.split()[-1] for line in maps if "libgomp" in line}
    assert len(runtimes) == 1, runtimes
