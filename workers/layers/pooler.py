"""The pooler: turns a step's last hidden states into each pooling request's output.

Called by `ember.workers.pooling_runner`. Per request, by its task:

    embed           pool the prompt's tokens (CLS: first, MEAN: all, LAST: last) -> [H'],
                    first `dimensions` features, L2-normalised unless use_activation=False
    token_embed     every token's hidden state -> [T, H'], the same per token
    classify/score  pool, then the model's classifier head -> [num_labels], softmax (sigmoid
                    for one label) unless use_activation=False
    token_classify  the classifier head on every token -> [T, num_labels]
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ember.workers.config import PoolerConfig
from ember.workers.pooling_params import PoolingParams

_SEQUENCE_TASKS = ("embed", "classify", "score")


class Pooler:
    def __init__(
        self, config: PoolerConfig, head: Callable[[torch.Tensor], torch.Tensor] | None = None
    ):
        if config.head == "classify" and head is None:
            raise ValueError("a classification pooler needs the model's classifier head")
        self.config = config
        self.head = head

    def _pool(self, hidden_states: torch.Tensor, start: int, end: int) -> torch.Tensor:
        pooling_type = self.config.pooling_type
        if pooling_type == "CLS":
            return hidden_states[start]
        if pooling_type == "LAST":
            return hidden_states[end - 1]
        if pooling_type == "MEAN":
            return hidden_states[start:end].float().mean(dim=0)
        raise ValueError(f"unknown pooling_type {pooling_type!r}")

    def _activate(self, logits: torch.Tensor, params: PoolingParams) -> torch.Tensor:
        if params.apply_activation is False:
            return logits
        if logits.shape[-1] == 1:
            return torch.sigmoid(logits)
        return logits.softmax(dim=-1)

    def _embedding(self, vectors: torch.Tensor, params: PoolingParams) -> torch.Tensor:
        if params.dimensions is not None:
            vectors = vectors[..., : params.dimensions]
        normalize = params.apply_normalize
        if normalize is None:
            normalize = self.config.normalize
        return F.normalize(vectors, p=2, dim=-1) if normalize else vectors

    def __call__(
        self,
        hidden_states: torch.Tensor,
        spans: list[tuple[int, int]],
        params: list[PoolingParams],
    ) -> list[torch.Tensor]:
        """One float32 tensor per request; `spans` are its rows [start, end) in the batch."""
        outputs: list[torch.Tensor | None] = [None] * len(spans)
        pooled_rows = [i for i, p in enumerate(params) if p.task in _SEQUENCE_TASKS]
        if pooled_rows:
            pooled = torch.stack([self._pool(hidden_states, *spans[i]) for i in pooled_rows])
            if self.config.head == "classify":
                pooled = self.head(pooled.to(hidden_states.dtype))
            pooled = pooled.float()
            for row, i in enumerate(pooled_rows):
                if self.config.head == "classify":
                    outputs[i] = self._activate(pooled[row], params[i])
                else:
                    outputs[i] = self._embedding(pooled[row], params[i])
        for i, p in enumerate(params):
            start, end = spans[i]
            if p.task == "token_embed":
                outputs[i] = self._embedding(hidden_states[start:end].float(), p)
            elif p.task == "token_classify":
                outputs[i] = self._activate(self.head(hidden_states[start:end]).float(), p)
            elif outputs[i] is None:
                raise ValueError(f"pooling task {p.task!r} is not served by this model")
        return outputs
