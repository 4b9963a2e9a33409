"""Rotary position embedding applied to query and key vectors, looked up by position.

Called by `ember.workers.layers.rotary_embedding`. CUDA tensors go to the Triton kernel of
`rotary_triton.py` (imported only then); the torch reference here serves CPU and tests.
"""

from __future__ import annotations

import torch


def apply_rotary_emb(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox_style: bool = True,
    step_cache: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate `query` [T, Hq, D] and `key` [T, Hk, D] by the angles of `positions` [T].

    `cos_sin_cache` is [max_position, rotary_dim] holding [cos | sin] halves. Only the first
    rotary_dim channels of each head rotate (partial rotary); the rest pass through.
    Neox style pairs channel i with i + rotary_dim/2; GPT-J style pairs 2i with 2i+1.
    `step_cache` (a dict that lives for one step, `AttentionMetadata.derived`) keeps the cos/sin
    of `positions` on CPU, so that only the first layer of a step looks them up.
    """
    if query.device.type == "cuda":
        from ember.kernels.rotary_triton import apply_rotary_emb_triton

        return apply_rotary_emb_triton(positions, query, key, cos_sin_cache, is_neox_style)
    return apply_rotary_emb_torch(positions, query, key, cos_sin_cache, is_neox_style, step_cache)


def apply_rotary_emb_torch(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox_style: bool = True,
    step_cache: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    if step_cache is None:
        cos, sin = rotary_cos_sin(positions, cos_sin_cache)
    else:
        cos_sin = step_cache.get(("rope", id(cos_sin_cache)))
        if cos_sin is None:
            cos_sin = step_cache[("rope", id(cos_sin_cache))] = rotary_cos_sin(
                positions, cos_sin_cache
            )
        cos, sin = cos_sin
    return rotate_query_key(query, key, cos, sin, cos_sin_cache.shape[-1], is_neox_style)


def rotary_cos_sin(
    positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, 1, rotary_dim / 2] of `positions` [T]: the same for every layer of a
    step, so a caller may compute them once."""
    cos, sin = cos_sin_cache.index_select(0, positions).unsqueeze(1).chunk(2, dim=-1)
    return cos, sin


def rotate_query_key(
    query: torch.Tensor,
    key: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    rotary_dim: int,
    is_neox_style: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate `query` [T, Hq, D] and `key` [T, Hk, D] by `cos`/`sin` (`rotary_cos_sin`); both
    rotate in one pass over their heads side by side (fewer, larger ops)."""
    num_query_heads = query.shape[1]
    both = _rotate(torch.cat((query, key), dim=1), cos, sin, rotary_dim, is_neox_style)
    return both[:, :num_query_heads], both[:, num_query_heads:]


def _rotate(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, is_neox_style: bool
) -> torch.Tensor:
    x_rot = x[..., :rotary_dim].float()
    if is_neox_style:
        x1, x2 = x_rot.chunk(2, dim=-1)
    else:
        x1, x2 = x_rot[..., ::2], x_rot[..., 1::2]
    out1 = x1 * cos - x2 * sin
    out2 = x2 * cos + x1 * sin
    if is_neox_style:
        rotated = torch.cat((out1, out2), dim=-1)
    else:
        rotated = torch.stack((out1, out2), dim=-1).flatten(-2)
    rotated = rotated.to(x.dtype)
    if rotary_dim == x.shape[-1]:
        return rotated
    return torch.cat((rotated, x[..., rotary_dim:]), dim=-1)
