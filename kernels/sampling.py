"""Top-k / top-p filtering and sampling from per-row exponential noise.

Called by `ember.workers.sampler`. CUDA tensors go to the Triton kernel of `sampling_triton.py`
(imported only then); the torch reference here serves CPU and tests. Neither reads anything
back to the host.
"""

from __future__ import annotations

import torch


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Mask logits [B, V] outside each row's top_k [B] (V = off) and nucleus top_p [B] (1 = off)
    with -inf. The most likely token always survives."""
    if logits.device.type == "cuda":
        from ember.kernels.sampling_triton import apply_top_k_top_p_triton

        return apply_top_k_top_p_triton(logits, top_k, top_p)
    return apply_top_k_top_p_torch(logits, top_k, top_p)


def apply_top_k_top_p_torch(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    if top_k is None and top_p is None:
        return logits
    logits_sorted, order = logits.sort(dim=-1, descending=False)
    vocab_size = logits.shape[-1]
    if top_k is not None:
        kth_index = (vocab_size - top_k.clamp(1, vocab_size)).unsqueeze(1)
        kth_value = logits_sorted.gather(1, kth_index)
        logits_sorted = logits_sorted.masked_fill(logits_sorted < kth_value, float("-inf"))
    if top_p is not None:
        probs_sorted = logits_sorted.softmax(dim=-1)
        cumulative = probs_sorted.cumsum(dim=-1)
        outside = cumulative <= (1 - top_p.unsqueeze(1))
        outside[:, -1] = False
        logits_sorted = logits_sorted.masked_fill(outside, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, logits_sorted)


def sample_from_probs(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Draw one token per row of probs [B, V] given Exp(1) noise [B, V]: argmax(p / noise) is a
    sample from p (the exponential race), and needs no host sync."""
    return probs.div(noise).argmax(dim=-1)
