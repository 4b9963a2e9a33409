"""Rotary position embedding with the scaling types of Hugging Face configs.

The inverse frequencies come from `transformers.modeling_rope_utils` (linear, dynamic, yarn,
llama3, longrope), so ember's angles are the ones the reference model uses; the cos/sin table
is built once for every position up to `max_position`. Models get it through `get_rope`, which
hands every layer of a model the same module (one table per model, not one per layer).

Decision on `dynamic` (NTK) scaling: Hugging Face recomputes the frequencies from the current
sequence length and leaves them unscaled up to `max_position_embeddings`. ember builds the
table once for `max_position` (the engine's `max_model_len`): unscaled, equal to Hugging Face,
while that is within `max_position_embeddings` (the default `max_model_len` of such a model);
scaled for the whole table, as vLLM does, when a longer `max_model_len` is asked for.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from ember.kernels import apply_rotary_emb
from ember.workers.hf_config import HFConfig, rope_parameters


class RotaryEmbedding(nn.Module):
    def __init__(
        self,
        config: HFConfig,
        head_dim: int,
        max_position: int,
        is_neox_style: bool = True,
        layer_type: str | None = None,
    ):
        super().__init__()
        self.is_neox_style = is_neox_style
        params = rope_parameters(config, layer_type)
        rope_type = params["rope_type"]
        rotary_dim = int(head_dim * params["partial_rotary_factor"])
        self.rotary_dim = rotary_dim
        if rope_type == "default":
            exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
            inv_freq = 1.0 / (params["rope_theta"] ** exponents)
            attention_scaling = 1.0
        else:
            inv_freq, attention_scaling = _scaled_inv_freq(
                config, rope_type, layer_type, max_position
            )
        positions = torch.arange(max_position, dtype=torch.float32)
        angles = torch.outer(positions, inv_freq.float())
        cos_sin = torch.cat((angles.cos(), angles.sin()), dim=-1) * attention_scaling
        self.register_buffer("cos_sin_cache", cos_sin, persistent=False)
        self._step_cos_sin: tuple[torch.Tensor, torch.Tensor] = ()

    def forward(
        self,
        positions: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        step_cache: dict | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate query/key by `positions`; `step_cache`: see `apply_rotary_emb`."""
        return apply_rotary_emb(
            positions, query, key, self.cos_sin_cache, self.is_neox_style, step_cache
        )


def _scaled_inv_freq(
    config: HFConfig, rope_type: str, layer_type: str | None, max_position: int
) -> tuple[torch.Tensor, float]:
    """transformers' frequencies for a scaled rope type; they need its config class."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(
            f"unsupported rope type {rope_type!r}; supported: "
            f"{['default', *sorted(ROPE_INIT_FUNCTIONS)]}"
        )
    if isinstance(config, HFConfig):
        config = config.to_transformers()
    kwargs = {"layer_type": layer_type} if layer_type is not None else {}
    if rope_type == "dynamic":  # unscaled up to max_position_embeddings (see above)
        kwargs["seq_len"] = max_position
    return ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"), **kwargs)


# One module per (config, geometry, device): every layer of a model shares its table. Weak
# values: an entry lives as long as a model holds it, and the model holds its config, so an id
# is never reused while its entry exists.
_ROPE_CACHE: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def get_rope(
    config: HFConfig,
    head_dim: int,
    max_position: int,
    is_neox_style: bool = True,
    layer_type: str | None = None,
) -> RotaryEmbedding:
    device = torch.get_default_device()
    key = (id(config), head_dim, max_position, is_neox_style, layer_type, str(device))
    rope = _ROPE_CACHE.get(key)
    if rope is None:
        rope = RotaryEmbedding(config, head_dim, max_position, is_neox_style, layer_type)
        _ROPE_CACHE[key] = rope
    return rope
