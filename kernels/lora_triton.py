"""Triton kernels of batched LoRA (CUDA): vLLM's bgmv shrink and expand, one program per
(token, block of outputs), reading each token's adapter slot (-1: no adapter, nothing done).

Called through `ember.kernels.lora` for CUDA tensors; the torch path there is the reference
(`tests/test_lora_units.py`). Per token: a gemv against its slot's matrix, so a step of decodes
with several adapters is one launch each for shrink and expand.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 64
BLOCK_K = 64


@triton.jit
def _lora_shrink_kernel(
    out_ptr,  # [T, R] float32
    x_ptr,  # [T, K]
    lora_a_ptr,  # [S, R, K]
    slots_ptr,  # [T] int64
    rank,
    in_size,
    stride_out_t,
    stride_x_t,
    stride_x_k,
    stride_a_s,
    stride_a_r,
    stride_a_k,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + token)
    if slot >= 0:
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, in_size, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            x = tl.load(
                x_ptr + token * stride_x_t + cols * stride_x_k, mask=cols < in_size, other=0
            )
            a = tl.load(
                lora_a_ptr
                + slot * stride_a_s
                + rows[:, None] * stride_a_r
                + cols[None, :] * stride_a_k,
                mask=(rows[:, None] < rank) & (cols[None, :] < in_size),
                other=0,
            )
            acc += tl.sum(a.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
        tl.store(out_ptr + token * stride_out_t + rows, acc, mask=rows < rank)


@triton.jit
def _lora_expand_kernel(
    y_ptr,  # [T, N], added to
    buffer_ptr,  # [T, R] float32
    lora_b_ptr,  # [S, N, R]
    scales_ptr,  # [S] float32
    slots_ptr,  # [T] int64
    rank,
    out_size,
    stride_y_t,
    stride_y_n,
    stride_buffer_t,
    stride_buffer_r,
    stride_b_s,
    stride_b_n,
    stride_b_r,
    stride_scales,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + token)
    if slot >= 0:
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, rank, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            h = tl.load(
                buffer_ptr + token * stride_buffer_t + cols * stride_buffer_r,
                mask=cols < rank,
                other=0,
            )
            b = tl.load(
                lora_b_ptr
                + slot * stride_b_s
                + rows[:, None] * stride_b_n
                + cols[None, :] * stride_b_r,
                mask=(rows[:, None] < out_size) & (cols[None, :] < rank),
                other=0,
            )
            acc += tl.sum(b.to(tl.float32) * h[None, :], axis=1)
        scale = tl.load(scales_ptr + slot * stride_scales)
        pointers = y_ptr + token * stride_y_t + rows * stride_y_n
        y = tl.load(pointers, mask=rows < out_size, other=0)
        tl.store(pointers, (y.to(tl.float32) + acc * scale).to(y.dtype), mask=rows < out_size)


def lora_shrink_triton(
    x: torch.Tensor, lora_a: torch.Tensor, token_slots: torch.Tensor
) -> torch.Tensor:
    """buffer [T, R] float32 = x[t] @ lora_a[slot(t)]^T (rows of slot -1 zero)."""
    num_tokens, in_size = x.shape
    rank = lora_a.shape[1]
    buffer = torch.zeros(num_tokens, rank, dtype=torch.float32, device=x.device)
    if num_tokens == 0:
        return buffer
    _lora_shrink_kernel[(num_tokens, triton.cdiv(rank, BLOCK_N))](
        buffer,
        x,
        lora_a,
        token_slots,
        rank,
        in_size,
        buffer.stride(0),
        x.stride(0),
        x.stride(1),
        lora_a.stride(0),
        lora_a.stride(1),
        lora_a.stride(2),
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
    )
    return buffer


def lora_expand_triton_(
    y: torch.Tensor,
    buffer: torch.Tensor,
    lora_b: torch.Tensor,
    scales: torch.Tensor,
    token_slots: torch.Tensor,
) -> None:
    """y[t] += buffer[t] @ lora_b[slot(t)]^T * scales[slot(t)], in place; y, buffer and
    lora_b may be slices (any strides)."""
    num_tokens, out_size = y.shape
    rank = buffer.shape[1]
    if num_tokens == 0 or out_size == 0:
        return
    _lora_expand_kernel[(num_tokens, triton.cdiv(out_size, BLOCK_N))](
        y,
        buffer,
        lora_b,
        scales,
        token_slots,
        rank,
        out_size,
        y.stride(0),
        y.stride(1),
        buffer.stride(0),
        buffer.stride(1),
        lora_b.stride(0),
        lora_b.stride(1),
        lora_b.stride(2),
        scales.stride(0),
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
    )
