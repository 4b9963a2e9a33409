"""Mixtral: Llama's attention with a sparse mixture of experts (softmax router, top-k
renormalised) in place of the MLP; experts `w1` (gate), `w3` (up), `w2` (down)."""

from __future__ import annotations

from torch import nn

from ember.workers.hf_config import HFConfig
from ember.workers.layers.context import ModelContext
from ember.workers.layers.fused_moe import FusedMoE, SparseMoeBlock
from ember.workers.models.llama import LlamaDecoderLayer, LlamaForCausalLM


class MixtralForCausalLM(LlamaForCausalLM):
    def __init__(self, config: HFConfig, max_position: int, ctx: ModelContext):
        super().__init__(config, max_position, ctx)
        self.name_mapping = FusedMoE.make_expert_params_mapping(
            "w1", "w2", "w3", config.num_local_experts, ctx.quant_config.quantizes_experts
        )

    def make_layer(
        self, config: HFConfig, max_position: int, layer_idx: int, ctx: ModelContext
    ) -> nn.Module:
        moe = SparseMoeBlock(
            config.hidden_size,
            config.intermediate_size,
            config.num_local_experts,
            config.num_experts_per_tok,
            renormalize=True,
            hidden_act=config.hidden_act,
            ctx=ctx,
        )
        return LlamaDecoderLayer(
            config, max_position, layer_idx, ctx, mlp=moe, mlp_name="block_sparse_moe"
        )
