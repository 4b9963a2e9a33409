"""LoRA deltas on the CPU in C (`csrc/lora_add.c`): each token's adapter delta added in place to
a linear layer's bfloat16 output, in one call for all the adapters of a step. The fused CPU
decode step calls the same function between its matmuls (`workers/cpu_decode/decode_step.c`);
the layer-by-layer path calls it through `lora_add`.

The weights are the layer's, in the form the kernel reads (`LoRACWeights`): A transposed and
stacked by slot [S, K, n*R] and B transposed and scaled [S, R, N], the layer's n output slices (q | k | v,
gate | up, or one) side by side in its columns, float32. `kernels/lora.py` holds the torch path and the
definition the tests compare with.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from ember.kernels.cpu_library import isa_cached, load_openmp_library


@dataclass(frozen=True, slots=True)
class LoRACWeights:
    """One layer's adapters as `ember_lora_add` reads them."""

    lora_at: torch.Tensor  # float32 [S, K, n * R]: A^T, slice i in columns i*R .. i*R + R-1
    lora_bt: torch.Tensor  # float32 [S, R, N]: each slice's B^T * scale over its own columns
    rank: int  # R, the padded rank of a slice
    slice_ends: torch.Tensor  # int64 [n]: where each slice's outputs end


@isa_cached
def _library() -> ctypes.CDLL | None:
    library = load_openmp_library("lora_add.c")
    if library is None:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    library.ember_lora_add.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, i64, ptr, i64, i64, ptr]
    library.ember_lora_add.restype = ctypes.c_int
    return library


def available() -> bool:
    return _library() is not None


def function_pointer() -> int | None:
    """The address of `ember_lora_add`, for the fused decode step; None where it is not built."""
    library = _library()
    return None if library is None else ctypes.cast(library.ember_lora_add, ctypes.c_void_p).value


def lora_add(
    x: torch.Tensor, out: torch.Tensor, token_slots: torch.Tensor, weights: LoRACWeights
) -> bool:
    """out [T, N] bfloat16 += each token's delta, x [T, K] bfloat16, token_slots [T] int64
    (-1: none; the others below the weights' slot count), in place; False (out untouched)
    where the kernel does not serve: not built here, or tensors not in the form it reads."""
    library = _library()
    if (
        library is None
        or x.dtype != torch.bfloat16
        or out.dtype != torch.bfloat16
        or not x.is_contiguous()
        or not out.is_contiguous()
        or token_slots.dtype != torch.int64
        or not token_slots.is_contiguous()
        or x.shape[0] != out.shape[0]
        or token_slots.shape != (x.shape[0],)
        or x.shape[1] != weights.lora_at.shape[1]
        or out.shape[1] != weights.lora_bt.shape[2]
    ):
        return False
    tokens, k = x.shape
    n_rank = weights.lora_at.shape[2]
    status = library.ember_lora_add(
        x.data_ptr(),
        tokens,
        k,
        token_slots.data_ptr(),
        weights.lora_at.data_ptr(),
        weights.lora_bt.data_ptr(),
        n_rank,
        weights.rank,
        weights.slice_ends.data_ptr(),
        weights.slice_ends.numel(),
        out.shape[1],
        out.data_ptr(),
    )
    if status == 2:
        raise MemoryError("ember_lora_add: out of memory")
    return status == 0
