"""quantization="compressed-tensors": checkpoints llm-compressor writes: the weight-only
integer schemes (W4A16, W4A16_ASYM, W8A16: `format: "pack-quantized"`, symmetric or not,
group or channel strategy, no activation quantization) and FP8 (`format: "float-quantized"`, FP8_DYNAMIC and
static FP8: e4m3 `weight` with `weight_scale` per row or tensor, and `input_scale` for static
activations), which is the layout of vLLM's "fp8" and runs as `fp8.FP8LinearMethod`.

Each quantized linear layer stores, with pack = 32 / bits codes to an int32 (lowest bits first,
compressed-tensors' `pack_to_int32` along the inputs):

    weight_packed  int32    [out, in / pack]   q + 2**(bits - 1), q the signed code
    weight_scale   float16  [out, groups]      (one group a row for the channel strategy)
    weight_shape   int64    [2]                (out, in)

w[n, k] = weight_scale[n, k // group_size] * q[n, k]: the shared group machinery
(`group_quant.py`) with the unsigned code and a zero point of 2**(bits - 1). An asymmetric
scheme (`symmetric: false`) adds

    weight_zero_point  int32  [out / pack, groups]  z + 2**(bits - 1), packed along the outputs

and w = weight_scale * (q - z), so the unsigned zero point is the unpacked one as stored.
With `actorder: "group"` (older llm-compressor's GPTQ) `weight_g_idx` int32 [in] gives each
input's group, as GPTQ's g_idx does ("weight" stores positional groups: nothing to add).
Layers named in `ignore` (names, or "re:" patterns) stay dense.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ember.workers.layers.quantization.base import LinearMethodBase, WeightLoader
from ember.workers.layers.quantization.group_quant import (
    GroupQuantConfig,
    GroupQuantLinearMethod,
    quantized_parameter,
    unpack_int32,
)
from ember.workers.quantization_settings import FP8Settings, compressed_tensors_settings


def _ignore_shape(param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
    """`weight_shape` says what the layer's shape already says; fused shards differ in it."""


class CompressedTensorsWNA16Method(GroupQuantLinearMethod):
    def __init__(
        self, bits: int, group_size: int, symmetric: bool = True, group_order: bool = False
    ):
        super().__init__(bits, group_size)
        self.symmetric, self.group_order = symmetric, group_order
        self.checkpoint_tensors = ("weight_packed", "weight_scale", "weight_shape")
        self.checkpoint_tensors += () if symmetric else ("weight_zero_point",)
        self.checkpoint_tensors += ("weight_g_idx",) if group_order else ()

    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_size_per_partition: int,
        input_size: int,
        output_size: int,
        weight_loader: WeightLoader,
    ) -> None:
        pack = 32 // self.bits
        if input_size_per_partition % pack:
            raise ValueError(
                f"{type(layer).__name__}: input size per rank {input_size_per_partition} is not "
                f"a multiple of {pack} ({self.bits}-bit codes packed {pack} to an int32)"
            )
        groups, sharded = self.groups_of(layer, input_size_per_partition, input_size)
        if self.group_order and input_size_per_partition != input_size:
            # any input of this rank may belong to any group: every rank holds all scales
            groups, sharded = input_size // self.group_size, False
        layer.model_dtype = torch.get_default_dtype()
        layer.weight_packed = quantized_parameter(
            (output_size_per_partition, input_size_per_partition // pack),
            torch.int32,
            weight_loader,
            input_dim=1,
            output_dim=0,
        )
        layer.weight_scale = quantized_parameter(
            (output_size_per_partition, groups),
            torch.float32,
            weight_loader,
            input_dim=1 if sharded else None,
            output_dim=0,
        )
        layer.weight_shape = quantized_parameter(
            (2,), torch.int64, _ignore_shape, input_dim=None, output_dim=None
        )
        if self.group_order:
            layer.weight_g_idx = quantized_parameter(
                (input_size_per_partition,),
                torch.int32,
                weight_loader,
                input_dim=0,
                output_dim=None,
            )
        if not self.symmetric:
            if output_size_per_partition % pack:
                raise ValueError(
                    f"{type(layer).__name__}: output size per rank {output_size_per_partition} "
                    f"is not a multiple of {pack} (zero points packed {pack} to an int32)"
                )
            layer.weight_zero_point = quantized_parameter(
                (output_size_per_partition // pack, groups),
                torch.int32,
                weight_loader,
                input_dim=1 if sharded else None,
                output_dim=0,
            )

    def unpacked(self, layer: nn.Module) -> tuple[torch.Tensor, ...]:
        codes = unpack_int32(layer.weight_packed.data, self.bits, 1)  # [N, K] unsigned
        scales = layer.weight_scale.data
        if self.symmetric:
            zeros = torch.full_like(scales, 2 ** (self.bits - 1))
        else:
            zeros = unpack_int32(layer.weight_zero_point.data, self.bits, 0)  # [N, groups]
        if self.group_order:  # global group numbers: the scales are the whole checkpoint's
            group_of_input = layer.weight_g_idx.data.long()
        else:
            group_of_input = self.positional_groups(codes.shape[1])
        return codes, scales, zeros, group_of_input


def _matches(name: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return name == target or name.endswith("." + target)


class CompressedTensorsConfig(GroupQuantConfig):
    """The `quantization_config` of an llm-compressor checkpoint (`quantization_settings`)."""

    def __init__(self, settings: dict):
        self.settings = compressed_tensors_settings(settings)

    @classmethod
    def get_name(cls) -> str:
        return "compressed-tensors"

    def is_layer_skipped(self, checkpoint_name: str) -> bool:
        s = self.settings
        if any(_matches(checkpoint_name, entry) for entry in s.ignore):
            return True
        return not any(
            target == "Linear" or _matches(checkpoint_name, target) for target in s.targets
        )

    def linear_method(self) -> LinearMethodBase:
        s = self.settings
        if s.weight_type == "float":
            from ember.workers.layers.quantization.fp8 import FP8LinearMethod

            return FP8LinearMethod(
                FP8Settings(
                    activation_scheme=s.activation_scheme,
                    weight_block_size=s.weight_block_size,
                    block_scale_name="weight_scale",
                )
            )
        return CompressedTensorsWNA16Method(s.bits, s.group_size, s.symmetric, s.desc_act)
