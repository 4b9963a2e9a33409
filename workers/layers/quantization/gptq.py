"""quantization="gptq": checkpoints written by AutoGPTQ / GPTQModel (`quant_method: gptq`).

Each quantized linear layer stores, with pack = 32 / bits codes to an int32 (lowest bits first):

    qweight  int32    [in / pack, out]     codes packed along the inputs
    qzeros   int32    [groups, out / pack] zero points packed along the outputs
    scales   float16  [groups, out]
    g_idx    int32    [in]                 the group of each input (act-order: not k // size)

w[n, k] = scales[g, n] * (q[k, n] - zero[g, n]), g = g_idx[k]; groups = in / group_size, or
one with group_size -1. `checkpoint_format` "gptq" (v1, what AutoGPTQ wrote) stores zero - 1
in qzeros; "gptq_v2" stores the zero itself. 4- and 8-bit codes, symmetric or not.
"""

from __future__ import annotations

import torch
from torch import nn

from ember.workers.layers.quantization.base import WeightLoader
from ember.workers.layers.quantization.group_quant import (
    GroupQuantConfig,
    GroupQuantLinearMethod,
    GroupQuantLMHeadMethod,
    quantized_parameter,
    unpack_int32,
)
from ember.workers.quantization_settings import group_quant_settings


class GPTQLinearMethod(GroupQuantLinearMethod):
    checkpoint_tensors = ("qweight", "qzeros", "scales", "g_idx")

    def __init__(self, bits: int, group_size: int, desc_act: bool, zero_offset: int):
        super().__init__(bits, group_size)
        self.desc_act, self.zero_offset = desc_act, zero_offset

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
        name = type(layer).__name__
        for size, what in (
            (input_size_per_partition, "input"),
            (output_size_per_partition, "output"),
        ):
            if size % pack:
                raise ValueError(
                    f"{name}: {what} size per rank {size} is not a multiple of {pack} "
                    f"({self.bits}-bit GPTQ codes packed {pack} to an int32)"
                )
        groups, sharded = self.groups_of(layer, input_size_per_partition, input_size)
        if self.desc_act and input_size_per_partition != input_size and self.group_size != -1:
            # act-order: any input of this rank may belong to any group
            groups, sharded = input_size // self.group_size, False
        group_dim = 0 if sharded else None
        layer.model_dtype = torch.get_default_dtype()
        layer.qweight = quantized_parameter(
            (input_size_per_partition // pack, output_size_per_partition),
            torch.int32,
            weight_loader,
            input_dim=0,
            output_dim=1,
        )
        layer.qzeros = quantized_parameter(
            (groups, output_size_per_partition // pack),
            torch.int32,
            weight_loader,
            input_dim=group_dim,
            output_dim=1,
        )
        layer.scales = quantized_parameter(
            (groups, output_size_per_partition),
            torch.float32,  # holds float16 or bfloat16 scales exactly
            weight_loader,
            input_dim=group_dim,
            output_dim=1,
        )
        layer.g_idx = quantized_parameter(
            (input_size_per_partition,), torch.int32, weight_loader, input_dim=0, output_dim=None
        )

    def unpacked(self, layer: nn.Module) -> tuple[torch.Tensor, ...]:
        codes = unpack_int32(layer.qweight.data, self.bits, 0).T  # [N, K]
        zeros = unpack_int32(layer.qzeros.data, self.bits, 1) + self.zero_offset  # [G, N]
        inputs = codes.shape[1]
        if self.desc_act and self.group_size != -1:
            # global group numbers: this rank's scales are then the whole checkpoint's
            group_of_input = layer.g_idx.data.long()
        else:
            group_of_input = self.positional_groups(inputs)
        return codes, layer.scales.data.T, zeros.T, group_of_input


class GPTQConfig(GroupQuantConfig):
    """The `quantization_config` of a GPTQ checkpoint (`quantization_settings`)."""

    def __init__(self, settings: dict):
        self.settings = group_quant_settings("gptq", settings)

    @classmethod
    def get_name(cls) -> str:
        return "gptq"

    def linear_method(self) -> GroupQuantLinearMethod:
        s = self.settings
        return GPTQLinearMethod(s.bits, s.group_size, s.desc_act, s.zero_offset)

    def get_quant_method(self, layer: nn.Module):
        from ember.workers.layers.embedding import ParallelLMHead

        if isinstance(layer, ParallelLMHead) and self.settings.lm_head:
            return GroupQuantLMHeadMethod(self.linear_method())
        return super().get_quant_method(layer)

    def _dynamic_rule(self, checkpoint_name: str):
        return next((r for r in self.settings.dynamic if r.matches(checkpoint_name)), None)

    def is_layer_skipped(self, checkpoint_name: str) -> bool:
        rule = self._dynamic_rule(checkpoint_name)
        return rule is not None and rule.skip

    def layer_method(self, checkpoint_name: str) -> GroupQuantLinearMethod | None:
        """GPTQModel's `dynamic`: the first rule that matches gives its settings over the
        checkpoint's (vLLM's `override_config`)."""
        rule = self._dynamic_rule(checkpoint_name)
        if rule is None or rule.skip:
            return None
        s = self.settings
        return GPTQLinearMethod(
            s.bits if rule.bits is None else rule.bits,
            s.group_size if rule.group_size is None else rule.group_size,
            s.desc_act if rule.desc_act is None else rule.desc_act,
            s.zero_offset,
        )
