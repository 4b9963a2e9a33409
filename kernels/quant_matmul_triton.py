"""Triton GEMM of `quant_matmul.PackedGroupWeight` (CUDA): y [M, N] = x [M, K] @ w.T with the
4- or 8-bit codes dequantized tile by tile in registers, float32 accumulation (tl.dot).

Called through `ember.kernels.quant_matmul` for CUDA tensors; `quant_matmul_torch` there is
the reference (`tests/test_quant_matmul_triton.py`). The grid is (output tiles, token tiles,
K splits). Each step loads a BLOCK_K x BLOCK_N tile of words, row k reading word k // pack
(neighbouring rows hit the same cache lines), and shifts out code k % pack:

    pack 8 (4 bits), BLOCK_K 64: rows 0..7 read qweight row k0/8, rows 8..15 row k0/8 + 1, ...
    code = (word >> 4 * (k % 8)) & 15;  w = (code - zero[g]) * scale[g];  acc += x @ w

A tile never spans two positional groups (BLOCK_K <= group size, both powers of two), so it
reads one row of scales and zeros; irregular groups read them per input. Decode batches take
16-row tiles; a grid of fewer tiles than two a multiprocessor (decode, mostly) splits K, and
the float32 partial sums are added after.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ember.kernels.quant_matmul import PackedGroupWeight
from ember.kernels.triton_tiles import (
    DEFAULT_LIMITS,
    BlockConfig,
    device_limits,
    split_k_output,
    split_k_parts,
)


def block_config(
    tokens: int,
    outputs: int,
    inputs: int,
    group_size: int,
    x_bytes: int = 2,
    limits: tuple[int, int] = DEFAULT_LIMITS,
) -> BlockConfig:
    """Decode batches (up to 16 tokens) take 16-row tiles, the smallest tl.dot tile; mid-sized
    batches 64-row tiles; prefill 128 x 128 tiles of 8 warps. K is split while the output
    tiles are fewer than two a multiprocessor; the pipeline is as deep as shared memory holds
    (`limits`: `device_limits`; `x_bytes`: the activations' element size)."""
    multiprocessors, shared_bytes = limits
    if tokens <= 16:
        config = BlockConfig(16, 64, 128, num_stages=4)
    elif tokens <= 64:
        config = BlockConfig(64, 64, 64)
    else:
        config = BlockConfig(128, 128, 64, num_warps=8)
    block_k = config.block_k if group_size <= 0 else min(config.block_k, group_size)
    parts = split_k_parts(
        tokens,
        outputs,
        inputs,
        BlockConfig(config.block_m, config.block_n, block_k),
        multiprocessors,
    )
    # a stage holds a tile of x and one of int32 words; 16 KiB left for the rest
    stage_bytes = block_k * (config.block_m * x_bytes + config.block_n * 4)
    num_stages = max(1, min(config.num_stages, (shared_bytes - 16 * 1024) // stage_bytes))
    return BlockConfig(config.block_m, config.block_n, block_k, parts, config.num_warps, num_stages)


@triton.jit
def _quant_matmul_kernel(
    out_ptr,  # [SPLIT_K, M, N] float32 partial sums, or [M, N] in x's dtype (SPLIT_K 1)
    x_ptr,  # [M, K]
    qweight_ptr,  # [K / PACK, N] int32
    scales_ptr,  # [G, N]
    zeros_ptr,  # [G, N]
    group_ptr,  # [K] int32 (GROUP_SIZE 0)
    M,
    N,
    K,
    k_blocks_per_split,
    stride_out_split,
    stride_out_m,
    stride_x_m,
    stride_x_k,
    stride_qweight_k,
    stride_group,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,  # > 0 positional groups, -1 one group, 0 per input (group_ptr)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FLOAT32: tl.constexpr,
):
    PACK: tl.constexpr = 32 // BITS
    CODE_MASK: tl.constexpr = (1 << BITS) - 1
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    row_mask = rows < M
    col_mask = cols < N
    k_blocks = tl.cdiv(K, BLOCK_K)
    first_block = split * k_blocks_per_split
    last_block = tl.minimum(first_block + k_blocks_per_split, k_blocks)
    if GROUP_SIZE == -1:  # one group: its scales and zeros for the whole loop
        scale = tl.load(scales_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        zero = tl.load(zeros_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for block in range(first_block, last_block):
        ks = block * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        x = tl.load(
            x_ptr + rows[:, None] * stride_x_m + ks[None, :] * stride_x_k,
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        words = tl.load(
            qweight_ptr + (ks // PACK)[:, None] * stride_qweight_k + cols[None, :],
            mask=k_mask[:, None] & col_mask[None, :],
            other=0,
        )
        codes = (words >> ((ks % PACK) * BITS)[:, None]) & CODE_MASK
        if GROUP_SIZE > 0:  # the tile lies in one group
            group_offset = (block * BLOCK_K // GROUP_SIZE) * stride_group
            scale = tl.load(scales_ptr + group_offset + cols, mask=col_mask, other=0.0)
            zero = tl.load(zeros_ptr + group_offset + cols, mask=col_mask, other=0.0)
            scale = scale.to(tl.float32)[None, :]
            zero = zero.to(tl.float32)[None, :]
        elif GROUP_SIZE == 0:
            groups = tl.load(group_ptr + ks, mask=k_mask, other=0)
            offsets = groups[:, None] * stride_group + cols[None, :]
            scale = tl.load(scales_ptr + offsets, mask=col_mask[None, :], other=0.0)
            zero = tl.load(zeros_ptr + offsets, mask=col_mask[None, :], other=0.0)
            scale = scale.to(tl.float32)
            zero = zero.to(tl.float32)
        # rounded to x's dtype, as a dense copy of the weight would be
        weight = ((codes.to(tl.float32) - zero) * scale).to(x_ptr.dtype.element_ty)
        if DOT_IN_FLOAT32:
            x = x.to(tl.float32)
            weight = weight.to(tl.float32)
        acc += tl.dot(x, weight, input_precision=DOT_PRECISION)
    out_mask = row_mask[:, None] & col_mask[None, :]
    pointers = out_ptr + split * stride_out_split + rows[:, None] * stride_out_m + cols[None, :]
    tl.store(pointers, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def quant_matmul_triton(
    x: torch.Tensor, weight: PackedGroupWeight, config: BlockConfig | None = None
) -> torch.Tensor:
    """Same contract as `ember.kernels.quant_matmul.quant_matmul_torch`: x [..., K] @ w.T ->
    [..., N] in x's dtype; `config` defaults to `block_config` of the shapes."""
    outputs, inputs = weight.shape
    if x.shape[-1] != inputs:
        raise ValueError(f"x: last dimension must be the weight's {inputs} inputs, got {x.shape}")
    leading = x.shape[:-1]
    x = x.reshape(-1, inputs)
    if weight.order is not None:
        x = x.index_select(1, weight.order)
    tokens = x.shape[0]
    if tokens == 0 or outputs == 0:
        return x.new_empty(*leading, outputs)
    if config is None:
        limits = device_limits(x.device)
        config = block_config(tokens, outputs, inputs, weight.group_size, x.element_size(), limits)
    if weight.group_size > 0 and weight.group_size % config.block_k:
        raise ValueError(
            f"config: block_k {config.block_k} must divide the group size {weight.group_size}"
        )
    split_k, k_blocks_per_split, partial = split_k_output(
        tokens, outputs, inputs, config, x.dtype, x.device
    )
    # Triton's interpreter (TRITON_INTERPRET=1, the CPU tests) stores bfloat16 as uint16 and
    # its tl.dot multiplies those integers: there the dot operands are widened to float32.
    interpreted = triton.knobs.runtime.interpret
    group_of_input = weight.group_of_input
    grid = (
        triton.cdiv(outputs, config.block_n),
        triton.cdiv(tokens, config.block_m),
        split_k,
    )
    _quant_matmul_kernel[grid](
        partial,
        x,
        weight.qweight,
        weight.scales,
        weight.zeros,
        weight.qweight if group_of_input is None else group_of_input,
        tokens,
        outputs,
        inputs,
        k_blocks_per_split,
        partial.stride(0) if split_k > 1 else 0,
        partial.stride(-2),
        x.stride(0),
        x.stride(1),
        weight.qweight.stride(0),
        weight.scales.stride(0),
        BITS=weight.bits,
        GROUP_SIZE=weight.group_size,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 or interpreted else "tf32",
        DOT_IN_FLOAT32=interpreted,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    out = partial.sum(0).to(x.dtype) if split_k > 1 else partial
    return out.view(*leading, outputs)
