"""RMSNorm as a module (and Gemma's variant scaling by 1 + weight); a residual passed in is
added first (the fused form)."""

from __future__ import annotations

import torch
from torch import nn

from ember.kernels import fused_add_rms_norm, rms_norm


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None = None,
        out_dtype: torch.dtype | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The normed x (after adding `residual`, which is returned updated), in x's dtype or
        the residual's, or rounded to `out_dtype`."""
        # out_dtype only where given: the kernels' plain signature stays the one callers see
        extra = () if out_dtype is None else (out_dtype,)
        if residual is None:
            return rms_norm(x, self.weight, self.eps, *extra)
        return fused_add_rms_norm(x, residual, self.weight, self.eps, *extra)


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: x / rms(x) * (1 + weight), all in float32 (checkpoints store weight - 1)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__(hidden_size, eps)
        self.weight.data.zero_()

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        x_f32 = x.float()
        x_f32 = x_f32 * torch.rsqrt(x_f32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (x_f32 * (1.0 + self.weight.float())).to(x.dtype)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None = None,
        out_dtype: torch.dtype | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            out = self._norm(x)
        else:
            residual = x + residual
            out = self._norm(residual)
        out = out if out_dtype is None else out.to(out_dtype)
        return out if residual is None else (out, residual)
