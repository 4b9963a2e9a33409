"""Pooling parameters of one request, with vLLM's fields: what a pooling model returns for it.

Built by the user (re-exported as `ember.PoolingParams`) or by `LLM.encode`/`embed`/`classify`/
`score`, which set `task`; sent to the engine core inside an add request and read by the
worker's pooler. Validation runs on construction and on msgspec decode.
"""

from __future__ import annotations

import msgspec

# vLLM's pooling tasks: one vector per prompt (embed), class probabilities per prompt
# (classify), a relevance score of a text pair (score), and the per-token variants.
POOLING_TASKS = ("embed", "classify", "score", "token_embed", "token_classify")


class PoolingParams(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Parameters of a pooling request, as vLLM's `PoolingParams`.

    - use_activation: vLLM's one switch for every task: L2-normalise embeddings (embed,
      token_embed), apply the classifier's activation (classify, score, token_classify);
      None = the task's default below.
    - normalize: L2-normalise embeddings (embed, token_embed); None = the model's default
      (True for embedding models, as sentence-transformers' `Normalize` module says).
    - dimensions: keep the first `dimensions` features of an embedding before normalising
      (Matryoshka truncation); must be in [1, hidden size].
    - activation: apply the classifier's activation (softmax over labels, sigmoid for a
      single label) for classify, score and token_classify; None = True.
      normalize and activation are the older vLLM spellings (before use_activation); either
      may be given with use_activation only when they agree.
    - truncate_prompt_tokens: keep only the last k prompt tokens (-1: the model's length).
    - task: set by `LLM.encode` and its siblings; one of `POOLING_TASKS`.
    """

    use_activation: bool | None = None
    normalize: bool | None = None
    dimensions: int | None = None
    activation: bool | None = None
    truncate_prompt_tokens: int | None = None
    task: str | None = None
    # Set by `LLM.score` for a text pair given to a cross-encoder: the prompt position where
    # the second text (token type 1) begins. Not a vLLM field; users leave it unset.
    segment_start: int | None = None

    def __post_init__(self) -> None:
        for name in ("use_activation", "normalize", "activation"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool or None, got {type(value).__name__}")
        for name in ("dimensions", "truncate_prompt_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
        for name in ("normalize", "activation"):
            value = getattr(self, name)
            if None not in (value, self.use_activation) and value != self.use_activation:
                raise ValueError(
                    f"use_activation={self.use_activation} and {name}={value} disagree; give "
                    "use_activation only"
                )
        if self.dimensions is not None and self.dimensions < 1:
            raise ValueError(f"dimensions must be at least 1, got {self.dimensions}")
        if self.truncate_prompt_tokens is not None and (
            self.truncate_prompt_tokens < 1 and self.truncate_prompt_tokens != -1
        ):
            raise ValueError(
                f"truncate_prompt_tokens must be -1 or at least 1, got "
                f"{self.truncate_prompt_tokens}"
            )
        if self.task is not None and self.task not in POOLING_TASKS:
            raise ValueError(f"task must be one of {POOLING_TASKS}, got {self.task!r}")

    @property
    def apply_activation(self) -> bool | None:
        """classify, score, token_classify: apply the classifier's activation (None: yes)."""
        return self.activation if self.use_activation is None else self.use_activation

    @property
    def apply_normalize(self) -> bool | None:
        """embed, token_embed: L2-normalise (None: the model's default)."""
        return self.normalize if self.use_activation is None else self.use_activation

    def clone(self) -> PoolingParams:
        return msgspec.structs.replace(self)

    def with_task(self, task: str) -> PoolingParams:
        """A copy for `task`; the task-specific fields that do not apply to it must be unset."""
        if self.dimensions is not None and task not in ("embed", "token_embed"):
            raise ValueError(f"dimensions applies to embeddings only, not to task {task!r}")
        if self.normalize is not None and task not in ("embed", "token_embed"):
            raise ValueError(f"normalize applies to embeddings only, not to task {task!r}")
        if self.activation is not None and task in ("embed", "token_embed"):
            raise ValueError(f"activation applies to classification and scores, not to {task!r}")
        return msgspec.structs.replace(self, task=task)
