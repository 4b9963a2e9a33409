"""What the engine core tells the workers each step, and what rank 0 answers.

Each step carries deltas: a request appears in full once (`NewRequestData`), then only what
changed (`CachedRequestData`); workers keep the rest. Encoded with msgspec on the broadcast queue.
"""

from __future__ import annotations

import msgspec

from ember.workers.logprobs import LogprobsLists
from ember.workers.lora_request import LoRARequest
from ember.workers.pooled_tensor import PooledTensor
from ember.workers.pooling_params import PoolingParams
from ember.workers.sampling_params import SamplingParams


class NewRequestData(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """A request the workers have not seen, or one resumed after a preemption (then its
    earlier outputs come along, and the worker keeps the request's random generator)."""

    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams | None  # None for a pooling request
    block_ids: list[int]
    num_computed_tokens: int = 0
    output_token_ids: list[int] = []  # tokens generated before a preemption
    pooling_params: PoolingParams | None = None  # set for a pooling request
    lora_request: LoRARequest | None = None  # its LoRA adapter; the worker loads it


class CachedRequestData(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """A request the workers already hold: its newly allocated blocks and progress."""

    req_id: str
    new_block_ids: list[int]
    num_computed_tokens: int


class SchedulerOutput(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """One engine step. Requests run in the order of `num_scheduled_tokens`."""

    scheduled_new_reqs: list[NewRequestData] = []
    scheduled_cached_reqs: list[CachedRequestData] = []
    num_scheduled_tokens: dict[str, int] = {}
    finished_req_ids: list[str] = []  # finished or aborted: forget them
    # Structured outputs: the requests that sample under a grammar this step, and their rows of
    # allowed tokens (int32 [len(grammar_req_ids), ceil(vocab / 32)], native byte order; bit
    # t % 32 of word t // 32 set = token t allowed). Rank 0 masks their logits before sampling.
    grammar_req_ids: list[str] = []
    grammar_bitmask: bytes = b""

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())


class ModelRunnerOutput(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """The tokens sampled this step, for the requests that reached the end of their tokens,
    with their logprobs (row i for req_ids[i]) and the prompt logprobs of prefill chunks."""

    req_ids: list[str] = []
    sampled_token_ids: list[int] = []
    logprobs: LogprobsLists | None = None
    prompt_logprobs: dict[str, LogprobsLists] = {}
    # Requests whose logits were not finite this step: no token; the engine finishes them
    # with "error" and the rest of the batch runs on.
    errored_req_ids: list[str] = []
    # Pooling models: the requests whose prompt was computed this step, and their outputs.
    pooled_req_ids: list[str] = []
    pooled_outputs: list[PooledTensor] = []
    # Lockstep data parallelism: whether any rank had work this step, and the largest wave
    # number of any rank (`LockstepGroups.agree`)
    lockstep_busy: bool = False
    lockstep_wave: int = 0
