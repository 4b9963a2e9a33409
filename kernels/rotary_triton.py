"""Triton kernel for rotary position embedding, neox and GPT-J styles, partial rotary (CUDA).

Called through `ember.kernels.rotary`, which dispatches here for CUDA tensors; the torch
reference in `rotary.py` is the oracle in `tests/test_triton_kernels.py`. One program per token
rotates every query and key head of it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(
    out_ptr,
    x_ptr,
    token,
    num_heads,
    stride_x_token,
    stride_x_head,
    stride_out_token,
    stride_out_head,
    cos,
    sin,
    HEAD_DIM: tl.constexpr,
    ROTARY_DIM: tl.constexpr,
    IS_NEOX: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    half = tl.arange(0, BLOCK_HALF)[None, :]
    if IS_NEOX:  # channel i pairs with i + rotary_dim / 2
        first, second = half, half + ROTARY_DIM // 2
    else:  # channel 2i pairs with 2i + 1
        first, second = 2 * half, 2 * half + 1
    mask = (heads < num_heads) & (half < ROTARY_DIM // 2)
    x_row = x_ptr + token * stride_x_token + heads * stride_x_head
    out_row = out_ptr + token * stride_out_token + heads * stride_out_head
    x1 = tl.load(x_row + first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + second, mask=mask, other=0.0).to(tl.float32)
    out1 = x1 * cos - x2 * sin
    out2 = x2 * cos + x1 * sin
    tl.store(out_row + first, out1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_row + second, out2.to(out_ptr.dtype.element_ty), mask=mask)
    if ROTARY_DIM < HEAD_DIM:  # partial rotary: the other channels pass through
        dims = tl.arange(0, BLOCK_DIM)[None, :]
        pass_mask = (heads < num_heads) & (dims >= ROTARY_DIM) & (dims < HEAD_DIM)
        tl.store(out_row + dims, tl.load(x_row + dims, mask=pass_mask), mask=pass_mask)


@triton.jit
def _rotary_kernel(
    query_out_ptr,
    key_out_ptr,
    query_ptr,
    key_ptr,
    positions_ptr,
    cos_sin_ptr,
    num_query_heads,
    num_key_heads,
    stride_q_token,
    stride_q_head,
    stride_k_token,
    stride_k_head,
    stride_qo_token,
    stride_qo_head,
    stride_ko_token,
    stride_ko_head,
    stride_cos_sin,
    HEAD_DIM: tl.constexpr,
    ROTARY_DIM: tl.constexpr,
    IS_NEOX: tl.constexpr,
    BLOCK_Q_HEADS: tl.constexpr,
    BLOCK_K_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    half = tl.arange(0, BLOCK_HALF)[None, :]
    half_mask = half < ROTARY_DIM // 2
    cos_sin_row = cos_sin_ptr + position * stride_cos_sin
    cos = tl.load(cos_sin_row + half, mask=half_mask, other=0.0).to(tl.float32)
    sin = tl.load(cos_sin_row + ROTARY_DIM // 2 + half, mask=half_mask, other=0.0).to(tl.float32)
    _rotate_heads(
        query_out_ptr, query_ptr, token, num_query_heads, stride_q_token, stride_q_head,
        stride_qo_token, stride_qo_head, cos, sin, HEAD_DIM, ROTARY_DIM, IS_NEOX,
        BLOCK_Q_HEADS, BLOCK_HALF, BLOCK_DIM,
    )  # fmt: skip
    _rotate_heads(
        key_out_ptr, key_ptr, token, num_key_heads, stride_k_token, stride_k_head,
        stride_ko_token, stride_ko_head, cos, sin, HEAD_DIM, ROTARY_DIM, IS_NEOX,
        BLOCK_K_HEADS, BLOCK_HALF, BLOCK_DIM,
    )  # fmt: skip


def apply_rotary_emb_triton(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox_style: bool = True,
    step_cache: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `ember.kernels.rotary.apply_rotary_emb_torch`: query [T, Hq, D] and key
    [T, Hk, D] (any strides with unit stride in D) rotated into new tensors. `step_cache` is
    not needed: the kernel reads cos/sin by position itself."""
    num_tokens, num_query_heads, head_dim = query.shape
    num_key_heads = key.shape[1]
    rotary_dim = cos_sin_cache.shape[-1]
    if query.stride(-1) != 1:
        query = query.contiguous()
    if key.stride(-1) != 1:
        key = key.contiguous()
    cos_sin_cache = cos_sin_cache.contiguous()
    query_out = torch.empty_like(query, memory_format=torch.contiguous_format)
    key_out = torch.empty_like(key, memory_format=torch.contiguous_format)
    if num_tokens == 0:
        return query_out, key_out
    _rotary_kernel[(num_tokens,)](
        query_out,
        key_out,
        query,
        key,
        positions,
        cos_sin_cache,
        num_query_heads,
        num_key_heads,
        query.stride(0),
        query.stride(1),
        key.stride(0),
        key.stride(1),
        query_out.stride(0),
        query_out.stride(1),
        key_out.stride(0),
        key_out.stride(1),
        cos_sin_cache.stride(0),
        HEAD_DIM=head_dim,
        ROTARY_DIM=rotary_dim,
        IS_NEOX=is_neox_style,
        BLOCK_Q_HEADS=triton.next_power_of_2(num_query_heads),
        BLOCK_K_HEADS=triton.next_power_of_2(num_key_heads),
        BLOCK_HALF=triton.next_power_of_2(max(rotary_dim // 2, 1)),
        BLOCK_DIM=triton.next_power_of_2(head_dim),
    )
    return query_out, key_out
