"""Batched LoRA for a step of mixed adapters (vLLM's bgmv / sgmv semantics), in plain torch: the
CPU path and the reference. Called by the LoRA linear layers (`ember.workers.layers.lora`).

Per token t whose adapter slot s = token_slots[t] is >= 0 (-1: the base model, untouched):

    y[t] += (x[t] @ lora_a[s]^T) @ lora_b[s]^T * scales[s]
            └──── shrink: [R] ───┘ └──────── expand: [out] ───────┘

    lora_a [num_slots, R, in]   lora_b [num_slots, out, R]   (R = max_lora_rank, zero padded)

The torch path (CPU, and the reference) groups the tokens by slot once per step
(`slot_groups`), so each layer does one matmul pair per adapter in the batch rather than one
per token; on CUDA `lora_triton.py` runs a gemv per token against its slot (vLLM's bgmv).
"""

from __future__ import annotations

import torch

# (slot, rows of the tokens using it; None when every token of the step uses it)
SlotGroups = list[tuple[int, torch.Tensor | None]]


def slot_groups(token_slots: torch.Tensor) -> SlotGroups:
    """The rows of each slot used in `token_slots` [T] (int64; -1 = no adapter), by slot. A
    step whose tokens all use one adapter gives `[(slot, None)]`: its layers then multiply
    whole activations, with no gather or scatter."""
    slots = torch.unique(token_slots).tolist()
    if len(slots) == 1 and slots[0] >= 0:
        return [(slots[0], None)]
    groups = []
    for slot in slots:
        if slot >= 0:
            groups.append((slot, (token_slots == slot).nonzero().squeeze(1)))
    return groups


def lora_shrink(
    x: torch.Tensor, lora_a: torch.Tensor, token_slots: torch.Tensor, groups: SlotGroups
) -> torch.Tensor:
    """buffer [T, R] = x[t] @ lora_a[slot(t)]^T (rows of slot -1 zero); `groups` are
    `slot_groups(token_slots)`, computed once per step."""
    if x.is_cuda:
        from ember.kernels.lora_triton import lora_shrink_triton

        return lora_shrink_triton(x, lora_a, token_slots)
    if len(groups) == 1 and groups[0][1] is None:
        return x.to(lora_a.dtype) @ lora_a[groups[0][0]].T
    buffer = x.new_zeros(x.shape[0], lora_a.shape[1], dtype=lora_a.dtype)
    for slot, rows in groups:
        buffer.index_copy_(0, rows, x.index_select(0, rows).to(lora_a.dtype) @ lora_a[slot].T)
    return buffer


def lora_expand_(
    y: torch.Tensor,
    buffer: torch.Tensor,
    lora_b: torch.Tensor,
    scales: torch.Tensor,
    token_slots: torch.Tensor,
    groups: SlotGroups,
) -> None:
    """y[t] += buffer[t] @ lora_b[slot(t)]^T * scales[slot(t)] (rows of slot -1 untouched), in
    place; `y` may be a column slice of a wider output (a fused layer's q, k or v part)."""
    if y.is_cuda:
        from ember.kernels.lora_triton import lora_expand_triton_

        lora_expand_triton_(y, buffer, lora_b, scales, token_slots)
        return
    for slot, rows in groups:
        if rows is None:  # every token: no gather, no scatter
            y.add_(((buffer @ lora_b[slot].T) * scales[slot]).to(y.dtype))
            continue
        delta = (buffer.index_select(0, rows) @ lora_b[slot].T) * scales[slot]
        y.index_add_(0, rows, delta.to(y.dtype))


def add_lora_reference(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scales: torch.Tensor,
    token_slots: torch.Tensor,
) -> torch.Tensor:
    """The definition, one token at a time: y + the LoRA delta of each token's slot."""
    out = y.clone()
    for t, slot in enumerate(token_slots.tolist()):
        if slot < 0:
            continue
        out[t] += ((x[t].to(lora_a.dtype) @ lora_a[slot].T) @ lora_b[slot].T * scales[slot]).to(
            y.dtype
        )
    return out
