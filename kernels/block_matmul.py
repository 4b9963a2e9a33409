"""Matmuls against weights held as GGUF-style groups of 32 (`packed_int4.QuantizedWeight`), in
C (`csrc/block_matmul.c`): each group of 32 activations becomes 16-bit integers with one scale,
and a group's product is integer work (vpmaddwd with AVX-512, AVX2 otherwise) scaled once. It
serves the LM head, whose 8-bit groups it reads in one pass (torch's 4-bit kernel needs two
halves).

`block_matmul` returns None where the library cannot be built (no compiler) or the rows are
wider than it takes; the caller keeps another path.
"""

from __future__ import annotations

import ctypes

import torch

from ember.kernels.cpu_library import isa_cached, load_openmp_library


@isa_cached
def _library() -> ctypes.CDLL | None:
    return with_signatures(load_openmp_library("block_matmul.c"))


def with_signatures(library: ctypes.CDLL | None) -> ctypes.CDLL | None:
    """`library` (a build of `csrc/block_matmul.c`) with its function's argument types."""
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
