"""OPT (facebook/opt-*): learned absolute positions (offset by 2), LayerNorm before (or, for
opt-350m, after) each block, ReLU MLP, optional projections between the embedding width and
the hidden size, head tied to the embedding."""

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
from ember.workers.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from ember.workers.model_loader.weight_utils import load_weights_into

_POSITION_OFFSET = 2  # OPT's learned positions start at row 2


class OPTAttention(nn.Module):
    def __init__(self, config: HFConfig, ctx: ModelContext):
        super().__init__()
        total_num_heads = config.num_attention_heads
        head_dim = config.hidden_size // total_num_heads
        bias = config.enable_bias
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, head_dim, total_num_heads, bias=bias, ctx=ctx
        )
        self.out_proj = RowParallelLinear(
            config.hidden_size, config.hidden_size, bias=bias, ctx=ctx
        )
        num_heads = self.qkv_proj.num_heads
        self.attn = Attention(num_heads, head_dim, head_dim**-0.5, num_heads)

    def forward(self, hidden_states: torch.Tensor, attn_metadata: AttentionMetadata):
        q, k, v = self.qkv_proj(hidden_states).chunk(3, dim=-1)
        return self.out_proj(self.attn(q, k, v, attn_metadata))


class OPTDecoderLayer(nn.Module):
    def __init__(self, config: HFConfig, ctx: ModelContext):
        super().__init__()
        affine = getattr(config, "layer_norm_elementwise_affine", True)
        self.do_layer_norm_before = config.do_layer_norm_before
        self.self_attn = OPTAttention(config, ctx)
        self.self_attn_layer_norm = nn.LayerNorm(config.hidden_size, elementwise_affine=affine)
        self.fc1 = ColumnParallelLinear(
            config.hidden_size, config.ffn_dim, config.enable_bias, ctx=ctx
        )
        self.activation_fn = get_act_fn(config.activation_function)
        self.fc2 = RowParallelLinear(
            config.ffn_dim, config.hidden_size, config.enable_bias, ctx=ctx
        )
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, elementwise_affine=affine)

    def forward(self, hidden_states: torch.Tensor, attn_metadata: AttentionMetadata):
        residual = hidden_states
        if self.do_layer_norm_before:
            hidden_states = self.self_attn_layer_norm(hidden_states)
        hidden_states = residual + self.self_attn(hidden_states, attn_metadata)
        if not self.do_layer_norm_before:
            hidden_states = self.self_attn_layer_norm(hidden_states)
        residual = hidden_states
        if self.do_layer_norm_before:
            hidden_states = self.final_layer_norm(hidden_states)
        hidden_states = residual + self.fc2(self.activation_fn(self.fc1(hidden_states)))
        if not self.do_layer_norm_before:
            hidden_states = self.final_layer_norm(hidden_states)
        return hidden_states


class OPTDecoder(nn.Module):
    def __init__(self, config: HFConfig, max_position: int, ctx: ModelContext):
        super().__init__()
        hidden, embed_dim = config.hidden_size, config.word_embed_proj_dim
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, embed_dim, ctx=ctx)
        self.embed_positions = VocabParallelEmbedding(
            config.max_position_embeddings + _POSITION_OFFSET, hidden, ctx=ctx
        )
        self.project_in = (
            ReplicatedLinear(embed_dim, hidden, ctx=ctx) if embed_dim != hidden else None
        )
        self.project_out = (
            ReplicatedLinear(hidden, embed_dim, ctx=ctx) if embed_dim != hidden else None
        )
        self.final_layer_norm = None
        if config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False):
            affine = getattr(config, "layer_norm_elementwise_affine", True)
            self.final_layer_norm = nn.LayerNorm(hidden, elementwise_affine=affine)
        self.layers = nn.ModuleList(
            OPTDecoderLayer(config, ctx) for _ in range(config.num_hidden_layers)
        )

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: AttentionMetadata
    ) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        if self.project_in is not None:
            hidden_states = self.project_in(hidden_states)
        hidden_states = hidden_states + self.embed_positions(positions + _POSITION_OFFSET)
        for layer in self.layers:
            hidden_states = layer(hidden_states, attn_metadata)
        if self.final_layer_norm is not None:
            hidden_states = self.final_layer_norm(hidden_states)
        if self.project_out is not None:
            hidden_states = self.project_out(hidden_states)
        return hidden_states


class OPTModel(nn.Module):
    def __init__(self, config: HFConfig, max_position: int, ctx: ModelContext):
        super().__init__()
        self.decoder = OPTDecoder(config, max_position, ctx)

    def forward(self, input_ids, positions, attn_metadata) -> torch.Tensor:
        return self.decoder(input_ids, positions, attn_metadata)


class OPTForCausalLM(nn.Module):
    packed_modules_mapping: ClassVar[dict[str, tuple[str, str]]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
    }

    def __init__(self, config: HFConfig, max_position: int, ctx: ModelContext):
        super().__init__()
        self.config = config
        self.model = OPTModel(config, max_position, ctx)
        self.lm_head = ParallelLMHead(config.vocab_size, config.word_embed_proj_dim, ctx=ctx)
        self.lm_head.tie_weights(self.model.decoder.embed_tokens)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: AttentionMetadata
    ) -> torch.Tensor:
        return self.model(input_ids, positions, attn_metadata)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        def renamed() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:  # facebook/opt-* checkpoints lack the "model." prefix
                yield ("model." + name if name.startswith("decoder.") else name), tensor

        load_weights_into(self, renamed(), self.packed_modules_mapping, skip_prefixes=("lm_head.",))
