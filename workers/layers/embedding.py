"""Token embedding and LM head, with the vocabulary split across tensor-parallel ranks."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ember.workers.distributed import get_tp_rank, get_tp_size, tp_all_gather, tp_all_reduce
from ember.workers.layers.linear import default_weight_loader

# Rows of logits recomputed in float32 after the packed LM head: the argmax and the head of the
# distribution that top-k and logprobs (at most 20 by default) read; each costs one dense row.
REFINED_LOGITS = 32


def refine_top_logits(
    logits: torch.Tensor,
    hidden_states: torch.Tensor,
    read_rows: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Recompute in float32 the `REFINED_LOGITS` largest of `logits` [M, V] (float32, from the
    packed LM head, whose bfloat16 output is coarse: 0.125 apart near 20) from the weight's
    rows (`read_rows(ids)`: [*ids.shape, H]): the argmax and the top of the distribution become
    float32 products."""
    top = logits.topk(min(REFINED_LOGITS, logits.shape[1]), dim=-1).indices  # [M, k]
    rows = read_rows(top).float()  # [M, k, H]
    exact = torch.bmm(rows, hidden_states.float().unsqueeze(-1)).squeeze(-1)
    return logits.scatter_(1, top, exact)


class VocabParallelEmbedding(nn.Module):
    """Each rank holds ceil(vocab / tp_size) rows; padding rows beyond the vocabulary are zero."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.num_embeddings = num_embeddings
        self.rows_per_rank = -(-num_embeddings // self.tp_size)
        self.vocab_start = self.tp_rank * self.rows_per_rank
        # Uninitialised, like every parameter: the checkpoint fills it (no second pass over
        # memory); only the padding rows of the last rank are zeroed here.
        self.weight = nn.Parameter(
            torch.empty(self.rows_per_rank, embedding_dim), requires_grad=False
        )
        valid_rows = max(0, min(self.rows_per_rank, num_embeddings - self.vocab_start))
        self.weight.data[valid_rows:].zero_()
        self.weight.weight_loader = self.weight_loader
        # `packed_int4.QuantizedWeight` of the weight (quantization="gguf"): rows are read from
        # it and the dense weight is left untouched (mapped from the cache, never resident).
        self.packed_rows = None

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        if loaded_weight.shape[0] != self.num_embeddings:
            raise ValueError(
                f"shape mismatch: checkpoint has {tuple(loaded_weight.shape)}, model expects "
                f"({self.num_embeddings}, {param.shape[1]})"
            )
        rows = min(self.rows_per_rank, self.num_embeddings - self.vocab_start)
        default_weight_loader(
            param.data.narrow(0, 0, rows), loaded_weight.narrow(0, self.vocab_start, rows)
        )

    def read_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (any shape) of this rank's weight: [*ids.shape, H]."""
        if self.packed_rows is not None:
            return self.packed_rows.rows(ids)
        return F.embedding(ids, self.weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self.read_rows(input_ids)
        local_ids = input_ids - self.vocab_start
        outside = (local_ids < 0) | (local_ids >= self.rows_per_rank)
        out = self.read_rows(local_ids.masked_fill(outside, 0))
        out = out.masked_fill(outside.unsqueeze(-1), 0)
        return tp_all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection to vocabulary logits; may share its weight with the embedding."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__(num_embeddings, embedding_dim)
        self.packed_weight = None  # `packed_int4`, see `compute_logits`

    def tie_weights(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab] (float32) of hidden states [N, H], gathered from every rank."""
        if self.packed_weight is None:
            logits = F.linear(hidden_states, self.weight)
        else:  # packed at any batch size: the dense rows are read only for the refined top
            logits = self.packed_weight.matmul(hidden_states).float()
            logits = refine_top_logits(logits, hidden_states, self.read_rows)
        logits = tp_all_gather(logits, dim=-1)
        return logits[:, : self.num_embeddings].float()
