"""Log probabilities as they travel from the worker to the engine core and on to the frontend.

Built by the sampler (sampled tokens) and the model runner (prompt tokens); plain lists in a
msgspec struct, so that the engine core, which never imports torch, can pass them on.

    logprobs=2, one position whose chosen token 17 ranks 3rd:
      token_ids [[17, 5, 9]]   logprobs [[-2.3, -0.4, -1.9]]   ranks [3]
      (the chosen token first, then the top 2, most likely first)
"""

from __future__ import annotations

import msgspec


class LogprobsLists(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """Per position: the chosen token and the top-k, their log probabilities, and the rank of
    the chosen token in the vocabulary (1 = most likely)."""

    token_ids: list[list[int]] = []
    logprobs: list[list[float]] = []
    ranks: list[int] = []

    def __len__(self) -> int:
        return len(self.ranks)

    def slice(self, start: int, end: int) -> LogprobsLists:
        return LogprobsLists(
            self.token_ids[start:end], self.logprobs[start:end], self.ranks[start:end]
        )

    def extend(self, other: LogprobsLists) -> None:
        self.token_ids.extend(other.token_ids)
        self.logprobs.extend(other.logprobs)
        self.ranks.extend(other.ranks)
