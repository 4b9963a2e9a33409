"""The attention layer: stores this step's keys and values in the paged KV cache, then attends.

Its `kv_cache` tensor is bound by the model runner once the cache is allocated; the metadata
describing the batch comes with every forward call. `k_scale` and `v_scale` (vLLM's per-layer,
per-tensor scales, 1.0 by default) are what an FP8 cache's keys and values are divided by when
written and multiplied by when read; other caches ignore them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ember.kernels import paged_attention, write_kv_cache
from ember.kernels.attention import AttentionMetadata
from ember.kernels.decode_cpu import rope_write_kv

if TYPE_CHECKING:
    from ember.workers.layers.rotary_embedding import RotaryEmbedding

# vLLM's K_SCALE_CONSTANT and V_SCALE_CONSTANT: `calculate_kv_scales` sets a scale to the
# largest magnitude of the first step's keys (values) over this, leaving e4m3's range (448)
# room for later tokens larger than those of the first prompt.
K_SCALE_RANGE = 200.0
V_SCALE_RANGE = 100.0


class Attention(nn.Module):
    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        scale: float,
        num_kv_heads: int,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.num_kv_heads = num_kv_heads
        self.sliding_window = sliding_window
        self.logits_soft_cap = logits_soft_cap
        self.kv_cache = torch.empty(0)  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        # float32 scalars on the layer's device, read there by the kernels; buffers, so that
        # they move with the weights, but not in the state dict (checkpoints do not hold them)
        self.register_buffer("k_scale", torch.ones((), dtype=torch.float32), persistent=False)
        self.register_buffer("v_scale", torch.ones((), dtype=torch.float32), persistent=False)
        # True: the next forward sets the scales from its keys and values, then turns this off
        # (the model runner sets it for the first step of an engine with calculate_kv_scales)
        self.calculate_kv_scales = False

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """query [T, Hq*D], key/value [T, Hkv*D] -> [T, Hq*D]."""
        num_tokens = query.shape[0]
        query = query.view(num_tokens, self.num_heads, self.head_dim)
        key = key.view(num_tokens, self.num_kv_heads, self.head_dim)
        value = value.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.calculate_kv_scales:
            self.calc_kv_scales(key, value)
        write_kv_cache(
            key,
            value,
            self.kv_cache,
            attn_metadata.slot_mapping,
            attn_metadata.all_slots_valid,
            k_scale=self.k_scale,
            v_scale=self.v_scale,
        )
        return self.attend(query, attn_metadata)

    def attend(
        self,
        query: torch.Tensor,
        attn_metadata: AttentionMetadata,
        out_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """query [T, Hq, D] over the cache, which holds this step's keys and values -> [T, Hq*D]
        in `out_dtype` (None: the query's)."""
        num_tokens = query.shape[0]
        output = paged_attention(
            query,
            self.kv_cache,
            attn_metadata,
            self.scale,
            sliding_window=self.sliding_window,
            logits_soft_cap=self.logits_soft_cap,
            k_scale=self.k_scale,
            v_scale=self.v_scale,
            out_dtype=out_dtype,
        )
        return output.view(num_tokens, self.num_heads * self.head_dim)

    def forward_fused_qkv(
        self,
        qkv: torch.Tensor,
        positions: torch.Tensor,
        rotary_emb: RotaryEmbedding,
        attn_metadata: AttentionMetadata,
        dtype: torch.dtype | None = None,
        out_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """The fused projection's output qkv [T, (Hq + 2 Hkv) D]: queries and keys rotated by
        `rotary_emb`, keys and values stored in the cache, then attention -> [T, Hq*D]. The
        rotation and the store are one C call where `rotate_into_cache` serves. `dtype`: the
        model's activations, where qkv comes narrower (a bfloat16 projection under float32
        activations): the values are widened to it as they are read. `out_dtype`: the output's
        (None: `dtype`), the values of the attention's output cast to it."""
        dtype = dtype or qkv.dtype
        if dtype == torch.float32:  # the C call reads float32 or bfloat16 into float32 math
            query = self.rotate_into_cache(qkv, positions, rotary_emb, attn_metadata)
            if query is not None:
                return self.attend(query, attn_metadata, out_dtype)
        qkv = qkv.to(dtype)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        query, key, value = qkv.split([q_size, kv_size, kv_size], dim=-1)
        query, key = rotary_emb(
            positions,
            query.reshape(-1, self.num_heads, self.head_dim),
            key.reshape(-1, self.num_kv_heads, self.head_dim),
            attn_metadata.derived,
        )
        output = self(query, key, value, attn_metadata)  # the module's call: its hooks see it
        return output if out_dtype is None else output.to(out_dtype)

    def rotate_into_cache(
        self,
        qkv: torch.Tensor,
        positions: torch.Tensor,
        rotary_emb: RotaryEmbedding,
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor | None:
        """The query [T, Hq, D] rotated, with the rotated keys and the values of `qkv`
        [T, (Hq + 2 Hkv) D] written to the cache, in one C call over the step's tokens
        (`decode_cpu.rope_write_kv`, shared among the cores for a prefill chunk) instead of
        torch's dozen operators; the same bits (float32 math, no fused multiply-adds, torch's
        rounding into the cache; a bfloat16 qkv, the projection's output under float32
        activations, is read into float32 math). None, having done nothing, where it does not
        apply: not a float32 or bfloat16 CPU qkv, GPT-J-style rotation, a first step that sets
        the KV scales, a cache the kernel does not read, a slot of -1 or no compiler."""
        if (
            qkv.device.type != "cpu"
            or qkv.dtype not in (torch.float32, torch.bfloat16)
            or not qkv.is_contiguous()
            or not rotary_emb.is_neox_style
            or self.calculate_kv_scales
            or self.kv_cache.dim() != 5
            or not self.kv_cache.is_contiguous()
            or not _int64_vector(positions)
            or not _int64_vector(attn_metadata.slot_mapping)
        ):
            return None
        query = torch.empty(qkv.shape[0], self.num_heads, self.head_dim, dtype=torch.float32)
        status = rope_write_kv(
            qkv,
            positions,
            rotary_emb.cos_sin_cache,
            self.kv_cache,
            attn_metadata.slot_mapping,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            query,
            k_scale=self.k_scale,
            v_scale=self.v_scale,
        )
        return query if status == 0 else None

    def calc_kv_scales(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """vLLM's `calc_kv_scales`: each scale from this step's largest magnitude (a step of
        all-zero keys keeps 1.0), once."""
        for scale, x, scale_range in (
            (self.k_scale, key, K_SCALE_RANGE),
            (self.v_scale, value, V_SCALE_RANGE),
        ):
            largest = x.abs().amax().float()
            scale.copy_(torch.where(largest > 0, largest / scale_range, 1.0))
        self.calculate_kv_scales = False


def _int64_vector(x: torch.Tensor) -> bool:
    return x.dtype == torch.int64 and x.dim() == 1 and x.is_contiguous()
