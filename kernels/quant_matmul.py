"""Weight-only quantized matmul (W4A16, W8A16) of GPTQ / AWQ / compressed-tensors layers on CUDA:
y = x @ w.T with w's integer codes kept packed on the GPU. Called by `group_quant.py`'s layers;
CUDA tensors go to `quant_matmul_triton.py`, the torch path here (dequantize, then matmul) is
the reference.

The packed form (`PackedGroupWeight`) is GPTQ's layout, whatever the checkpoint's format was:

    qweight  int32 [K / pack, N]   pack = 32 / bits codes of one output along the inputs,
                                   lowest bits first: word [i, n] = q[i*pack .. i*pack+pack-1, n]
    scales   dtype [G, N]          the model's dtype
    zeros    dtype [G, N]          integer zero points (exact in float16 and bfloat16)

    w[n, k] = scales[g, n] * (q[k, n] - zeros[g, n]),  g = k // group_size (group_size -1: 0)

GPTQ's act-order groups are sorted once at packing (`order`, the checkpoint input of each
packed input; the activations are gathered into it), which makes them positional; groups that
stay irregular after that (a rank's share of act-order groups) are read per input
(`group_of_input`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

BITS = (4, 8)


@dataclass(frozen=True, slots=True)
class PackedGroupWeight:
    """A [N, K] weight for x @ w.T as `quant_matmul` reads it (see the module docstring)."""

    qweight: torch.Tensor  # int32 [K / pack, N]
    scales: torch.Tensor  # [G, N]
    zeros: torch.Tensor  # [G, N]
    bits: int
    group_size: int  # positional groups of this many inputs, -1 one group; 0: group_of_input
    group_of_input: torch.Tensor | None  # int32 [K] where groups are not positional
    order: torch.Tensor | None  # int64 [K]: packed input i is checkpoint input order[i]

    @property
    def shape(self) -> tuple[int, int]:
        return self.qweight.shape[1], self.qweight.shape[0] * (32 // self.bits)

    def groups(self) -> torch.Tensor:
        """The group of each packed input, int64 [K]."""
        if self.group_of_input is not None:
            return self.group_of_input.long()
        inputs, device = self.shape[1], self.qweight.device
        if self.group_size == -1:
            return torch.zeros(inputs, dtype=torch.long, device=device)
        return torch.arange(inputs, device=device) // self.group_size

    def dequantize(self) -> torch.Tensor:
        """w float32 [N, K] in the checkpoint's input order, computed as the kernel does (for
        the reference, and for whoever needs the weight dense)."""
        shifts = torch.arange(0, 32, self.bits, dtype=torch.int32, device=self.qweight.device)
        codes = (self.qweight.unsqueeze(1) >> shifts.view(1, -1, 1)) & ((1 << self.bits) - 1)
        codes = codes.flatten(0, 1)  # [K, N]
        groups = self.groups()
        weight = (codes.float() - self.zeros.float()[groups]) * self.scales.float()[groups]
        weight = weight.T
        if self.order is not None:
            weight = torch.empty_like(weight).index_copy_(1, self.order, weight)
        return weight.contiguous()


def pack_group_weight(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_of_input: torch.Tensor,
    bits: int,
    dtype: torch.dtype,
    device: torch.device | str | None = None,
) -> PackedGroupWeight:
    """codes [N, K] in [0, 2**bits), scales and zeros [N, G], the group of each input [K] (what
    `GroupQuantLinearMethod.unpacked` gives for every format) as a `PackedGroupWeight` on
    `device` (codes' device by default), scales and zeros in `dtype`."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    device = codes.device if device is None else torch.device(device)
    codes, group_of_input = codes.to(device), group_of_input.to(device).long()
    outputs, inputs = codes.shape
    pack = 32 // bits
    if inputs % pack:
        raise ValueError(f"codes: inputs ({inputs}) must be a multiple of {pack} for {bits} bits")
    order = None
    if bool((group_of_input[1:] < group_of_input[:-1]).any()):  # act-order: sort by group
        order = torch.sort(group_of_input, stable=True).indices
        codes = codes.index_select(1, order)
        group_of_input = group_of_input.index_select(0, order)
    group_size = positional_group_size(group_of_input)
    qweight = torch.zeros(outputs, inputs // pack, dtype=torch.int32, device=device)
    for position in range(pack):  # two's complement: the top code of 8 bits may set the sign
        qweight |= codes[:, position::pack].to(torch.int32) << (bits * position)
    return PackedGroupWeight(
        qweight=qweight.T.contiguous(),
        scales=scales.to(device=device, dtype=dtype).T.contiguous(),
        zeros=zeros.to(device=device, dtype=dtype).T.contiguous(),
        bits=bits,
        group_size=group_size,
        group_of_input=group_of_input.to(torch.int32) if group_size == 0 else None,
        order=order,
    )


def positional_group_size(group_of_input: torch.Tensor) -> int:
    """size when input k is in group k // size, a power of two >= 16 (the kernel's tiles fit
    such groups whole); -1 when every input is in group 0; 0 otherwise (groups read per input)."""
    inputs = group_of_input.numel()
    size = int((group_of_input == 0).sum())
    if size == inputs:
        return -1
    if size < 16 or size & (size - 1):
        return 0
    expected = torch.arange(inputs, device=group_of_input.device) // size
    return size if torch.equal(group_of_input, expected) else 0


def quant_matmul(x: torch.Tensor, weight: PackedGroupWeight) -> torch.Tensor:
    """x [..., K] @ w.T -> [..., N] in x's dtype."""
    if x.device.type == "cuda":
        from ember.kernels.quant_matmul_triton import quant_matmul_triton

        return quant_matmul_triton(x, weight)
    return quant_matmul_torch(x, weight)


def quant_matmul_torch(x: torch.Tensor, weight: PackedGroupWeight) -> torch.Tensor:
    """The reference: the weight dequantized, rounded to x's dtype (as the kernel rounds it
    for its tl.dot), multiplied in float32."""
    dense = weight.dequantize().to(x.dtype)
    return F.linear(x.float(), dense.float()).to(x.dtype)
