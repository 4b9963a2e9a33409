"""Gated activations used by MLP blocks: the input holds [gate | up] along the last dim.

Called by `ember.workers.layers.activation`. CUDA tensors go to the Triton kernels of
`activation_triton.py` (imported only then); the torch references here serve CPU and tests.
bfloat16 on CPU is computed in float32 and rounded once (SiLU through the C kernel of the
fused decode step, `decode_cpu.silu_and_mul_bfloat16`): the values of the float32 product
rounded for the next matmul, as a CPU MLP kept in bfloat16 needs (`LlamaMLP`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_GELU_APPROXIMATIONS = ("none", "tanh")


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up, with x = [gate | up] on the last dimension."""
    if x.device.type == "cuda":
        from ember.kernels.activation_triton import silu_and_mul_triton

        return silu_and_mul_triton(x)
    if x.dtype == torch.bfloat16:  # float32 math, rounded once (a CPU MLP kept in bfloat16)
        from ember.kernels.decode_cpu import silu_and_mul_bfloat16

        out = silu_and_mul_bfloat16(x)
        return out if out is not None else silu_and_mul_torch(x.float()).bfloat16()
    return silu_and_mul_torch(x)


def gelu_and_mul(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU(gate) * up, exact ("none") or tanh-approximated, with x = [gate | up]."""
    if approximate not in _GELU_APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {_GELU_APPROXIMATIONS}, got {approximate!r}")
    if x.device.type == "cuda":
        from ember.kernels.activation_triton import gelu_and_mul_triton

        return gelu_and_mul_triton(x, approximate)
    if x.dtype == torch.bfloat16:  # float32 math, rounded once, as silu_and_mul
        return gelu_and_mul_torch(x.float(), approximate).bfloat16()
    return gelu_and_mul_torch(x, approximate)


def silu_and_mul_torch(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_and_mul_torch(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate=approximate) * up
