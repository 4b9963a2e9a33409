"""A request as the engine core tracks it: its tokens, progress and status."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ember.enginecore.messages import EngineCoreRequest, FinishReason
from ember.workers.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED = enum.auto()


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...]
    arrival_time: float = 0.0
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_preemptions: int = 0
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None

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
        )

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

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
        if (
            max_tokens is not None and num_output >= max_tokens
        ) or self.num_tokens >= max_model_len:
            self.finish_reason = FinishReason.LENGTH
            return True
        return False
