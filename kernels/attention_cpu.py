"""Decode attention over a bfloat16 or e4m3 paged KV cache on CPU, in C
(`csrc/paged_decode_attention.c`).

Called by `attention.paged_attention` for the decodes of a CPU batch, and by the fused decode
step; its reference is `attention.paged_attention_torch`, which gathers a padded float32 copy of
the blocks (about 50 MB per layer per step for 32 requests of a few hundred tokens) where this
kernel reads each cached key and value once, in place (about 7 MB), with float32 math. An e4m3
cache (`kv_cache_dtype="fp8"`) is read a byte a value, widened to float32 in registers, its
scales applied to the query and the output.

Compiled on first use (`cpu_library`); where that fails, `paged_decode_attention_cpu` returns
None and the caller falls back. Its tasks run on torch's own OpenMP threads (`libgomp.so.1`,
already loaded with torch), so `torch.set_num_threads` governs it as it does torch's operators;
without OpenMP it runs on the calling thread.
"""

from __future__ import annotations

import ctypes
import os

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
    function.argtypes += [ctypes.c_float, i64, ptr, i64, ptr, ptr]
    function.restype = ctypes.c_int
    function = library.ember_paged_prefill_attention
    function.argtypes = [ptr, ptr, ptr, i64, ptr, ptr, i64, i64, i64, i64, i64, i64]
    function.argtypes += [ctypes.c_float, ptr, ctypes.c_int, i64, ptr, ptr]
    function.restype = ctypes.c_int
    library.ember_prefill_use_amx.argtypes = [ctypes.c_int]
    library.ember_prefill_use_amx.restype = ctypes.c_int
    library.ember_prefill_tiles_serve.argtypes = [i64]
    library.ember_prefill_tiles_serve.restype = ctypes.c_int
    if os.environ.get("EMBER_CPU_AMX", "").strip() == "0":
        library.ember_prefill_use_amx(0)
    return library


# The cache dtypes the kernel reads, by its `cache_format` code.
_CACHE_FORMATS = {torch.bfloat16: 0, torch.float8_e4m3fn: 1}


def _is_scalar(scale: torch.Tensor | None) -> bool:
    """Whether the kernel can read `scale`: None, or one float32 in host memory."""
    return scale is None or (
        scale.dtype == torch.float32 and scale.numel() == 1 and scale.device.type == "cpu"
    )


def _scale_pointer(scale: torch.Tensor | None) -> int | None:
    """The address of a float32 scalar for the kernel to read (None: NULL, a scale of 1)."""
    return None if scale is None else scale.data_ptr()


def available() -> bool:
    """Whether the kernel could be built here (else every call returns None)."""
    return _library() is not None


def use_amx(enabled: bool) -> bool:
    """Let the prefill kernel use AMX tiles (or not) on CPUs that have them (Sapphire Rapids
    and later Xeons; the avx512 build); returns whether it now does. On by default where Linux
    grants the tile state, off with `EMBER_CPU_AMX=0`; either way the outputs are float32 sums
    of the exact products."""
    library = _library()
    return False if library is None else bool(library.ember_prefill_use_amx(int(enabled)))


def prefill_tiles_serve(head_dim: int) -> bool:
    """Whether the prefill kernel multiplies with AMX tiles for heads of `head_dim` (a
    multiple of 32 up to 128, on a CPU with AMX, `use_amx`): it then beats torch's SDPA at
    every context (one SmolLM2 prompt of 2048 tokens: 23 ms a layer against 30), where the
    AVX-512 form loses from about 1024 tokens."""
    library = _library()
    return library is not None and bool(library.ember_prefill_tiles_serve(head_dim))


def _served(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    *int_tensors: tuple[torch.Tensor, torch.dtype],
) -> tuple[ctypes.CDLL, int] | None:
    """(the library, the cache's format code) when the kernels can read these inputs: float32
    queries, a contiguous bfloat16 or e4m3 cache (an e4m3 one's scales float32 scalars in host
    memory), each of `int_tensors` (tensor, dtype) of its dtype; else None."""
    cache_format = _CACHE_FORMATS.get(kv_cache.dtype)
    if query.dtype != torch.float32 or cache_format is None or not kv_cache.is_contiguous():
        return None
    if any(tensor.dtype != dtype for tensor, dtype in int_tensors):
        return None
    if cache_format == 1 and not (_is_scalar(k_scale) and _is_scalar(v_scale)):
        return None
    library = _library()
    return None if library is None else (library, cache_format)


def paged_decode_attention_cpu(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Attention of `query` [B, Hq, D] (float32, one token per request) over the bfloat16 or
    e4m3 `kv_cache` [2, num_blocks, block_size, Hkv, D] of each request's `block_table` row and
    `seq_lens` entry (an e4m3 cache's keys times `k_scale`, values times `v_scale`: float32
    scalars, None: 1); None when the kernel cannot serve these inputs (the caller falls back)."""
    served = _served(
        query, kv_cache, k_scale, v_scale, (block_table, torch.int64), (seq_lens, torch.int32)
    )
    if served is None:
        return None
    library, cache_format = served
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
        cache_format,
        _scale_pointer(k_scale if cache_format == 1 else None),
        _scale_pointer(v_scale if cache_format == 1 else None),
    )
    return out if status == 0 else None


def paged_prefill_attention_cpu(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor | None:
    """Causal attention of a batch of prefill chunks and decodes, `query` [T, Hq, D] float32
    (request r's tokens at `query_start_loc` [R + 1] int32, the last of its `seq_lens` [R]
    int32 cached tokens), over the bfloat16 or e4m3 cache of `block_table` [R, n] int64: one
    call for the whole batch, each key read once for a few tokens' query heads; no sliding
    window. The output in `out_dtype`: float32, or bfloat16 rounded as torch's cast rounds the
    float32 one. None when the kernel cannot serve these inputs (the caller falls back)."""
    if out_dtype not in (torch.float32, torch.bfloat16):
        return None
    served = _served(
        query,
        kv_cache,
        k_scale,
        v_scale,
        (block_table, torch.int64),
        (query_start_loc, torch.int32),
        (seq_lens, torch.int32),
    )
    if served is None or query_start_loc.shape[0] != seq_lens.shape[0] + 1:
        return None
    library, cache_format = served
    query = query.contiguous()
    block_table, seq_lens = block_table.contiguous(), seq_lens.contiguous()
    query_start_loc = query_start_loc.contiguous()
    _, num_heads, head_dim = query.shape
    _, num_blocks, block_size, num_kv_heads, _ = kv_cache.shape
    out = torch.empty_like(query, dtype=out_dtype)
    status = library.ember_paged_prefill_attention(
        query.data_ptr(),
        kv_cache.data_ptr(),
        block_table.data_ptr(),
        block_table.stride(0),
        query_start_loc.data_ptr(),
        seq_lens.data_ptr(),
        seq_lens.shape[0],
        num_heads,
        num_kv_heads,
        head_dim,
        block_size,
        num_blocks,
        scale,
        out.data_ptr(),
        out_dtype == torch.bfloat16,
        cache_format,
        _scale_pointer(k_scale if cache_format == 1 else None),
        _scale_pointer(v_scale if cache_format == 1 else None),
    )
    return out if status == 0 else None
