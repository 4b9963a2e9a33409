"""Triton kernel for top-k / top-p filtering (CUDA): per row, the cut-off is found by bisection
on the values' bit patterns instead of a sort, and nothing is read back to the host.

Called through `ember.kernels.sampling`, which dispatches here for CUDA tensors; the torch
reference in `sampling.py` is the oracle in `tests/test_triton_kernels.py`.

A float32 maps to an int32 key with the same order (negative floats have their magnitude bits
flipped). Top-k keeps keys >= the largest T with count(key >= T) >= k, which is the k-th
largest value (ties kept, as the reference does); top-p then keeps keys >= the largest T whose
mass below it (among the top-k survivors) is <= (1 - p) of theirs: the reference's rule that
drops the least likely tokens while their cumulative probability stays <= 1 - p.
Each search halves an int range 32 times, one pass over the row per step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _order_key(x):
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _count_at_least(row_ptr, vocab_size, threshold, BLOCK: tl.constexpr):
    count = tl.zeros([BLOCK], tl.int32)
    for start in range(0, vocab_size, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + cols, mask=cols < vocab_size, other=float("-inf"))
        hit = (_order_key(x).to(tl.int64) >= threshold) & (cols < vocab_size)
        count += hit.to(tl.int32)
    return tl.sum(count, axis=0)


@triton.jit
def _mass_between(row_ptr, vocab_size, low, high, row_max, BLOCK: tl.constexpr):
    """Sum of exp(x - row_max) over the values whose key is in [low, high)."""
    mass = tl.zeros([BLOCK], tl.float32)
    for start in range(0, vocab_size, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + cols, mask=cols < vocab_size, other=float("-inf"))
        key = _order_key(x).to(tl.int64)
        hit = (key >= low) & (key < high) & (cols < vocab_size)
        mass += tl.where(hit, tl.exp(x - row_max), 0.0)
    return tl.sum(mass, axis=0)


@triton.jit
def _top_k_top_p_kernel(
    out_ptr,
    logits_ptr,
    top_k_ptr,
    top_p_ptr,
    vocab_size,
    stride_logits,
    stride_out,
    HAS_TOP_K: tl.constexpr,
    HAS_TOP_P: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_logits
    lowest = tl.zeros([BLOCK], tl.int32) + 0x7FFFFFFF
    highest = tl.zeros([BLOCK], tl.int32) - 0x7FFFFFFF - 1
    for start in range(0, vocab_size, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < vocab_size
        key = _order_key(tl.load(row_ptr + cols, mask=valid, other=0.0))
        lowest = tl.minimum(lowest, tl.where(valid, key, 0x7FFFFFFF))
        highest = tl.maximum(highest, tl.where(valid, key, -0x7FFFFFFF - 1))
    low = tl.min(lowest, axis=0).to(tl.int64)  # invariant: low satisfies the condition
    high = tl.max(highest, axis=0).to(tl.int64)
    top_key = high
    if HAS_TOP_K:
        k = tl.minimum(tl.maximum(tl.load(top_k_ptr + row), 1), vocab_size)
        for _ in range(32):
            middle = low + (high - low + 1) // 2
            fits = _count_at_least(row_ptr, vocab_size, middle, BLOCK) >= k
            low = tl.where(fits, middle, low)
            high = tl.where(fits, high, middle - 1)
    if HAS_TOP_P:
        top_p = tl.load(top_p_ptr + row)
        top_bits = tl.where(top_key < 0, top_key ^ 0x7FFFFFFF, top_key).to(tl.int32)
        row_max = top_bits.to(tl.float32, bitcast=True)
        kept_by_top_k = low
        removable = (1.0 - top_p) * _mass_between(
            row_ptr, vocab_size, kept_by_top_k, top_key + 1, row_max, BLOCK
        )
        high = top_key
        for _ in range(32):
            middle = low + (high - low + 1) // 2
            below = _mass_between(row_ptr, vocab_size, kept_by_top_k, middle, row_max, BLOCK)
            fits = below <= removable
            low = tl.where(fits, middle, low)
            high = tl.where(fits, high, middle - 1)
    for start in range(0, vocab_size, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < vocab_size
        x = tl.load(row_ptr + cols, mask=valid, other=0.0)
        kept = _order_key(x).to(tl.int64) >= low
        tl.store(out_ptr + row * stride_out + cols, tl.where(kept, x, float("-inf")), mask=valid)


def apply_top_k_top_p_triton(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Same contract as `ember.kernels.sampling.apply_top_k_top_p_torch`; the search runs on
    float32 keys, so other dtypes are widened for it and the result narrowed back."""
    if top_k is None and top_p is None:
        return logits
    if logits.dtype != torch.float32:
        return apply_top_k_top_p_triton(logits.float(), top_k, top_p).to(logits.dtype)
    logits = logits.contiguous()
    num_rows, vocab_size = logits.shape
    out = torch.empty_like(logits)
    if num_rows == 0:
        return out
    _top_k_top_p_kernel[(num_rows,)](
        out,
        logits,
        top_k if top_k is not None else logits,
        top_p if top_p is not None else logits,
        vocab_size,
        logits.stride(0),
        out.stride(0),
        HAS_TOP_K=top_k is not None,
        HAS_TOP_P=top_p is not None,
        BLOCK=min(4096, triton.next_power_of_2(vocab_size)),
    )
    return out
