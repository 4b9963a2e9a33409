"""Activation modules, by the name a Hugging Face config gives in `hidden_act`."""

from __future__ import annotations

import torch
from torch import nn

from ember.kernels import silu_and_mul


class SiluAndMul(nn.Module):
    """SiLU(gate) * up for an input [..., 2 * d] holding [gate | up]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(x)


_GATED_ACTIVATIONS = {"silu": SiluAndMul, "swish": SiluAndMul}


def get_gated_activation(hidden_act: str) -> nn.Module:
    if hidden_act not in _GATED_ACTIVATIONS:
        raise ValueError(
            f"unsupported hidden_act {hidden_act!r}; supported: {sorted(_GATED_ACTIVATIONS)}"
        )
    return _GATED_ACTIVATIONS[hidden_act]()
