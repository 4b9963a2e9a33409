"""Qwen2-MoE: Qwen2's attention with a mixture of experts plus a gated shared expert; layers
listed in `mlp_only_layers` (or off the `decoder_sparse_step`) keep a dense MLP."""

from __future__ import annotations

from torch import nn

from ember.workers.hf_config import HFConfig
from ember.workers.layers.context import ModelContext
from ember.workers.layers.fused_moe import FusedMoE, SparseMoeBlock
from ember.workers.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP


def qwen_moe_mlp(config: HFConfig, layer_idx: int, ctx: ModelContext) -> nn.Module:
    """The MLP of one Qwen-MoE layer (Qwen2-MoE and Qwen3-MoE): dense or sparse."""
    step = getattr(config, "decoder_sparse_step", 1) or 1
    sparse = (
        layer_idx not in (getattr(config, "mlp_only_layers", None) or [])
        and config.num_experts > 0
        and (layer_idx + 1) % step == 0
    )
    if not sparse:
        return LlamaMLP(config, ctx)
    shared_size = getattr(config, "shared_expert_intermediate_size", 0) or 0
    return SparseMoeBlock(
        config.hidden_size,
        config.moe_intermediate_size,
        config.num_experts,
        config.num_experts_per_tok,
        renormalize=bool(config.norm_topk_prob),
        hidden_act=config.hidden_act,
        shared_expert=LlamaMLP(config, ctx, shared_size) if shared_size else None,
        ctx=ctx,
    )


class Qwen2MoeForCausalLM(LlamaForCausalLM):
    def __init__(self, config: HFConfig, max_position: int, ctx: ModelContext):
        super().__init__(config, max_position, ctx)
        self.name_mapping = FusedMoE.make_expert_params_mapping(
            "gate_proj",
            "down_proj",
            "up_proj",
            config.num_experts,
            ctx.quant_config.quantizes_experts,
        )

    def make_layer(
        self, config: HFConfig, max_position: int, layer_idx: int, ctx: ModelContext
    ) -> nn.Module:
        qkv_bias = getattr(config, "qkv_bias", True)
        return LlamaDecoderLayer(
            config,
            max_position,
            layer_idx,
            ctx,
            mlp=qwen_moe_mlp(config, layer_idx, ctx),
            qkv_bias=qkv_bias,
            o_bias=False,
        )
