"""Linear weights held as 4- and 8-bit groups on the CPU, for decode-sized batches.

A decode step of a small model on a CPU is bound by memory bandwidth: every step reads every
weight once. A GGUF file already stores most weights as 4-bit groups (Q4_0, Q4_1: 32 values
sharing a scale and an offset), and torch has CPU kernels that multiply bfloat16 activations
by such groups directly (`aten._weight_int4pack_mm_for_cpu`). Reading 4 bits per weight instead
of 32 makes a batch-1 decode step several times faster.

Nothing here knows about GGUF: `find_int4_groups` looks at dense weights (dequantised from the
file) and recovers the groups only when the weights are exactly 4-bit groups, so the packed
weights compute the same products as the dense ones (with the scales rounded to bfloat16).
Eight-bit groups (Q8_0, often the embedding and LM head) are split exactly into a high and a
low 4-bit half for torch's kernel:

    w = d * q8,  q8 in [-127, 127],  q8 + 128 = 16 * hi + lo   (hi, lo in [0, 15])
    w = (hi - 8) * 16d  +  ((lo - 8) * d + 8d)                 (two int4 products, summed)

torch's kernel reads each group as  w = (q - 8) * scale + zero  with q in [0, 15].

Embeddings and LM heads keep their groups as GGUF has them (`QuantizedWeight`): rows are read
from them, and an LM head multiplies by them in C (`kernels/block_matmul.py`) where a compiler
is found, one pass over its 8-bit groups instead of torch's two 4-bit halves (SmolLM2's 49152 x
576 head: 1.9 -> 1.0 ms a decode token, 25 -> 15 ms for 32). For the 4-bit layers torch's
kernel stays: it measured 25-40% faster than the C one on SmolLM2's layer shapes at 1 to 8 rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ember.kernels import block_matmul, group_search, tile_matmul
from ember.workers.layers.tiled_weight import TiledWeight

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
    (symmetric, d * (q - 8), the largest magnitude at q = 0). In C (`kernels.group_search`,
    one pass) where it builds, else `find_int4_groups_torch`: the same answer.
    """
    if group_size != GROUP_SIZE or weight.device.type != "cpu" or not group_search.available():
        return find_int4_groups_torch(weight, group_size)
    for form in ("q4_1", "q4_0"):
        found = group_search.find_groups(weight, form)
        if found is not None:
            q, step, base = found
            zero = base + 8 * step if form == "q4_1" else torch.zeros_like(step)
            return Int4Groups(q.int(), step, zero)
    return None


def find_int4_groups_torch(weight: torch.Tensor, group_size: int = GROUP_SIZE) -> Int4Groups | None:
    """`find_int4_groups` in torch: the reference."""
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
    |q8| = 127); else None. In C where it builds, else `find_int8_groups_torch`."""
    if group_size != GROUP_SIZE or weight.device.type != "cpu" or not group_search.available():
        return find_int8_groups_torch(weight, group_size)
    found = group_search.find_groups(weight, "q8_0")
    return None if found is None else (found[0].int(), found[1])


def find_int8_groups_torch(
    weight: torch.Tensor, group_size: int = GROUP_SIZE
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`find_int8_groups` in torch: the reference."""
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


def _narrowed(
    weight: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, offset) in float16 when q * scale + offset still lands on `weight` [N, K]
    within the tolerance the groups were found with, else in float32."""
    narrow_scale, narrow_offset = scale.half(), offset.half()
    if group_search.available():
        fits = group_search.rebuild_fits(weight, q, narrow_scale, narrow_offset, scale)
        return (narrow_scale, narrow_offset) if fits else (scale, offset)
    group_size = q.shape[1] // scale.shape[1]
    rebuilt = q.float().unflatten(-1, (scale.shape[1], group_size))
    rebuilt = rebuilt * narrow_scale.float()[..., None] + narrow_offset.float()[..., None]
    error = (rebuilt.flatten(-2) - weight.float()).abs()
    tolerance = _EXACT * scale.abs().repeat_interleave(group_size, dim=1) + 1e-7 * weight.abs()
    if bool(torch.isfinite(rebuilt).all()) and bool((error <= tolerance).all()):
        return narrow_scale, narrow_offset
    return scale, offset


class QuantizedWeight:
    """A [N, K] weight of 4- or 8-bit groups of 32 kept compact, as GGUF stores it:

        4-bit: codes [N, K / 2] uint8 (two q per byte, the even element in the low nibble),
               w = q * scale + offset, q in [0, 15]                       (Q4_0, Q4_1)
        8-bit: codes [N, K] int8, w = q * scale, q in [-127, 127]; offset None     (Q8_0)

    scale, offset: [N, K / 32], float16 where that reproduces the weight (GGUF's own scales
    are float16), else float32. Rows are read dequantised to float32 (an embedding lookup, the
    LM head's refined rows), and `matmul` multiplies by the groups in C (`kernels.block_matmul`,
    activations in 16-bit groups). SmolLM2's 49152 x 576 Q8_0 table takes 30 MB so, against
    113 MB in float32, and serves both the embedding and the tied LM head."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None):
        self.codes, self.scale, self.offset = codes, scale, offset

    @classmethod
    def from_weight(cls, weight: torch.Tensor) -> QuantizedWeight | None:
        if weight.device.type != "cpu" or weight.dim() != 2:
            return None
        groups = find_int4_groups(weight)
        if groups is not None:
            q = groups.q.to(torch.uint8)
            codes = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
            scale, offset = _narrowed(
                weight, groups.q, groups.scale, groups.zero - 8 * groups.scale
            )
            return cls(codes, scale, offset)
        found = find_int8_groups(weight)
        if found is not None:
            q8, step = found
            scale, _ = _narrowed(weight, q8, step, torch.zeros_like(step))
            return cls(q8.to(torch.int8), scale, None)
        return None

    @property
    def shape(self) -> tuple[int, int]:
        rows, width = self.codes.shape
        return rows, width * 2 if self.codes.dtype == torch.uint8 else width

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] (float32 or bfloat16) @ w.T -> [M, N] in x's dtype, through bfloat16 as the
        fused decode step computes it (both paths give the same values)."""
        return self._matmul(x.to(torch.bfloat16), torch.bfloat16).to(x.dtype)

    def matmul_bfloat16(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] bfloat16 -> [M, N] bfloat16."""
        return self._matmul(x, torch.bfloat16)

    def _matmul(self, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        out = block_matmul.block_matmul(x, self.codes, self.scale, self.offset, out_dtype)
        if out is None:  # rows wider than the kernel takes (16384): dequantised, slow but exact
            index = torch.arange(self.codes.shape[0])
            out = (x.float() @ self.rows(index).T).to(out_dtype)
        return out

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """The rows `index` (any shape) as float32 [*index.shape, H]."""
        flat = index.reshape(-1)
        codes = self.codes.index_select(0, flat)
        if codes.dtype == torch.uint8:
            q = torch.stack((codes & 15, codes >> 4), dim=-1).flatten(-2).float()
        else:
            q = codes.float()
        groups = self.scale.shape[1]
        w = q.unflatten(-1, (groups, -1))
        w = w.mul_(self.scale.index_select(0, flat).float().unsqueeze(-1))
        if self.offset is not None:
            w = w.add_(self.offset.index_select(0, flat).float().unsqueeze(-1))
        return w.reshape(*index.shape, -1)


class PackedInt4Weight:
    """One or more sets of 4-bit groups in torch's CPU layout, summed: `x @ w.T` takes one kernel
    call per set. Each set is (packed [N, K / 2] uint8, scales_zeros [K / group, N, 2] bf16)."""

    max_tokens = 8  # batches up to this size read it; larger ones are faster on bfloat16

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


def pack_weight(weight: torch.Tensor) -> TiledWeight | PackedInt4Weight | None:
    """`weight` packed when it is exactly made of 4- or 8-bit groups: in VNNI tiles where the
    CPU has them, else in torch's packed 4-bit layout (8-bit groups in two halves)."""
    if weight.device.type != "cpu" or weight.dim() != 2:
        return None
    if tile_matmul.available():
        tiled = tiled_groups(QuantizedWeight.from_weight(weight))
        if isinstance(tiled, TiledWeight):
            return tiled
    groups = find_int4_groups(weight)
    if groups is not None:
        return PackedInt4Weight.from_groups([groups])
    halves = find_int8_halves(weight)
    if halves is not None:
        return PackedInt4Weight.from_groups(list(halves))
    return None


def tiled_groups(groups: QuantizedWeight | None) -> TiledWeight | QuantizedWeight | None:
    """`groups` in VNNI tiles where the CPU has them, else as they are."""
    if groups is None:
        return None
    return TiledWeight.from_groups(groups.codes, groups.scale, groups.offset) or groups


def packed_format() -> str:
    """What packed weights are on this machine (part of the packed cache file's name): VNNI
    tiles; or torch's 4-bit layout for layers, with the LM head as `QuantizedWeight` rows
    through the C kernel or as torch's 4-bit halves."""
    if tile_matmul.available():
        return "tiles"
    return "groups" if block_matmul.available() else "int4pack"


def packed_cache_key() -> str:
    """What decides the bytes of the packed weights made here, for the name of their cache
    file: `packed_format()`, and for torch's 4-bit layout the instruction set torch packs for
    (`_convert_weight_to_int4pack_for_cpu` lays the groups out per ISA: a file packed under
    AVX2 read under AVX-512 gives garbage, as a cache shared by two machines, or a run under
    `ATEN_CPU_CAPABILITY`, would)."""
    layout = packed_format()
    if layout == "tiles":
        return layout
    return f"{layout}-{torch.backends.cpu.get_cpu_capability().lower()}"
