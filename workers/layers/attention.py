"""The attention layer: stores this step's keys and values in the paged KV cache, then attends.

Its `kv_cache` tensor is bound by the model runner once the cache is allocated; the metadata
describing the batch comes with every forward call.
"""

from __future__ import annotations

import torch
from torch import nn

from ember.kernels import paged_attention, write_kv_cache
from ember.kernels.attention import AttentionMetadata


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
        write_kv_cache(
            key, value, self.kv_cache, attn_metadata.slot_mapping, attn_metadata.all_slots_valid
        )
        output = paged_attention(
            query,
            self.kv_cache,
            attn_metadata,
            self.scale,
            sliding_window=self.sliding_window,
            logits_soft_cap=self.logits_soft_cap,
        )
        return output.view(num_tokens, self.num_heads * self.head_dim)
