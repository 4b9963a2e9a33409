"""Turns the engine core's per-step outputs into `RequestOutput`s: incremental detokenizing,
stop strings (which abort the request in the engine), finish reasons, logprobs, and the
gathering of a prompt's `n` sequences into one output.

Called by `LLM.generate` for each batch of `EngineCoreOutput`s. A request with `n > 1` runs in
the engine as n child requests; its `ParentRequest` holds their completions in index order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ember.detokenizer import IncrementalDetokenizer
from ember.enginecore.messages import EngineCoreOutput, FinishReason
from ember.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestOutput, SampleLogprobs
from ember.workers.logprobs import LogprobsLists
from ember.workers.sampling_params import SamplingParams

if TYPE_CHECKING:
    from ember.metrics import EngineMetrics, RequestStateStats


class TokenTexts:
    """The text of single tokens, as `Logprob.decoded_token` shows them; each id decoded once."""

    def __init__(self, tokenizer: Any | None):
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str | None:
        if self.tokenizer is None:
            return None
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self.tokenizer.decode([token_id])
        return text


def logprob_dicts(lists: LogprobsLists, token_texts: TokenTexts) -> list[dict[int, Logprob]]:
    """One dict per position: the chosen token first (with its rank), then the top-k in order
    of rank (vLLM's layout; a chosen token inside the top-k appears once)."""
    dicts = []
    for token_ids, logprobs, rank in zip(lists.token_ids, lists.logprobs, lists.ranks):
        position = {token_ids[0]: Logprob(logprobs[0], rank, token_texts(token_ids[0]))}
        for top_rank, (token_id, logprob) in enumerate(zip(token_ids[1:], logprobs[1:]), 1):
            if token_id not in position:
                position[token_id] = Logprob(logprob, top_rank, token_texts(token_id))
        dicts.append(position)
    return dicts


@dataclass(slots=True)
class RequestState:
    """One sequence in the engine: a request with n = 1, or one child of a parent."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    detokenizer: IncrementalDetokenizer
    index: int = 0  # the completion's index among the parent's n
    parent: ParentRequest | None = None
    logprobs: SampleLogprobs | None = None
    cumulative_logprob: float | None = None
    prompt_logprobs: PromptLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    num_cache_creation_tokens: int = 0
    stats: RequestStateStats | None = field(default=None)  # RequestOutput.metrics

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def completion(self) -> CompletionOutput:
        return CompletionOutput(
            index=self.index,
            text=self.detokenizer.output_text,
            token_ids=list(self.detokenizer.output_token_ids),
            cumulative_logprob=self.cumulative_logprob,
            logprobs=self.logprobs,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )

    def to_output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            prompt_logprobs=self.prompt_logprobs,
            outputs=[self.completion()],
            finished=self.finished,
            num_cached_tokens=self.num_cached_tokens,
            num_cache_creation_tokens=self.num_cache_creation_tokens,
            metrics=self.stats,
        )


@dataclass(slots=True)
class ParentRequest:
    """A prompt sampled n times: finished once all its children are."""

    request_id: str
    n: int
    completions: dict[int, CompletionOutput] = field(default_factory=dict)
    first_child: RequestState | None = None  # holds the prompt, its logprobs, cached count

    def add_finished(self, child: RequestState) -> RequestOutput | None:
        self.completions[child.index] = child.completion()
        if child.index == 0:
            self.first_child = child
        if len(self.completions) < self.n:
            return None
        first = self.first_child
        return RequestOutput(
            request_id=self.request_id,
            prompt=first.prompt,
            prompt_token_ids=first.prompt_token_ids,
            prompt_logprobs=first.prompt_logprobs,
            outputs=[self.completions[i] for i in range(self.n)],
            finished=True,
            num_cached_tokens=first.num_cached_tokens,
            num_cache_creation_tokens=first.num_cache_creation_tokens,
            metrics=first.stats,
        )


class OutputProcessor:
    def __init__(self, tokenizer: Any | None, metrics: EngineMetrics | None = None):
        self.tokenizer = tokenizer
        self.token_texts = TokenTexts(tokenizer)
        self.states: dict[str, RequestState] = {}
        self.metrics = metrics

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float = 0.0,
        index: int = 0,
        parent: ParentRequest | None = None,
    ) -> None:
        detokenizer = IncrementalDetokenizer.from_sampling_params(
            self.tokenizer, prompt_token_ids, params
        )
        state = RequestState(request_id, prompt, prompt_token_ids, detokenizer, index, parent)
        if params.logprobs is not None:
            state.logprobs, state.cumulative_logprob = [], 0.0
        if params.prompt_logprobs is not None:
            state.prompt_logprobs = [None]  # nothing precedes the first prompt token
        if self.metrics is not None:
            from ember.metrics import RequestStateStats

            state.stats = RequestStateStats(arrival_time=arrival_time)
        self.states[request_id] = state

    def process(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Apply one step's outputs; return the outputs of the requests that finished (a parent
        once all its children have), and the ids the engine must abort (a stop string ended
        them here)."""
        finished, to_abort = [], []
        for output in outputs:
            state = self.states.get(output.request_id)
            if state is None:  # a request this process already gave up on
                continue
            if output.num_cached_tokens:  # sent with the request's first output
                state.num_cached_tokens = output.num_cached_tokens
            if output.num_cache_creation_tokens:  # likewise
                state.num_cache_creation_tokens = output.num_cache_creation_tokens
            if state.stats is not None:
                self.metrics.observe_output(state.stats, output, len(state.prompt_token_ids))
            if output.new_prompt_logprobs is not None and state.prompt_logprobs is not None:
                state.prompt_logprobs.extend(
                    logprob_dicts(output.new_prompt_logprobs, self.token_texts)
                )
            num_text_tokens = len(state.detokenizer.output_token_ids)
            stopped_by_token = output.finish_reason is FinishReason.STOP
            stop_string = state.detokenizer.update(output.new_token_ids, stopped_by_token)
            if output.new_logprobs is not None and state.logprobs is not None:
                self._add_logprobs(state, output.new_logprobs, num_text_tokens)
            if stop_string is not None:
                state.finish_reason, state.stop_reason = "stop", stop_string
                if not output.finished:
                    to_abort.append(output.request_id)
            elif output.finished:
                state.finish_reason = str(output.finish_reason)
                state.stop_reason = output.stop_reason
            if state.finished:
                del self.states[output.request_id]
                if state.stats is not None:
                    num_prompt_tokens = len(state.prompt_token_ids)
                    self.metrics.observe_finished(
                        state.stats, state.finish_reason, num_prompt_tokens
                    )
                result = state.to_output() if state.parent is None else None
                if state.parent is not None:
                    result = state.parent.add_finished(state)
                if result is not None:
                    finished.append(result)
        return finished, to_abort

    def _add_logprobs(self, state: RequestState, new: LogprobsLists, num_before: int) -> None:
        """Keep the logprobs of the tokens the detokenizer kept (a stop string may cut the
        sequence inside this step's tokens)."""
        num_kept = len(state.detokenizer.output_token_ids) - num_before
        new = new.slice(0, num_kept)
        state.logprobs.extend(logprob_dicts(new, self.token_texts))
        state.cumulative_logprob += sum(row[0] for row in new.logprobs)

    def abort_all(self) -> list[str]:
        request_ids = list(self.states)
        self.states.clear()
        return request_ids
