"""Qwen3-MoE: Qwen3's attention (q/k norm per head) with a mixture of experts, no shared
expert."""

from __future__ import annotations

from torch import nn

from ember.workers.hf_config import HFConfig
from ember.workers.layers.context import ModelContext
from ember.workers.layers.fused_moe import FusedMoE
from ember.workers.layers.layernorm import RMSNorm
from ember.workers.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from ember.workers.models.qwen2_moe import qwen_moe_mlp


class Qwen3MoeForCausalLM(LlamaForCausalLM):
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
        return LlamaDecoderLayer(
            config,
            max_position,
            layer_idx,
            ctx,
            mlp=qwen_moe_mlp(config, layer_idx, ctx),
            qk_norm=RMSNorm,
        )
