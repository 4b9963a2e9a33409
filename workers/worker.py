"""One tensor-parallel rank: sets up its device and thread count, owns the ModelRunner, and
answers the engine core's calls (KV capacity, cache allocation, model steps).

The engine core calls it in-process (`UniProcExecutor`) or through `ember.workers.__main__`
in a child process.
"""

from __future__ import annotations

import logging
import os

import psutil
import torch

from ember.workers.config import EngineConfig
from ember.workers.model_runner import ModelRunner
from ember.workers.scheduler_output import ModelRunnerOutput, SchedulerOutput

logger = logging.getLogger(__name__)

_DEFAULT_CPU_KV_FRACTION = 0.2
_DEFAULT_CPU_KV_MAX_BYTES = 4 << 30


class Worker:
    def __init__(self, config: EngineConfig, rank: int = 0):
        self.config = config
        self.rank = rank
        self.device = torch.device(config.device.device)
        if self.device.type == "cpu" and config.device.num_threads:
            torch.set_num_threads(config.device.num_threads)
        self.model_runner = ModelRunner(config, self.device)
        self.profiler: torch.profiler.profile | None = None
        self.profile_dir: str | None = None

    def kv_cache_block_bytes(self) -> int:
        return self.model_runner.kv_cache_block_bytes()

    def available_kv_cache_bytes(self) -> int:
        """The bytes this rank may give the KV cache."""
        if self.device.type == "cpu":
            budget = self.config.cache.kv_cache_memory_bytes
            if budget is None:
                available = psutil.virtual_memory().available
                budget = min(int(available * _DEFAULT_CPU_KV_FRACTION), _DEFAULT_CPU_KV_MAX_BYTES)
            return budget
        free, total = torch.cuda.mem_get_info(self.device)
        used_elsewhere = total - free
        return int(total * self.config.cache.gpu_memory_utilization) - used_elsewhere

    def num_available_kv_blocks(self) -> int:
        block_bytes = self.kv_cache_block_bytes()
        if block_bytes == 0:  # an encoder (BERT): no KV cache; blocks are bookkeeping only
            cache, scheduler = self.config.cache, self.config.scheduler
            blocks_per_request = -(-scheduler.max_model_len // cache.block_size)
            return scheduler.max_num_seqs * blocks_per_request + 1
        return self.available_kv_cache_bytes() // block_bytes

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.model_runner.initialize_kv_cache(num_blocks)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.model_runner.execute_model(scheduler_output)

    def start_profile(self, profile_dir: str) -> None:
        """Record every step with torch.profiler until `stop_profile`."""
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profile_dir = profile_dir
        self.profiler = torch.profiler.profile(activities=activities, record_shapes=True)
        self.profiler.start()

    def stop_profile(self) -> str:
        """Stop recording; write this rank's Chrome trace and return its path."""
        if self.profiler is None:
            raise RuntimeError("the profiler was not started")
        self.profiler.stop()
        path = os.path.join(self.profile_dir, f"ember-worker-{self.rank}.trace.json")
        self.profiler.export_chrome_trace(path)
        self.profiler = None
        return path
