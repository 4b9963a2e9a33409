"""Gemma 2 and Gemma 3 (text only): Llama's attention and gated MLP with Gemma's choices:
RMSNorm scaling by (1 + weight), a norm before and after both the attention and the MLP,
embeddings scaled by sqrt(hidden_size), query scale from `query_pre_attn_scalar`, a sliding
window on the layers `layer_types` marks, soft-capped attention scores and final logits
(Gemma 2), and q/k norms with a separate rope base for the local layers (Gemma 3)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import nn

from ember.kernels.attention import AttentionMetadata
from ember.workers.hf_config import HFConfig
from ember.workers.layers.context import ModelContext
from ember.workers.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from ember.workers.layers.layernorm import GemmaRMSNorm
from ember.workers.model_loader.weight_utils import load_weights_into
from ember.workers.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP


class GemmaDecoderLayer(nn.Module):
    def __init__(
        self,
        config: HFConfig,
        max_position: int,
        layer_idx: int,
        ctx: ModelContext,
        qk_norm: type[nn.Module] | None,
    ):
        super().__init__()
        self.self_attn = LlamaAttention(
            config,
            max_position,
            layer_idx,
            ctx,
            qk_norm=qk_norm,
            scale=config.query_pre_attn_scalar**-0.5,
            logits_soft_cap=getattr(config, "attn_logit_softcapping", None),
        )
        hidden_act = getattr(config, "hidden_activation", None) or config.hidden_act
        self.mlp = LlamaMLP(config, ctx, hidden_act=hidden_act)
        size, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(size, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(size, eps)

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
        attn_metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, attn_metadata)
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states, residual = self.pre_feedforward_layernorm(hidden_states, residual)
        hidden_states = self.mlp(hidden_states)
        return self.post_feedforward_layernorm(hidden_states), residual


class Gemma2Model(nn.Module):
    def __init__(self, config: HFConfig, max_position: int, ctx: ModelContext, qk_norm):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, ctx=ctx)
        self.normalizer = config.hidden_size**0.5
        self.layers = nn.ModuleList(
            GemmaDecoderLayer(config, max_position, i, ctx, qk_norm)
            for i in range(config.num_hidden_layers)
        )
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: AttentionMetadata
    ) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        # The scale rounded to the model's dtype first, as Hugging Face does.
        hidden_states = hidden_states * torch.tensor(self.normalizer, dtype=hidden_states.dtype)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual, attn_metadata)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class Gemma2ForCausalLM(nn.Module):
    packed_modules_mapping: ClassVar[dict] = LlamaForCausalLM.packed_modules_mapping
    qk_norm: ClassVar[type[nn.Module] | None] = None

    def __init__(self, config: HFConfig, max_position: int, ctx: ModelContext):
        super().__init__()
        self.config = config
        self.model = Gemma2Model(config, max_position, ctx, self.qk_norm)
        self.lm_head = ParallelLMHead(
            config.vocab_size,
            config.hidden_size,
            ctx=ctx,
            soft_cap=getattr(config, "final_logit_softcapping", None),
        )
        if getattr(config, "tie_word_embeddings", True):
            self.lm_head.tie_weights(self.model.embed_tokens)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: AttentionMetadata
    ) -> torch.Tensor:
        return self.model(input_ids, positions, attn_metadata)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """Soft-capped logits (Gemma 2) on rank 0; None on the other ranks."""
        return self.lm_head.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        skip = ("lm_head.",) if getattr(self.config, "tie_word_embeddings", True) else ()
        load_weights_into(self, weights, self.packed_modules_mapping, skip_prefixes=skip)


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    qk_norm = GemmaRMSNorm
