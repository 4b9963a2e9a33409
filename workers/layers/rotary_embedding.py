"""Rotary position embedding with the scaling types of Hugging Face configs.

The inverse frequencies come from `transformers.modeling_rope_utils` (linear, dynamic, yarn,
llama3, longrope), so ember's angles are the ones the reference model uses; the cos/sin table
is built once for every position up to `max_position`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from ember.kernels import apply_rotary_emb


def rope_parameters(config: PretrainedConfig) -> dict:
    """The rope settings of a config, across transformers' old (`rope_scaling`, `rope_theta`)
    and new (`rope_parameters`) spellings."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None)
    if scaling:
        params = {**scaling, **params}
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    params.setdefault("rope_type", params.get("type", "default"))
    return params


class RotaryEmbedding(nn.Module):
    def __init__(
        self,
        config: PretrainedConfig,
        head_dim: int,
        max_position: int,
        is_neox_style: bool = True,
    ):
        super().__init__()
        self.is_neox_style = is_neox_style
        params = rope_parameters(config)
        rope_type = params["rope_type"]
        partial_rotary_factor = getattr(config, "partial_rotary_factor", 1.0)
        rotary_dim = int(head_dim * partial_rotary_factor)
        if rope_type == "default":
            exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
            inv_freq = 1.0 / (params["rope_theta"] ** exponents)
            attention_scaling = 1.0
        elif rope_type in ROPE_INIT_FUNCTIONS:
            inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](
                config, torch.device("cpu")
            )
        else:
            raise ValueError(
                f"unsupported rope type {rope_type!r}; supported: "
                f"{['default', *sorted(ROPE_INIT_FUNCTIONS)]}"
            )
        positions = torch.arange(max_position, dtype=torch.float32)
        angles = torch.outer(positions, inv_freq.float())
        cos_sin = torch.cat((angles.cos(), angles.sin()), dim=-1) * attention_scaling
        self.register_buffer("cos_sin_cache", cos_sin, persistent=False)

    def forward(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rotary_emb(positions, query, key, self.cos_sin_cache, self.is_neox_style)
