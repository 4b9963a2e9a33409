"""Matmuls of float32 activations by a weight kept in half precision (`csrc/half_matmul.c`).

A float32 model on CPU whose vocabulary table comes from a bfloat16 or float16 checkpoint can
keep the table in that format without losing a bit (`UnquantizedEmbeddingMethod`): it takes
half the memory and a decode step reads half the bytes, while the products stay those of
float32 (each weight is widened in registers). `half_matmul` multiplies by such a table;
`widened_matmul` also serves where the kernel cannot (torch on a float32 copy).
"""

from __future__ import annotations

import ctypes

import torch

from ember.kernels.cpu_library import isa_cached, load_openmp_library


@isa_cached
def _library() -> ctypes.CDLL | None:
    library = load_openmp_library("half_matmul.c")
    if library is None:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    library.ember_half_matmul.argtypes = [ptr, i64, i64, ptr, ctypes.c_int, i64, ptr]
    library.ember_half_matmul.restype = ctypes.c_int
    return library


def available() -> bool:
    return _library() is not None


def half_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """x [M, K] float32 @ weight.T ([N, K] bfloat16 or float16) -> [M, N] float32; None when
    the kernel cannot serve (no compiler, K not a multiple of the vector width)."""
    library = _library()
    if library is None:
        return None
    x = x.contiguous()
    rows, k = x.shape
    out = torch.empty(rows, weight.shape[0], dtype=torch.float32)
    status = library.ember_half_matmul(
        x.data_ptr(),
        rows,
        k,
        weight.data_ptr(),
        weight.dtype == torch.float16,
        weight.shape[0],
        out.data_ptr(),
    )
    return out if status == 0 else None


def widened_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, K] float32 @ weight.T for a half-precision weight [N, K]: the C kernel, whose
    result for a row does not depend on the other rows; torch's float32 matmul on a widened
    copy where the kernel cannot serve. Equal up to the order of the sums."""
    if weight.is_contiguous():
        out = half_matmul(x, weight)
        if out is not None:
            return out
    return torch.nn.functional.linear(x, weight.float())
