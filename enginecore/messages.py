"""Messages between the frontend and the engine core (msgspec structs, no pickle).

`EngineCoreRequest` is received here; `EngineCoreOutput(s)` are received by the frontend but
defined here, the lowest layer that uses them (the frontend imports downward only).
"""

from __future__ import annotations

import enum

import msgspec

from ember.enginecore.stats import SchedulerStats
from ember.workers.logprobs import LogprobsLists
from ember.workers.lora_request import LoRARequest
from ember.workers.pooled_tensor import PooledTensor
from ember.workers.pooling_params import PoolingParams
from ember.workers.sampling_params import SamplingParams


class FinishReason(enum.IntEnum):
    """Why a request finished; `str()` gives vLLM's strings ("stop", "length", "abort",
    "error": the request failed, e.g. non-finite logits, while the others ran on)."""

    STOP = 0
    LENGTH = 1
    ABORT = 2
    ERROR = 3

    def __str__(self) -> str:
        return self.name.lower()


class EngineCoreRequest(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams | None  # None for a pooling request
    arrival_time: float = 0.0
    # Part of the prefix-cache key of the request's blocks: requests share cached blocks only
    # with requests of the same salt (vLLM's `cache_salt`).
    cache_salt: str | None = None
    pooling_params: PoolingParams | None = None  # set for a pooling request
    # Under scheduling_policy="priority": a lower value is scheduled first (vLLM's).
    priority: int = 0
    lora_request: LoRARequest | None = None  # its LoRA adapter (LLM(enable_lora=True))


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """What one request produced in one step."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    # With a request's first output: the prompt tokens this request computed and wrote to the
    # prefix cache (whole blocks), vLLM's num_cache_creation_tokens.
    num_cache_creation_tokens: int = 0
    # One row per new token, when the request asked for logprobs.
    new_logprobs: LogprobsLists | None = None
    # One row per prompt token computed this step (from the second on), for prompt_logprobs.
    new_prompt_logprobs: LogprobsLists | None = None
    # With a request's first output: when the engine core queued it and first scheduled it
    # (time.monotonic() of the engine core's host), for the frontend's queue-time metric.
    queued_ts: float = 0.0
    scheduled_ts: float = 0.0
    pooling_output: PooledTensor | None = None  # a pooling request's result, in a raw frame

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class EngineCoreOutputs(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    outputs: list[EngineCoreOutput] = []
    timestamp: float = 0.0
    scheduler_stats: SchedulerStats | None = None


class MessageType:
    """The first frame of every message: `[type][msgpack payload][raw tensor frames...]`."""

    # client -> engine core
    HELLO = b"H"  # handshake, payload: Hello; answered with READY (or STARTUP_ERROR)
    PING = b"P"  # "still here": sent while waiting, so the engine knows the client lives
    ADD = b"A"  # payload: list[EngineCoreRequest]
    ABORT = b"B"  # payload: list[str] (request ids)
    UTILITY = b"U"  # payload: UtilityRequest
    # engine core -> client
    READY = b"R"  # payload: EngineCoreReadyInfo
    STARTUP_ERROR = b"S"  # payload: EngineError
    OUTPUTS = b"O"  # payload: EngineCoreOutputs
    UTILITY_OUTPUT = b"V"  # payload: UtilityOutput
    ENGINE_DEAD = b"D"  # payload: EngineError; the engine core is stopping
    PONG = b"Q"  # answer to PING: the engine core lives


class Hello(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    token: str | None = None  # required by an engine core started with a token


class EngineCoreReadyInfo(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """The engine's facts, sent in reply to the handshake."""

    max_model_len: int
    num_kv_blocks: int
    block_size: int
    dtype: str
    vocab_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    model: str = ""
    tokenizer: str | None = None  # a local path an attaching frontend can load
    max_logprobs: int = 20  # the most logprobs / prompt_logprobs a request may ask for
    runner: str = "generate"  # "generate" | "pooling"
    pooling_tasks: list[str] = []  # the tasks a pooling model serves
    pooling_size: int = 0  # a pooling model's hidden size (the longest embedding)
    num_labels: int = 0  # a classification model's number of labels
    # `ModelConfig.generation_config` and `.default_sampling_params`: an attaching frontend's
    # `LLM.get_default_sampling_params` reads them here
    generation_config: str = "auto"
    default_sampling_params: dict = {}
    max_lora_rank: int = 0  # 0: LoRA is off (enable_lora=False)
    # LoRA: [in, out] of each module an adapter may target, checked in the user's process
    lora_module_shapes: dict[str, list[int]] = {}


class UtilityRequest(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    call_id: int
    method: str
    args: list = []


class UtilityOutput(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    call_id: int
    result: object = None
    error: str | None = None


class EngineError(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    error_type: str
    message: str
