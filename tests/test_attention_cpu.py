"""CPU attention: the C decode kernel (`kernels/attention_cpu.py`) against the pure torch
reference on the same bfloat16 cache, the reference's purity, and `paged_attention`'s dispatch."""

from __future__ import annotations

import pytest
import torch

from ember.kernels import attention, attention_cpu, cpu_library
from ember.kernels.attention import AttentionMetadata

pytestmark = pytest.mark.usefixtures("cpu_isa")
needs_c_kernel = pytest.mark.skipif(
    not attention_cpu.available(),
    reason="the C decode kernel could not be built here (no C compiler)",
)

# Two decodes, a chunk in the middle of its request, a fresh prompt (q_len == seq_len).
MIXED_QUERY_LENS = [1, 1, 5, 12]
MIXED_SEQ_LENS = [9, 40, 30, 12]


def _paged_batch(
    seq_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    query_lens: list[int] | None = None,
    cache_dtype: torch.dtype = torch.bfloat16,
    query_dtype: torch.dtype = torch.float32,
    block_size: int = 16,
):
    """A random cache and queries; decodes (query_lens 1) first, then chunks."""
    query_lens = query_lens or [1] * len(seq_lens)
    torch.manual_seed(len(seq_lens) * 7 + head_dim)
    num_blocks = max(96, 2 * -(-max(seq_lens) // block_size))
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim).to(cache_dtype)
    max_blocks = -(-max(seq_lens) // block_size)
    block_table = torch.stack([torch.randperm(num_blocks)[:max_blocks] for _ in seq_lens])
    query = torch.randn(sum(query_lens), num_heads, head_dim).to(query_dtype)
    starts = [0]
    for query_len in query_lens:
        starts.append(starts[-1] + query_len)
    metadata = AttentionMetadata(
        slot_mapping=torch.zeros(len(query), dtype=torch.int64),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_table=block_table,
        num_decodes=query_lens.count(1),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=starts,
        seq_lens_cpu=seq_lens,
    )
    return query, kv_cache, metadata


def _dense_attention(query, kv_cache, metadata, scale, sliding_window=None):
    """Each request's query rows against its cached keys/values read slot by slot, in float64."""
    block_size = kv_cache.shape[2]
    cache = kv_cache.flatten(1, 2).double()  # [2, slots, Hkv, D]
    out = torch.empty(query.shape, dtype=torch.float64)
    starts = metadata.query_start_loc_cpu
    for req, seq_len in enumerate(metadata.seq_lens_cpu):
        positions = torch.arange(seq_len)
        blocks = metadata.block_table[req, positions // block_size]
        slots = blocks * block_size + positions % block_size
        q = query[starts[req] : starts[req + 1]].double()
        group = q.shape[1] // kv_cache.shape[3]
        keys = cache[0, slots].repeat_interleave(group, dim=1)
        values = cache[1, slots].repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, keys) * scale
        query_pos = torch.arange(seq_len - len(q), seq_len)[:, None]
        allowed = positions[None, :] <= query_pos
        if sliding_window is not None:
            allowed &= positions[None, :] > query_pos - sliding_window
        scores = scores.masked_fill(~allowed, float("-inf"))
        rows = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values)
        out[starts[req] : starts[req + 1]] = rows
    return out.float()


@needs_c_kernel
@pytest.mark.parametrize(
    "num_heads, num_kv_heads, head_dim",
    # groups of 1, 3, 4, 6, 7 and 16 query heads a KV head (up to 8 a compile-time constant)
    [(4, 4, 64), (9, 3, 64), (8, 2, 128), (12, 2, 64), (14, 2, 64), (16, 1, 64)],
)
@pytest.mark.parametrize("sliding_window", [None, 20])
def test_c_kernel_matches_the_torch_reference_on_the_same_bf16_cache(
    num_heads, num_kv_heads, head_dim, sliding_window
):
    # Lengths: one token, inside a block, on block boundaries, across many blocks.
    seq_lens = [1, 7, 16, 17, 33, 64, 130, 250]
    query, kv_cache, metadata = _paged_batch(seq_lens, num_heads, num_kv_heads, head_dim)
    scale = head_dim**-0.5
    out = attention_cpu.paged_decode_attention_cpu(
        query, kv_cache, metadata.block_table, metadata.seq_lens, scale, sliding_window
    )
    assert out is not None
    reference = attention.paged_attention_torch(query, kv_cache, metadata, scale, sliding_window)
    # Both read the same bfloat16 values exactly into float32 and do float32 math; they differ
    # only in the order of the sums (the kernel's softmax is online, block by block).
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


@needs_c_kernel
@pytest.mark.parametrize("num_heads, num_kv_heads", [(9, 3), (16, 1)])
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("sliding_window", [None, 300])
@pytest.mark.parametrize("seq_lens", [[1000], [20, 700], [130]])
def test_c_kernel_splits_a_few_long_requests_over_the_threads_and_merges_them(
    num_heads, num_kv_heads, block_size, sliding_window, seq_lens
):
    """Fewer (request, KV head) tasks than twice the threads: each task's tokens are cut into
    stretches of whole blocks (two or four here; two requests of three KV heads are tasks
    enough and stay whole), attended on both threads and merged by their softmax maxima and
    sums. Under the sliding window the stretches start inside a block; with 64-token blocks a
    stretch can be empty (the short request beside a long one cut in two, or the window's
    last 300 of 1000 tokens cut in four)."""
    query, kv_cache, metadata = _paged_batch(
        seq_lens, num_heads, num_kv_heads, 64, block_size=block_size
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = attention_cpu.paged_decode_attention_cpu(
            query, kv_cache, metadata.block_table, metadata.seq_lens, 0.125, sliding_window
        )
    finally:
        torch.set_num_threads(threads)
    assert out is not None
    reference = _dense_attention(query, kv_cache, metadata, 0.125, sliding_window)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sliding_window", [None, 7])
def test_torch_reference_on_a_bf16_cache_uses_torch_alone_and_matches_dense_attention(
    monkeypatch, sliding_window
):
    def no_c_kernel(*args, **kwargs):
        raise AssertionError("the torch reference called the C kernel")

    monkeypatch.setattr(attention_cpu, "_library", no_c_kernel)
    monkeypatch.setattr(attention, "paged_decode_attention_cpu", no_c_kernel)
    query, kv_cache, metadata = _paged_batch(MIXED_SEQ_LENS, 8, 2, 64, MIXED_QUERY_LENS)
    out = attention.paged_attention_torch(query, kv_cache, metadata, 0.125, sliding_window)
    assert out.dtype == torch.float32
    expected = _dense_attention(query, kv_cache, metadata, 0.125, sliding_window)
    # The same bfloat16 inputs on both sides: float32 against float64 math.
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(params=["amx", "vector"])
def prefill_form(request):
    """The prefill kernel's AMX-tile form (skipped where the build or the CPU has none) or its
    vector form (chunks of keys with AVX-512 or AVX2, else key by key), chosen for the test."""
    tiles = attention_cpu.use_amx(request.param == "amx")
    try:
        if request.param == "amx" and not tiles:
            pytest.skip("this build has no AMX tiles on this CPU")
        yield request.param
    finally:
        attention_cpu.use_amx(True)


@needs_c_kernel
@pytest.mark.parametrize(
    "num_heads, num_kv_heads, head_dim",
    [(4, 4, 64), (9, 3, 64), (8, 2, 128), (16, 1, 64), (6, 2, 32)],
)
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, attention.FP8_E4M3])
def test_prefill_kernel_matches_the_torch_reference_on_a_mixed_batch(
    num_heads, num_kv_heads, head_dim, cache_dtype, prefill_form
):
    # Decodes, chunks in the middle of their requests (on and off block boundaries), fresh
    # prompts (q_len == seq_len) of two tokens, within a block and across many, and a long one.
    query_lens = [1, 1, 5, 16, 12, 2, 37, 250, 700]
    seq_lens = [9, 300, 30, 48, 12, 2, 37, 250, 700]
    query, kv_cache, metadata = _paged_batch(
        seq_lens, num_heads, num_kv_heads, head_dim, query_lens, cache_dtype
    )
    scale = head_dim**-0.5
    k_scale, v_scale = torch.tensor(0.7), torch.tensor(1.3)
    out = attention_cpu.paged_prefill_attention_cpu(
        query, kv_cache, metadata.block_table, metadata.query_start_loc, metadata.seq_lens,
        scale, k_scale=k_scale, v_scale=v_scale,
    )  # fmt: skip
    assert out is not None
    reference = attention.paged_attention_torch(
        query, kv_cache, metadata, scale, k_scale=k_scale, v_scale=v_scale
    )
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


@needs_c_kernel
def test_prefill_kernel_over_contexts_longer_than_one_packing_round(prefill_form):
    # The AMX form packs each request's keys and values once a call, in rounds of at most 16
    # MiB (8 KiB a chunk of 32 keys and a KV head here): two 9000-token contexts of 4 KV heads
    # take two rounds, the short request joining the second.
    query_lens, seq_lens = [16, 5, 16], [9000, 300, 9000]
    query, kv_cache, metadata = _paged_batch(seq_lens, 8, 4, 64, query_lens)
    scale = 64**-0.5
    out = attention_cpu.paged_prefill_attention_cpu(
        query, kv_cache, metadata.block_table, metadata.query_start_loc, metadata.seq_lens, scale
    )
    assert out is not None
    reference = attention.paged_attention_torch(query, kv_cache, metadata, scale)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


@needs_c_kernel
@pytest.mark.parametrize(
    "num_heads, num_kv_heads, head_dim",
    # 40: the rows' last 8 channels rounded one by one after the vectors
    [(9, 3, 64), (8, 2, 128), (6, 2, 32), (4, 2, 40)],
)
def test_prefill_kernel_writes_bfloat16_as_torch_casts_its_float32_output(
    num_heads, num_kv_heads, head_dim, prefill_form
):
    query_lens, seq_lens = [1, 5, 37, 250], [9, 30, 37, 250]
    query, kv_cache, metadata = _paged_batch(
        seq_lens, num_heads, num_kv_heads, head_dim, query_lens
    )
    args = (query, kv_cache, metadata.block_table, metadata.query_start_loc, metadata.seq_lens)
    scale = head_dim**-0.5
    out32 = attention_cpu.paged_prefill_attention_cpu(*args, scale)
    out16 = attention_cpu.paged_prefill_attention_cpu(*args, scale, out_dtype=torch.bfloat16)
    assert out32 is not None and out16 is not None and out16.dtype == torch.bfloat16
    assert torch.equal(out16.view(torch.int16), out32.to(torch.bfloat16).view(torch.int16))
    # through the dispatch too, and the paths that convert afterwards (decodes alone)
    dispatched = attention.paged_attention(
        query, kv_cache, metadata, scale, out_dtype=torch.bfloat16
    )
    assert torch.equal(dispatched.view(torch.int16), out16.view(torch.int16))
    decodes, _, decode_metadata = _paged_batch([9, 40], num_heads, num_kv_heads, head_dim)
    decoded = attention.paged_attention(decodes, kv_cache, decode_metadata, scale)
    decoded16 = attention.paged_attention(
        decodes, kv_cache, decode_metadata, scale, out_dtype=torch.bfloat16
    )
    assert torch.equal(decoded16.view(torch.int16), decoded.to(torch.bfloat16).view(torch.int16))


def test_paged_attention_on_cpu_sends_batches_to_the_c_kernels_and_the_rest_to_torch(
    monkeypatch,
):
    """Checked through the results: stand-ins for the C kernels mark the rows they computed
    (7: the decode kernel, 5: the prefill kernel)."""
    calls = []

    def decode_kernel(query, kv_cache, block_table, seq_lens, scale, sliding_window, **scales):
        calls.append(("decode", tuple(query.shape), block_table.shape[0], seq_lens.tolist()))
        return torch.full_like(query, 7.0)

    def prefill_kernel(query, kv_cache, block_table, query_start_loc, seq_lens, scale, **scales):
        calls.append(("prefill", tuple(query.shape), query_start_loc.tolist(), seq_lens.tolist()))
        return torch.full_like(query, 5.0)

    monkeypatch.setattr(attention, "paged_decode_attention_cpu", decode_kernel)
    monkeypatch.setattr(attention, "paged_prefill_attention_cpu", prefill_kernel)

    def run(query_lens, seq_lens, cache_dtype, query_dtype=torch.float32, soft_cap=None, sw=None):
        calls.clear()
        query, kv_cache, metadata = _paged_batch(
            seq_lens, 4, 2, 32, query_lens, cache_dtype, query_dtype
        )
        args = (query, kv_cache, metadata, 0.125, sw, soft_cap)
        return (
            attention.paged_attention(*args),
            attention.paged_attention_torch(*args),
            metadata.num_decodes,
        )

    # bfloat16 cache, float32 queries, prefill chunks: the whole batch in one prefill call.
    out, _, _ = run(MIXED_QUERY_LENS, MIXED_SEQ_LENS, torch.bfloat16)
    starts = [0, 1, 2, 7, 19]
    assert calls == [("prefill", (19, 4, 32), starts, MIXED_SEQ_LENS)]
    assert out.eq(5.0).all()
    # Decodes only: the decode kernel's output is the batch's.
    out, _, _ = run([1, 1, 1], [5, 17, 33], torch.bfloat16)
    assert [call[0] for call in calls] == ["decode"] and out.eq(7.0).all()
    # A context beyond PREFILL_KERNEL_MAX_LEN without AMX tiles, or a sliding window shorter
    # than a context: the decode rows from C, the chunks from the reference.
    long_seq_lens = [*MIXED_SEQ_LENS[:3], attention.PREFILL_KERNEL_MAX_LEN + 1]
    tiles = attention_cpu.use_amx(False)
    try:
        for seq_lens, sliding_window in ((long_seq_lens, None), (MIXED_SEQ_LENS, 20)):
            out, reference, num_decodes = run(
                [*MIXED_QUERY_LENS[:3], 12], seq_lens, torch.bfloat16, sw=sliding_window
            )
            decode_call = ("decode", (num_decodes, 4, 32), num_decodes, seq_lens[:num_decodes])
            assert calls == [decode_call]
            assert out[:num_decodes].eq(7.0).all()
            assert torch.equal(out[num_decodes:], reference[num_decodes:])
    finally:
        tiles = attention_cpu.use_amx(True)
    # With AMX tiles the kernel takes every context.
    if tiles:
        out, _, _ = run([*MIXED_QUERY_LENS[:3], 12], long_seq_lens, torch.bfloat16)
        assert calls == [("prefill", (19, 4, 32), [0, 1, 2, 7, 19], long_seq_lens)]
        assert out.eq(5.0).all()
    # The reference alone: a float32 cache, bfloat16 queries, a soft cap.
    f32, bf16 = torch.float32, torch.bfloat16
    for case in [
        (MIXED_QUERY_LENS, MIXED_SEQ_LENS, f32, f32, None),
        (MIXED_QUERY_LENS, MIXED_SEQ_LENS, bf16, bf16, None),
        (MIXED_QUERY_LENS, MIXED_SEQ_LENS, bf16, f32, 30.0),
    ]:
        out, reference, _ = run(*case)
        assert calls == [], case
        assert torch.equal(out, reference)


def test_paged_attention_falls_back_to_the_reference_where_the_c_kernels_decline(monkeypatch):
    calls = []

    def declining(*args, **kwargs):  # returns None, as the kernels do where they cannot serve
        calls.append(args[0].shape)

    monkeypatch.setattr(attention, "paged_decode_attention_cpu", declining)
    monkeypatch.setattr(attention, "paged_prefill_attention_cpu", declining)
    query, kv_cache, metadata = _paged_batch(MIXED_SEQ_LENS, 4, 2, 32, MIXED_QUERY_LENS)
    out = attention.paged_attention(query, kv_cache, metadata, 0.125)
    assert len(calls) == 2  # the prefill kernel for the batch, then the decode one
    assert torch.equal(out, attention.paged_attention_torch(query, kv_cache, metadata, 0.125))


def _assert_the_reference_serves(query, kv_cache, metadata) -> None:
    """`paged_attention` gives exactly the torch reference's output (the C kernel declined)."""
    torch.testing.assert_close(
        attention.paged_attention(query, kv_cache, metadata, 0.125),
        attention.paged_attention_torch(query, kv_cache, metadata, 0.125),
        rtol=0,
        atol=0,
    )


@needs_c_kernel
def test_c_kernel_declines_more_than_16_query_heads_per_kv_head():
    query, kv_cache, metadata = _paged_batch([9, 3], 34, 2, 64)  # 17 query heads per KV head
    out = attention_cpu.paged_decode_attention_cpu(
        query, kv_cache, metadata.block_table, metadata.seq_lens, 0.125, None
    )
    assert out is None
    _assert_the_reference_serves(query, kv_cache, metadata)


def test_without_a_compiler_the_c_kernel_declines_and_the_reference_serves(monkeypatch):
    monkeypatch.setattr(cpu_library.shutil, "which", lambda name: None)
    cpu_library.clear_caches()
    try:
        assert not attention_cpu.available()
        query, kv_cache, metadata = _paged_batch([9, 3], 4, 2, 64)
        out = attention_cpu.paged_decode_attention_cpu(
            query, kv_cache, metadata.block_table, metadata.seq_lens, 0.125, None
        )
        assert out is None
        _assert_the_reference_serves(query, kv_cache, metadata)
    finally:
        cpu_library.clear_caches()


_GOMP_CHECK = """
import json

import torch

from ember.kernels import attention_cpu

def runtimes():
    with open("/proc/self/maps") as maps:
        return {line.split()[-1] for line in maps if "libgomp" in line}

before = runtimes()
assert attention_cpu._library() is not None
print(json.dumps([sorted(before), sorted(runtimes())]))
"""


@needs_c_kernel
def test_openmp_kernels_share_torchs_runtime():
    """The OpenMP kernels link `libgomp.so.1`, and the loader gives them torch's: loading them
    into a process that has torch maps no OpenMP runtime of their own (one thread pool, not two
    competing for the cores). Checked in a fresh process, where the kernels are not loaded yet
    and no other package (sentencepiece bundles its own libgomp) has been imported."""
    import json
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", _GOMP_CHECK],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    before, after = json.loads(result.stdout.strip().splitlines()[-1])
    assert after == before and len(after) == 1, (before, after)
