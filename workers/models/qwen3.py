"""Qwen3: Llama with an RMSNorm over each query and key head before the rotary embedding."""

from __future__ import annotations

from torch import nn

from ember.workers.hf_config import HFConfig
from ember.workers.layers.context import ModelContext
from ember.workers.layers.layernorm import RMSNorm
from ember.workers.models.llama import LlamaDecoderLayer, LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    def make_layer(
        self, config: HFConfig, max_position: int, layer_idx: int, ctx: ModelContext
    ) -> nn.Module:
        return LlamaDecoderLayer(config, max_position, layer_idx, ctx, qk_norm=RMSNorm)
