"""Triton kernels for the gated activations SiLU-and-mul and GELU-and-mul (CUDA).

Called through `ember.kernels.activation`, which dispatches here for CUDA tensors; the torch
references beside them in `activation.py` are the oracle in `tests/test_triton_kernels.py`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_SILU, _GELU, _GELU_TANH = 0, 1, 2
_ACTIVATION_IDS = {"silu": _SILU, "none": _GELU, "tanh": _GELU_TANH}


@triton.jit
def _gated_activation_kernel(
    out_ptr,
    x_ptr,
    d,
    stride_x_row,
    stride_out_row,
    ACTIVATION: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x_row + d + cols, mask=mask, other=0.0).to(tl.float32)
    if ACTIVATION == 0:
        activated = gate / (1.0 + tl.exp(-gate))
    elif ACTIVATION == 1:
        activated = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))
    else:
        inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        tanh_inner = 2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0
        activated = 0.5 * gate * (1.0 + tanh_inner)
    result = (activated * up).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_out_row + cols, result, mask=mask)


def gated_activation_triton(x: torch.Tensor, activation: str) -> torch.Tensor:
    """activation(gate) * up for x [..., 2 * d] = [gate | up]; activation is "silu", or GELU's
    `approximate` ("none" for the exact erf form, "tanh")."""
    if activation not in _ACTIVATION_IDS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATION_IDS)}, got {activation!r}")
    d = x.shape[-1] // 2
    rows = x.reshape(-1, 2 * d)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape[0], d, dtype=x.dtype, device=x.device)
    if rows.shape[0] == 0:
        return out.view(*x.shape[:-1], d)
    block = min(1024, triton.next_power_of_2(d))
    grid = (rows.shape[0], triton.cdiv(d, block))
    _gated_activation_kernel[grid](
        out,
        rows,
        d,
        rows.stride(0),
        out.stride(0),
        ACTIVATION=_ACTIVATION_IDS[activation],
        BLOCK=block,
    )
    return out.view(*x.shape[:-1], d)


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    return gated_activation_triton(x, "silu")


def gelu_and_mul_triton(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    return gated_activation_triton(x, approximate)
