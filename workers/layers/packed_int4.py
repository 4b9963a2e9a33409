"""Linear weights held as 4-bit groups on the CPU, for decode-sized batches.

A decode step of a small model on a CPU is bound by memory bandwidth: every step reads every
weight once. A GGUF file already stores most weights as 4-bit groups (Q4_0, Q4_1: 32 values
sharing a scale and an offset), and torch has CPU kernels that multiply bfloat16 activations
by such groups directly (`aten._weight_int4pack_mm_for_cpu`). Reading 4 bits per weight instead
of 32 makes a batch-1 decode step several times faster.

Nothing here knows about GGUF: `find_int4_groups` looks at dense weights (dequantised from the
file) and recovers the groups only when the weights are exactly 4-bit groups, so the packed
weights compute the same products as the dense ones (with the scales rounded to bfloat16).
Eight-bit groups (Q8_0, often the embedding and LM head) are split exactly into a high and a
low 4-bit half:

    w = d * q8,  q8 in [-127, 127],  q8 + 128 = 16 * hi + lo   (hi, lo in [0, 15])
    w = (hi - 8) * 16d  +  ((lo - 8) * d + 8d)                 (two int4 products, summed)

torch's kernel reads each group as  w = (q - 8) * scale + zero  with q in [0, 15].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ember.workers.layers.embedding import ParallelLMHead, VocabParallelEmbedding

GROUP_SIZE = 32
_EXACT = 1e-3  # a weight is on a group's grid when it is this close to it, in grid steps


@dataclass(frozen=True, slots=True)
class Int4Groups:
    """Unpacked 4-bit groups of a [N, K] weight: w = (q - 8) * scale + zero, per group."""

    q: torch.Tensor  # [N, K] int32 in [0, 15]
    scale: torch.Tensor  # [N, K / group_size] float32
    zero: torch.Tensor  # [N, K / group_size] float32

    def dequantize(self) -> torch.Tensor:
        group_size = self.q.shape[1] // self.scale.shape[1]
        scale = self.scale.repeat_interleave(group_size, dim=1)
        zero = self.zero.repeat_interleave(group_size, dim=1)
        return (self.q - 8) * scale + zero


def _grid(groups: torch.Tensor, step: torch.Tensor, base: torch.Tensor, q_min: int, q_max: int):
    """q with groups == base + q * step and q in [q_min, q_max], or None where that fails."""
    safe_step = torch.where(step > 0, step, torch.ones_like(step))
    q = ((groups - base[..., None]) / safe_step[..., None]).round()
    q = torch.where(step[..., None] > 0, q, torch.zeros_like(q))
    error = (base[..., None] + q * step[..., None] - groups).abs()
    tolerance = _EXACT * safe_step[..., None] + 1e-7 * groups.abs()
    if bool((error <= tolerance).all()) and int(q.min()) >= q_min and int(q.max()) <= q_max:
        return q
    return None


def find_int4_groups(weight: torch.Tensor, group_size: int = GROUP_SIZE) -> Int4Groups | None:
    """The 4-bit groups that `weight` [N, K] is made of, or None when it is not made of any.

    Tries Q4_1's form (offset at the group's minimum, 15 steps up to its maximum) and Q4_0's
    (symmetric, d * (q - 8), the largest magnitude at q = 0).
    """
    rows, cols = weight.shape
    if cols % group_size:
        return None
    groups = weight.detach().float().reshape(rows, cols // group_size, group_size)
    low, high = groups.amin(-1), groups.amax(-1)
    step = (high - low) / 15
    q = _grid(groups, step, low, 0, 15)
    if q is not None:
        return Int4Groups(q.reshape(rows, cols).int(), step, low + 8 * step)
    extreme = groups.gather(-1, groups.abs().argmax(-1, keepdim=True)).squeeze(-1)
    step = -extreme / 8  # may be negative: then the grid runs downwards
    q = _grid(groups * step.sign()[..., None], step.abs(), -8 * step.abs(), 0, 15)
    if q is not None:
        return Int4Groups(q.reshape(rows, cols).int(), step, torch.zeros_like(step))
    return None


def find_int8_groups(
    weight: torch.Tensor, group_size: int = GROUP_SIZE
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(q8 [N, K] int32 in [-127, 127], d [N, K / group_size]) with weight == d * q8, when
    `weight` [N, K] is made of 8-bit symmetric groups (Q8_0: the largest magnitude at
    |q8| = 127); else None."""
    rows, cols = weight.shape
    if cols % group_size:
        return None
    groups = weight.detach().float().reshape(rows, cols // group_size, group_size)
    step = groups.abs().amax(-1) / 127
    q8 = _grid(groups, step, torch.zeros_like(step), -127, 127)
    if q8 is None:
        return None
    return q8.reshape(rows, cols).int(), step


def find_int8_halves(
    weight: torch.Tensor, group_size: int = GROUP_SIZE
) -> tuple[Int4Groups, Int4Groups] | None:
    """Two 4-bit halves whose sum is `weight` [N, K], when it is made of 8-bit symmetric groups
    (see `find_int8_groups`); else None."""
    found = find_int8_groups(weight, group_size)
    if found is None:
        return None
    q8, step = found
    shifted = q8 + 128
    high = Int4Groups(shifted // 16, 16 * step, torch.zeros_like(step))
    low = Int4Groups(shifted % 16, step, 8 * step)
    return high, low


class QuantizedRows:
    """A [V, H] table of 4- or 8-bit groups kept compact and read a row at a time (an
    embedding lookup, the LM head's refined rows), each row dequantised to float32 on reading:

        4-bit: codes [V, H / 2] uint8 (two q per byte, low nibble first), w = (q - 8) * scale + zero
        8-bit: codes [V, H] int8, w = q * scale

    scale, zero: [V, H / group] float32. SmolLM2's 49152 x 576 Q8_0 table takes 32 MB so,
    against 113 MB in float32, of which a run over random token ids touches most."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
        self.codes, self.scale, self.zero = codes, scale, zero

    @classmethod
    def from_weight(cls, weight: torch.Tensor) -> QuantizedRows | None:
        if weight.device.type != "cpu" or weight.dim() != 2:
            return None
        groups = find_int4_groups(weight)
        if groups is not None:
            q = groups.q.to(torch.uint8)
            codes = q[:, 0::2] | (q[:, 1::2] << 4)
            return cls(codes.contiguous(), groups.scale, groups.zero)
        found = find_int8_groups(weight)
        if found is not None:
            q8, step = found
            return cls(q8.to(torch.int8), step, torch.zeros_like(step))
        return None

    @property
    def shape(self) -> tuple[int, int]:
        rows, width = self.codes.shape
        return rows, width * 2 if self.codes.dtype == torch.uint8 else width

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """The rows `index` (any shape) as float32 [*index.shape, H]."""
        flat = index.reshape(-1)
        codes = self.codes.index_select(0, flat)
        if codes.dtype == torch.uint8:
            q = torch.stack((codes & 15, codes >> 4), dim=-1).flatten(-2).float().sub_(8)
        else:
            q = codes.float()
        groups = self.scale.shape[1]
        w = q.unflatten(-1, (groups, -1))
        w = w.mul_(self.scale.index_select(0, flat).unsqueeze(-1))
        w = w.add_(self.zero.index_select(0, flat).unsqueeze(-1))
        return w.reshape(*index.shape, -1)


class PackedInt4Weight:
    """One or more sets of 4-bit groups in torch's CPU layout, summed: `x @ w.T` takes one kernel
    call per set. Each set is (packed [N, K / 2] uint8, scales_zeros [K / group, N, 2] bf16)."""

    def __init__(self, parts: list[tuple[torch.Tensor, torch.Tensor]]):
        self.parts = parts
        packed, scales_zeros = parts[0]
        self.group_size = 2 * packed.shape[1] // scales_zeros.shape[0]

    @classmethod
    def from_groups(cls, groups: list[Int4Groups]) -> PackedInt4Weight:
        return cls(
            [
                (
                    torch.ops.aten._convert_weight_to_int4pack_for_cpu(g.q.contiguous(), 1),
                    torch.stack([g.scale.T, g.zero.T], dim=-1).to(torch.bfloat16).contiguous(),
                )
                for g in groups
            ]
        )

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] (any float dtype) -> [M, N] in x's dtype; bfloat16 inside."""
        return self.matmul_bfloat16(x.to(torch.bfloat16)).to(x.dtype)

    def matmul_bfloat16(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] bfloat16 -> [M, N] bfloat16, one kernel call per set, summed."""
        out = None
        for packed, scales_zeros in self.parts:
            part = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x, packed, self.group_size, scales_zeros
            )
            out = part if out is None else out.add_(part)
        return out


def pack_weight(weight: torch.Tensor) -> PackedInt4Weight | None:
    """`weight` as packed 4-bit groups when it is exactly made of 4- or 8-bit groups."""
    if weight.device.type != "cpu" or weight.dim() != 2:
        return None
    groups = find_int4_groups(weight)
    if groups is not None:
        return PackedInt4Weight.from_groups([groups])
    halves = find_int8_halves(weight)
    if halves is not None:
        return PackedInt4Weight.from_groups(list(halves))
    return None


# ---- a whole model -----------------------------------------------------------------------


def packable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers whose matmul goes through `apply_linear` (they have `packed_weight`)."""
    return [(name, m) for name, m in model.named_modules() if hasattr(m, "packed_weight")]


def row_tables(model: nn.Module) -> list[tuple[str, VocabParallelEmbedding]]:
    """The embeddings and LM heads, whose rows are read (`packed_rows`); a head tied to its
    embedding is listed once, under the embedding's name."""
    tables, seen = [], set()
    for name, module in model.named_modules():
        if isinstance(module, VocabParallelEmbedding) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            tables.append((name, module))
    return tables


def _share_rows(model: nn.Module) -> None:
    """A head tied to its embedding reads the embedding's packed rows."""
    by_weight = {id(m.weight): m.packed_rows for _, m in row_tables(model)}
    for module in model.modules():
        if isinstance(module, VocabParallelEmbedding):
            module.packed_rows = by_weight.get(id(module.weight))


def pack_model(model: nn.Module) -> int:
    """Give each layer whose dense weight is exactly 4- or 8-bit groups its packed weight, and
    keep the dense copy of those layers in bfloat16; embeddings and LM heads also get their
    rows as `QuantizedRows`. Returns how many linear layers were packed."""
    count = 0
    for _, layer in packable_layers(model):
        layer.packed_weight = pack_weight(layer.weight)
        count += layer.packed_weight is not None
    for _, table in row_tables(model):
        table.packed_rows = QuantizedRows.from_weight(table.weight)
    _share_rows(model)
    use_bfloat16_dense_weights(model, convert=True)
    return count


def unpack_model(model: nn.Module, dtype: torch.dtype) -> None:
    """Undo `pack_model` on an unloaded model: no packed weights, dense weights in `dtype`."""
    for _, layer in packable_layers(model):
        if layer.packed_weight is not None:
            layer.packed_weight = None
            _set_weight_dtype(layer, dtype, convert=False)
    for module in model.modules():
        if isinstance(module, VocabParallelEmbedding):
            module.packed_rows = None


def use_bfloat16_dense_weights(model: nn.Module, convert: bool) -> None:
    """Store the dense weights of the packed linear layers in bfloat16: they serve batches too
    large for the packed kernels, where bfloat16 matmuls are about twice as fast as float32
    ones. Layers that are not packed keep their weights as loaded, and so does the LM head: its
    float32 rows refine the packed logits, and it may be the embedding. `convert=False` only
    changes the dtype of an unloaded model's parameters."""
    for _, layer in packable_layers(model):
        if layer.packed_weight is not None and not isinstance(layer, ParallelLMHead):
            _set_weight_dtype(layer, torch.bfloat16, convert)


def _set_weight_dtype(layer: nn.Module, dtype: torch.dtype, convert: bool) -> None:
    weight = layer.weight
    if weight.dtype == dtype:
        return
    data = weight.data.to(dtype) if convert else torch.empty_like(weight.data, dtype=dtype)
    layer.weight = nn.Parameter(data, requires_grad=False)
    layer.weight.weight_loader = getattr(weight, "weight_loader", None)


_ROW_PARTS = ("codes", "scale", "zero")


def packed_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The packed weights of `model` by name ("<layer>.<part>.packed", ".scales_zeros"; for
    row tables "<table>.rows.codes", ".scale", ".zero")."""
    tensors = {}
    for name, layer in packable_layers(model):
        if layer.packed_weight is None:
            continue
        for index, (packed, scales_zeros) in enumerate(layer.packed_weight.parts):
            tensors[f"{name}.{index}.packed"] = packed
            tensors[f"{name}.{index}.scales_zeros"] = scales_zeros
    for name, table in row_tables(model):
        if table.packed_rows is not None:
            for part in _ROW_PARTS:
                tensors[f"{name}.rows.{part}"] = getattr(table.packed_rows, part)
    return tensors


def attach_packed_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> bool:
    """Give the layers of `model` the packed weights of `tensors` (from `packed_tensors`);
    False when they do not fit the model's layers."""
    layers = dict(packable_layers(model))
    tables = dict(row_tables(model))
    for key in (k for k in tensors if k.endswith(".rows.codes")):
        name = key.removesuffix(".rows.codes")
        table = tables.get(name)
        found = [tensors.get(f"{name}.rows.{part}") for part in _ROW_PARTS]
        if table is None or any(t is None for t in found):
            return False
        table_rows = QuantizedRows(*found)
        if table_rows.shape != tuple(table.weight.shape):
            return False
        table.packed_rows = table_rows
    _share_rows(model)
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for key in sorted(k for k in tensors if k.endswith(".packed")):
        name, index, _ = key.rsplit(".", 2)
        scales_zeros = tensors.get(f"{name}.{index}.scales_zeros")
        layer = layers.get(name)
        if layer is None or scales_zeros is None or int(index) != len(parts.get(name, [])):
            return False
        rows, cols = layer.weight.shape
        packed = tensors[key]
        if packed.shape != (rows, cols // 2) or scales_zeros.shape[1:] != (rows, 2):
            return False
        parts.setdefault(name, []).append((packed, scales_zeros))
    for name, layer_parts in parts.items():
        layers[name].packed_weight = PackedInt4Weight(layer_parts)
    return True
