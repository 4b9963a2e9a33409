"""GPT-2: learned absolute positions, LayerNorm before each block, fused `c_attn`, a GELU MLP,
head tied to the token embedding. The checkpoint's Conv1D weights are [in, out] and are
transposed on load."""

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
from ember.workers.model_loader.weight_utils import load_weights_into

_CONV1D_WEIGHTS = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")


class GPT2Attention(nn.Module):
    def __init__(self, config: HFConfig, layer_idx: int, ctx: ModelContext):
        super().__init__()
        hidden, total_num_heads = config.hidden_size, config.num_attention_heads
        head_dim = hidden // total_num_heads
        self.c_attn = QKVParallelLinear(hidden, head_dim, total_num_heads, bias=True, ctx=ctx)
        self.c_proj = RowParallelLinear(hidden, hidden, bias=True, ctx=ctx)
        scale = head_dim**-0.5 if getattr(config, "scale_attn_weights", True) else 1.0
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            scale /= layer_idx + 1
        num_heads = self.c_attn.num_heads
        self.attn = Attention(num_heads, head_dim, scale, num_heads)

    def forward(self, hidden_states: torch.Tensor, attn_metadata: AttentionMetadata):
        q, k, v = self.c_attn(hidden_states).chunk(3, dim=-1)
        return self.c_proj(self.attn(q, k, v, attn_metadata))


class GPT2MLP(nn.Module):
    def __init__(self, config: HFConfig, ctx: ModelContext):
        super().__init__()
        inner = getattr(config, "n_inner", None) or 4 * config.hidden_size
        self.c_fc = ColumnParallelLinear(config.hidden_size, inner, bias=True, ctx=ctx)
        self.act = get_act_fn(config.activation_function)
        self.c_proj = RowParallelLinear(inner, config.hidden_size, bias=True, ctx=ctx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config: HFConfig, layer_idx: int, ctx: ModelContext):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=eps)
        self.attn = GPT2Attention(config, layer_idx, ctx)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=eps)
        self.mlp = GPT2MLP(config, ctx)

    def forward(self, hidden_states: torch.Tensor, attn_metadata: AttentionMetadata):
        hidden_states = hidden_states + self.attn(self.ln_1(hidden_states), attn_metadata)
        return hidden_states + self.mlp(self.ln_2(hidden_states))


class GPT2Model(nn.Module):
    def __init__(self, config: HFConfig, max_position: int, ctx: ModelContext):
        super().__init__()
        self.wte = VocabParallelEmbedding(config.vocab_size, config.hidden_size, ctx=ctx)
        self.wpe = VocabParallelEmbedding(
            config.max_position_embeddings, config.hidden_size, ctx=ctx
        )
        self.h = nn.ModuleList(GPT2Block(config, i, ctx) for i in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: AttentionMetadata
    ) -> torch.Tensor:
        hidden_states = self.wte(input_ids) + self.wpe(positions)
        for block in self.h:
            hidden_states = block(hidden_states, attn_metadata)
        return self.ln_f(hidden_states)


class GPT2LMHeadModel(nn.Module):
    # The checkpoint stores c_attn fused: its parameter's own name, loaded whole.
    packed_modules_mapping: ClassVar[dict] = {}

    def __init__(self, config: HFConfig, max_position: int, ctx: ModelContext):
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config, max_position, ctx)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, ctx=ctx)
        self.lm_head.tie_weights(self.transformer.wte)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: AttentionMetadata
    ) -> torch.Tensor:
        return self.transformer(input_ids, positions, attn_metadata)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        def converted() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                if not name.startswith(("transformer.", "lm_head.")):  # the original gpt2 files
                    name = "transformer." + name
                if name.endswith(_CONV1D_WEIGHTS):
                    tensor = tensor.t()
                yield name, tensor

        load_weights_into(
            self, converted(), self.packed_modules_mapping, skip_prefixes=("lm_head.",)
        )
