"""Attention over a paged KV cache, for a flat batch mixing decode tokens and prefill chunks.

Called by `ember.workers.layers.attention.Attention`. The KV cache of one layer is a tensor
`[2, num_blocks, block_size, num_kv_heads, head_dim]` (keys, then values). A request's tokens
live in the blocks its block table lists:

    request r, block_size 4, 10 tokens in the cache:
      block_table[r] = [7, 2, 9]      slots: 7*4+0 .. 7*4+3 | 2*4+0 .. 2*4+3 | 9*4+0, 9*4+1

New keys and values are written through `slot_mapping` (one slot per scheduled token, -1 for a
padding token that must not be written). Requests with a single scheduled token (decodes) come
first in the batch and are computed together; each longer chunk (prefill) is computed on its own.

An FP8 cache (`kv_cache_dtype="fp8"`, torch.float8_e4m3fn, one byte a value) stores each key as
key / k_scale and each value as value / v_scale, clamped to +-448 and rounded to nearest e4m3,
as vLLM's `reshape_and_cache_flash` does; attention reads the e4m3 values where they lie and
multiplies them by the scale as it computes (`k_scale`, `v_scale`: float32 0-dim tensors on the
cache's device, read there, so a CUDA graph sees a scale set after its capture).

`paged_attention` is the one place that picks a kernel: CUDA tensors go to the Triton kernels of
`attention_triton.py` (imported only then); on CPU the decodes of a bfloat16 or e4m3 cache under
float32 queries go to the C kernel of `attention_cpu.py`; everything else goes to the
references here (`*_torch`), which use torch operators only, for every cache dtype, and are
the tests' oracles.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ember.kernels.attention_cpu import (
    paged_decode_attention_cpu,
    paged_prefill_attention_cpu,
    prefill_tiles_serve,
)

FP8_E4M3 = torch.float8_e4m3fn
FP8_E4M3_MAX = 448.0  # the largest finite e4m3fn value


def to_fp8_e4m3(x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x / scale in e4m3: divided in float32, clamped to +-448 (a NaN stays NaN), rounded to
    nearest even. What an FP8 cache stores of a key or value (vLLM's scaled conversion)."""
    x = x.float()
    if scale is not None:
        x = x / scale
    return x.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_E4M3)


# Contexts up to which a batch with prefill chunks takes the C kernel
# (`paged_prefill_attention_cpu`: one call, no gathered copies) in its vector forms; beyond,
# each chunk takes torch's SDPA, whose blocked matmuls win there (one prompt of 1024 tokens:
# 8.8 ms against 10.4 for the AVX-512 form). Where the kernel multiplies with AMX tiles
# (`attention_cpu.prefill_tiles_serve`) it serves every context.
PREFILL_KERNEL_MAX_LEN = 512


@dataclass(slots=True)
class AttentionMetadata:
    """Where each request's tokens sit in the flat batch and in the paged KV cache.

    The batch holds `num_decodes` single-token requests first, then prefill chunks:
        query_start_loc = [0, 1, 2, 7, 12]   -> two decodes, then chunks of 5 and 5 tokens
        seq_lens        = [40, 9, 5, 20]     -> tokens in the cache after this step, per request
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64, -1 = do not write
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32
    seq_lens: torch.Tensor  # [num_reqs] int32
    block_table: torch.Tensor  # [num_reqs, max_blocks_per_req] int32
    num_decodes: int
    max_query_len: int
    max_seq_len: int
    # Host copies, so that the reference path never reads a device tensor back.
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    all_slots_valid: bool = False  # True: no -1 in slot_mapping (skips a check per layer)
    # Tensors derived from the above that every layer of a step needs (the decode mask):
    # computed by the first layer, reused by the others.
    derived: dict = field(default_factory=dict)

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens_cpu)


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    all_slots_valid: bool = False,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Store `key`/`value` [T, Hkv, D] into the slots of `kv_cache` named by `slot_mapping` [T]
    (-1: skip; `all_slots_valid` says there is none). An e4m3 cache stores `to_fp8_e4m3` of
    them by `k_scale` / `v_scale` (None: 1.0); other caches ignore the scales."""
    if kv_cache.device.type == "cuda":
        from ember.kernels.attention_triton import write_kv_cache_triton

        write_kv_cache_triton(
            key, value, kv_cache, slot_mapping, all_slots_valid, k_scale=k_scale, v_scale=v_scale
        )
        return
    write_kv_cache_torch(
        key, value, kv_cache, slot_mapping, all_slots_valid, k_scale=k_scale, v_scale=v_scale
    )


def write_kv_cache_torch(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    all_slots_valid: bool = False,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    if not all_slots_valid:
        valid = slot_mapping >= 0
        if not bool(valid.all()):
            key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
    flat = kv_cache.view(2, num_blocks * block_size, num_kv_heads, head_dim)
    if kv_cache.dtype == FP8_E4M3:
        # torch has no index_copy_ for float8 on CPU: the same bytes through a uint8 view
        flat = flat.view(torch.uint8)
        key = to_fp8_e4m3(key, k_scale).view(torch.uint8)
        value = to_fp8_e4m3(value, v_scale).view(torch.uint8)
    flat[0].index_copy_(0, slot_mapping, key.to(flat.dtype))
    flat[1].index_copy_(0, slot_mapping, value.to(flat.dtype))


def paged_attention(
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
    """Causal attention of `query` [T, Hq, D] over the cached keys/values of each request,
    in `out_dtype` (None: the query's; the CPU prefill kernel writes bfloat16 itself, the
    other paths convert their output as a cast would).

    The keys and values of this step must already be in `kv_cache` (see `write_kv_cache`).
    Query token j of a chunk of length q_len sits at position seq_len - q_len + j and sees the
    cached positions p with p <= its position (and p > position - sliding_window if set).
    An e4m3 cache's keys count as stored * k_scale and its values as stored * v_scale (None:
    1.0); other caches ignore the scales.

    Dispatch: CUDA tensors -> `paged_attention_triton`, the whole batch in one launch. On CPU, a
    bfloat16 or e4m3 cache under float32 queries without a soft cap -> a batch with prefill
    chunks, contexts up to `PREFILL_KERNEL_MAX_LEN` (any, where AMX tiles serve) and no
    sliding window in effect:
    `paged_prefill_attention_cpu`, the whole batch in one call; otherwise
    `paged_decode_attention_cpu` for the decode rows (where a kernel declines: no compiler, a
    shape beyond it, the reference serves); everything else, and the prefill chunks beside
    C-computed decodes -> the torch reference.
    """
    if query.device.type == "cuda":
        from ember.kernels.attention_triton import paged_attention_triton

        return paged_attention_triton(
            query,
            kv_cache,
            metadata,
            scale,
            sliding_window,
            logits_soft_cap,
            k_scale=k_scale,
            v_scale=v_scale,
            out_dtype=out_dtype,
        )
    num_decodes = metadata.num_decodes
    kv_scales = _kv_scales(kv_cache, k_scale, v_scale)
    c_kernels_apply = (
        kv_cache.dtype in (torch.bfloat16, FP8_E4M3)
        and query.dtype == torch.float32
        and not logits_soft_cap  # the C kernels have no soft cap
    )
    if (
        c_kernels_apply
        and num_decodes < metadata.num_reqs
        and (metadata.max_seq_len <= PREFILL_KERNEL_MAX_LEN or prefill_tiles_serve(query.shape[-1]))
        and (sliding_window is None or metadata.max_seq_len <= sliding_window)
        and query.shape[0] == metadata.query_start_loc_cpu[-1]
    ):
        output = paged_prefill_attention_cpu(
            query,
            kv_cache,
            metadata.block_table,
            metadata.query_start_loc,
            metadata.seq_lens,
            scale,
            k_scale=k_scale,
            v_scale=v_scale,
            out_dtype=out_dtype or query.dtype,
        )
        if output is not None:
            return output
    if num_decodes > 0 and c_kernels_apply:
        decodes = paged_decode_attention_cpu(
            query[:num_decodes],
            kv_cache,
            metadata.block_table[:num_decodes],
            metadata.seq_lens[:num_decodes],
            scale,
            sliding_window,
            k_scale=k_scale,
            v_scale=v_scale,
        )
        if decodes is not None:  # else: no compiler, or a shape beyond the kernel
            output = _beside_chunks(
                decodes,
                query,
                kv_cache,
                metadata,
                scale,
                sliding_window,
                logits_soft_cap,
                kv_scales,
            )
            return output if out_dtype is None else output.to(out_dtype)
    output = paged_attention_torch(
        query,
        kv_cache,
        metadata,
        scale,
        sliding_window,
        logits_soft_cap,
        k_scale=k_scale,
        v_scale=v_scale,
    )
    return output if out_dtype is None else output.to(out_dtype)


def paged_attention_torch(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The reference of `paged_attention`, in torch operators only. A cache of another dtype than
    `query` (bfloat16 or e4m3 under float32 queries) is converted to the query's dtype as it is
    read (only the blocks of the step's requests, gathered; an e4m3 cache's then multiplied by
    its scales), so the math runs in the query's dtype."""
    kv_scales = _kv_scales(kv_cache, k_scale, v_scale)
    decodes = None
    num_decodes = metadata.num_decodes
    if num_decodes > 0:
        decodes = _decode_attention(
            query[:num_decodes],
            kv_cache,
            metadata,
            scale,
            sliding_window,
            logits_soft_cap,
            kv_scales,
        )
    return _beside_chunks(
        decodes, query, kv_cache, metadata, scale, sliding_window, logits_soft_cap, kv_scales
    )


def _kv_scales(
    kv_cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
    """The scales an e4m3 cache's values are multiplied by as they are read; None for other
    caches, whose values are what they hold."""
    if kv_cache.dtype != FP8_E4M3:
        return None
    return k_scale, v_scale


def _beside_chunks(
    decodes: torch.Tensor | None,
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    sliding_window: int | None,
    logits_soft_cap: float | None,
    kv_scales: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """The batch's output: `decodes` (the rows of the decodes, None if there is none) followed
    by the torch reference's attention of each prefill chunk."""
    num_decodes = metadata.num_decodes
    if decodes is not None and num_decodes == metadata.num_reqs:
        return decodes  # decodes only: no chunk to place beside them
    output = torch.empty_like(query)
    if decodes is not None:
        output[:num_decodes] = decodes
    starts = metadata.query_start_loc_cpu
    for req in range(num_decodes, metadata.num_reqs):
        start, end = starts[req], starts[req + 1]
        output[start:end] = _chunk_attention(
            query[start:end],
            kv_cache,
            metadata.block_table[req],
            metadata.seq_lens_cpu[req],
            scale,
            sliding_window,
            logits_soft_cap,
            kv_scales,
        )
    return output


def _gather_kv(
    kv_cache: torch.Tensor,
    block_ids: torch.Tensor,
    num_tokens: int,
    dtype: torch.dtype,
    kv_scales: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [..., num_tokens, Hkv, D] of the blocks `block_ids` [..., n], in
    `dtype`; with `kv_scales` (an e4m3 cache) times their scales."""
    # index_select, not kv_cache[:, block_ids]: the same copy with a quarter of the overhead
    blocks = kv_cache.index_select(1, block_ids.reshape(-1))
    blocks = blocks.view(2, *block_ids.shape, *kv_cache.shape[2:])  # [2, ..., n, bs, Hkv, D]
    blocks = blocks.flatten(-4, -3)[..., :num_tokens, :, :]
    key, value = blocks[0], blocks[1]
    if kv_scales is not None:  # dequantized in float32, then rounded once to `dtype`
        k_scale, v_scale = kv_scales
        key = key.float() if k_scale is None else key.float() * k_scale
        value = value.float() if v_scale is None else value.float() * v_scale
    return key.to(dtype), value.to(dtype)


def _attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    logits_soft_cap: float | None,
    is_causal: bool = False,
) -> torch.Tensor:
    """query [B, Hq, Q, D], key/value [B, Hkv, K, D], mask [B or 1, 1, Q, K] (True = attend)."""
    if logits_soft_cap is None:
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, scale=scale, is_causal=is_causal, enable_gqa=True
        )
    group = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(group, dim=1)
    value = value.repeat_interleave(group, dim=1)
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    scores = torch.tanh(scores / logits_soft_cap) * logits_soft_cap
    if is_causal:
        q_len, k_len = scores.shape[-2:]
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device)
        mask = mask.tril(k_len - q_len)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1), value.float()).to(query.dtype)


def _decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    sliding_window: int | None,
    logits_soft_cap: float | None,
    kv_scales: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """All single-token requests at once: keys padded to the longest context and masked."""
    block_ids, max_len, mask = _decode_context(metadata, kv_cache.shape[2], sliding_window)
    # [B, L, Hkv, D]
    key, value = _gather_kv(kv_cache, block_ids, max_len, query.dtype, kv_scales)
    out = _attend(
        query.unsqueeze(2),  # [B, Hq, 1, D]
        key.transpose(1, 2),
        value.transpose(1, 2),
        mask,
        scale,
        logits_soft_cap,
    )
    return out.squeeze(2)


def _decode_context(
    metadata: AttentionMetadata, block_size: int, sliding_window: int | None
) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """(block ids [B, n], longest context, mask [B, 1, 1, L] or None) of the decodes of a
    step, built once per step (per window) and kept in `metadata.derived`."""
    key = ("decode", sliding_window)
    context = metadata.derived.get(key)
    if context is None:
        num_decodes = metadata.num_decodes
        lens = metadata.seq_lens_cpu[:num_decodes]
        max_len = max(lens)
        block_ids = metadata.block_table[:num_decodes, : -(-max_len // block_size)]
        mask = None
        if min(lens) != max_len or (sliding_window is not None and max_len > sliding_window):
            seq_lens = metadata.seq_lens[:num_decodes, None]
            positions = torch.arange(max_len, device=seq_lens.device)[None, :]
            mask = positions < seq_lens
            if sliding_window is not None:
                mask &= positions >= seq_lens - sliding_window
            mask = mask[:, None, None, :]
        context = metadata.derived[key] = (block_ids, max_len, mask)
    return context


def _chunk_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_ids: torch.Tensor,
    seq_len: int,
    scale: float,
    sliding_window: int | None,
    logits_soft_cap: float | None,
    kv_scales: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """One request's chunk of q_len tokens, the last q_len of its seq_len cached tokens."""
    q_len = query.shape[0]
    block_size = kv_cache.shape[2]
    num_blocks = -(-seq_len // block_size)
    key, value = _gather_kv(
        kv_cache, block_ids[:num_blocks], seq_len, query.dtype, kv_scales
    )  # [L, Hkv, D]
    mask = None
    is_causal = sliding_window is None and q_len == seq_len
    if not is_causal:
        query_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)[:, None]
        key_pos = torch.arange(seq_len, device=query.device)[None, :]
        mask = key_pos <= query_pos
        if sliding_window is not None:
            mask &= key_pos > query_pos - sliding_window
        mask = mask[None, None]
    out = _attend(
        query.transpose(0, 1).unsqueeze(0),  # [1, Hq, Q, D]
        key.transpose(0, 1).unsqueeze(0),
        value.transpose(0, 1).unsqueeze(0),
        mask,
        scale,
        logits_soft_cap,
        is_causal=is_causal,
    )
    return out[0].transpose(0, 1)
