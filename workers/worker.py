"""One tensor-parallel rank: sets up its device and thread count, owns the ModelRunner, and
answers the engine core's calls (KV capacity, cache allocation, model steps, sleep mode, and
`collective_rpc`: its public methods by name).

The engine core calls it in-process (`UniProcExecutor`) or through `ember.workers.__main__`
in a child process.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
from typing import Any

import psutil
import torch

from ember.kernels.cpu_library import build_in_background
from ember.workers.config import DEFAULT_CPU_KV_FRACTION, DEFAULT_CPU_KV_MAX_BYTES, EngineConfig
from ember.workers.cuda_graphs import CudaGraphRunner, capture_batch_sizes
from ember.workers.distributed import (
    destroy_rank_group,
    init_lockstep_groups,
    init_rank_group,
)
from ember.workers.gpu_memory import (
    MemoryBaseline,
    check_requested_memory,
    kv_cache_budget_bytes,
    profile_memory,
)
from ember.workers.host_allocator import keep_freed_blocks
from ember.workers.model_runner import ModelRunner
from ember.workers.rpc import FunctionRef, resolve_reference
from ember.workers.scheduler_output import ModelRunnerOutput, SchedulerOutput
from ember.workers.weight_memory import loaded_weight_bytes

logger = logging.getLogger(__name__)


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
            keep_freed_blocks()  # a step's large tensors reuse freed memory (host_allocator)
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
            # Offloaded layers copy their weights in each forward: not captured (vLLM's UVA
            # views would be; ember has no UVA).
            if not config.device.enforce_eager and not config.device.cpu_offload_bytes:
                self.cuda_graph_sizes = capture_batch_sizes(
                    config.scheduler.max_num_seqs, config.scheduler.max_num_batched_tokens
                )
        if config.parallel.lockstep is not None:
            self.cuda_graph_sizes = []  # the MoE layers' exchanges change shape every step
            self.parallel = init_lockstep_groups(
                rank,
                world_size,
                config.parallel.lockstep,
                self.device,
                config.parallel.execute_model_timeout_s,
                config.parallel.expert_placement_strategy,
            )
        else:
            self.parallel = init_rank_group(
                rank,
                world_size,
                rendezvous,
                self.device,
                enable_expert_parallel=config.parallel.enable_expert_parallel,
                expert_placement_strategy=config.parallel.expert_placement_strategy,
            )
        self.model_runner = ModelRunner(config, self.device, self.parallel)
        self.profiler: torch.profiler.profile | None = None
        self.profile_dir: str | None = None
        self.trace_name = f"ember-worker-{rank}"
        self.num_kv_blocks = 0
        # Sleep mode: 0 = weights in place; 1 = on host memory (on CPU: kept as they are);
        # 2 = dropped, loaded from the checkpoint again on wake_up.
        self.weights_asleep = 0
        self.kv_cache_asleep = False

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
                budget = min(int(available * DEFAULT_CPU_KV_FRACTION), DEFAULT_CPU_KV_MAX_BYTES)
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
        self.num_kv_blocks = num_blocks
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

    def execute_model(
        self, scheduler_output: SchedulerOutput, lockstep_wave: int = 0
    ) -> ModelRunnerOutput:
        output = self.model_runner.execute_model(scheduler_output)
        lockstep = self.parallel.lockstep
        if lockstep is not None:  # every rank makes the same collectives, then agrees
            if not self.model_runner.ran_model:
                self.model_runner.idle_moe_step()
            output.lockstep_busy, output.lockstep_wave = lockstep.agree(True, lockstep_wave)
        return output

    def idle_step(self, wave: int, busy: bool = False) -> tuple[bool, int]:
        """Lockstep data parallelism, a step without tokens of this rank: its MoE layers serve
        the other ranks' tokens; returns the ranks' agreement (whether any rank has requests,
        `busy` for this one; the largest wave number)."""
        lockstep = self.parallel.lockstep
        if lockstep is None:
            raise RuntimeError("idle_step is for lockstep data-parallel ranks")
        self.model_runner.idle_moe_step()
        return lockstep.agree(busy, wave)

    def start_profile(self, profile_dir: str, prefix: str = "") -> None:
        """Record every step with torch.profiler until `stop_profile`; the trace will be
        `<profile_dir>/[<prefix>_]ember-worker-<rank>.trace.json`."""
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profile_dir = profile_dir
        self.trace_name = f"ember-worker-{self.rank}"
        if prefix:
            self.trace_name = f"{prefix}_{self.trace_name}"
        self.profiler = torch.profiler.profile(activities=activities, record_shapes=True)
        self.profiler.start()

    def stop_profile(self) -> str:
        """Stop recording; write this rank's Chrome trace and return its path."""
        if self.profiler is None:
            raise RuntimeError("the profiler was not started")
        self.profiler.stop()
        path = os.path.join(self.profile_dir, f"{self.trace_name}.trace.json")
        self.profiler.export_chrome_trace(path)
        self.profiler = None
        return path

    # ---- sleep mode (`LLM.sleep` / `LLM.wake_up`) ------------------------------------

    def sleep(self, level: int) -> None:
        """Release memory: level 1 the KV cache (its contents are lost) and, on a GPU, moves
        the weights to host memory; on CPU, where they already are, they stay. Level 2 drops
        the weights too. Memory freed by torch goes back to the system (`_release_memory`)."""
        if level not in (1, 2):
            raise ValueError(f"level must be 1 or 2, got {level!r}")
        self.model_runner.free_kv_cache()
        self.kv_cache_asleep = True
        if level == 2 or self.weights_asleep == 2:
            self.model_runner.unload_model()
            self.weights_asleep = 2
        elif not self.weights_asleep:
            if self.device.type != "cpu":
                self.model_runner.move_weights(torch.device("cpu"))
            self.weights_asleep = 1
        _release_memory(self.device)

    def wake_up(self, tags: list[str]) -> None:
        """Bring back "weights" (from host memory, or loaded from the checkpoint after level
        2) and "kv_cache" (allocated again, zeroed, once the weights are back)."""
        unknown = sorted(set(tags) - {"weights", "kv_cache"})
        if unknown:
            raise ValueError(f"tags must be 'weights' or 'kv_cache', got {unknown[0]!r}")
        if "weights" in tags and self.weights_asleep:
            if self.weights_asleep == 2:
                self.model_runner.load_model()
            elif self.device.type != "cpu":
                self.model_runner.move_weights(self.device)
            self.weights_asleep = 0
        if "kv_cache" in tags:
            self.kv_cache_asleep = False
        if not (self.kv_cache_asleep or self.weights_asleep or self.model_runner.kv_caches):
            self.initialize_kv_cache(self.num_kv_blocks)

    def reload_weights(self) -> None:
        """Load the weights from the checkpoint again (vLLM's `collective_rpc("reload_weights")`,
        as after `sleep(level=2)`); the KV cache stays bound."""
        if self.weights_asleep:
            raise RuntimeError("the weights are asleep: call wake_up(tags=['weights']) first")
        self.model_runner.unload_model()
        _release_memory(self.device)
        self.model_runner.load_model()
        if self.cuda_graph_sizes and self.model_runner.kv_caches:
            self._capture_cuda_graphs()

    # ---- collective_rpc ----------------------------------------------------------------

    def call(self, method: str | FunctionRef, args: list, kwargs: dict[str, Any]) -> Any:
        """Run `method` (a public method of this worker by name, or a function by reference,
        called with this worker, or with the model for `apply_model`), as vLLM's
        `collective_rpc` does on each rank."""
        if isinstance(method, FunctionRef):
            function = resolve_function(method)
            target = self.get_model() if method.on_model else self
            return function(target, *args, **kwargs)
        if method.startswith("_"):
            raise ValueError(f"method must name a public Worker method, got {method!r}")
        function = getattr(self, method, None)
        if not callable(function):
            raise NotImplementedError(f"Method {method!r} is not implemented.")
        return function(*args, **kwargs)

    def get_model(self) -> torch.nn.Module:
        """This rank's model (vLLM's `Worker.get_model`)."""
        if self.model_runner.model is None:
            raise RuntimeError("the weights are asleep: call wake_up(tags=['weights']) first")
        return self.model_runner.model

    def apply_model(self, func: Any) -> Any:
        return func(self.get_model())

    def loaded_weight_bytes(self) -> dict[str, int]:
        """`weight_memory.loaded_weight_bytes` of this rank's model, for a caller that names
        the method (`collective_rpc("loaded_weight_bytes")`) without importing torch."""
        return loaded_weight_bytes(self.get_model())

    def check_health(self) -> None:
        """Nothing to check: a worker that answers is healthy (vLLM's)."""

    def get_memory_usage(self) -> dict[str, int]:
        """This rank's process and the bytes its KV cache and weights take."""
        model = self.model_runner.model
        weights = () if model is None else [*model.parameters(), *model.buffers()]
        caches = self.model_runner.kv_caches
        return {
            "rank": self.rank,
            "pid": os.getpid(),
            "rss_bytes": psutil.Process().memory_info().rss,
            "kv_cache_bytes": sum(c.numel() * c.element_size() for c in caches),
            "weights_bytes": sum(t.numel() * t.element_size() for t in weights),
        }

    def shutdown(self) -> None:
        destroy_rank_group(self.parallel)


def resolve_function(ref: FunctionRef) -> Any:
    """The function `ref` names, imported as pickle would import it."""
    function = resolve_reference(ref)
    if not callable(function):
        raise TypeError(f"method: {ref.module}.{ref.qualname} is not callable")
    return function


def freeze_heap() -> None:
    """Put what exists now (the model's modules and tensors, the imported libraries) out of the
    cyclic collector's reach, so that its full passes during steps do not walk it again (as
    vLLM's engine freezes its heap after startup). Called by the worker process after its
    startup and after a wake-up; `_release_memory` thaws it first."""
    gc.collect()
    gc.freeze()


def _release_memory(device: torch.device) -> None:
    """Hand freed memory back: collect cycles (the frozen heap's too: released weights sit in
    cycles, a parameter's loader bound to its module), empty torch's CUDA cache, and on CPU
    ask glibc to return its free heap pages (`malloc_trim`), which it otherwise keeps for
    reuse."""
    gc.unfreeze()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
