"""`ember.logits_process`: the interface of vLLM v1's class-based logits processors
(`vllm.v1.sample.logits_processor`), for classes given as `LLM(logits_processors=[...])`."""

from ember.workers.logits_processor import (
    AddedRequest,
    BatchUpdate,
    LogitsProcessor,
    MoveDirectionality,
    MovedRequest,
    RemovedRequest,
)

__all__ = [
    "AddedRequest",
    "BatchUpdate",
    "LogitsProcessor",
    "MoveDirectionality",
    "MovedRequest",
    "RemovedRequest",
]
