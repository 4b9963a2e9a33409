"""RMSNorm, alone and fused with the residual add that precedes it in a decoder layer.

Called by `ember.workers.layers.layernorm`. CUDA tensors go to the Triton kernel of
`layernorm_triton.py` (imported only then); float32 CPU tensors to the C kernel of
`csrc/rms_norm.c` (one call instead of torch's five operators: 6 us against 13 us for a decode
row; a 2048-row prefill chunk's on two threads, 0.2 ms against torch's 1.4); the torch
references here serve the rest, and tests.
"""

from __future__ import annotations

import ctypes

import torch

from ember.kernels.cpu_library import isa_cached, load_c_library


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 and cast back to x's dtype (or
    rounded to `out_dtype`: a float32 row's result rounded once, as a cast after it would)."""
    if x.device.type == "cuda":
        from ember.kernels.layernorm_triton import rms_norm_triton

        return _cast(rms_norm_triton(x, weight, eps), out_dtype)
    c_out_dtype = out_dtype or x.dtype
    if x.dtype == torch.float32 and _c_kernel_applies(x, weight, c_out_dtype):
        out = torch.empty_like(x, dtype=c_out_dtype)
        if rms_norm_c(x, weight, eps, out) == 0:
            return out
    return _cast(rms_norm_torch(x, weight, eps), out_dtype)


def fused_add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (rms_norm(x + residual), x + residual): the new hidden state and the new residual,
    both in the residual's dtype (the hidden state rounded to `out_dtype` where given). On CPU x
    may be narrower than a float32 residual (bfloat16: a packed layer's output, widened
    exactly as it is read)."""
    if x.device.type == "cuda":
        from ember.kernels.layernorm_triton import fused_add_rms_norm_triton

        out, new_residual = fused_add_rms_norm_triton(x, residual, weight, eps)
        return _cast(out, out_dtype), new_residual
    c_out_dtype = out_dtype or residual.dtype
    if (
        residual.dtype == torch.float32
        and _c_kernel_applies(x, weight, c_out_dtype)
        and _c_kernel_applies(residual, weight, c_out_dtype)
        and x.shape == residual.shape
    ):
        out = torch.empty_like(residual, dtype=c_out_dtype)
        new_residual = torch.empty_like(residual)
        if rms_norm_c(x, weight, eps, out, residual, new_residual) == 0:
            return out, new_residual
    out, new_residual = fused_add_rms_norm_torch(x, residual, weight, eps)
    return _cast(out, out_dtype), new_residual


def _cast(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return x if dtype is None else x.to(dtype)


def _c_kernel_applies(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """The C kernel reads and writes float32 or bfloat16 rows, with float32 weights."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and out_dtype in (torch.float32, torch.bfloat16)
        and weight.dtype == torch.float32
        and x.is_contiguous()
        and weight.is_contiguous()
        and x.shape[-1] == weight.shape[0]
        and x.numel() > 0
    )


def rms_norm_c(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor,
    residual: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> int:
    """The C kernel on contiguous CPU rows: `out` = rms_norm(x (+ residual)) * weight, the sum
    also written to `residual_out` (may be `residual`). x and out float32 or bfloat16; weight
    and the residuals float32. Returns 0, or non-zero when it computed nothing (no compiler,
    rows too wide) and the caller must fall back."""
    library = _library()
    if library is None:
        return -1
    hidden = x.shape[-1]
    return library.ember_rms_norm(
        x.data_ptr(),
        x.dtype == torch.bfloat16,
        None if residual is None else residual.data_ptr(),
        weight.data_ptr(),
        x.numel() // hidden,
        hidden,
        eps,
        out.data_ptr(),
        out.dtype == torch.bfloat16,
        None if residual_out is None else residual_out.data_ptr(),
    )


@isa_cached
def _library() -> ctypes.CDLL | None:
    library = load_c_library("rms_norm.c", ("-ffp-contract=off", "-fopenmp"))
    library = library or load_c_library("rms_norm.c", ("-ffp-contract=off",))
    if library is None:
        return None
    i64, ptr, flag = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    library.ember_rms_norm.argtypes = [ptr, flag, ptr, ptr, i64, i64, ctypes.c_float, ptr, flag]
    library.ember_rms_norm.argtypes += [ptr]
    library.ember_rms_norm.restype = ctypes.c_int
    return library


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32 and weight.dtype == torch.float32:  # one fused op, same math
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)
    x_f32 = x.float()
    variance = x_f32.pow(2).mean(dim=-1, keepdim=True)
    return (x_f32 * torch.rsqrt(variance + eps)).to(x.dtype) * weight


def fused_add_rms_norm_torch(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    residual = x + residual
    return rms_norm_torch(residual, weight, eps), residual
