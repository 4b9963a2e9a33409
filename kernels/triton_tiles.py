"""What the Triton GEMMs of quantized weights (`quant_matmul_triton`, `fp8_matmul_triton`) share
about their launches: the tile sizes of a call (`BlockConfig`), what the GPU holds
(`device_limits`), and how far K is split when a decode batch's output tiles cannot fill it."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

# A grid of fewer output tiles than two programs a multiprocessor splits K, up to this.
MAX_SPLIT_K = 16
# Where no GPU says (Triton's interpreter): an H100's 132 multiprocessors, 227 KiB of shared
# memory per program.
DEFAULT_LIMITS = (132, 227 * 1024)


@dataclass(frozen=True, slots=True)
class BlockConfig:
    """Tile sizes and launch options of one GEMM call."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


@functools.cache
def device_limits(device: torch.device) -> tuple[int, int]:
    """(multiprocessors, shared memory bytes a program may use) of a CUDA device."""
    if device.type != "cuda":
        return DEFAULT_LIMITS
    properties = torch.cuda.get_device_properties(device)
    shared = getattr(properties, "shared_memory_per_block_optin", 48 * 1024)
    return properties.multi_processor_count, shared


def split_k_parts(
    tokens: int, outputs: int, inputs: int, config: BlockConfig, multiprocessors: int
) -> int:
    """K parts such that the grid holds about two programs a multiprocessor, at most
    `MAX_SPLIT_K` and no more than the K tiles."""
    tiles = triton.cdiv(tokens, config.block_m) * triton.cdiv(outputs, config.block_n)
    k_blocks = triton.cdiv(inputs, config.block_k)
    return max(1, min(triton.cdiv(2 * multiprocessors, tiles), k_blocks, MAX_SPLIT_K))


def split_k_output(
    tokens: int,
    outputs: int,
    inputs: int,
    config: BlockConfig,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[int, int, torch.Tensor]:
    """(K parts, K tiles a part, the kernel's output): with K split, one float32 [T, N] of
    partial sums a part (summed after the launch); else [T, N] in `dtype`. No part is left
    empty."""
    k_blocks = triton.cdiv(inputs, config.block_k)
    k_blocks_per_split = triton.cdiv(k_blocks, config.split_k)
    parts = triton.cdiv(k_blocks, k_blocks_per_split)
    if parts > 1:
        partial = torch.empty(parts, tokens, outputs, dtype=torch.float32, device=device)
    else:
        partial = torch.empty(tokens, outputs, dtype=dtype, device=device)
    return parts, k_blocks_per_split, partial
