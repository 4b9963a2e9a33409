"""The objects `LLM.encode`, `embed`, `classify` and `score` return, with vLLM's class and field
names. Built in the user's process from the pooled tensors the engine core sends as raw frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:  # the tensors come from `pooling_api`, which imports torch when it builds them
    import torch


@dataclass(slots=True)
class PoolingOutput:
    """A pooling request's raw result: `data` is the pooled tensor."""

    data: torch.Tensor


@dataclass(slots=True)
class EmbeddingOutput:
    """One prompt's embedding (`embedding`, a list of floats; `data`, the same as a tensor)."""

    embedding: list[float]
    data: torch.Tensor

    @classmethod
    def from_base(cls, output: PoolingOutput) -> EmbeddingOutput:
        if output.data.ndim != 1:
            raise ValueError("an embedding must be one vector")
        return cls(output.data.tolist(), output.data)

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass(slots=True)
class ClassificationOutput:
    """One prompt's class probabilities (`probs`; logits when activation=False)."""

    probs: list[float]
    data: torch.Tensor

    @classmethod
    def from_base(cls, output: PoolingOutput) -> ClassificationOutput:
        if output.data.ndim != 1:
            raise ValueError("class probabilities must be one vector")
        return cls(output.data.tolist(), output.data)

    @property
    def num_classes(self) -> int:
        return len(self.probs)


@dataclass(slots=True)
class ScoringOutput:
    """The relevance score of a text pair."""

    score: float


OutputT = TypeVar("OutputT")


@dataclass(slots=True)
class PoolingRequestOutput(Generic[OutputT]):
    """The output of one pooling request: its prompt's token ids and what was pooled.

    num_cached_tokens counts the prompt tokens served from the prefix cache (for a score of
    two embeddings, the sum over both prompts, as vLLM's).
    """

    request_id: str
    outputs: OutputT
    prompt_token_ids: list[int]
    num_cached_tokens: int = 0
    finished: bool = True


class EmbeddingRequestOutput(PoolingRequestOutput[EmbeddingOutput]):
    __slots__ = ()

    @classmethod
    def from_base(cls, output: PoolingRequestOutput[PoolingOutput]) -> EmbeddingRequestOutput:
        return cls(
            output.request_id,
            EmbeddingOutput.from_base(output.outputs),
            output.prompt_token_ids,
            output.num_cached_tokens,
            output.finished,
        )


class ClassificationRequestOutput(PoolingRequestOutput[ClassificationOutput]):
    __slots__ = ()

    @classmethod
    def from_base(cls, output: PoolingRequestOutput[PoolingOutput]) -> ClassificationRequestOutput:
        return cls(
            output.request_id,
            ClassificationOutput.from_base(output.outputs),
            output.prompt_token_ids,
            output.num_cached_tokens,
            output.finished,
        )


class ScoringRequestOutput(PoolingRequestOutput[ScoringOutput]):
    __slots__ = ()
