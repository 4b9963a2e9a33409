"""Executors drive the workers: `UniProcExecutor` holds one Worker in this process (tests,
tools); the multiprocess executor starts one worker process per rank (see `multiproc_executor`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from typing import Any

from ember.workers.config import EngineConfig
from ember.workers.rpc import FunctionRef
from ember.workers.scheduler_output import ModelRunnerOutput, SchedulerOutput


class Executor(ABC):
    def __init__(self, config: EngineConfig):
        self.config = config
        # Outputs of submitted steps, for executors that run a step in `submit_model` itself.
        self._submitted: deque[ModelRunnerOutput] = deque()

    @abstractmethod
    def determine_num_kv_blocks(self) -> int:
        """The number of KV blocks every rank can hold."""

    @abstractmethod
    def initialize_kv_cache(self, num_blocks: int) -> None: ...

    @abstractmethod
    def execute_model(
        self, scheduler_output: SchedulerOutput, lockstep_wave: int = 0
    ) -> ModelRunnerOutput: ...

    def submit_model(self, scheduler_output: SchedulerOutput) -> None:
        """Start a step and return (async scheduling): its output comes from `await_model`, in
        the order the steps were submitted."""
        self._submitted.append(self.execute_model(scheduler_output))

    def await_model(self) -> ModelRunnerOutput:
        """The output of the oldest step `submit_model` started."""
        return self._submitted.popleft()

    def idle_step(self, wave: int, busy: bool = False) -> tuple[bool, int]:
        """Lockstep data parallelism: a step without tokens of this rank (`Worker.idle_step`);
        (any rank busy, the largest wave number)."""
        raise NotImplementedError(f"{type(self).__name__} has no lockstep data parallelism")

    def check_health(self) -> None:
        """Raise if a worker is gone."""

    @abstractmethod
    def start_profile(self, profile_dir: str, prefix: str = "") -> None: ...

    @abstractmethod
    def stop_profile(self) -> list[str]:
        """Stop profiling; the paths of the traces written, one per worker."""

    def collective_rpc(
        self,
        method: str | FunctionRef,
        timeout_s: float | None,
        args: list,
        kwargs: dict[str, Any],
    ) -> list[Any]:
        """Run `method` on every worker (`Worker.call`); the results, one per rank. Raises
        TimeoutError when a rank has not answered within `timeout_s`."""
        raise NotImplementedError(f"{type(self).__name__} has no collective_rpc")

    def sleep(self, level: int) -> None:
        """Release the workers' KV caches (level 1) and weights (level 2): `Worker.sleep`."""
        raise NotImplementedError(f"{type(self).__name__} has no sleep mode")

    def wake_up(self, tags: list[str]) -> None:
        """Bring back "weights" and / or "kv_cache": `Worker.wake_up`."""
        raise NotImplementedError(f"{type(self).__name__} has no sleep mode")

    def shutdown(self) -> None:
        pass


class UniProcExecutor(Executor):
    def __init__(self, config: EngineConfig):
        super().__init__(config)
        if config.parallel.tensor_parallel_size != 1:
            raise ValueError("UniProcExecutor runs tensor_parallel_size=1 only")
        from ember.workers.worker import Worker

        self.worker = Worker(config)

    def determine_num_kv_blocks(self) -> int:
        return self.worker.num_available_kv_blocks()

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.worker.initialize_kv_cache(num_blocks)

    def execute_model(
        self, scheduler_output: SchedulerOutput, lockstep_wave: int = 0
    ) -> ModelRunnerOutput:
        return self.worker.execute_model(scheduler_output, lockstep_wave)

    def idle_step(self, wave: int, busy: bool = False) -> tuple[bool, int]:
        return self.worker.idle_step(wave, busy)

    def start_profile(self, profile_dir: str, prefix: str = "") -> None:
        self.worker.start_profile(profile_dir, prefix)

    def stop_profile(self) -> list[str]:
        return [self.worker.stop_profile()]

    def collective_rpc(
        self,
        method: str | FunctionRef,
        timeout_s: float | None,
        args: list,
        kwargs: dict[str, Any],
    ) -> list[Any]:
        return [self.worker.call(method, args, kwargs)]  # in this thread: no timeout

    def sleep(self, level: int) -> None:
        self.worker.sleep(level)

    def wake_up(self, tags: list[str]) -> None:
        self.worker.wake_up(tags)
