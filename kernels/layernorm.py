"""RMSNorm, alone and fused with the residual add that precedes it in a decoder layer.

Called by `ember.workers.layers.layernorm`. CUDA tensors go to the Triton kernel of
`layernorm_triton.py` (imported only then); float32 CPU tensors to the C kernel of
`csrc/rms_norm.c` (one call instead of torch's five operators: 3 us against 25 us for a decode
row); the torch references here serve the rest, and tests.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from ember.kernels.cpu_library import load_c_library


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 and cast back to x's dtype."""
    if x.device.type == "cuda":
        from ember.kernels.layernorm_triton import rms_norm_triton

        return rms_norm_triton(x, weight, eps)
    if _c_kernel_applies(x, weight):
        library = _library()
        if library is not None:
            out = torch.empty_like(x)
            library.ember_rms_norm(
                x.data_ptr(),
                None,
                weight.data_ptr(),
                x.numel() // x.shape[-1],
                x.shape[-1],
                eps,
                out.data_ptr(),
                None,
            )
            return out
    return rms_norm_torch(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (rms_norm(x + residual), x + residual): the new hidden state and the new residual."""
    if x.device.type == "cuda":
        from ember.kernels.layernorm_triton import fused_add_rms_norm_triton

        return fused_add_rms_norm_triton(x, residual, weight, eps)
    if _c_kernel_applies(x, weight) and _c_kernel_applies(residual, weight):
        library = _library()
        if library is not None:
            out, new_residual = torch.empty_like(x), torch.empty_like(x)
            library.ember_rms_norm(
                x.data_ptr(),
                residual.data_ptr(),
                weight.data_ptr(),
                x.numel() // x.shape[-1],
                x.shape[-1],
                eps,
                out.data_ptr(),
                new_residual.data_ptr(),
            )
            return out, new_residual
    return fused_add_rms_norm_torch(x, residual, weight, eps)


def _c_kernel_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.is_contiguous()
        and weight.is_contiguous()
        and x.shape[-1] == weight.shape[0]
        and x.numel() > 0
    )


@functools.cache
def _library() -> ctypes.CDLL | None:
    library = load_c_library("rms_norm.c")
    if library is None:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    library.ember_rms_norm.argtypes = [ptr, ptr, ptr, i64, i64, ctypes.c_float, ptr, ptr]
    library.ember_rms_norm.restype = None
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
