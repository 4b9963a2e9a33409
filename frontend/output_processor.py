"""Turns the engine core's per-step token ids into `RequestOutput`s: incremental detokenizing,
stop strings (which abort the request in the engine), and finish reasons."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ember.detokenizer import IncrementalDetokenizer
from ember.enginecore.messages import EngineCoreOutput, FinishReason
from ember.outputs import CompletionOutput, RequestOutput
from ember.workers.sampling_params import SamplingParams

if TYPE_CHECKING:
    from ember.metrics import EngineMetrics, RequestStateStats


@dataclass(slots=True)
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    detokenizer: IncrementalDetokenizer
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    stats: RequestStateStats | None = field(default=None)  # RequestOutput.metrics

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def to_output(self) -> RequestOutput:
        completion = CompletionOutput(
            index=0,
            text=self.detokenizer.output_text,
            token_ids=list(self.detokenizer.output_token_ids),
            cumulative_logprob=None,
            logprobs=None,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            prompt_logprobs=None,
            outputs=[completion],
            finished=self.finished,
            num_cached_tokens=self.num_cached_tokens,
            metrics=self.stats,
        )


class OutputProcessor:
    def __init__(self, tokenizer: Any | None, metrics: EngineMetrics | None = None):
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}
        self.metrics = metrics

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float = 0.0,
    ) -> None:
        detokenizer = IncrementalDetokenizer.from_sampling_params(
            self.tokenizer, prompt_token_ids, params
        )
        state = RequestState(request_id, prompt, prompt_token_ids, detokenizer)
        if self.metrics is not None:
            from ember.metrics import RequestStateStats

            state.stats = RequestStateStats(arrival_time=arrival_time)
        self.states[request_id] = state

    def process(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestState], list[str]]:
        """Apply one step's outputs; return the requests that finished, and the ids the engine
        must abort (a stop string ended them here)."""
        finished, to_abort = [], []
        for output in outputs:
            state = self.states.get(output.request_id)
            if state is None:  # a request this process already gave up on
                continue
            if output.num_cached_tokens:  # sent with the request's first output
                state.num_cached_tokens = output.num_cached_tokens
            if state.stats is not None:
                self.metrics.observe_output(state.stats, output, len(state.prompt_token_ids))
            stopped_by_token = output.finish_reason is FinishReason.STOP
            stop_string = state.detokenizer.update(output.new_token_ids, stopped_by_token)
            if stop_string is not None:
                state.finish_reason, state.stop_reason = "stop", stop_string
                if not output.finished:
                    to_abort.append(output.request_id)
            elif output.finished:
                state.finish_reason = str(output.finish_reason)
                state.stop_reason = output.stop_reason
            if state.finished:
                finished.append(self.states.pop(output.request_id))
                if state.stats is not None:
                    num_prompt_tokens = len(state.prompt_token_ids)
                    self.metrics.observe_finished(
                        state.stats, state.finish_reason, num_prompt_tokens
                    )
        return finished, to_abort

    def abort_all(self) -> list[str]:
        request_ids = list(self.states)
        self.states.clear()
        return request_ids
