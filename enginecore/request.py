"""A request as the engine core tracks it: its tokens, progress, status, and the hashes of its
full blocks for the prefix cache. Created by `EngineCore.add_request`, driven by the `Scheduler`."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ember.enginecore.block_pool import BlockHash
from ember.enginecore.messages import EngineCoreRequest, FinishReason
from ember.workers.lora_request import LoRARequest
from ember.workers.pooling_params import PoolingParams
from ember.workers.sampling_params import SamplingParams

if TYPE_CHECKING:
    from ember.enginecore.structured_output.manager import RequestGrammar


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED = enum.auto()


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams | None  # None for a pooling request
    eos_token_ids: tuple[int, ...]
    arrival_time: float = 0.0
    cache_salt: str | None = None
    # The LoRA adapter's name: part of every block's prefix-cache key.
    lora_name: str | None = None
    lora_request: LoRARequest | None = None
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)  # prompt, then outputs
    num_computed_tokens: int = 0
    # Tokens scheduled steps will sample that have not come back yet (async scheduling: the
    # next step is scheduled before this one's output arrives; the workers know the tokens).
    num_output_placeholders: int = 0
    # Prompt tokens found in the prefix cache when first scheduled; -1 until then.
    num_cached_tokens: int = -1
    num_preemptions: int = 0
    # Hashes of the request's full blocks so far (filled by the KVCacheManager as blocks fill;
    # a function of the tokens only, so they survive a preemption).
    block_hashes: list[BlockHash] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    # time.monotonic() when the engine core queued it, and when it was first scheduled.
    queued_ts: float = 0.0
    scheduled_ts: float = 0.0
    pooling_params: PoolingParams | None = None  # a pooling request: prefilled whole, then done
    # Set for a request under structured outputs: its compile, then its matcher. The request
    # waits until the compile is done; each sampled token advances the matcher.
    grammar: RequestGrammar | None = None
    priority: int = 0  # under scheduling_policy="priority": lower first

    @property
    def priority_key(self) -> tuple[int, float, str]:
        """The order of scheduling_policy="priority": priority, then arrival, then id."""
        return (self.priority, self.arrival_time, self.request_id)

    def __post_init__(self) -> None:
        if not self.all_token_ids:
            self.all_token_ids = self.prompt_token_ids + self.output_token_ids

    @classmethod
    def from_engine_core_request(
        cls, request: EngineCoreRequest, eos_token_ids: tuple[int, ...]
    ) -> Request:
        return cls(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            sampling_params=request.sampling_params,
            eos_token_ids=eos_token_ids,
            arrival_time=request.arrival_time,
            cache_salt=request.cache_salt,
            pooling_params=request.pooling_params,
            priority=request.priority,
            lora_request=request.lora_request,
            lora_name=None if request.lora_request is None else request.lora_request.lora_name,
        )

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_output_token_id(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def check_stop(self, max_model_len: int) -> bool:
        """Record why the request is done after its newest token, if it is; return whether."""
        params = self.sampling_params
        num_output = len(self.output_token_ids)
        last = self.output_token_ids[-1]
        if num_output >= params.min_tokens:
            if not params.ignore_eos and last in self.eos_token_ids:
                self.finish_reason = FinishReason.STOP
                return True
            if params.stop_token_ids and last in params.stop_token_ids:
                self.finish_reason, self.stop_reason = FinishReason.STOP, last
                return True
        max_tokens = params.max_tokens
        if (max_tokens is not None and num_output >= max_tokens) or len(
            self.all_token_ids
        ) >= max_model_len:
            self.finish_reason = FinishReason.LENGTH
            return True
        return False
