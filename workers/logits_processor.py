"""vLLM v1's class-based logits processors (`LLM(logits_processors=[...])`): the interface users
subclass (re-exported as `ember.logits_process`), and the rank-0 worker's set of built instances.

Classes travel by reference (module and qualified name, no pickle). Each step the model runner
tells every processor how its batch changed (`BatchUpdate`), then the sampler calls `apply`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum, auto
from typing import TYPE_CHECKING, Any

from ember.workers.rpc import FunctionRef, reference_to, resolve_reference

if TYPE_CHECKING:
    import torch

    from ember.workers.sampling_params import SamplingParams


class MoveDirectionality(Enum):
    UNIDIRECTIONAL = auto()  # one-way move of a request from index i1 to i2
    SWAP = auto()  # two-way swap of the requests at i1 and i2


RemovedRequest = int  # batch index of a removed request
# (index, params, prompt token ids, output token ids): output token ids is the request's live
# list, so a processor that keeps it sees every token generated later.
AddedRequest = tuple[int, "SamplingParams", "list[int] | None", "list[int]"]
MovedRequest = tuple[int, int, MoveDirectionality]


@dataclass(frozen=True)
class BatchUpdate:
    """How the batch changed since the last step (vLLM's shape). Apply in this order: removed,
    added, moved. An added request may replace the one that held its index.

    ember's model runner reports a request whose row changed as added at its new row (never as
    moved), and rows past the new batch size as removed:

        last step  rows: [a, b, c]        this step rows: [a, c]
        BatchUpdate(batch_size=2, removed=[2], added=[(1, c.params, c.prompt, c.output)], moved=[])
    """

    batch_size: int
    removed: Sequence[RemovedRequest]
    added: Sequence[AddedRequest]
    moved: Sequence[MovedRequest]


class LogitsProcessor(ABC):
    """vLLM's `LogitsProcessor` interface. ember builds each class once, in the rank-0 worker,
    as `cls(engine_config, device, is_pin_memory)`: the first argument is ember's
    `EngineConfig` (`.model`, `.scheduler.max_num_seqs`, ...), not a vLLM `VllmConfig`."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Raise ValueError for sampling params this processor cannot serve (not called by
        ember yet)."""
        return

    @abstractmethod
    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        raise NotImplementedError

    @abstractmethod
    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [batch_size, vocab] float32 -> the processed logits (may be modified in place)."""
        raise NotImplementedError

    @abstractmethod
    def is_argmax_invariant(self) -> bool:
        """True if it never changes a row's argmax: then greedy rows skip it, and it runs after
        temperature for sampled rows (as vLLM's min_p)."""
        raise NotImplementedError

    @abstractmethod
    def update_state(self, batch_update: BatchUpdate | None) -> None:
        """Called before each `apply`; batch_update is None when the batch did not change."""
        raise NotImplementedError


_PROCESSOR_METHODS = ("apply", "is_argmax_invariant", "update_state")


def processor_reference(entry: Any) -> FunctionRef:
    """One `logits_processors` entry as the workers can import it: a class at the top level of
    an importable module, or vLLM's string form "module:QualifiedName"."""
    if isinstance(entry, str):
        module, sep, qualname = entry.partition(":")
        if not sep or not module or not qualname or ":" in qualname:
            raise ValueError(
                f"logits_processors: invalid class name {entry!r}; expected '<module>:<class>'"
            )
        return FunctionRef(module, qualname)
    if not isinstance(entry, type):
        raise TypeError(
            "logits_processors entries must be classes or '<module>:<class>' strings, got "
            f"{type(entry).__name__}"
        )
    _check_processor_class(entry)
    return reference_to(entry, "logits_processors", kind="class")


def _check_processor_class(cls: type) -> None:
    missing = [name for name in _PROCESSOR_METHODS if not callable(getattr(cls, name, None))]
    if missing:
        raise TypeError(
            f"logits_processors: {cls.__module__}.{cls.__qualname__} is not a LogitsProcessor "
            f"(it lacks {', '.join(missing)})"
        )


def load_processor_class(ref: FunctionRef) -> type:
    """The class `ref` names, imported in the worker."""
    try:
        found = resolve_reference(ref)
    except ImportError as exc:
        raise RuntimeError(f"logits_processors: cannot import {ref.module!r}: {exc}") from exc
    if not isinstance(found, type):
        raise TypeError(f"logits_processors: {ref.module}:{ref.qualname} is not a class")
    _check_processor_class(found)
    return found


class LogitsProcessors:
    """The built processors of one worker, and the batch rows they last saw."""

    def __init__(self, processors: list[Any]):
        self.non_argmax_invariant = [p for p in processors if not p.is_argmax_invariant()]
        self.argmax_invariant = [p for p in processors if p.is_argmax_invariant()]
        self.all = processors
        self._rows: list[Any] = []  # identity of each batch row at the last step

    @classmethod
    def build(
        cls, refs: Sequence[FunctionRef], config: Any, device: torch.device, is_pin_memory: bool
    ) -> LogitsProcessors | None:
        if not refs:
            return None
        return cls([load_processor_class(ref)(config, device, is_pin_memory) for ref in refs])

    def update(self, rows: list[tuple[Any, SamplingParams, list[int], Sequence[int]]]) -> None:
        """rows: (identity, params, prompt token ids, live output token ids) per batch row; a
        row whose identity differs from last step's is reported as added."""
        added = [
            (index, params, prompt, output)
            for index, (key, params, prompt, output) in enumerate(rows)
            if index >= len(self._rows) or self._rows[index] != key
        ]
        removed = list(range(len(rows), len(self._rows)))
        batch_update = None
        if added or removed:
            batch_update = BatchUpdate(len(rows), removed, added, [])
        self._rows = [row[0] for row in rows]
        for processor in self.all:
            processor.update_state(batch_update)


class OutputTokenIds(Sequence):
    """A live, read-only view of a request's output token ids inside its `token_ids` (prompt,
    then outputs): what vLLM's `AddedRequest` hands processors as the running output list."""

    __slots__ = ("_num_prompt_tokens", "_token_ids")

    def __init__(self, token_ids: list[int], num_prompt_tokens: int):
        self._token_ids = token_ids
        self._num_prompt_tokens = num_prompt_tokens

    def __len__(self) -> int:
        return len(self._token_ids) - self._num_prompt_tokens

    def __getitem__(self, index):
        return self._token_ids[self._num_prompt_tokens :][index]

    def __iter__(self):
        return iter(self._token_ids[self._num_prompt_tokens :])

    def __repr__(self) -> str:
        return repr(self._token_ids[self._num_prompt_tokens :])
