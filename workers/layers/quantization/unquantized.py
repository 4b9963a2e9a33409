"""Dense weights in the model's dtype: the default format of every layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.kernels import half_matmul
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
    """A dense vocabulary table. On CPU a float32 model's table that the checkpoint stores in
    bfloat16 or float16 stays in that format (`half_matmul`): rows are widened when read and
    the LM head multiplies float32 activations by it in C, with float32's products and half
    the bytes to read and hold (Qwen3-0.6B's tied 151936 x 1024 head, 4-bit GPTQ at batch 1 on
    2 cores: 55.8 -> 48.5 ms a token). The parameter then carries `compute_dtype` (float32),
    shared with an LM head tied to it."""

    def create_weights(
        self, layer: nn.Module, rows_per_partition: int, embedding_dim: int, weight_loader
    ) -> None:
        layer.weight = make_parameter(
            rows_per_partition, embedding_dim, weight_loader=_keeping_half(weight_loader)
        )

    def embedding(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, layer.weight)
        compute_dtype = getattr(layer.weight, "compute_dtype", None)
        return rows if compute_dtype is None else rows.to(compute_dtype)

    def apply(self, layer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = layer.weight
        if getattr(weight, "compute_dtype", None) is not None:
            shape = hidden_states.shape
            flat = hidden_states.reshape(-1, shape[-1]).float()
            return half_matmul.widened_matmul(flat, weight).view(*shape[:-1], -1)
        return F.linear(hidden_states, weight).float()


class UnquantizedConfig(QuantizationConfig):
    @classmethod
    def get_name(cls) -> str:
        return "none"

    def get_quant_method(self, layer: nn.Module) -> LinearMethodBase | EmbeddingMethodBase:
        from ember.workers.layers.embedding import VocabParallelEmbedding

        if isinstance(layer, VocabParallelEmbedding):
            return UnquantizedEmbeddingMethod()
        return UnquantizedLinearMethod()


def _keeping_half(weight_loader: WeightLoader) -> WeightLoader:
    """`weight_loader`, storing the table in the checkpoint's half format instead of float32
    where that loses nothing (a float32 table on CPU with the C kernel built). The float32
    storage is replaced before it is written, so its pages are never touched."""

    def load(param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        half = loaded_weight.dtype in (torch.bfloat16, torch.float16)
        if getattr(param, "compute_dtype", None) is not None and loaded_weight.dtype != param.dtype:
            param.data = param.data.float()  # another format after all: back to float32
            del param.compute_dtype
        elif (
            half
            and param.dtype == torch.float32
            and param.device.type == "cpu"
            and half_matmul.available()
        ):
            param.data = torch.zeros(param.shape, dtype=loaded_weight.dtype)  # padding rows: 0
            param.compute_dtype = torch.float32
        weight_loader(param, loaded_weight)

    return load
