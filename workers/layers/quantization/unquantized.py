"""Dense weights in the model's dtype: the default format of every layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.workers.layers.quantization.base import (
    EmbeddingMethodBase,
    LinearMethodBase,
    QuantizationConfig,
    WeightLoader,
)


def make_parameter(*shape: int, weight_loader: WeightLoader) -> nn.Parameter:
    """An uninitialised parameter in the default dtype (the checkpoint fills it)."""
    param = nn.Parameter(torch.empty(*shape), requires_grad=False)
    param.weight_loader = weight_loader
    return param


class UnquantizedLinearMethod(LinearMethodBase):
    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_size_per_partition: int,
        input_size: int,
        output_size: int,
        weight_loader: WeightLoader,
    ) -> None:
        layer.weight = make_parameter(
            output_size_per_partition, input_size_per_partition, weight_loader=weight_loader
        )

    def apply(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """In the weight's dtype when it differs from x's (then cast back)."""
        weight = layer.weight
        if weight.dtype == x.dtype:
            return F.linear(x, weight, bias)
        out = F.linear(x.to(weight.dtype), weight).to(x.dtype)
        return out if bias is None else out + bias


class UnquantizedEmbeddingMethod(EmbeddingMethodBase):
    def create_weights(
        self, layer: nn.Module, rows_per_partition: int, embedding_dim: int, weight_loader
    ) -> None:
        layer.weight = make_parameter(
            rows_per_partition, embedding_dim, weight_loader=weight_loader
        )

    def embedding(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, layer.weight)

    def apply(self, layer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden_states, layer.weight).float()


class UnquantizedConfig(QuantizationConfig):
    @classmethod
    def get_name(cls) -> str:
        return "none"

    def get_quant_method(self, layer: nn.Module) -> LinearMethodBase | EmbeddingMethodBase:
        from ember.workers.layers.embedding import VocabParallelEmbedding

        if isinstance(layer, VocabParallelEmbedding):
            return UnquantizedEmbeddingMethod()
        return UnquantizedLinearMethod()
