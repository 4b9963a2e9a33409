"""Triton kernel for RMSNorm, alone or fused with the residual add before it (CUDA).

Called through `ember.kernels.layernorm`, which dispatches here for CUDA tensors; the torch
references in `layernorm.py` are the oracle in `tests/test_triton_kernels.py`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    out_ptr,
    residual_out_ptr,
    x_ptr,
    residual_ptr,
    weight_ptr,
    hidden_size,
    eps,
    stride_x,
    stride_residual,
    stride_out,
    stride_residual_out,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden_size
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0)
        # Rounded to the input dtype, as `x + residual` in torch is.
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_residual_out + cols, x, mask=mask)
    x_f32 = x.to(tl.float32)
    variance = tl.sum(x_f32 * x_f32, axis=0) / hidden_size
    normed = (x_f32 * tl.rsqrt(variance + eps)).to(x_ptr.dtype.element_ty)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    result = (normed.to(tl.float32) * weight.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_out + cols, result, mask=mask)


def _launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    hidden_size = x.shape[-1]
    rows = x.reshape(-1, hidden_size)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out_dtype = torch.promote_types(x.dtype, weight.dtype)  # as `x.to(x.dtype) * weight`
    out = torch.empty(rows.shape, dtype=out_dtype, device=x.device)
    residual_rows = residual_out = None
    if residual is not None:
        residual_rows = residual.reshape(-1, hidden_size)
        if residual_rows.stride(-1) != 1:
            residual_rows = residual_rows.contiguous()
        residual_out = torch.empty_like(rows)
    if rows.shape[0] > 0:
        _rms_norm_kernel[(rows.shape[0],)](
            out,
            residual_out if residual_out is not None else out,
            rows,
            residual_rows if residual_rows is not None else rows,
            weight,
            hidden_size,
            eps,
            rows.stride(0),
            residual_rows.stride(0) if residual_rows is not None else 0,
            out.stride(0),
            residual_out.stride(0) if residual_out is not None else 0,
            HAS_RESIDUAL=residual is not None,
            BLOCK=triton.next_power_of_2(hidden_size),
        )
    out = out.view(x.shape)
    return out, None if residual_out is None else residual_out.view(x.shape)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(x, residual, weight, eps)
