"""Bidirectional (non-causal) attention over whole sequences laid out flat, for encoder models
such as BERT. Called by `ember.workers.models.bert`; a plain-torch implementation (no KV cache:
an encoder sees every token of its prompt in one step).

    flat batch, seq_lens [3, 1, 2]:   tokens a0 a1 a2 | b0 | c0 c1
    padded to [B=3, L=3]:             a0 a1 a2 / b0 .  . / c0 c1 .   keys past a row's length
                                      are masked; padded query rows are computed and dropped
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def encoder_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, seq_lens: list[int], scale: float
) -> torch.Tensor:
    """query/key/value [T, H, D] of sequences of `seq_lens` tokens back to back -> [T, H, D]."""
    num_tokens, num_heads, head_dim = query.shape
    if len(seq_lens) == 1:
        out = F.scaled_dot_product_attention(
            query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), scale=scale
        )
        return out.transpose(0, 1)
    max_len = max(seq_lens)
    lengths = torch.tensor(seq_lens, device=query.device)
    starts = torch.cumsum(lengths, 0) - lengths
    seq_index = torch.repeat_interleave(torch.arange(len(seq_lens), device=query.device), lengths)
    position = torch.arange(num_tokens, device=query.device) - starts[seq_index]
    padded_index = seq_index * max_len + position

    def pad(x: torch.Tensor) -> torch.Tensor:
        padded = x.new_zeros(len(seq_lens) * max_len, num_heads, head_dim)
        padded[padded_index] = x
        return padded.view(len(seq_lens), max_len, num_heads, head_dim).transpose(1, 2)

    key_mask = torch.arange(max_len, device=query.device)[None, :] < lengths[:, None]
    out = F.scaled_dot_product_attention(
        pad(query), pad(key), pad(value), attn_mask=key_mask[:, None, None, :], scale=scale
    )
    return out.transpose(1, 2).reshape(-1, num_heads, head_dim)[padded_index]


def encoder_attention_reference(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, seq_lens: list[int], scale: float
) -> torch.Tensor:
    """The same, one sequence at a time with an explicit softmax: the oracle in tests."""
    outputs, start = [], 0
    for length in seq_lens:
        q, k, v = (x[start : start + length].transpose(0, 1).float() for x in (query, key, value))
        weights = (q @ k.transpose(-1, -2) * scale).softmax(-1)
        outputs.append((weights @ v).transpose(0, 1).to(query.dtype))
        start += length
    return torch.cat(outputs)
