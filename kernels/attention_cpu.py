"""Decode attention over a bfloat16 paged KV cache on CPU, in C (`csrc/paged_decode_attention.c`).

Called by `attention.paged_attention` for the decodes of a CPU batch, and by the fused decode
step; its reference is `attention.paged_attention_torch`, which gathers a padded float32 copy of
the blocks (about 50 MB per layer per step for 32 requests of a few hundred tokens) where this
kernel reads each cached key and value once, in place (about 7 MB), with float32 math.

Compiled on first use (`cpu_library`); where that fails, `paged_decode_attention_cpu` returns
None and the caller falls back. Its tasks run on torch's own OpenMP threads (`libgomp.so.1`,
already loaded with torch), so `torch.set_num_threads` governs it as it does torch's operators;
without OpenMP it runs on the calling thread.
"""

from __future__ import annotations

import ctypes

import torch

from ember.kernels.cpu_library import isa_cached, load_openmp_library


@isa_cached
def _library() -> ctypes.CDLL | None:
    """The compiled kernel with its argument types, or None (no compiler)."""
    library = load_openmp_library("paged_decode_attention.c")
    if library is None:
        return None
    function = library.ember_paged_decode_attention
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    function.argtypes = [ptr, ptr, ptr, i64, ptr, i64, i64, i64, i64, i64, i64]
    function.argtypes += [ctypes.c_float, i64, ptr]
    function.restype = ctypes.c_int
    return library


def available() -> bool:
    """Whether the kernel could be built here (else every call returns None)."""
    return _library() is not None


def paged_decode_attention_cpu(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor | None:
    """Attention of `query` [B, Hq, D] (float32, one token per request) over the bfloat16
    `kv_cache` [2, num_blocks, block_size, Hkv, D] of each request's `block_table` row and
    `seq_lens` entry; None when the kernel cannot serve these inputs (the caller falls back)."""
    if (
        query.dtype != torch.float32
        or kv_cache.dtype != torch.bfloat16
        or not kv_cache.is_contiguous()
        or block_table.dtype != torch.int64
        or seq_lens.dtype != torch.int32
    ):
        return None
    library = _library()
    if library is None:
        return None
    query = query.contiguous()
    block_table = block_table.contiguous()
    seq_lens = seq_lens.contiguous()
    num_reqs, num_heads, head_dim = query.shape
    _, num_blocks, block_size, num_kv_heads, _ = kv_cache.shape
    out = torch.empty_like(query)

    status = library.ember_paged_decode_attention(
        query.data_ptr(),
        kv_cache.data_ptr(),
        block_table.data_ptr(),
        block_table.stride(0),
        seq_lens.data_ptr(),
        num_reqs,
        num_heads,
        num_kv_heads,
        head_dim,
        block_size,
        num_blocks,
        scale,
        sliding_window or 0,
        out.data_ptr(),
    )
    return out if status == 0 else None
