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

from ember.kernels.cpu_library import build_in_background
from ember.workers.config import EngineConfig
from ember.workers.cuda_graphs import CudaGraphRunner, capture_batch_sizes
from ember.workers.distributed import destroy_rank_group, init_rank_group
from ember.workers.gpu_memory import (
    MemoryBaseline,
    check_requested_memory,
    kv_cache_budget_bytes,
    profile_memory,
)
from ember.workers.model_runner import ModelRunner
from ember.workers.scheduler_output import ModelRunnerOutput, SchedulerOutput

logger = logging.getLogger(__name__)

_DEFAULT_CPU_KV_FRACTION = 0.2
_DEFAULT_CPU_KV_MAX_BYTES = 4 << 30


class Worker:
    """`rendezvous`: where the ranks of this engine meet (a `file://` store the executor made
    for it); needed with more than one rank."""

    def __init__(self, config: EngineConfig, rank: int = 0, rendezvous: str | None = None):
        self.config = config
        self.rank = rank
        world_size = config.parallel.tensor_parallel_size
        if world_size > 1 and rendezvous is None:
            raise ValueError("tensor_parallel_size > 1 needs a rendezvous address")
        self.device = torch.device(config.device.device)
        if self.device.type == "cpu":
            build_in_background()  # the C kernels compile while the model loads
            num_threads = config.device.num_threads
            if num_threads is None and world_size > 1:
                # The ranks share the machine's cores: torch's default (every core per rank)
                # would oversubscribe them, and OpenMP's spinning threads then wait on each
                # other (TP=2 on 2 cores: 0.4 s a step instead of 0.1 s).
                num_threads = max(1, len(os.sched_getaffinity(0)) // world_size)
            if num_threads:
                torch.set_num_threads(num_threads)
        self.memory_baseline: MemoryBaseline | None = None
        self.cuda_graph_sizes: list[int] = []
        if self.device.type == "cuda":
            if self.device.index is None:  # "cuda": this rank's GPU, as an index set_device takes
                self.device = torch.device("cuda", rank)
            torch.cuda.set_device(self.device)
            free_bytes, total_bytes = torch.cuda.mem_get_info(self.device)
            self.memory_baseline = MemoryBaseline(total_bytes=total_bytes, free_bytes=free_bytes)
            check_requested_memory(self.memory_baseline, config.cache.gpu_memory_utilization)
            if not config.device.enforce_eager:
                self.cuda_graph_sizes = capture_batch_sizes(
                    config.scheduler.max_num_seqs, config.scheduler.max_num_batched_tokens
                )
        self.parallel = init_rank_group(rank, world_size, rendezvous, self.device)
        self.model_runner = ModelRunner(config, self.device, self.parallel)
        self.profiler: torch.profiler.profile | None = None
        self.profile_dir: str | None = None

    def kv_cache_block_bytes(self) -> int:
        return self.model_runner.kv_cache_block_bytes()

    def available_kv_cache_bytes(self) -> int:
        """The bytes this rank may give the KV cache. On CPU the ranks share one machine's
        memory: the budget (the user's `kv_cache_memory_bytes`, or a share of free memory) is
        split evenly across them."""
        if self.device.type == "cpu":
            budget = self.config.cache.kv_cache_memory_bytes
            if budget is None:
                available = psutil.virtual_memory().available
                budget = min(int(available * _DEFAULT_CPU_KV_FRACTION), _DEFAULT_CPU_KV_MAX_BYTES)
            return budget // self.parallel.world_size
        utilization = self.config.cache.gpu_memory_utilization
        graph_batch_size = self.cuda_graph_sizes[-1] if self.cuda_graph_sizes else None
        profile = profile_memory(self.model_runner, self.memory_baseline, graph_batch_size)
        budget = kv_cache_budget_bytes(profile, utilization)
        logger.info(
            "GPU memory: %.2f GiB x %.2f utilization; torch peak %.2f GiB (weights, activations, "
            "sampler), non-torch %.2f GiB, CUDA graphs ~%.2f GiB; KV cache %.2f GiB",
            profile.total_bytes / 2**30,
            utilization,
            profile.torch_peak_bytes / 2**30,
            (profile.used_bytes - profile.baseline_used_bytes - profile.torch_reserved_bytes)
            / 2**30,
            profile.cuda_graph_bytes / 2**30,
            budget / 2**30,
        )
        return max(budget, 0)

    def num_available_kv_blocks(self) -> int:
        block_bytes = self.kv_cache_block_bytes()
        if block_bytes == 0:  # an encoder (BERT): no KV cache; blocks are bookkeeping only
            cache, scheduler = self.config.cache, self.config.scheduler
            blocks_per_request = -(-scheduler.max_model_len // cache.block_size)
            return scheduler.max_num_seqs * blocks_per_request + 1
        return self.available_kv_cache_bytes() // block_bytes

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.model_runner.initialize_kv_cache(num_blocks)
        if self.cuda_graph_sizes:
            self._capture_cuda_graphs()

    def _capture_cuda_graphs(self) -> None:
        """Capture the decode graphs; a model whose forward cannot be captured (one that reads
        a device value on the host, as the mixture-of-experts layer does) runs eagerly."""
        runner = self.model_runner
        max_blocks_per_req = -(-self.config.scheduler.max_model_len // runner.block_size)
        graphs = CudaGraphRunner(
            runner.model, self.cuda_graph_sizes, max_blocks_per_req, self.device
        )
        try:
            graphs.capture()
        except RuntimeError as exc:
            logger.warning("CUDA graph capture failed (%s); running eagerly", exc)
            torch.cuda.synchronize(self.device)
            return
        runner.cuda_graphs = graphs

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

    def shutdown(self) -> None:
        destroy_rank_group(self.parallel)
