"""Triton kernel applying a grammar's token bitmask to logits (CUDA), in place.

Called through `ember.kernels.token_bitmask`, which validates the arguments and dispatches here
for CUDA tensors; the torch reference there is the oracle in `tests/test_token_bitmask.py`.
One program per (bitmask row, block of tokens): it loads each token's word, tests the token's
bit, and stores -inf where it is clear. Allowed tokens are neither read nor written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _apply_token_bitmask_kernel(
    logits_ptr,
    bitmask_ptr,
    rows_ptr,
    vocab_size,
    num_words,
    stride_logits_row,
    stride_logits_token,
    stride_bitmask_row,
    stride_bitmask_word,
    BLOCK: tl.constexpr,
):
    bitmask_row = tl.program_id(0).to(tl.int64)
    tokens = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_vocab = tokens < vocab_size
    word_index = tokens // 32
    words = tl.load(
        bitmask_ptr + bitmask_row * stride_bitmask_row + word_index * stride_bitmask_word,
        mask=in_vocab & (word_index < num_words),
        other=0,  # past the bitmask's width: forbidden
    )
    forbidden = ((words >> (tokens % 32)) & 1) == 0  # arithmetic shift: bit 31 is still bit 31
    logits_row = tl.load(rows_ptr + bitmask_row).to(tl.int64)
    neg_inf = tl.full([BLOCK], float("-inf"), logits_ptr.dtype.element_ty)
    tl.store(
        logits_ptr + logits_row * stride_logits_row + tokens.to(tl.int64) * stride_logits_token,
        neg_inf,
        mask=in_vocab & forbidden,
    )


def apply_token_bitmask_triton(
    logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor
) -> None:
    """Same contract as `ember.kernels.token_bitmask.apply_token_bitmask_torch` (arguments as
    checked by `apply_token_bitmask_`); logits may have any strides."""
    num_bitmask_rows, num_words = bitmask.shape
    vocab_size = logits.shape[1]
    if num_bitmask_rows == 0 or vocab_size == 0:
        return
    _apply_token_bitmask_kernel[(num_bitmask_rows, triton.cdiv(vocab_size, BLOCK))](
        logits,
        bitmask,
        rows,
        vocab_size,
        num_words,
        logits.stride(0),
        logits.stride(1),
        bitmask.stride(0),
        bitmask.stride(1),
        BLOCK=BLOCK,
    )
