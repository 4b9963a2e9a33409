"""Activation modules, by the name a Hugging Face config gives in `hidden_act` (or Gemma's
`hidden_activation`): gated ones for [gate | up] MLPs, plain ones for GPT-2/OPT/NeoX MLPs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.kernels import gelu_and_mul, silu_and_mul


class SiluAndMul(nn.Module):
    """SiLU(gate) * up for an input [..., 2 * d] holding [gate | up]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(x)


class GeluAndMul(nn.Module):
    """GELU(gate) * up for an input [..., 2 * d] holding [gate | up] (exact or tanh-approximated)."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_and_mul(x, self.approximate)


class Activation(nn.Module):
    """An element-wise activation chosen by name (for MLPs without a gate)."""

    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.function(x)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


# Hugging Face's names (transformers.activations.ACT2FN); gelu_new / gelu_fast /
# gelu_pytorch_tanh are all the tanh approximation of GELU.
_ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "silu": F.silu,
    "swish": F.silu,
}
_GATED_ACTIVATIONS = {
    "silu": SiluAndMul,
    "swish": SiluAndMul,
    "gelu": lambda: GeluAndMul("none"),
    "gelu_new": lambda: GeluAndMul("tanh"),
    "gelu_fast": lambda: GeluAndMul("tanh"),
    "gelu_pytorch_tanh": lambda: GeluAndMul("tanh"),
}


def get_gated_activation(hidden_act: str) -> nn.Module:
    if hidden_act not in _GATED_ACTIVATIONS:
        raise ValueError(
            f"unsupported hidden_act {hidden_act!r}; supported: {sorted(_GATED_ACTIVATIONS)}"
        )
    return _GATED_ACTIVATIONS[hidden_act]()


def get_act_fn(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(_ACTIVATIONS)}")
    return Activation(_ACTIVATIONS[name])
