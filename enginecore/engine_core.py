"""The engine core's step: schedule, execute on the workers, update, and report what changed.

`EngineCore` is plain, single-threaded logic; `ember.enginecore.__main__` wraps it in a process
with ZeroMQ I/O threads, and tests and tools may drive it in-process.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import msgspec

from ember.enginecore.executor import Executor, UniProcExecutor
from ember.enginecore.kv_cache_manager import KVCacheManager
from ember.enginecore.messages import EngineCoreOutput, EngineCoreRequest, FinishReason
from ember.enginecore.request import Request
from ember.enginecore.scheduler import Scheduler
from ember.enginecore.stats import SchedulerStats, scheduler_stats
from ember.enginecore.structured_output.manager import StructuredOutputManager
from ember.workers.config import EngineConfig
from ember.workers.scheduler_output import SchedulerOutput
from ember.workers.structured_outputs_params import StructuredOutputsParams

logger = logging.getLogger(__name__)

# How long a step with nothing to run but grammars compiling waits for them.
_COMPILE_WAIT_S = 0.005


class EngineCore:
    def __init__(self, config: EngineConfig, executor_class: type[Executor] = UniProcExecutor):
        self.executor = executor_class(config)
        try:
            num_blocks = config.cache.num_kv_blocks or self.executor.determine_num_kv_blocks()
            block_size = config.cache.block_size
            max_model_len = config.model.max_model_len
            blocks_per_request = -(-max_model_len // block_size)
            if num_blocks - 1 < blocks_per_request:
                raise ValueError(
                    f"the KV cache holds {(num_blocks - 1) * block_size} tokens, fewer than one "
                    f"request of max_model_len={max_model_len}: raise kv_cache_memory_bytes "
                    f"(or gpu_memory_utilization), or lower max_model_len"
                )
            self.executor.initialize_kv_cache(num_blocks)
        except BaseException:
            self.executor.shutdown()
            raise
        logger.info(
            "KV cache%s: %d blocks of %d tokens = %d tokens; maximum concurrency at "
            "max_model_len=%d: %.1fx; prefix caching %s",
            "" if config.cache.cache_dtype == "auto" else f" ({config.cache.cache_dtype}, e4m3)",
            num_blocks - 1,
            block_size,
            (num_blocks - 1) * block_size,
            max_model_len,
            (num_blocks - 1) / blocks_per_request,
            "on" if config.cache.enable_prefix_caching else "off",
        )
        self.config = dataclasses.replace(
            config, cache=dataclasses.replace(config.cache, num_kv_blocks=num_blocks)
        )
        self.kv_cache_manager = KVCacheManager(
            num_blocks, block_size, enable_caching=config.cache.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            config.scheduler,
            self.kv_cache_manager,
            max_loras=None if config.lora is None else config.lora.max_loras,
        )
        self.eos_token_ids = config.model.eos_token_ids
        self.structured_output = StructuredOutputManager(config.model, config.structured_outputs)
        # Requests whose grammar is compiling: checked each step for a failed compile.
        self.compiling: list[Request] = []
        # Sleep mode: what the workers have released ("weights", "kv_cache"), and whether
        # scheduling is paused (any level); requests are refused until fully awake.
        self.sleeping_tags: set[str] = set()
        self.scheduling_paused = False
        # Async scheduling: the step the workers are running, whose output is not in yet.
        self.async_scheduling = config.scheduler.async_scheduling
        self.in_flight: SchedulerOutput | None = None

    # ---- requests ----------------------------------------------------------------------

    def add_request(self, request: EngineCoreRequest) -> None:
        engine_request = Request.from_engine_core_request(request, self.eos_token_ids)
        engine_request.queued_ts = time.monotonic()
        params = request.sampling_params
        if params is not None and params.structured_outputs is not None:
            engine_request.grammar = self.structured_output.request_grammar(
                params.structured_outputs
            )
            self.compiling.append(engine_request)
        self.scheduler.add_request(engine_request)

    def abort_requests(self, request_ids: list[str]) -> list[EngineCoreOutput]:
        finished = self.scheduler.finish_requests(request_ids, FinishReason.ABORT)
        return [
            EngineCoreOutput(r.request_id, [], finish_reason=FinishReason.ABORT) for r in finished
        ]

    def has_unfinished_requests(self) -> bool:
        return self.in_flight is not None or self.scheduler.has_unfinished_requests()

    def step(self) -> list[EngineCoreOutput]:
        """Run one step; return the outputs of the requests that produced or finished.

        With async scheduling the step returned is the one submitted before: the next one is
        scheduled and submitted first, so the workers go on to it without waiting for this
        process (each request's newest token, still unknown here, is the one its workers
        sampled). Steps that need the tokens here first (grammars) run one at a time."""
        if self.in_flight is None and not self.scheduler.has_unfinished_requests():
            return []
        failed = self._finish_failed_grammars() if self.compiling else []
        if self.in_flight is None:
            scheduler_output = self._schedule()
            if scheduler_output is None:
                return failed
            if not self.async_scheduling:
                runner_output = self.executor.execute_model(scheduler_output)
                return failed + self.scheduler.update_from_output(scheduler_output, runner_output)
            self.executor.submit_model(scheduler_output)
            self.in_flight = scheduler_output
        running, self.in_flight = self.in_flight, self._submit_overlapped()
        runner_output = self.executor.await_model()
        return failed + self.scheduler.update_from_output(running, runner_output)

    def drain(self) -> list[EngineCoreOutput]:
        """Wait for the step in flight (async scheduling) and take in its output: before
        anything else is asked of the workers, or of the requests' state."""
        if self.in_flight is None:
            return []
        running, self.in_flight = self.in_flight, None
        return self.scheduler.update_from_output(running, self.executor.await_model())

    def _schedule(self) -> SchedulerOutput | None:
        """The next step, with its grammar rows; None when nothing can run yet."""
        scheduler_output = self.scheduler.schedule()
        if not scheduler_output.num_scheduled_tokens and not scheduler_output.finished_req_ids:
            # Every waiting request waits for its grammar: let the compiles run a moment.
            self.structured_output.wait_for_compiles(
                [r.grammar for r in self.compiling], _COMPILE_WAIT_S
            )
            return None
        if any(r.grammar is not None for r in self.scheduler.running):
            self._add_grammar_bitmask(scheduler_output)
        return scheduler_output

    def _submit_overlapped(self) -> SchedulerOutput | None:
        """Schedule and submit the step after the one in flight, if one can run without its
        output: none while a request has a grammar (its next row of allowed tokens follows
        from the token in flight)."""
        scheduler = self.scheduler
        if any(r.grammar is not None for r in scheduler.requests.values()):
            return None
        scheduler_output = scheduler.schedule(overlapped=True)
        if not scheduler_output.num_scheduled_tokens:
            # Nothing to run: the finished requests go to the workers with the next step.
            scheduler.finished_req_ids.update(scheduler_output.finished_req_ids)
            return None
        self.executor.submit_model(scheduler_output)
        return scheduler_output

    def lockstep_step(self, wave: int) -> tuple[list[EngineCoreOutput], bool, int]:
        """`step` for a lockstep data-parallel rank (`enginecore/lockstep.py`): the model runs
        every step, on this rank's tokens or, with none, as an idle step that serves the other
        ranks' MoE tokens. Returns the outputs and the ranks' agreement: whether any rank had
        requests at this step's start, and the largest wave number any rank holds."""
        if not self.scheduler.has_unfinished_requests():
            busy, largest = self.executor.idle_step(wave)
            return [], busy, largest
        failed = self._finish_failed_grammars() if self.compiling else []
        scheduler_output = self.scheduler.schedule()
        if not scheduler_output.num_scheduled_tokens and not scheduler_output.finished_req_ids:
            self.structured_output.wait_for_compiles(
                [r.grammar for r in self.compiling], _COMPILE_WAIT_S
            )
            busy, largest = self.executor.idle_step(wave, busy=True)
            return failed, busy, largest
        if any(r.grammar is not None for r in self.scheduler.running):
            self._add_grammar_bitmask(scheduler_output)
        runner_output = self.executor.execute_model(scheduler_output, wave)
        outputs = self.scheduler.update_from_output(scheduler_output, runner_output)
        return failed + outputs, runner_output.lockstep_busy, runner_output.lockstep_wave

    def _finish_failed_grammars(self) -> list[EngineCoreOutput]:
        """Finish with "error" the requests whose grammar failed to compile (a frontend that
        validated them first never sends one); forget the compiles that are done."""
        failed = []
        for request in self.compiling:
            error = request.grammar.error() if request.grammar.ready else None
            if error is not None and not request.is_finished:
                logger.warning("request %r: grammar failed: %s", request.request_id[:64], error)
                failed.extend(
                    self.scheduler.finish_requests([request.request_id], FinishReason.ERROR)
                )
        self.compiling = [r for r in self.compiling if not r.grammar.ready and not r.is_finished]
        return [EngineCoreOutput(r.request_id, [], FinishReason.ERROR) for r in failed]

    def _add_grammar_bitmask(self, scheduler_output) -> None:
        """Rows of allowed tokens for the constrained requests that sample in this step."""
        requests = self.scheduler.requests
        sampling = [
            requests[request_id]
            for request_id in scheduler_output.num_scheduled_tokens
            if requests[request_id].grammar is not None
            and requests[request_id].num_computed_tokens >= requests[request_id].num_tokens
        ]
        if not sampling:
            return
        bitmask = self.structured_output.fill_bitmask([r.grammar for r in sampling])
        scheduler_output.grammar_req_ids = [r.request_id for r in sampling]
        scheduler_output.grammar_bitmask = bitmask.tobytes()

    def shutdown(self) -> None:
        self.structured_output.shutdown()
        self.executor.shutdown()

    def utility_validate_structured_outputs(self, specs: list) -> object:
        """Choose the backend of each spec and compile it, on the compile threads (a Future:
        the process answers when it is done). Per spec: [backend, was_auto] or [None, error]."""
        return self.structured_output.validate(
            [msgspec.convert(spec, StructuredOutputsParams) for spec in specs]
        )

    def utility_structured_output_allowed_tokens(self, spec: object, token_seqs: list) -> object:
        """Per token sequence, the ids `spec`'s grammar allows next, or None where it ended
        (a Future, as above): the grammar side of vLLM's constrained beam search."""
        return self.structured_output.allowed_tokens_after(
            msgspec.convert(spec, StructuredOutputsParams), token_seqs
        )

    # ---- sleep mode --------------------------------------------------------------------

    @property
    def is_sleeping(self) -> bool:
        return self.scheduling_paused or bool(self.sleeping_tags)

    def check_sleep_level(self, level: object) -> None:
        if not isinstance(level, int) or isinstance(level, bool) or level not in (0, 1, 2):
            raise ValueError(f"level must be 0, 1 or 2, got {level!r}")
        if level >= 1 and not self.config.model.enable_sleep_mode:
            raise ValueError(
                f"sleep(level={level}) needs sleep mode: create the engine with "
                "LLM(..., enable_sleep_mode=True)"
            )

    def sleep(self, level: int) -> None:
        """vLLM's levels: 0 pauses scheduling; 1 also releases the workers' KV caches (and on
        a GPU moves the weights to host memory); 2 releases the weights too. The caller has
        finished every request (`EngineCoreProc.utility_sleep` aborts them)."""
        self.check_sleep_level(level)
        if self.scheduler.has_unfinished_requests():
            raise RuntimeError("sleep() needs an engine without unfinished requests")
        self.scheduling_paused = True
        if level == 0:
            return
        if self.sleeping_tags:
            logger.warning("the engine is asleep already (%s)", sorted(self.sleeping_tags))
            return
        # The cached blocks' contents go with the KV cache: nothing may match them after.
        if not self.kv_cache_manager.reset_prefix_cache():
            raise RuntimeError("the prefix cache could not be reset: requests hold blocks")
        self.executor.sleep(level)
        self.sleeping_tags = {"weights", "kv_cache"}
        logger.info("asleep at level %d", level)

    def wake_up(self, tags: list[str] | None = None) -> bool:
        """Bring back `tags` ("weights", "kv_cache", "scheduling"; None: all); scheduling
        resumes once the workers hold everything again. Returns whether fully awake."""
        allowed = ("weights", "kv_cache", "scheduling")
        if tags is not None and (
            not isinstance(tags, list) or any(tag not in allowed for tag in tags)
        ):
            raise ValueError(f"tags must be None or a list of {allowed}, got {tags!r}")
        wanted = self.sleeping_tags if tags is None else self.sleeping_tags & set(tags)
        if wanted:
            self.executor.wake_up(sorted(wanted))
            self.sleeping_tags -= wanted
        if not self.sleeping_tags:
            self.scheduling_paused = False
        return not self.is_sleeping

    # ---- utilities (called by name from clients: `core_process._call_utility`) ---------

    def utility_reset_prefix_cache(
        self, reset_running_requests: bool = False, reset_connector: bool = False
    ) -> bool:
        """Forget every cached block; False (and nothing done) while requests hold blocks,
        unless `reset_running_requests`: the running requests are then preempted (recomputed
        later) first, as vLLM does. `reset_connector`: ember has no KV connector."""
        for name, value in (
            ("reset_running_requests", reset_running_requests),
            ("reset_connector", reset_connector),
        ):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {value!r}")
        if reset_running_requests:
            self.scheduler.preempt_running()
        reset = self.kv_cache_manager.reset_prefix_cache()
        if not reset:
            logger.warning(
                "prefix cache not reset: %d requests still hold blocks",
                len(self.kv_cache_manager.req_to_blocks),
            )
        return reset

    def utility_wake_up(self, tags: list[str] | None = None) -> bool:
        return self.wake_up(tags)

    def utility_is_sleeping(self) -> bool:
        return self.is_sleeping

    def utility_get_scheduler_stats(self) -> SchedulerStats:
        """The scheduler statistics `LLM.get_metrics()` reads between `generate` calls."""
        return scheduler_stats(self)

    def utility_get_stats(self) -> dict[str, int | float]:
        """Counters since startup: prefix-cache lookups (in tokens), preemptions, KV usage."""
        prefix_cache = self.kv_cache_manager.prefix_cache_stats
        return {
            "num_running_reqs": self.scheduler.num_running,
            "num_waiting_reqs": self.scheduler.num_waiting,
            "num_preemptions": self.scheduler.num_preemptions,
            "kv_cache_usage": self.kv_cache_manager.usage,
            "prefix_cache_requests": prefix_cache.requests,
            "prefix_cache_queries": prefix_cache.queries,
            "prefix_cache_hits": prefix_cache.hits,
            "prefix_cache_hit_rate": prefix_cache.hit_rate,
        }
