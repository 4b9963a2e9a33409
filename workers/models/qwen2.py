"""Qwen2 (Qwen2, Qwen2.5): Llama with biases on the query, key and value projections, and a
sliding window on the layers `layer_types` marks."""

from __future__ import annotations

from torch import nn

from ember.workers.hf_config import HFConfig
from ember.workers.layers.context import ModelContext
from ember.workers.models.llama import LlamaDecoderLayer, LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    def make_layer(
        self, config: HFConfig, max_position: int, layer_idx: int, ctx: ModelContext
    ) -> nn.Module:
        return LlamaDecoderLayer(config, max_position, layer_idx, ctx, qkv_bias=True, o_bias=False)
