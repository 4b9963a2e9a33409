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
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from ember.kernels import apply_rotary_emb


def rope_parameters(config: PretrainedConfig, layer_type: str | None = None) -> dict:
    """The rope settings of a config, across transformers' old (`rope_scaling`, `rope_theta`)
    and new (`rope_parameters`, possibly one dict per layer type as in Gemma 3) spellings."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        params = dict(params[layer_type])
    scaling = getattr(config, "rope_scaling", None)
    if scaling and layer_type is None:
        params = {**scaling, **params}
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    if "partial_rotary_factor" not in params:
        params["partial_rotary_factor"] = getattr(config, "partial_rotary_factor", 1.0)
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def rope_layer_type(config: PretrainedConfig, layer_idx: int) -> str | None:
    """The layer type whose own rope settings layer `layer_idx` uses (Gemma 3: local layers
    rotate with `sliding_attention`'s base), or None when the config has one setting for all."""
    layer_types = getattr(config, "layer_types", None)
    params = getattr(config, "rope_parameters", None) or {}
    if layer_types is not None and isinstance(params.get(layer_types[layer_idx]), dict):
        return layer_types[layer_idx]
    return None


class RotaryEmbedding(nn.Module):
    def __init__(
        self,
        config: PretrainedConfig,
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
        elif rope_type in ROPE_INIT_FUNCTIONS:
            kwargs = {"layer_type": layer_type} if layer_type is not None else {}
            if rope_type == "dynamic":  # unscaled up to max_position_embeddings (see above)
                kwargs["seq_len"] = max_position
            inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](
                config, torch.device("cpu"), **kwargs
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


# One module per (config, geometry, device): every layer of a model shares its table. Weak
# values: an entry lives as long as a model holds it, and the model holds its config, so an id
# is never reused while its entry exists.
_ROPE_CACHE: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def get_rope(
    config: PretrainedConfig,
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
