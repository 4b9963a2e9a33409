"""Repetition, frequency and presence penalties on a batch of logits (the torch reference).

Called by `ember.workers.sampler.Sampler` once per step for the rows that use a penalty. Token
histories arrive padded with `vocab_size` (an id no logit has), so one scatter counts every
row at once:

    vocab 5, row 0 outputs [2, 2, 4], row 1 outputs [1]:
      output_token_ids = [[2, 2, 4], [1, 5, 5]]   -> counts [[0, 0, 2, 0, 1], [0, 1, 0, 0, 0]]
"""

from __future__ import annotations

import torch


def token_counts(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """How often each id occurs in each row of token_ids [B, L] (padding id = vocab_size):
    [B, V] int32."""
    counts = torch.zeros(
        token_ids.shape[0], vocab_size + 1, dtype=torch.int32, device=token_ids.device
    )
    counts.scatter_add_(1, token_ids, torch.ones_like(token_ids, dtype=torch.int32))
    return counts[:, :vocab_size]


def apply_penalties(
    logits: torch.Tensor,
    prompt_token_ids: torch.Tensor,
    output_token_ids: torch.Tensor,
    presence_penalties: torch.Tensor,
    frequency_penalties: torch.Tensor,
    repetition_penalties: torch.Tensor,
) -> torch.Tensor:
    """Penalise logits [B, V] by each row's history, as vLLM and the OpenAI API define it.

    - repetition (> 0, 1 = off; CTRL's rule): a token seen in the prompt or the output has its
      logit divided by the penalty when positive, multiplied when negative.
    - frequency (0 = off): minus penalty × times the token was generated.
    - presence (0 = off): minus penalty once if the token was generated at all.

    prompt_token_ids [B, Lp] and output_token_ids [B, Lo] are padded with V. Returns new logits.
    """
    vocab_size = logits.shape[1]
    output_counts = token_counts(output_token_ids, vocab_size)
    output_seen = output_counts > 0
    prompt_seen = token_counts(prompt_token_ids, vocab_size) > 0
    repetition = repetition_penalties.to(logits.dtype).unsqueeze(1)
    penalised = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(prompt_seen | output_seen, penalised, logits)
    logits = logits - frequency_penalties.to(logits.dtype).unsqueeze(1) * output_counts
    return logits - presence_penalties.to(logits.dtype).unsqueeze(1) * output_seen
