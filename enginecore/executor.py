"""Executors drive the workers: `UniProcExecutor` holds one Worker in this process (tests,
tools); the multiprocess executor starts one worker process per rank (see `multiproc_executor`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from ember.workers.config import EngineConfig
from ember.workers.scheduler_output import ModelRunnerOutput, SchedulerOutput


class Executor(ABC):
    def __init__(self, config: EngineConfig):
        self.config = config

    @abstractmethod
    def determine_num_kv_blocks(self) -> int:
        """The number of KV blocks every rank can hold."""

    @abstractmethod
    def initialize_kv_cache(self, num_blocks: int) -> None: ...

    @abstractmethod
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput: ...

    def check_health(self) -> None:
        """Raise if a worker is gone."""

    @abstractmethod
    def start_profile(self, profile_dir: str) -> None: ...

    @abstractmethod
    def stop_profile(self) -> list[str]:
        """Stop profiling; the paths of the traces written, one per worker."""

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

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.worker.execute_model(scheduler_output)

    def start_profile(self, profile_dir: str) -> None:
        self.worker.start_profile(profile_dir)

    def stop_profile(self) -> list[str]:
        return [self.worker.stop_profile()]
