"""quantization="awq": AutoAWQ's GEMM checkpoints (`quant_method: awq`, `version: gemm`).

Each quantized linear layer stores 4-bit codes, eight to an int32 along the outputs:

    qweight  int32    [in, out / 8]
    qzeros   int32    [groups, out / 8]
    scales   float16  [groups, out]

w[n, k] = scales[g, n] * (q[k, n] - zero[g, n]), g = k // group_size. The eight nibbles of a
word, lowest first, hold the outputs 0, 2, 4, 6, 1, 3, 5, 7 of its eight (AutoAWQ's pack order;
vLLM's `AWQ_REVERSE_ORDER` undoes it).
"""

from __future__ import annotations

import torch
from torch import nn

from ember.workers.layers.quantization.base import WeightLoader
from ember.workers.layers.quantization.group_quant import (
    GroupQuantConfig,
    GroupQuantLinearMethod,
    quantized_parameter,
    unpack_int32,
)
from ember.workers.quantization_settings import group_quant_settings

# Output j of a word's eight is nibble REVERSE_ORDER[j]: the inverse of AutoAWQ's pack order
# [0, 2, 4, 6, 1, 3, 5, 7].
REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """[rows, out / 8] int32 -> [rows, out] codes in output order."""
    nibbles = unpack_int32(packed, 4, 1).unflatten(1, (-1, 8))
    return nibbles[:, :, REVERSE_ORDER].flatten(1)


class AWQLinearMethod(GroupQuantLinearMethod):
    checkpoint_tensors = ("qweight", "qzeros", "scales")

    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_size_per_partition: int,
        input_size: int,
        output_size: int,
        weight_loader: WeightLoader,
    ) -> None:
        if output_size_per_partition % 8:
            raise ValueError(
                f"{type(layer).__name__}: output size per rank {output_size_per_partition} is "
                "not a multiple of 8 (AWQ packs 8 outputs to an int32)"
            )
        groups, sharded = self.groups_of(layer, input_size_per_partition, input_size)
        group_dim = 0 if sharded else None
        layer.model_dtype = torch.get_default_dtype()
        layer.qweight = quantized_parameter(
            (input_size_per_partition, output_size_per_partition // 8),
            torch.int32,
            weight_loader,
            input_dim=0,
            output_dim=1,
        )
        layer.qzeros = quantized_parameter(
            (groups, output_size_per_partition // 8),
            torch.int32,
            weight_loader,
            input_dim=group_dim,
            output_dim=1,
        )
        layer.scales = quantized_parameter(
            (groups, output_size_per_partition),
            torch.float32,
            weight_loader,
            input_dim=group_dim,
            output_dim=1,
        )

    def unpacked(self, layer: nn.Module) -> tuple[torch.Tensor, ...]:
        codes = unpack_awq(layer.qweight.data).T  # [N, K]
        zeros = unpack_awq(layer.qzeros.data)  # [G, N]
        group_of_input = self.positional_groups(codes.shape[1])
        return codes, layer.scales.data.T, zeros.T, group_of_input


class AWQConfig(GroupQuantConfig):
    """The `quantization_config` of an AutoAWQ GEMM checkpoint (`quantization_settings`)."""

    def __init__(self, settings: dict):
        self.settings = group_quant_settings("awq", settings)

    @classmethod
    def get_name(cls) -> str:
        return "awq"

    def is_layer_skipped(self, checkpoint_name: str) -> bool:
        """AutoAWQ's (and vLLM's) rule: a module whose name contains a listed one stays dense."""
        return any(module in checkpoint_name for module in self.settings.modules_to_not_convert)

    def linear_method(self) -> GroupQuantLinearMethod:
        return AWQLinearMethod(4, self.settings.group_size)
