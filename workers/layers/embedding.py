"""Token embedding and LM head, with the vocabulary split across tensor-parallel ranks.

As vLLM does, the vocabulary is padded to a multiple of 64 and each rank holds an equal share
of the padded rows (the last rank's share runs past the vocabulary; those rows are zero):

    vocab 1000 -> padded 1024, tp_size 2:   rank 0 rows [0, 512)   rank 1 rows [512, 1024)
                                            (rank 1: 488 real rows, 24 padding rows)

An embedding looks up the ids that fall in its rows, zeroes the others, and all-reduces; an LM
head multiplies by its rows, and the shares of logits are gathered on rank 0 and trimmed to the
real vocabulary. The table's format is its `quant_method`'s (dense, or GGUF's packed groups).
"""

from __future__ import annotations

import torch
from torch import nn

from ember.workers.layers.context import ModelContext
from ember.workers.layers.linear import default_weight_loader

VOCAB_PADDING = 64


def pad_vocab_size(vocab_size: int, padding: int = VOCAB_PADDING) -> int:
    return -(-vocab_size // padding) * padding


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, *, ctx: ModelContext):
        super().__init__()
        self.parallel = ctx.parallel
        self.tp_rank, self.tp_size = ctx.tp_rank, ctx.tp_size
        self.num_embeddings = num_embeddings
        self.num_embeddings_padded = pad_vocab_size(num_embeddings)
        self.rows_per_rank = -(-self.num_embeddings_padded // self.tp_size)
        self.vocab_start = self.tp_rank * self.rows_per_rank
        self.quant_method = ctx.quant_config.get_quant_method(self)
        # Uninitialised, like every parameter: the checkpoint fills it (no second pass over
        # memory); only the padding rows are zeroed here.
        self.quant_method.create_weights(
            self, self.rows_per_rank, embedding_dim, self.weight_loader
        )
        if hasattr(self, "weight"):  # a quantized head zeroes its own padding
            self.weight.data[self.num_local_rows :].zero_()

    @property
    def num_local_rows(self) -> int:
        """Rows of this rank that hold real tokens."""
        return max(0, min(self.rows_per_rank, self.num_embeddings - self.vocab_start))

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        if loaded_weight.shape[0] != self.num_embeddings:
            raise ValueError(
                f"shape mismatch: checkpoint has {tuple(loaded_weight.shape)}, model expects "
                f"({self.num_embeddings}, {param.shape[1]})"
            )
        rows = self.num_local_rows
        if rows == 0:  # this rank's share is all padding (a table smaller than the ranks)
            return
        default_weight_loader(
            param.data.narrow(0, 0, rows), loaded_weight.narrow(0, self.vocab_start, rows)
        )

    def read_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (any shape, local to this rank) of this rank's table: [*ids.shape, H]."""
        return self.quant_method.embedding(self, ids)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self.read_rows(input_ids)
        local_ids = input_ids - self.vocab_start
        outside = (local_ids < 0) | (local_ids >= self.rows_per_rank)
        out = self.read_rows(local_ids.masked_fill(outside, 0))
        out = out.masked_fill(outside.unsqueeze(-1), 0)
        return self.parallel.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection to vocabulary logits; may share its weight with the embedding.

    `logit_scale` and `soft_cap` (Granite's 1 / logits_scaling, Gemma 2's final soft cap) are
    applied to each rank's share before the gather: both act on each logit alone.
    """

    is_lm_head = True

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        ctx: ModelContext,
        logit_scale: float = 1.0,
        soft_cap: float | None = None,
    ):
        super().__init__(num_embeddings, embedding_dim, ctx=ctx)
        self.logit_scale = logit_scale
        self.soft_cap = soft_cap

    def tie_weights(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """Logits [N, vocab] (float32) of hidden states [N, H] on rank 0; None on the other
        ranks (each computes its share, which rank 0 gathers)."""
        logits = self.quant_method.apply(self, hidden_states)
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        if self.soft_cap:
            logits = torch.tanh(logits / self.soft_cap) * self.soft_cap
        logits = self.parallel.gather(logits, dim=-1)
        if logits is None:
            return None
        return logits[:, : self.num_embeddings]
