"""Llama (SmolLM2, Llama 2/3, Mistral) over a paged KV cache, and the blocks that the models
shaped like it reuse: attention with options (biases, q/k norm, scale, soft cap, sliding window
per layer), the gated MLP, and a decoder layer that takes another MLP (a mixture of experts)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import nn

from ember.kernels.attention import AttentionMetadata
from ember.workers.hf_config import HFConfig, rope_layer_type
from ember.workers.layers.activation import get_gated_activation
from ember.workers.layers.attention import Attention
from ember.workers.layers.context import ModelContext
from ember.workers.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from ember.workers.layers.layernorm import RMSNorm
from ember.workers.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from ember.workers.layers.rotary_embedding import get_rope
from ember.workers.model_loader.weight_utils import load_weights_into


def layer_sliding_window(config: HFConfig, layer_idx: int) -> int | None:
    """The sliding window of one layer: `sliding_window` for every layer, or only for the
    layers that `layer_types` marks "sliding_attention" (Gemma 2/3, Qwen2); 0 means none."""
    window = getattr(config, "sliding_window", None) or None
    layer_types = getattr(config, "layer_types", None)
    if window is not None and layer_types is not None:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    return window


class LlamaAttention(nn.Module):
    def __init__(
        self,
        config: HFConfig,
        max_position: int,
        layer_idx: int,
        ctx: ModelContext,
        *,
        qkv_bias: bool | None = None,  # None: the config's attention_bias
        o_bias: bool | None = None,
        qk_norm: type[nn.Module] | None = None,  # an RMSNorm class applied per head (Qwen3)
        scale: float | None = None,  # None: head_dim ** -0.5
        logits_soft_cap: float | None = None,
    ):
        super().__init__()
        total_num_heads = config.num_attention_heads
        total_num_kv_heads = getattr(config, "num_key_value_heads", None) or total_num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // total_num_heads
        bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            self.head_dim,
            total_num_heads,
            total_num_kv_heads,
            bias=bias if qkv_bias is None else qkv_bias,
            ctx=ctx,
        )
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(
            total_num_heads * self.head_dim,
            config.hidden_size,
            bias if o_bias is None else o_bias,
            ctx=ctx,
        )
        self.q_norm = self.k_norm = None
        if qk_norm is not None:
            self.q_norm = qk_norm(self.head_dim, config.rms_norm_eps)
            self.k_norm = qk_norm(self.head_dim, config.rms_norm_eps)
        self.rotary_emb = get_rope(
            config, self.head_dim, max_position, layer_type=rope_layer_type(config, layer_idx)
        )
        self.attn = Attention(
            self.num_heads,
            self.head_dim,
            self.head_dim**-0.5 if scale is None else scale,
            self.num_kv_heads,
            sliding_window=layer_sliding_window(config, layer_idx),
            logits_soft_cap=logits_soft_cap,
        )

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, attn_metadata: AttentionMetadata
    ) -> torch.Tensor:
        if self.q_norm is None:
            dtype = self.qkv_proj.input_dtype(hidden_states.shape[0])
            if dtype is not None and dtype != hidden_states.dtype:
                # The projection computes in `dtype` (CPU packed weights: bfloat16), so its
                # output stays in it (the values of the round trip through hidden_states'
                # dtype): the attention layer widens it where it reads it.
                qkv = self.qkv_proj(hidden_states.to(dtype))
            else:
                qkv = self.qkv_proj(hidden_states)
            attn_output = self.attn.forward_fused_qkv(
                qkv, positions, self.rotary_emb, attn_metadata, dtype=hidden_states.dtype
            )
            return self.o_proj(attn_output)
        qkv = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q.reshape(-1, self.num_heads, self.head_dim))
        k = self.k_norm(k.reshape(-1, self.num_kv_heads, self.head_dim))
        q, k = self.rotary_emb(positions, q, k, attn_metadata.derived)
        return self.o_proj(self.attn(q, k, v, attn_metadata))


class LlamaMLP(nn.Module):
    def __init__(
        self,
        config: HFConfig,
        ctx: ModelContext,
        intermediate_size: int | None = None,
        hidden_act: str | None = None,
    ):
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        size = intermediate_size or config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [size, size], bias, ctx=ctx
        )
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias, ctx=ctx)
        self.act_fn = get_gated_activation(hidden_act or config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.gate_up_proj.input_dtype(x.shape[0])
        if dtype is None or dtype == x.dtype or dtype != self.down_proj.input_dtype(x.shape[0]):
            return self.down_proj(self.act_fn(self.gate_up_proj(x)))
        # Both matmuls compute in `dtype` (CPU packed weights: bfloat16), so the widest tensor
        # of the layer, gate_up's output, and the activation stay in it: the values of the
        # round trip through x's dtype (the activation rounds once), without its conversions.
        return self.down_proj(self.act_fn(self.gate_up_proj(x.to(dtype)))).to(x.dtype)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention and MLP with the residual add fused into the next norm.

    `mlp` replaces the dense MLP (e.g. a mixture of experts), registered under `mlp_name`, the
    checkpoint's name for it (Mixtral: "block_sparse_moe"). GraniteMoE scales both branches
    by `residual_multiplier` before they join the residual stream.
    """

    def __init__(
        self,
        config: HFConfig,
        max_position: int,
        layer_idx: int,
        ctx: ModelContext,
        *,
        mlp: nn.Module | None = None,
        mlp_name: str = "mlp",
        residual_multiplier: float = 1.0,
        **attention_options,
    ):
        super().__init__()
        self.self_attn = LlamaAttention(config, max_position, layer_idx, ctx, **attention_options)
        self.mlp_name = mlp_name
        setattr(self, mlp_name, mlp if mlp is not None else LlamaMLP(config, ctx))
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.residual_multiplier = residual_multiplier

    def narrow_dtype(self, num_tokens: int, dtype: torch.dtype) -> torch.dtype | None:
        """The dtype narrower than the activations' `dtype` that all four projections of a
        batch of `num_tokens` rows compute in (CPU packed weights: bfloat16), where this layer
        can keep its values in it between the norms and the projections; else None. The plain
        layer only: no query/key norms, no residual multiplier, the dense MLP."""
        attention, mlp = self.self_attn, getattr(self, self.mlp_name)
        if attention.q_norm is not None or self.residual_multiplier != 1.0:
            return None
        if type(mlp) is not LlamaMLP:
            return None
        linears = (attention.qkv_proj, attention.o_proj, mlp.gate_up_proj, mlp.down_proj)
        narrow = {linear.input_dtype(num_tokens) for linear in linears}
        if len(narrow) != 1 or None in narrow or dtype in narrow:
            return None
        return narrow.pop()

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
        attn_metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        activations = hidden_states.dtype if residual is None else residual.dtype
        narrow = self.narrow_dtype(hidden_states.shape[0], activations)
        if narrow is not None:
            return self.forward_narrow(positions, hidden_states, residual, attn_metadata, narrow)
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, attn_metadata)
        if self.residual_multiplier != 1.0:
            hidden_states = hidden_states * self.residual_multiplier
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        hidden_states = getattr(self, self.mlp_name)(hidden_states)
        if self.residual_multiplier != 1.0:
            hidden_states = hidden_states * self.residual_multiplier
        return hidden_states, residual

    def forward_narrow(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
        attn_metadata: AttentionMetadata,
        narrow: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` where every projection computes in `narrow` (`narrow_dtype`): the norms
        write their output in it and read the projections' output in it, the residual stream
        keeps the activations' dtype. Each projection rounds its input to `narrow` and its
        output too, and the norms widen exactly and round once as a cast would, so the values
        are `forward`'s, without its conversions: a prefill chunk's layer converted its
        activations four times (SmolLM2 on a Sapphire Rapids, W1's prefill: 0.12 of 1.5 s)."""
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states, out_dtype=narrow)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual, narrow)
        attention = self.self_attn
        attn_output = attention.attn.forward_fused_qkv(
            attention.qkv_proj(hidden_states),
            positions,
            attention.rotary_emb,
            attn_metadata,
            dtype=residual.dtype,
            out_dtype=narrow,  # the CPU prefill kernel writes it directly
        )
        hidden_states = attention.o_proj(attn_output)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual, narrow)
        return getattr(self, self.mlp_name)(hidden_states), residual


class LlamaModel(nn.Module):
    def __init__(self, config: HFConfig, max_position: int, ctx: ModelContext, make_layer):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, ctx=ctx)
        self.embedding_multiplier = 1.0
        self.layers = nn.ModuleList(
            make_layer(config, max_position, i, ctx) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: AttentionMetadata
    ) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        if self.embedding_multiplier != 1.0:
            hidden_states = hidden_states * self.embedding_multiplier
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual, attn_metadata)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LlamaForCausalLM(nn.Module):
    """Llama; models of the same shape subclass it and override `make_layer`."""

    # checkpoint name -> (fused parameter name, shard id)
    packed_modules_mapping: ClassVar[dict[str, tuple[str, str | int]]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: HFConfig, max_position: int, ctx: ModelContext):
        super().__init__()
        self.config = config
        # (checkpoint fragment, parameter fragment, shard id), tried before the packed mapping
        self.name_mapping: list[tuple[str, str, object]] = []
        self.model = LlamaModel(config, max_position, ctx, self.make_layer)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, ctx=ctx)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.tie_weights(self.model.embed_tokens)

    def make_layer(
        self, config: HFConfig, max_position: int, layer_idx: int, ctx: ModelContext
    ) -> nn.Module:
        return LlamaDecoderLayer(config, max_position, layer_idx, ctx)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: AttentionMetadata
    ) -> torch.Tensor:
        return self.model(input_ids, positions, attn_metadata)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """Logits on rank 0; None on the other ranks."""
        return self.lm_head.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        skip = ("lm_head.",) if getattr(self.config, "tie_word_embeddings", False) else ()
        for name, module in self.named_modules():  # MoE: other ranks' experts (`FusedMoE`)
            if hasattr(module, "foreign_expert_prefixes"):
                skip += module.foreign_expert_prefixes(name)
        load_weights_into(
            self,
            weights,
            self.packed_modules_mapping,
            skip_prefixes=skip,
            name_mapping=self.name_mapping,
        )
