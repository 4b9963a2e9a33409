"""Triton kernels for the paged KV cache (CUDA): the cache write through the slot mapping, and
one attention launch serving decodes and prefill chunks together.

Called through `ember.kernels.attention`, which dispatches here for CUDA tensors; the torch
references in `attention.py` are the oracle in `tests/test_triton_kernels.py`.

The attention grid is (query tiles, KV heads). A tile is BLOCK_Q consecutive query tokens of
one request times the QUERIES_PER_KV query heads sharing one KV head, BLOCK_M rows in all:

    BLOCK_M = 16, QUERIES_PER_KV = 4 -> BLOCK_Q = 4 tokens x 4 heads per tile
    request r owns tiles query_start_loc[r] // BLOCK_Q + r ..., at least cdiv(q_len, BLOCK_Q)

so a program finds its request by a binary search over `query_start_loc` on the device, and the
grid size (num_tokens // BLOCK_Q + num_reqs) needs nothing from the host; spare tiles exit.
Each program walks the request's keys TILE_N at a time (any block size), with an online
softmax, causal and sliding-window masks and optional logit soft-capping.

An e4m3 cache (CACHE_FP8) is passed as its uint8 view and coded by hand (`_to_e4m3`,
`_from_e4m3`), bit for bit torch's conversions, rather than by Triton's float8 casts: the
interpreter's float32 -> float8 cast truncates wrongly (1.98 -> 1.0), and integer code runs on
every GPU. The keys and values are widened in registers, one tile at a time; k_scale joins the
scores' scale and v_scale the output's, read from device scalars (CUDA graphs replay them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ember.kernels.attention import AttentionMetadata

_TILE_N = 32  # keys per inner step; a multiple of 16 for tl.dot


@triton.jit
def _to_e4m3(x):
    """float32 -> e4m3 codes (int32 0..255): clamped to +-448, rounded to nearest even, NaN
    to 0x7f with its sign (torch's `x.clamp(-448, 448).to(torch.float8_e4m3fn)`)."""
    bits = x.to(tl.int32, bitcast=True)
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    sign = (bits >> 24) & 0x80
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    magnitude = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    # At least 2^-6 (an e4m3 normal): the float32 mantissa rounded to 3 bits, the exponent
    # rebiased from 127 to 7; a carry out of the mantissa moves into the exponent.
    rounded = magnitude + 0x7FFFF + ((magnitude >> 20) & 1)
    normal = (rounded >> 20) - (120 << 3)
    # Below: multiples of 2^-9, rounded to nearest even by adding and taking away 2^23.
    absolute = magnitude.to(tl.float32, bitcast=True)
    subnormal = ((absolute * 512.0 + 8388608.0) - 8388608.0).to(tl.int32)
    code = tl.where(is_nan, 0x7F, tl.where(absolute < 0.015625, subnormal, normal))
    return code | sign


@triton.jit
def _from_e4m3(code):
    """e4m3 codes (uint8) -> float32, exactly (see `csrc/float8.h`)."""
    code = code.to(tl.int32)
    magnitude = code & 0x7F
    value = ((magnitude << 20) + (120 << 23)).to(tl.float32, bitcast=True)
    value = tl.where(magnitude < 8, magnitude.to(tl.float32) * 0.001953125, value)
    value = tl.where(magnitude == 0x7F, float("nan"), value)
    sign = (code & 0x80) << 24
    return (value.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _write_kv_cache_kernel(
    key_ptr,
    value_ptr,
    kv_cache_ptr,
    slot_mapping_ptr,
    k_scale_ptr,
    v_scale_ptr,
    num_kv_heads,
    stride_key_token,
    stride_key_head,
    stride_value_token,
    stride_value_head,
    stride_cache_side,
    stride_cache_slot,
    stride_cache_head,
    HEAD_DIM: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
    CACHE_FP8: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # a padding token: nothing to store
        return
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    dims = tl.arange(0, BLOCK_DIM)[None, :]
    mask = (heads < num_kv_heads) & (dims < HEAD_DIM)
    target = kv_cache_ptr + slot * stride_cache_slot + heads * stride_cache_head + dims
    key = tl.load(key_ptr + token * stride_key_token + heads * stride_key_head + dims, mask=mask)
    value = tl.load(
        value_ptr + token * stride_value_token + heads * stride_value_head + dims, mask=mask
    )
    if CACHE_FP8:  # the cache is its uint8 view; divided correctly rounded, as torch does
        key = _to_e4m3(tl.div_rn(key.to(tl.float32), tl.load(k_scale_ptr)))
        value = _to_e4m3(tl.div_rn(value.to(tl.float32), tl.load(v_scale_ptr)))
    tl.store(target, key.to(kv_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(target + stride_cache_side, value.to(kv_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache_triton(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    all_slots_valid: bool = False,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Same contract as `ember.kernels.attention.write_kv_cache_torch`, without a host sync (the
    kernel skips -1 slots itself, so `all_slots_valid` changes nothing)."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    cache, k_scale, v_scale, fp8 = _cache_and_scales(kv_cache, k_scale, v_scale)
    _write_kv_cache_kernel[(num_tokens,)](
        key,
        value,
        cache,
        slot_mapping,
        k_scale,
        v_scale,
        num_kv_heads,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(2),
        kv_cache.stride(3),
        HEAD_DIM=head_dim,
        BLOCK_HEADS=triton.next_power_of_2(num_kv_heads),
        BLOCK_DIM=triton.next_power_of_2(head_dim),
        CACHE_FP8=fp8,
    )


def _cache_and_scales(
    kv_cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """(the cache as the kernels take it, k_scale, v_scale, whether it is e4m3): an e4m3
    cache as its uint8 view with its scales (None: a 1.0 made here); any other cache as it is,
    with itself in place of the scales the kernels then never read."""
    if kv_cache.dtype != torch.float8_e4m3fn:
        return kv_cache, kv_cache, kv_cache, False
    if k_scale is None or v_scale is None:
        one = torch.ones((), dtype=torch.float32, device=kv_cache.device)
        k_scale = one if k_scale is None else k_scale
        v_scale = one if v_scale is None else v_scale
    return kv_cache.view(torch.uint8), k_scale, v_scale, True


@triton.jit
def _find_request(query_start_loc_ptr, num_reqs, tile, BLOCK_Q: tl.constexpr):
    """The request whose first tile (query_start_loc[r] // BLOCK_Q + r) is the last <= tile."""
    low = 0
    high = num_reqs
    while low < high:
        middle = (low + high) // 2
        first_tile = tl.load(query_start_loc_ptr + middle) // BLOCK_Q + middle
        if first_tile <= tile:
            low = middle + 1
        else:
            high = middle
    return low - 1


@triton.jit
def _paged_attention_kernel(
    out_ptr,
    query_ptr,
    kv_cache_ptr,
    block_table_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    k_scale_ptr,
    v_scale_ptr,
    num_reqs,
    scale,
    soft_cap,
    stride_q_token,
    stride_q_head,
    stride_out_token,
    stride_out_head,
    stride_cache_side,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    stride_block_table,
    QUERIES_PER_KV: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr,
    USE_SOFT_CAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FLOAT32: tl.constexpr,
    CACHE_FP8: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    req = _find_request(query_start_loc_ptr, num_reqs, tile, BLOCK_Q)
    query_start = tl.load(query_start_loc_ptr + req)
    query_len = tl.load(query_start_loc_ptr + req + 1) - query_start
    first_query = (tile - (query_start // BLOCK_Q + req)) * BLOCK_Q
    if first_query >= query_len:  # a spare tile
        return
    seq_len = tl.load(seq_lens_ptr + req)
    context_len = seq_len - query_len

    rows = tl.arange(0, BLOCK_M)
    query_index = first_query + rows // QUERIES_PER_KV  # within this request's chunk
    head = kv_head * QUERIES_PER_KV + rows % QUERIES_PER_KV
    row_valid = (rows < BLOCK_Q * QUERIES_PER_KV) & (query_index < query_len)
    dims = tl.arange(0, BLOCK_DIM)
    dim_valid = dims < HEAD_DIM
    token = (query_start + query_index).to(tl.int64)
    q_mask = row_valid[:, None] & dim_valid[None, :]
    query = tl.load(
        query_ptr + token[:, None] * stride_q_token + head[:, None] * stride_q_head + dims[None, :],
        mask=q_mask,
        other=0.0,
    )
    if DOT_IN_FLOAT32:
        query = query.to(tl.float32)
    query_pos = context_len + query_index  # absolute position of each row's token
    scores_scale = scale
    if CACHE_FP8:  # keys count as stored * k_scale
        scores_scale = scale * tl.load(k_scale_ptr)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DIM], tl.float32)
    kv_end = context_len + tl.minimum(first_query + BLOCK_Q, query_len)
    kv_begin = context_len * 0
    if SLIDING_WINDOW > 0:
        kv_begin = tl.maximum(kv_begin, context_len + first_query - SLIDING_WINDOW + 1)
    block_table_row = block_table_ptr + req.to(tl.int64) * stride_block_table
    for key_tile in range(kv_begin // TILE_N, tl.cdiv(kv_end, TILE_N)):
        key_pos = key_tile * TILE_N + tl.arange(0, TILE_N)
        key_valid = key_pos < kv_end
        block = tl.load(block_table_row + key_pos // BLOCK_SIZE, mask=key_valid, other=0)
        slot_offset = (
            block.to(tl.int64) * stride_cache_block
            + (key_pos % BLOCK_SIZE) * stride_cache_slot
            + kv_head * stride_cache_head
        )
        key_t = tl.load(
            kv_cache_ptr + slot_offset[None, :] + dims[:, None],
            mask=dim_valid[:, None] & key_valid[None, :],
            other=0,
        )  # [BLOCK_DIM, TILE_N]
        value = tl.load(
            kv_cache_ptr + stride_cache_side + slot_offset[:, None] + dims[None, :],
            mask=key_valid[:, None] & dim_valid[None, :],
            other=0,
        )  # [TILE_N, BLOCK_DIM]
        if CACHE_FP8:  # e4m3 codes, exact in the query's dtype (bfloat16, float16, float32)
            key_t = _from_e4m3(key_t).to(query.dtype)
            value = _from_e4m3(value).to(query.dtype)
        if DOT_IN_FLOAT32:
            key_t = key_t.to(tl.float32)
            value = value.to(tl.float32)
        scores = tl.dot(query, key_t, input_precision=DOT_PRECISION) * scores_scale
        if USE_SOFT_CAP:
            capped = scores / soft_cap
            scores = soft_cap * (2.0 / (1.0 + tl.exp(-2.0 * capped)) - 1.0)  # cap * tanh
        allowed = key_valid[None, :] & (key_pos[None, :] <= query_pos[:, None])
        if SLIDING_WINDOW > 0:
            allowed = allowed & (key_pos[None, :] > query_pos[:, None] - SLIDING_WINDOW)
        scores = tl.where(allowed, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no key yet
        probs = tl.exp(scores - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(probs, axis=1)
        acc = acc * alpha[:, None] + tl.dot(
            probs.to(value.dtype), value, input_precision=DOT_PRECISION
        )
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if CACHE_FP8:  # values count as stored * v_scale
        out = out * tl.load(v_scale_ptr)
    tl.store(
        out_ptr
        + token[:, None] * stride_out_token
        + head[:, None] * stride_out_head
        + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=q_mask,
    )


def attention_tile_rows(num_query_heads: int, num_kv_heads: int, max_query_len: int) -> int:
    """BLOCK_M: rows (tokens x query heads of one KV head) one program computes. Decode-only
    batches take 16 (the smallest tl.dot tile); batches with prefill chunks take 64."""
    queries_per_kv = num_query_heads // num_kv_heads
    return max(16 if max_query_len == 1 else 64, triton.next_power_of_2(queries_per_kv))


def paged_attention_triton(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Same contract as `ember.kernels.attention.paged_attention_torch`, in one launch, reading
    only device tensors of `metadata` (and `max_query_len`, a host int); the output cast to
    `out_dtype` where one is given, as `paged_attention` returns it."""
    num_tokens, num_query_heads, head_dim = query.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    queries_per_kv = num_query_heads // num_kv_heads
    num_reqs = metadata.query_start_loc.shape[0] - 1
    block_m = attention_tile_rows(num_query_heads, num_kv_heads, metadata.max_query_len)
    block_q = block_m // queries_per_kv
    output = torch.empty_like(query, memory_format=torch.contiguous_format)
    if num_tokens == 0 or num_reqs == 0:
        return output if out_dtype is None else output.to(out_dtype)
    if query.stride(-1) != 1:
        query = query.contiguous()
    cache, k_scale, v_scale, fp8 = _cache_and_scales(kv_cache, k_scale, v_scale)
    grid = (num_tokens // block_q + num_reqs, num_kv_heads)
    # Triton's interpreter (TRITON_INTERPRET=1, the CPU tests) stores bfloat16 as uint16 and
    # its tl.dot multiplies those integers: there the dot operands are widened to float32.
    interpreted = triton.knobs.runtime.interpret
    _paged_attention_kernel[grid](
        output,
        query,
        cache,
        metadata.block_table,
        metadata.seq_lens,
        metadata.query_start_loc,
        k_scale,
        v_scale,
        num_reqs,
        scale,
        logits_soft_cap or 1.0,
        query.stride(0),
        query.stride(1),
        output.stride(0),
        output.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        metadata.block_table.stride(0),
        QUERIES_PER_KV=queries_per_kv,
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        HEAD_DIM=head_dim,
        BLOCK_DIM=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_SIZE=block_size,
        TILE_N=_TILE_N,
        SLIDING_WINDOW=sliding_window or 0,
        USE_SOFT_CAP=logits_soft_cap is not None,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 or interpreted else "tf32",
        DOT_IN_FLOAT32=interpreted,
        CACHE_FP8=fp8,
    )
    return output if out_dtype is None else output.to(out_dtype)
