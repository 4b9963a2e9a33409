"""GraniteMoE (PowerMoE): Mixtral's shape with Granite's scalings (embeddings, attention,
residual branches, logits) and all experts of a layer stored in one tensor."""

from __future__ import annotations

from torch import nn

from ember.workers.hf_config import HFConfig
from ember.workers.layers.context import ModelContext
from ember.workers.layers.fused_moe import SparseMoeBlock
from ember.workers.models.llama import LlamaDecoderLayer, LlamaForCausalLM


class GraniteMoeForCausalLM(LlamaForCausalLM):
    def __init__(self, config: HFConfig, max_position: int, ctx: ModelContext):
        super().__init__(config, max_position, ctx)
        self.model.embedding_multiplier = config.embedding_multiplier
        self.lm_head.logit_scale = 1.0 / config.logits_scaling
        self.name_mapping = [
            # input_linear [E, 2I, H] holds [gate | up] of every expert; output_linear [E, H, I]
            ("block_sparse_moe.input_linear.", "block_sparse_moe.experts.w13_", None),
            ("block_sparse_moe.output_linear.", "block_sparse_moe.experts.w2_", None),
            ("block_sparse_moe.router.layer.", "block_sparse_moe.gate.", None),
        ]

    def make_layer(
        self, config: HFConfig, max_position: int, layer_idx: int, ctx: ModelContext
    ) -> nn.Module:
        moe = SparseMoeBlock(
            config.hidden_size,
            config.intermediate_size,
            config.num_local_experts,
            config.num_experts_per_tok,
            renormalize=True,  # Granite's softmax over the top-k logits is the same thing
            hidden_act=config.hidden_act,
            ctx=ctx,
        )
        return LlamaDecoderLayer(
            config,
            max_position,
            layer_idx,
            ctx,
            mlp=moe,
            mlp_name="block_sparse_moe",
            residual_multiplier=config.residual_multiplier,
            scale=config.attention_multiplier,
        )
