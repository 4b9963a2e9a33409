"""GPT-NeoX (Pythia, GPT-NeoX-20B): LayerNorm, rotary on part of each head, attention and MLP
in parallel off the same input (`use_parallel_residual`), untied `embed_out` head. The fused
`query_key_value` checkpoint tensor interleaves q, k, v per head and is reordered on load."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import ClassVar

import torch
from torch import nn

from ember.kernels.attention import AttentionMetadata
from ember.workers.hf_config import HFConfig
from ember.workers.layers.activation import get_act_fn
from ember.workers.layers.attention import Attention
from ember.workers.layers.context import ModelContext
from ember.workers.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from ember.workers.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from ember.workers.layers.rotary_embedding import get_rope
from ember.workers.model_loader.weight_utils import load_weights_into


class GPTNeoXAttention(nn.Module):
    def __init__(self, config: HFConfig, max_position: int, ctx: ModelContext):
        super().__init__()
        total_num_heads = config.num_attention_heads
        self.head_size = config.hidden_size // total_num_heads
        bias = getattr(config, "attention_bias", True)
        self.query_key_value = QKVParallelLinear(
            config.hidden_size, self.head_size, total_num_heads, bias=bias, ctx=ctx
        )
        self.dense = RowParallelLinear(config.hidden_size, config.hidden_size, bias=bias, ctx=ctx)
        self.num_heads = self.query_key_value.num_heads
        self.rotary_emb = get_rope(config, self.head_size, max_position)
        self.attn = Attention(self.num_heads, self.head_size, self.head_size**-0.5, self.num_heads)

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, attn_metadata: AttentionMetadata
    ) -> torch.Tensor:
        q, k, v = self.query_key_value(hidden_states).chunk(3, dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_size)
        k = k.reshape(-1, self.num_heads, self.head_size)
        q, k = self.rotary_emb(positions, q, k)
        return self.dense(self.attn(q, k, v, attn_metadata))


class GPTNeoXMLP(nn.Module):
    def __init__(self, config: HFConfig, ctx: ModelContext):
        super().__init__()
        self.dense_h_to_4h = ColumnParallelLinear(
            config.hidden_size, config.intermediate_size, True, ctx=ctx
        )
        self.act = get_act_fn(config.hidden_act)
        self.dense_4h_to_h = RowParallelLinear(
            config.intermediate_size, config.hidden_size, True, ctx=ctx
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class GPTNeoXLayer(nn.Module):
    def __init__(self, config: HFConfig, max_position: int, ctx: ModelContext):
        super().__init__()
        self.use_parallel_residual = config.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = GPTNeoXAttention(config, max_position, ctx)
        self.mlp = GPTNeoXMLP(config, ctx)

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, attn_metadata: AttentionMetadata
    ) -> torch.Tensor:
        attn_output = self.attention(positions, self.input_layernorm(hidden_states), attn_metadata)
        if self.use_parallel_residual:  # x + attn(ln1(x)) + mlp(ln2(x))
            mlp_output = self.mlp(self.post_attention_layernorm(hidden_states))
            return hidden_states + attn_output + mlp_output
        hidden_states = hidden_states + attn_output
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class GPTNeoXModel(nn.Module):
    def __init__(self, config: HFConfig, max_position: int, ctx: ModelContext):
        super().__init__()
        self.embed_in = VocabParallelEmbedding(config.vocab_size, config.hidden_size, ctx=ctx)
        self.layers = nn.ModuleList(
            GPTNeoXLayer(config, max_position, ctx) for _ in range(config.num_hidden_layers)
        )
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: AttentionMetadata
    ) -> torch.Tensor:
        hidden_states = self.embed_in(input_ids)
        for layer in self.layers:
            hidden_states = layer(positions, hidden_states, attn_metadata)
        return self.final_layer_norm(hidden_states)


class GPTNeoXForCausalLM(nn.Module):
    # query_key_value is stored fused: its parameter's own name, loaded whole after reordering.
    packed_modules_mapping: ClassVar[dict] = {}

    def __init__(self, config: HFConfig, max_position: int, ctx: ModelContext):
        super().__init__()
        self.config = config
        self.gpt_neox = GPTNeoXModel(config, max_position, ctx)
        self.embed_out = ParallelLMHead(config.vocab_size, config.hidden_size, ctx=ctx)
        if getattr(config, "tie_word_embeddings", False):
            self.embed_out.tie_weights(self.gpt_neox.embed_in)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: AttentionMetadata
    ) -> torch.Tensor:
        return self.gpt_neox(input_ids, positions, attn_metadata)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.embed_out.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        num_heads = self.config.num_attention_heads

        def converted() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                if ".query_key_value." in name:
                    # rows [heads, 3, head_size] -> [3, heads, head_size], i.e. [ q | k | v ]
                    rest = tensor.shape[1:]
                    tensor = tensor.reshape(num_heads, 3, -1, *rest).transpose(0, 1)
                    tensor = tensor.reshape(-1, *rest)
                yield name, tensor

        tied = getattr(self.config, "tie_word_embeddings", False)
        load_weights_into(
            self, converted(), self.packed_modules_mapping, ("embed_out.",) if tied else ()
        )
