"""The objects `LLM.generate` returns, with vLLM's class and field names.

Built in the user's process by the output processor from engine-core outputs and the detokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Logprob:
    """The log probability of one token, its rank in the vocabulary (1 = most likely) and text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One dict per output token: token id -> Logprob (the sampled token plus the top `logprobs`).
SampleLogprobs = list[dict[int, Logprob]]
# One entry per prompt token; the first is None (nothing precedes it).
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass(slots=True)
class CompletionOutput:
    """One output sequence of a request.

    finish_reason is None while running, then "stop" (EOS, a stop token or a stop string),
    "length" (max_tokens or the model's length), or "error" (this request failed, e.g. its
    logits were not finite, while the rest of the batch ran on). stop_reason is the stop string or stop token id
    that ended it, or None for EOS and length.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    lora_request: Any = None  # vLLM's field, None as in vLLM v1 (see RequestOutput's)

    def finished(self) -> bool:
        return self.finish_reason is not None

    def __repr__(self) -> str:
        return (
            f"CompletionOutput(index={self.index}, "
            f"text={self.text!r}, "
            f"token_ids={self.token_ids}, "
            f"cumulative_logprob={self.cumulative_logprob}, "
            f"logprobs={self.logprobs}, "
            f"finish_reason={self.finish_reason}, "
            f"stop_reason={self.stop_reason})"
        )


@dataclass(slots=True)
class RequestOutput:
    """The output of one request: its prompt and its `n` completions.

    metrics is the request's `RequestStateStats` (`ember.metrics`: arrival, queue, schedule
    and token timestamps, first-token latency); num_cached_tokens counts the prompt
    tokens served from the prefix cache (None when not known), num_cache_creation_tokens those
    this request computed and wrote to it in whole blocks (0 without prefix caching). encoder_prompt and
    encoder_prompt_token_ids are vLLM's fields for encoder-decoder models: ember serves
    decoder-only models, so both are always None.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: Any = None
    lora_request: Any = None  # the request's LoRARequest, or None (the base model)
    encoder_prompt: str | None = None
    encoder_prompt_token_ids: list[int] | None = None
    num_cached_tokens: int | None = None
    num_cache_creation_tokens: int | None = None

    def add(self, next_output: RequestOutput, aggregate: bool) -> None:
        """Merge a later output of the same request into this one (vLLM's `RequestOutput.add`).

        With aggregate, text, token ids and logprobs of a completion with the same index are
        appended (the later output carries deltas); otherwise the later completion replaces it.
        """
        self.finished |= next_output.finished
        for next_completion in next_output.outputs:
            for i, completion in enumerate(self.outputs):
                if completion.index != next_completion.index:
                    continue
                if aggregate:
                    completion.text += next_completion.text
                    completion.token_ids.extend(next_completion.token_ids)
                    if next_completion.logprobs:
                        if completion.logprobs is None:
                            completion.logprobs = []
                        completion.logprobs.extend(next_completion.logprobs)
                    completion.cumulative_logprob = next_completion.cumulative_logprob
                    completion.finish_reason = next_completion.finish_reason
                    completion.stop_reason = next_completion.stop_reason
                else:
                    self.outputs[i] = next_completion
                break
            else:
                self.outputs.append(next_completion)

    def __repr__(self) -> str:
        return (
            f"RequestOutput(request_id={self.request_id}, "
            f"prompt={self.prompt!r}, "
            f"prompt_token_ids={self.prompt_token_ids}, "
            f"prompt_logprobs={self.prompt_logprobs}, "
            f"outputs={self.outputs}, "
            f"finished={self.finished}, "
            f"metrics={self.metrics}, "
            f"lora_request={self.lora_request}, "
            f"encoder_prompt={self.encoder_prompt!r}, "
            f"encoder_prompt_token_ids={self.encoder_prompt_token_ids}, "
            f"num_cached_tokens={self.num_cached_tokens}, "
            f"num_cache_creation_tokens={self.num_cache_creation_tokens})"
        )
