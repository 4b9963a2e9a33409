"""Triton GEMM of `fp8_matmul.FP8Weight` (CUDA): y [M, N] = (x_q * s_x) @ (w_q * s_w).T with e4m3
codes on both sides, float32 accumulation. Called through `ember.kernels.fp8_matmul` where
torch._scaled_mm does not take the call (block-wise weights, GPUs before sm_89, float32 outputs);
`fp8_matmul_torch` there is the reference (`tests/test_fp8.py`).

The codes travel as uint8 (Triton's interpreter cannot load float8 tensors) and become either
    FP8_DOT   e4m3 again (a bitcast) for the FP8 tensor cores' tl.dot (sm_89+), or
    otherwise fp16 by moving their bits, s eeee mmm -> s 0eeee mmm0000000 (e4m3's exponent
              bias 7 read with fp16's 15: the value / 2^8, subnormals included), so that fp16
              products (exact: 4 significant bits each) are added in float32; the 2^16 of the
              two operands is multiplied back with the scales.
Scales are applied after each group's partial dot (block-wise: per token and group of GROUP_K
inputs times each row's block scale, DeepSeek's recipe), or once at the end:

    acc[m, n] = sum_g  s_x[m, g] * s_w[n, g] * sum_{k in g} x_q[m, k] * w_q[n, k]

The grid is (output tiles, token tiles, K splits), as `quant_matmul_triton`'s: decode batches
split K until the grid fills the GPU, the float32 partial sums are added after.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ember.kernels.fp8_matmul import FP8Weight
from ember.kernels.triton_tiles import (
    DEFAULT_LIMITS,
    BlockConfig,
    device_limits,
    split_k_output,
    split_k_parts,
)

_MIN_BLOCK_K = 32  # the smallest K tile of an fp8 tl.dot


def triton_takes(weight: FP8Weight) -> bool:
    """Whether the kernel takes `weight`: its K tiles must lie in one scale group, so a
    block-wise group must be a multiple of the smallest tile."""
    return weight.group_k is None or weight.group_k % _MIN_BLOCK_K == 0


def block_config(
    tokens: int,
    outputs: int,
    inputs: int,
    group_k: int | None,
    limits: tuple[int, int] = DEFAULT_LIMITS,
) -> BlockConfig:
    """Decode batches (up to 16 tokens) take 16-row tiles, mid-sized ones 64-row tiles, prefill
    128 x 128 tiles of 8 warps, all 128 inputs deep (a block-wise group at most). K is split
    while the output tiles are fewer than two a multiprocessor; the pipeline is as deep as
    shared memory holds (`limits`: `device_limits`)."""
    multiprocessors, shared_bytes = limits
    if tokens <= 16:
        config = BlockConfig(16, 64, 128, num_stages=4)
    elif tokens <= 64:
        config = BlockConfig(64, 64, 128)
    else:
        config = BlockConfig(128, 128, 128, num_warps=8)
    block_k = config.block_k
    while group_k is not None and group_k % block_k:
        block_k //= 2
    parts = split_k_parts(
        tokens,
        outputs,
        inputs,
        BlockConfig(config.block_m, config.block_n, block_k),
        multiprocessors,
    )
    # a stage holds a tile of each side's codes (1 byte); fp16 copies of one stage and 16 KiB
    # for the rest
    stage_bytes = block_k * (config.block_m + config.block_n)
    free_bytes = shared_bytes - 16 * 1024 - 2 * stage_bytes
    num_stages = max(1, min(config.num_stages, free_bytes // stage_bytes))
    return BlockConfig(config.block_m, config.block_n, block_k, parts, config.num_warps, num_stages)


@triton.jit
def _e4m3_bits_to_fp16(codes):
    """uint8 e4m3 codes -> fp16 of value / 2^8 (exact; the NaN code reads 480 / 2^8)."""
    bits = codes.to(tl.uint16)
    return (((bits & 0x80) << 8) | ((bits & 0x7F) << 7)).to(tl.float16, bitcast=True)


@triton.jit
def _fp8_matmul_kernel(
    out_ptr,  # [SPLIT_K, M, N] float32 partial sums, or [M, N] (SPLIT_K 1)
    x_ptr,  # [M, K] uint8 e4m3 codes
    w_ptr,  # [N, K] uint8 e4m3 codes
    x_scales_ptr,  # float32 [M, G] (strides 0 where broadcast)
    w_scales_ptr,  # float32 [N, G]
    M,
    N,
    K,
    k_blocks_per_split,
    stride_out_split,
    stride_out_m,
    stride_x_m,
    stride_w_n,
    stride_xs_m,
    stride_xs_g,
    stride_ws_n,
    stride_ws_g,
    GROUP_K: tl.constexpr,  # inputs a scale group (block-wise), 0: one scale a token / row
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    FP8_DOT: tl.constexpr,
):
    # fp16 operands hold the values / 2^8 each (`_e4m3_bits_to_fp16`)
    UNIT: tl.constexpr = 1.0 if FP8_DOT else 65536.0
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    row_mask = rows < M
    col_mask = cols < N
    k_blocks = tl.cdiv(K, BLOCK_K)
    first_block = split * k_blocks_per_split
    last_block = tl.minimum(first_block + k_blocks_per_split, k_blocks)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for block in range(first_block, last_block):
        ks = block * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        x = tl.load(
            x_ptr + rows[:, None].to(tl.int64) * stride_x_m + ks[None, :],
            mask=row_mask[:, None] & k_mask[None, :],
            other=0,
        )
        w = tl.load(  # [BLOCK_K, BLOCK_N] of the row-major [N, K]
            w_ptr + cols[None, :].to(tl.int64) * stride_w_n + ks[:, None],
            mask=k_mask[:, None] & col_mask[None, :],
            other=0,
        )
        if FP8_DOT:
            x = x.to(tl.float8e4nv, bitcast=True)
            w = w.to(tl.float8e4nv, bitcast=True)
        else:
            x = _e4m3_bits_to_fp16(x)
            w = _e4m3_bits_to_fp16(w)
        if GROUP_K > 0:  # the tile lies in one group: its scales, then into the sum
            group = block * BLOCK_K // GROUP_K
            x_scale = tl.load(
                x_scales_ptr + rows * stride_xs_m + group * stride_xs_g, mask=row_mask, other=0.0
            )
            w_scale = tl.load(
                w_scales_ptr + cols * stride_ws_n + group * stride_ws_g, mask=col_mask, other=0.0
            )
            part = tl.dot(x, w, out_dtype=tl.float32)
            acc += part * (x_scale * UNIT)[:, None] * w_scale[None, :]
        else:
            acc = tl.dot(x, w, acc, out_dtype=tl.float32)
    if GROUP_K == 0:
        x_scale = tl.load(x_scales_ptr + rows * stride_xs_m, mask=row_mask, other=0.0)
        w_scale = tl.load(w_scales_ptr + cols * stride_ws_n, mask=col_mask, other=0.0)
        acc = acc * (x_scale * UNIT)[:, None] * w_scale[None, :]
    out_mask = row_mask[:, None] & col_mask[None, :]
    pointers = out_ptr + split * stride_out_split + rows[:, None] * stride_out_m + cols[None, :]
    tl.store(pointers, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def _scale_strides(scales: torch.Tensor) -> tuple[int, int]:
    """(stride over tokens / rows, stride over groups) of [] / [R, 1] / [R, G] scales; 0 where
    one value serves all."""
    if scales.dim() == 0:
        return 0, 0
    return (
        scales.stride(0) if scales.shape[0] > 1 else 0,
        scales.stride(1) if scales.shape[1] > 1 else 0,
    )


def fp8_matmul_triton(
    codes: torch.Tensor,
    scales: torch.Tensor,
    weight: FP8Weight,
    out_dtype: torch.dtype,
    *,
    fp8_dot: bool,
    config: BlockConfig | None = None,
) -> torch.Tensor:
    """Same contract as `ember.kernels.fp8_matmul.fp8_matmul_torch`: (codes [M, K] * scales)
    @ w.T -> [M, N] in `out_dtype`; `fp8_dot`: FP8 tensor cores (sm_89+), else fp16 ones;
    `config` defaults to `block_config` of the shapes."""
    outputs, inputs = weight.shape
    if codes.dim() != 2 or codes.shape[1] != inputs:
        raise ValueError(f"codes must be [M, {inputs}] (the weight's inputs), got {codes.shape}")
    if not triton_takes(weight):
        raise ValueError(
            f"weight.group_k must be a multiple of {_MIN_BLOCK_K}, got {weight.group_k}"
        )
    if weight.codes.stride(1) != 1:
        raise ValueError("weight.codes must be row-major [N, K] (stride 1 along K)")
    tokens = codes.shape[0]
    if tokens == 0 or outputs == 0:
        return torch.empty(tokens, outputs, dtype=out_dtype, device=codes.device)
    if codes.stride(1) != 1:
        codes = codes.contiguous()
    if config is None:
        limits = device_limits(codes.device)
        config = block_config(tokens, outputs, inputs, weight.group_k, limits)
    if weight.group_k is not None and weight.group_k % config.block_k:
        raise ValueError(
            f"config: block_k {config.block_k} must divide the group size {weight.group_k}"
        )
    split_k, k_blocks_per_split, partial = split_k_output(
        tokens, outputs, inputs, config, out_dtype, codes.device
    )
    x_scales = scales.float()
    w_scales = weight.scales
    grid = (
        triton.cdiv(outputs, config.block_n),
        triton.cdiv(tokens, config.block_m),
        split_k,
    )
    _fp8_matmul_kernel[grid](
        partial,
        codes.view(torch.uint8),
        weight.codes.view(torch.uint8),
        x_scales,
        w_scales,
        tokens,
        outputs,
        inputs,
        k_blocks_per_split,
        partial.stride(0) if split_k > 1 else 0,
        partial.stride(-2),
        codes.stride(0),
        weight.codes.stride(0),
        *_scale_strides(x_scales),
        *_scale_strides(w_scales),
        GROUP_K=weight.group_k or 0,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        FP8_DOT=fp8_dot,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return partial.sum(0).to(out_dtype) if split_k > 1 else partial
