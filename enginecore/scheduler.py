"""Continuous batching with one token budget per step, shared by decodes and prefill chunks.

Called by `EngineCore.step`. Running requests are served first (oldest first), then waiting
ones while the budget, `max_num_seqs` and the KV cache allow. A long prompt is spread over
several steps (chunked prefill), at most `long_prefill_token_threshold` tokens a step when that
is set. A waiting request starts after its longest prefix found in the prefix cache. When
blocks run out, the newest running request is preempted: its blocks are freed and it is
recomputed later from its prompt and the tokens it already has (vLLM's recompute; ember never
swaps to CPU memory, so `swap_space` is unused).

Under `scheduling_policy="priority"` (vLLM's), running and waiting requests are kept in the
order of (priority, arrival time), a lower priority value first: the best are served first and
the worst running one is preempted.
"""

from __future__ import annotations

import bisect
import time
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
    def __init__(
        self,
        config: SchedulerConfig,
        kv_cache_manager: KVCacheManager,
        max_loras: int | None = None,
    ):
        self.config = config
        self.kv_cache_manager = kv_cache_manager
        # LoRA: at most this many distinct adapters among the running requests (the workers'
        # slots); None: LoRA off.
        self.max_loras = max_loras
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # Requests the workers must forget at the next step (finished or aborted).
        self.finished_req_ids: set[str] = set()
        self.num_preemptions = 0

    # ---- requests in and out -----------------------------------------------------------

    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self._queue(request)

    @property
    def by_priority(self) -> bool:
        return self.config.policy == "priority"

    def _queue(self, request: Request, resumed: bool = False) -> None:
        """Into the waiting queue: at the back (a resumed request at the front) under "fcfs",
        in (priority, arrival) order under "priority"."""
        if self.by_priority:
            keys = [r.priority_key for r in self.waiting]
            self.waiting.insert(bisect.bisect(keys, request.priority_key), request)
        elif resumed:
            self.waiting.appendleft(request)
        else:
            self.waiting.append(request)

    def finish_requests(self, request_ids: Iterable[str], reason: FinishReason) -> list[Request]:
        """Stop requests from outside (abort); unknown or finished ids are ignored."""
        finished = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None:
                continue
            if request.status is not RequestStatus.RUNNING:
                self.waiting.remove(request)
            request.finish_reason = reason
            self._free(request)
            finished.append(request)
        if finished:
            self._drop_finished_from_running()
        return finished

    def _drop_finished_from_running(self) -> None:
        """One pass over the running list, however many requests finished this step."""
        self.running = [r for r in self.running if r.status is RequestStatus.RUNNING]

    def _free(self, request: Request) -> None:
        request.status = RequestStatus.FINISHED
        self.kv_cache_manager.free(request)
        self.finished_req_ids.add(request.request_id)
        del self.requests[request.request_id]

    def _finish_errored(self, request_id: str) -> list[EngineCoreOutput]:
        """A request whose step failed on the worker (non-finite logits): finish it alone with
        "error"; its blocks leave the prefix cache, since their contents are not to be trusted."""
        request = self.requests.get(request_id)
        if request is None:
            return []
        request.finish_reason = FinishReason.ERROR
        self.kv_cache_manager.uncache_blocks_of(request)
        self._free(request)
        return [EngineCoreOutput(request_id, [], FinishReason.ERROR)]

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- one step ----------------------------------------------------------------------

    def _preempt(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        # The workers keep the request's state (its random generator above all) until it is
        # scheduled again as a new request. Its cached blocks stay in the prefix cache until
        # evicted, so the resume may find most of them.
        self._queue(request, resumed=True)

    def preempt_running(self) -> None:
        """Preempt every running request (newest first, so that they wait in their running
        order): they free their blocks and are recomputed when scheduled again."""
        while self.running:
            self._preempt(self.running.pop())

    def schedule(self, overlapped: bool = False) -> SchedulerOutput:
        """The next step. `overlapped`: scheduled while the step before is still running (async
        scheduling), so its sampled tokens are placeholders here: nothing is preempted, and a
        request those tokens may finish (its max_tokens or max_model_len reached) waits."""
        token_budget = self.config.max_num_batched_tokens
        long_prefill_threshold = self.config.long_prefill_token_threshold
        kv_cache_manager = self.kv_cache_manager
        allocate_slots = kv_cache_manager.allocate_slots
        num_scheduled: dict[str, int] = {}
        new_reqs: list[NewRequestData] = []
        cached_reqs: list[CachedRequestData] = []
        short_of_blocks = False

        # Running requests first, oldest (or best, by priority) first; a victim is taken from
        # the end of the list, so it is never one already scheduled in this step.
        if self.by_priority:
            self.running.sort(key=lambda r: r.priority_key)
        running = self.running
        index = 0
        while index < len(running) and token_budget > 0:
            request = running[index]
            num_new = request.num_tokens + request.num_output_placeholders
            num_new -= request.num_computed_tokens
            if overlapped and (num_new <= 0 or self._may_finish_pending(request)):
                index += 1
                continue
            if 0 < long_prefill_threshold < num_new:
                num_new = long_prefill_threshold
            num_new = min(num_new, token_budget)
            new_block_ids = allocate_slots(request, num_new)
            if new_block_ids is None and overlapped:
                # No preemption while a step runs, and no newcomer takes blocks before this
                # request: once nothing runs, the next step schedules (or preempts) as usual.
                short_of_blocks = True
                break
            while new_block_ids is None:
                victim = running.pop()
                self._preempt(victim)
                short_of_blocks = True
                if victim is request:
                    break
                new_block_ids = allocate_slots(request, num_new)
            if new_block_ids is None:
                break
            request_id = request.request_id
            num_scheduled[request_id] = num_new
            token_budget -= num_new
            cached_reqs.append(
                CachedRequestData(request_id, new_block_ids, request.num_computed_tokens)
            )
            request.num_computed_tokens += num_new
            self._expect_sample(request)
            index += 1

        # Then waiting ones (resumed preempted requests first), unless blocks ran short. A
        # request whose grammar is still compiling, or whose LoRA adapter would make more than
        # max_loras adapters run at once, is passed over, keeping its place (vLLM's).
        waiting = self.waiting
        compiling: list[Request] = []
        running_loras = self._running_loras()
        while (
            waiting
            and token_budget > 0
            and not short_of_blocks
            and len(running) < self.config.max_num_seqs
        ):
            request = waiting[0]
            if request.grammar is not None and not request.grammar.ready:
                compiling.append(waiting.popleft())
                continue
            lora_id = _lora_id(request)
            if (
                lora_id is not None
                and self.max_loras is not None
                and lora_id not in running_loras
                and len(running_loras) >= self.max_loras
            ):
                compiling.append(waiting.popleft())
                continue
            computed_blocks, num_cached = kv_cache_manager.get_computed_blocks(request)
            num_new = request.num_tokens - num_cached
            if 0 < long_prefill_threshold < num_new:
                num_new = long_prefill_threshold
            num_new = min(num_new, token_budget)
            if request.pooling_params is not None and num_cached + num_new < request.num_tokens:
                break  # a pooling request is computed whole in one step: wait for the budget
            if allocate_slots(request, num_new, computed_blocks) is None:
                break
            waiting.popleft()
            running.append(request)
            request.status = RequestStatus.RUNNING
            if request.num_cached_tokens < 0:  # first scheduled (not a resume)
                request.num_cached_tokens = num_cached
                request.scheduled_ts = time.monotonic()
                if kv_cache_manager.enable_caching:
                    kv_cache_manager.record_prefix_cache_lookup(request, num_cached)
            request_id = request.request_id
            num_scheduled[request_id] = num_new
            token_budget -= num_new
            new_reqs.append(
                NewRequestData(
                    req_id=request_id,
                    prompt_token_ids=request.prompt_token_ids,
                    sampling_params=request.sampling_params,
                    block_ids=kv_cache_manager.get_block_ids(request),
                    num_computed_tokens=num_cached,
                    output_token_ids=list(request.output_token_ids),
                    pooling_params=request.pooling_params,
                    lora_request=request.lora_request,
                )
            )
            if lora_id is not None:
                running_loras.add(lora_id)
            request.num_computed_tokens = num_cached + num_new
            self._expect_sample(request)
        waiting.extendleft(reversed(compiling))

        output = SchedulerOutput(
            scheduled_new_reqs=new_reqs,
            scheduled_cached_reqs=cached_reqs,
            num_scheduled_tokens=num_scheduled,
            finished_req_ids=sorted(self.finished_req_ids),
        )
        self.finished_req_ids.clear()
        return output

    @staticmethod
    def _expect_sample(request: Request) -> None:
        """A step that reaches the end of a generating request's known tokens samples one."""
        if request.sampling_params is not None and request.num_computed_tokens >= (
            request.num_tokens + request.num_output_placeholders
        ):
            request.num_output_placeholders += 1

    def _may_finish_pending(self, request: Request) -> bool:
        """Whether the tokens still coming for `request` can end it by length: it then waits
        for them rather than compute a token that would be thrown away."""
        pending = request.num_output_placeholders
        if not pending:
            return False
        max_tokens = request.sampling_params.max_tokens
        num_output = len(request.output_token_ids) + pending
        return (max_tokens is not None and num_output >= max_tokens) or (
            request.num_tokens + pending >= self.config.max_model_len
        )

    def _running_loras(self) -> set[int]:
        """The adapters (lora_int_id) of the running requests: each holds a worker slot while
        it runs."""
        if self.max_loras is None:
            return set()
        return {r.lora_request.lora_int_id for r in self.running if r.lora_request is not None}

    def update_from_output(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> list[EngineCoreOutput]:
        """Append the sampled tokens, finish the requests that are done, and say what changed.
        A request's first output carries the number of its prompt tokens found in the cache."""
        outputs = []
        max_model_len = self.config.max_model_len
        requests = self.requests
        any_finished = False
        logprobs = runner_output.logprobs
        prompt_logprobs = dict(runner_output.prompt_logprobs)
        for row, (request_id, token_id) in enumerate(
            zip(runner_output.req_ids, runner_output.sampled_token_ids)
        ):
            request = requests.get(request_id)
            if request is None:  # aborted while the step ran
                continue
            if request.num_output_placeholders:
                request.num_output_placeholders -= 1
            first_output = not request.output_token_ids
            if first_output:  # before a stop frees the blocks it counts
                num_cache_creation_tokens = self._num_cache_creation_tokens(request)
            request.output_token_ids.append(token_id)
            request.all_token_ids.append(token_id)
            if request.grammar is not None:
                request.grammar.accept_token(request_id, token_id)
            if request.check_stop(max_model_len):
                self._free(request)
                any_finished = True
            output = EngineCoreOutput(
                request_id, [token_id], request.finish_reason, request.stop_reason
            )
            if first_output:
                output.num_cached_tokens = max(request.num_cached_tokens, 0)
                output.num_cache_creation_tokens = num_cache_creation_tokens
                output.queued_ts, output.scheduled_ts = request.queued_ts, request.scheduled_ts
            if logprobs is not None and request.sampling_params.logprobs is not None:
                output.new_logprobs = logprobs.slice(row, row + 1)
            output.new_prompt_logprobs = prompt_logprobs.pop(request_id, None)
            outputs.append(output)
        # Prefill chunks that sampled nothing yet still send their prompt logprobs.
        for request_id, chunk_logprobs in prompt_logprobs.items():
            if request_id in requests:
                outputs.append(EngineCoreOutput(request_id, [], new_prompt_logprobs=chunk_logprobs))
        for request_id in runner_output.errored_req_ids:
            outputs.extend(self._finish_errored(request_id))
            any_finished = True
        if runner_output.pooled_req_ids:
            outputs.extend(self._finish_pooled(runner_output))
            any_finished = True
        if any_finished:
            self._drop_finished_from_running()
        return outputs

    def _num_cache_creation_tokens(self, request: Request) -> int:
        """Prompt tokens in the full blocks this request has cached, less those it found there
        (vLLM's `PrefillStats.finalize`); 0 without prefix caching."""
        kv_cache_manager = self.kv_cache_manager
        if not kv_cache_manager.enable_caching:
            return 0
        num_cached_blocks = kv_cache_manager.num_cached_blocks.get(request.request_id, 0)
        num_written = min(
            num_cached_blocks * kv_cache_manager.block_size, request.num_prompt_tokens
        )
        return max(0, num_written - max(request.num_cached_tokens, 0))

    def _finish_pooled(self, runner_output: ModelRunnerOutput) -> list[EngineCoreOutput]:
        """Pooling requests end with the step that computed their prompt: their pooled output."""
        outputs = []
        for request_id, tensor in zip(runner_output.pooled_req_ids, runner_output.pooled_outputs):
            request = self.requests.get(request_id)
            if request is None:  # aborted while the step ran
                continue
            request.finish_reason = FinishReason.STOP
            self._free(request)
            outputs.append(
                EngineCoreOutput(
                    request_id,
                    [],
                    FinishReason.STOP,
                    num_cached_tokens=max(request.num_cached_tokens, 0),
                    pooling_output=tensor,
                )
            )
        return outputs


def _lora_id(request: Request) -> int | None:
    return None if request.lora_request is None else request.lora_request.lora_int_id
