"""Matmuls against weights held as GGUF-style groups of 32 (`packed_int4.BlockQuantized`), in C
(`csrc/block_matmul.c`): the activations are quantized to 8-bit groups and each group's product
is integer work on bytes (AVX512-VNNI or AVX2), as llama.cpp computes it. It serves decode-sized
batches, whose steps are bound by reading the weights: 4.5 to 5 bits per weight here against 16
for a bfloat16 matmul.

`block_matmul` returns None where the library cannot be built (no compiler); the caller keeps
torch's path.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from ember.kernels.cpu_library import load_openmp_library

GROUP_SIZE = 32


@functools.cache
def _library() -> ctypes.CDLL | None:
    library = load_openmp_library("block_matmul.c")
    if library is None:
        return None
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    library.ember_block_matmul.argtypes = [ptr, i32, i64, i64, ptr, i32, ptr, ptr, i32, i64]
    library.ember_block_matmul.argtypes += [ptr, i32]
    library.ember_block_matmul.restype = ctypes.c_int
    return library


def available() -> bool:
    return _library() is not None


def block_matmul(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor | None:
    """x [M, K] (float32 or bfloat16) @ w.T -> [M, N] in `out_dtype` (float32 or bfloat16), w
    given by 4-bit `codes` [N, K / 2] uint8 (w = q * scale + offset) or 8-bit `codes` [N, K]
    int8 (w = q * scale), `scale` and `offset` [N, K / 32] float16 or float32; None when the
    kernel is not available."""
    library = _library()
    if library is None:
        return None
    bits = 8 if codes.dtype == torch.int8 else 4
    x = x.contiguous()
    rows, k = x.shape
    if k != codes.shape[1] * (8 // bits):
        raise ValueError(f"x has {k} columns, the weight {codes.shape[1] * (8 // bits)}")
    out = torch.empty(rows, codes.shape[0], dtype=out_dtype)
    status = library.ember_block_matmul(
        x.data_ptr(),
        x.dtype == torch.bfloat16,
        rows,
        k,
        codes.data_ptr(),
        bits,
        scale.data_ptr(),
        offset.data_ptr() if offset is not None else None,
        scale.dtype == torch.float16,
        codes.shape[0],
        out.data_ptr(),
        out_dtype == torch.bfloat16,
    )
    return out if status == 0 else None
