"""Continuous batching with one token budget per step, shared by decodes and prefill chunks.

Called by `EngineCore.step`. Running requests are served first (oldest first), then waiting
ones while the budget, `max_num_seqs` and the KV cache allow. A long prompt is spread over
several steps (chunked prefill). When blocks run out, the newest running request is preempted:
its blocks are freed and it is recomputed later from its prompt and the tokens it already has.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from ember.enginecore.kv_cache_manager import KVCacheManager
from ember.enginecore.messages import EngineCoreOutput, FinishReason
from ember.enginecore.request import Request, RequestStatus
from ember.workers.config import SchedulerConfig
from ember.workers.scheduler_output import (
    CachedRequestData,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache_manager: KVCacheManager):
        self.config = config
        self.kv_cache_manager = kv_cache_manager
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # Requests the workers must forget at the next step (finished or aborted).
        self.finished_req_ids: set[str] = set()
        self.num_preemptions = 0

    # ---- requests in and out -----------------------------------------------------------

    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_requests(self, request_ids: Iterable[str], reason: FinishReason) -> list[Request]:
        """Stop requests from outside (abort); unknown or finished ids are ignored."""
        finished = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None:
                continue
            if request.status is RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.finish_reason = reason
            self._free(request)
            finished.append(request)
        return finished

    def _free(self, request: Request) -> None:
        request.status = RequestStatus.FINISHED
        self.kv_cache_manager.free(request)
        self.finished_req_ids.add(request.request_id)
        del self.requests[request.request_id]

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- one step ----------------------------------------------------------------------

    def _num_new_tokens(self, request: Request, token_budget: int) -> int:
        num_new = request.num_tokens - request.num_computed_tokens
        threshold = self.config.long_prefill_token_threshold
        if 0 < threshold < num_new:
            num_new = threshold
        return min(num_new, token_budget)

    def _preempt(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        # The workers keep the request's state (its random generator above all) until it is
        # scheduled again as a new request.
        self.waiting.appendleft(request)

    def schedule(self) -> SchedulerOutput:
        token_budget = self.config.max_num_batched_tokens
        num_scheduled: dict[str, int] = {}
        new_reqs: list[NewRequestData] = []
        cached_reqs: list[CachedRequestData] = []
        preempted = False

        index = 0
        while index < len(self.running) and token_budget > 0:
            request = self.running[index]
            num_new = self._num_new_tokens(request, token_budget)
            new_blocks = self.kv_cache_manager.allocate_slots(request, num_new)
            while new_blocks is None:
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
                new_blocks = self.kv_cache_manager.allocate_slots(request, num_new)
            if new_blocks is None:
                break
            num_scheduled[request.request_id] = num_new
            token_budget -= num_new
            cached_reqs.append(
                CachedRequestData(request.request_id, new_blocks, request.num_computed_tokens)
            )
            index += 1

        while (
            self.waiting
            and token_budget > 0
            and not preempted
            and len(self.running) < self.config.max_num_seqs
        ):
            request = self.waiting[0]
            num_new = self._num_new_tokens(request, token_budget)
            if self.kv_cache_manager.allocate_slots(request, num_new) is None:
                break
            self.waiting.popleft()
            self.running.append(request)
            request.status = RequestStatus.RUNNING
            num_scheduled[request.request_id] = num_new
            token_budget -= num_new
            new_reqs.append(
                NewRequestData(
                    req_id=request.request_id,
                    prompt_token_ids=request.prompt_token_ids,
                    sampling_params=request.sampling_params,
                    block_ids=list(self.kv_cache_manager.blocks_of(request)),
                    num_computed_tokens=request.num_computed_tokens,
                    output_token_ids=list(request.output_token_ids),
                )
            )

        output = SchedulerOutput(
            scheduled_new_reqs=new_reqs,
            scheduled_cached_reqs=cached_reqs,
            num_scheduled_tokens=num_scheduled,
            finished_req_ids=sorted(self.finished_req_ids),
        )
        self.finished_req_ids.clear()
        for request_id, count in num_scheduled.items():
            self.requests[request_id].num_computed_tokens += count
        return output

    def update_from_output(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> list[EngineCoreOutput]:
        """Append the sampled tokens, finish the requests that are done, and say what changed."""
        outputs = []
        max_model_len = self.config.max_model_len
        for request_id, token_id in zip(runner_output.req_ids, runner_output.sampled_token_ids):
            request = self.requests.get(request_id)
            if request is None:  # aborted while the step ran
                continue
            request.output_token_ids.append(token_id)
            finished = request.check_stop(max_model_len)
            if finished:
                self.running.remove(request)
                self._free(request)
            outputs.append(
                EngineCoreOutput(
                    request_id=request_id,
                    new_token_ids=[token_id],
                    finish_reason=request.finish_reason,
                    stop_reason=request.stop_reason,
                )
            )
        return outputs
