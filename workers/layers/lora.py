"""LoRA on the linear layers: with `LLM(enable_lora=True)` the model runner wraps the
`quant_method` of every linear layer a PEFT adapter may target (q/k/v/o/gate/up/down_proj)
in a `LoRALinearMethod`, which adds each token's adapter delta to the base output.

A layer's LoRA weights are stacked by device slot and padded to `max_lora_rank` (R):

    lora_a [max_loras, n * R, in]      slice i's A in rows i*R .. i*R + r
    lora_b [max_loras, out, R]         slice i's B in its own output rows
    scales [max_loras, n]              alpha / r (alpha / sqrt(r) under use_rslora)

with n the layer's output slices: q | k | v (QKVParallelLinear), gate | up
(MergedColumnParallelLinear), or one. Under tensor parallelism B shards like the layer's
output (column-parallel) and A like its input (row-parallel), so a row-parallel layer adds its
partial delta before the all-reduce.

Which tokens use which slot is a `LoRAStep` shared by all wrapped layers of one model, set by
the model runner before each forward (vLLM's punica wrapper). A step with no adapter costs one
check per layer: the LoRA math is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ember.kernels.lora import SlotGroups, lora_expand_, lora_shrink, slot_groups
from ember.kernels.lora_cpu import LoRACWeights, lora_add
from ember.workers.layers.linear import (
    ColumnParallelLinear,
    LinearBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from ember.workers.layers.quantization.base import LinearMethodBase
from ember.workers.lora_request import SUPPORTED_TARGETS


@dataclass(slots=True)
class LoRAStep:
    """The adapter slot of each token of this step, and the tokens grouped by slot: `groups`
    is empty when no token has an adapter."""

    token_slots: torch.Tensor | None = None
    groups: SlotGroups = field(default_factory=list)

    def set_token_slots(self, token_slots: torch.Tensor | None) -> None:
        """`token_slots` [T] int64, -1 for the base model; None: no adapter this step."""
        self.token_slots = token_slots
        self.groups = [] if token_slots is None else slot_groups(token_slots)


@dataclass(frozen=True, slots=True)
class OutputSlice:
    """One checkpoint module's rows of a (fused) layer's output on this rank."""

    shard_id: str | int | None
    offset: int
    size: int


# From this many rows of one adapter a fused layer's expand runs slice by slice on CPU rather
# than through its block-diagonal B (float32, SmolLM2's 30 layers, 2 cores: 64 rows 5 ms
# against 6; 256 rows 20 against 15; 2048 rows 124 against 96).
SLICED_EXPAND_MIN_ROWS = 128


class LoRALinearMethod(LinearMethodBase):
    """The layer's own method, plus the LoRA delta of each token's adapter."""

    def __init__(
        self,
        base: LinearMethodBase,
        slices: list[OutputSlice],
        input_size: int,
        output_size: int,
        max_loras: int,
        max_rank: int,
        step: LoRAStep,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.base = base
        self.slices = slices
        self.max_rank = max_rank
        self.step = step
        self.lora_a = torch.zeros(
            max_loras, len(slices) * max_rank, input_size, dtype=dtype, device=device
        )
        self.lora_b = torch.zeros(max_loras, output_size, max_rank, dtype=dtype, device=device)
        self.scales = torch.zeros(max_loras, len(slices), dtype=torch.float32, device=device)
        # On CPU every slice's B, scaled, in one block-diagonal matrix [out, n * R]: a fused
        # layer's delta is then one matmul per adapter, not one per slice. The C kernel
        # (`kernels/lora_cpu.py`, for bfloat16 activations: the fused decode step's) reads A^T
        # [K, n * R] and every slice's scaled B^T side by side in one [R, N] matrix, float32
        # (`c_weights`).
        self.lora_b_blocks = None
        self.c_weights = None
        if device.type == "cpu":
            self.lora_b_blocks = torch.zeros(
                max_loras, output_size, len(slices) * max_rank, dtype=dtype, device=device
            )
            self.c_weights = LoRACWeights(
                torch.zeros(max_loras, input_size, len(slices) * max_rank),
                torch.zeros(max_loras, max_rank, output_size),
                max_rank,
                torch.tensor([part.offset + part.size for part in slices], dtype=torch.int64),
            )

    def create_weights(self, layer, *args, **kwargs) -> None:
        self.base.create_weights(layer, *args, **kwargs)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        self.base.process_weights_after_loading(layer)

    def apply(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.add_delta(x, self.base.apply(layer, x, bias))

    def add_delta(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out (the base output of x) plus each token's adapter delta, in place; also used by
        the fused CPU decode loop, which computes the base outputs itself."""
        groups = self.step.groups
        if not groups:
            return out
        if self.lora_b_blocks is not None and not out.is_cuda:
            return self._add_cpu(x, out, groups)
        token_slots = self.step.token_slots
        buffer = lora_shrink(x, self.lora_a, token_slots, groups)
        rank = self.max_rank
        for index, part in enumerate(self.slices):
            lora_expand_(
                out[:, part.offset : part.offset + part.size],
                buffer[:, index * rank : (index + 1) * rank],
                self.lora_b[:, part.offset : part.offset + part.size],
                self.scales[:, index],
                token_slots,
                groups,
            )
        return out

    def _add_cpu(self, x: torch.Tensor, out: torch.Tensor, groups: SlotGroups) -> torch.Tensor:
        """CPU: per adapter of the step, out[rows] += (x[rows] @ A^T) @ B_blocks^T. Bfloat16
        activations and outputs (the fused decode loop's) take the C kernel, one call for the
        step; otherwise the fewest framework calls (each costs more than these small
        products), until a prefill's rows make the zeros of the block-diagonal B cost more
        than a call a slice. Either way a token's delta does not depend on the other adapters in its
        step (the torch path gathers a slot's rows and puts them back)."""
        if lora_add(x, out, self.step.token_slots, self.c_weights):
            return out
        lora_a, lora_b = self.lora_a, self.lora_b_blocks
        for slot, rows in groups:
            part = x if rows is None else x.index_select(0, rows)
            target = out if rows is None else out.index_select(0, rows)
            if part.dtype != lora_a.dtype:
                part = part.to(lora_a.dtype)
            shrunk = part @ lora_a[slot].T
            if target.dtype != lora_b.dtype:
                target.add_(shrunk @ lora_b[slot].T)
            elif len(self.slices) == 1 or part.shape[0] < SLICED_EXPAND_MIN_ROWS:
                target.addmm_(shrunk, lora_b[slot].T)  # the sum rounded once
            else:  # each slice's block of B alone: no products with the zeros around it
                rank = self.max_rank
                for index, piece in enumerate(self.slices):
                    columns = slice(piece.offset, piece.offset + piece.size)
                    ranks = slice(index * rank, (index + 1) * rank)
                    target[:, columns].addmm_(shrunk[:, ranks], lora_b[slot, columns, ranks].T)
            if rows is not None:
                out.index_copy_(0, rows, target)
        return out

    def set_slot(
        self,
        slot: int,
        weights: dict[str | int | None, tuple[torch.Tensor, torch.Tensor, float]],
    ) -> None:
        """Put one adapter in `slot`: per shard id, this rank's A [r, in] and B [rows, r]
        and the scale; a slice the adapter does not target stays zero."""
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        self.scales[slot].zero_()
        rank = self.max_rank
        for index, part in enumerate(self.slices):
            if part.shard_id not in weights:
                continue
            lora_a, lora_b, scale = weights[part.shard_id]
            r = lora_a.shape[0]
            self.lora_a[slot, index * rank : index * rank + r].copy_(lora_a)
            self.lora_b[slot, part.offset : part.offset + part.size, :r].copy_(lora_b)
            self.scales[slot, index] = scale
        if self.lora_b_blocks is not None:
            blocks = self.lora_b_blocks[slot]
            blocks.zero_()
            for index, part in enumerate(self.slices):
                rows, columns = (
                    slice(part.offset, part.offset + part.size),
                    slice(index * rank, (index + 1) * rank),
                )
                blocks[rows, columns] = self.lora_b[slot, rows] * self.scales[slot, index]
            self.c_weights.lora_at[slot].copy_(self.lora_a[slot].T)
            for index, part in enumerate(self.slices):  # each slice's block of B, side by side
                columns = slice(part.offset, part.offset + part.size)
                self.c_weights.lora_bt[slot, :, columns] = blocks[
                    columns, index * rank : (index + 1) * rank
                ].T


def output_slices(layer: LinearBase) -> list[OutputSlice]:
    """The checkpoint modules in a layer's output rows on this rank."""
    if isinstance(layer, QKVParallelLinear):
        q_rows = layer.num_heads * layer.head_size
        kv_rows = layer.num_kv_heads * layer.head_size
        return [
            OutputSlice("q", 0, q_rows),
            OutputSlice("k", q_rows, kv_rows),
            OutputSlice("v", q_rows + kv_rows, kv_rows),
        ]
    if isinstance(layer, MergedColumnParallelLinear):
        slices, offset = [], 0
        for index, size in enumerate(layer.output_sizes):
            rows = size // layer.tp_size
            slices.append(OutputSlice(index, offset, rows))
            offset += rows
        return slices
    return [OutputSlice(None, 0, layer.output_size_per_partition)]


@dataclass(frozen=True, slots=True)
class LoRATarget:
    """Where a checkpoint module of an adapter goes: its layer and its slice of the output."""

    layer: LinearBase
    method: LoRALinearMethod
    shard_id: str | int | None

    @property
    def row_parallel(self) -> bool:
        return isinstance(self.layer, RowParallelLinear)


def add_lora_layers(
    model: nn.Module,
    max_loras: int,
    max_rank: int,
    step: LoRAStep,
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, LoRATarget]:
    """Wrap every linear layer an adapter may target; the targets by checkpoint module name
    (`model.layers.0.self_attn.q_proj` -> the layer `...qkv_proj`, shard "q")."""
    unpacked: dict[str, list[tuple[str, str | int]]] = {}
    for checkpoint_name, (fused, shard_id) in getattr(model, "packed_modules_mapping", {}).items():
        unpacked.setdefault(fused, []).append((checkpoint_name, shard_id))
    targets = {}  # in the model's dtype (the activations'), whatever the layer's format
    for name, layer in model.named_modules():
        if not isinstance(layer, (ColumnParallelLinear, RowParallelLinear)):
            continue
        prefix, _, leaf = name.rpartition(".")
        names = unpacked.get(leaf, [(leaf, None)])
        if not all(checkpoint_name in SUPPORTED_TARGETS for checkpoint_name, _ in names):
            continue
        method = LoRALinearMethod(
            layer.quant_method,
            output_slices(layer),
            layer.input_size_per_partition,
            layer.output_size_per_partition,
            max_loras,
            max_rank,
            step,
            dtype,
            device,
        )
        layer.quant_method = method
        for checkpoint_name, shard_id in names:
            key = f"{prefix}.{checkpoint_name}" if prefix else checkpoint_name
            targets[key] = LoRATarget(layer, method, shard_id)
    return targets
