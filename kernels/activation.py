"""Gated activations used by MLP blocks: the input holds [gate | up] along the last dim."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up, with x = [gate | up] on the last dimension."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
