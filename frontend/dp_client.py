"""`LLM(data_parallel_size=N)`: N engine-core replicas, each with its own tensor-parallel worker
ranks, behind the one client interface `LLM` uses (vLLM's DPLBAsyncMPClient, offline).

Balancing: each request goes to the replica with the fewest pending tokens (prompt tokens plus
`max_tokens` of its unfinished requests; ties to the lowest index). The n children of one prompt
go together, so they share the prompt's cached blocks. Outputs are read from every replica in
turn; `LLM` puts them back in input order by request id, as for one engine.

Utilities fan out (`call_utility`): the ones that change state (sleep, wake_up, profiles,
reset_prefix_cache) run on every replica, collective_rpc returns every replica's ranks in
replica order, stats are summed, and read-only ones (the configuration, structured-output
checks) ask replica 0. A replica that dies stops them all: the call raises EngineDeadError.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import msgspec
import psutil
import zmq

from ember.core_client import _POLL_MS, EngineCoreClient
from ember.data_parallel import num_experts
from ember.enginecore.exceptions import EngineDeadError
from ember.enginecore.messages import EngineCoreOutputs, EngineCoreRequest
from ember.enginecore.stats import SchedulerStats
from ember.workers.config import (
    DEFAULT_CPU_KV_FRACTION,
    DEFAULT_CPU_KV_MAX_BYTES,
    EngineConfig,
    LockstepConfig,
)

logger = logging.getLogger(__name__)

_LOCKSTEP_IDLE_S = 30.0  # how long shutdown waits for lockstep replicas to finish a wave

# Utilities whose answer is the same on every replica (or only needed once): replica 0's.
_ASK_ONE = frozenset(
    {"get_engine_config", "validate_structured_outputs", "structured_output_allowed_tokens"}
)
# Utilities run on every replica whose answers are concatenated lists.
_CONCATENATE = frozenset({"collective_rpc", "stop_profile"})
# Utilities run on every replica that answer True only if every replica did.
_ALL = frozenset({"wake_up", "reset_prefix_cache"})
# Utilities run on every replica that answer nothing.
_EVERY = frozenset({"sleep", "start_profile"})
_KNOWN = (
    _ASK_ONE | _CONCATENATE | _ALL | _EVERY | {"is_sleeping", "get_scheduler_stats", "get_stats"}
)


def replica_config(config: EngineConfig, data_parallel_size: int) -> EngineConfig:
    """The configuration of each replica. On CPU the replicas share the machine: unless the
    user set them, each worker rank gets cores / (replicas x ranks) threads (every core per
    rank would oversubscribe them), and each replica 1 / replicas of the default KV budget
    (each would otherwise take the whole share of free memory)."""
    if config.device.device != "cpu":
        return config
    device, cache = config.device, config.cache
    if device.num_threads is None:
        ranks = data_parallel_size * config.parallel.tensor_parallel_size
        num_threads = max(1, len(os.sched_getaffinity(0)) // ranks)
        device = dataclasses.replace(device, num_threads=num_threads)
    if cache.kv_cache_memory_bytes is None:
        available = psutil.virtual_memory().available
        budget = min(int(available * DEFAULT_CPU_KV_FRACTION), DEFAULT_CPU_KV_MAX_BYTES)
        cache = dataclasses.replace(cache, kv_cache_memory_bytes=budget // data_parallel_size)
    return dataclasses.replace(config, device=device, cache=cache)


def replica_env(
    config: EngineConfig, local_rank: int, sliced_by_user: bool = False
) -> dict[str, str] | None:
    """The environment of replica `local_rank`'s engine core: on CUDA, its slice of the visible
    GPUs (tensor_parallel_size of them, as vLLM slices CUDA_VISIBLE_DEVICES); None on CPU.
    `sliced_by_user`: a VLLM_DP_* rank whose launcher already left it exactly its own GPUs
    (older versions of vLLM's example set CUDA_VISIBLE_DEVICES per rank) keeps them."""
    if config.device.device != "cuda":
        return None
    tp_size = config.parallel.tensor_parallel_size
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        devices = visible.split(",")
    else:
        import torch  # on a CUDA machine torch is loaded already (the device was resolved)

        devices = [str(i) for i in range(torch.cuda.device_count())]
    mine = devices[local_rank * tp_size : (local_rank + 1) * tp_size]
    if sliced_by_user and len(devices) == tp_size:
        mine = devices
    if len(mine) < tp_size:
        raise ValueError(
            f"data-parallel rank {local_rank} needs GPUs {local_rank * tp_size}.."
            f"{(local_rank + 1) * tp_size - 1} of the {len(devices)} visible "
            f"(CUDA_VISIBLE_DEVICES={visible!r}): each rank needs tensor_parallel_size GPUs "
            "of its own"
        )
    return {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(mine)}


def lockstep_replica_configs(
    config: EngineConfig, data_parallel_size: int
) -> tuple[list[EngineConfig], object | None]:
    """Each replica's configuration, and the store they meet through: a MoE model with
    `enable_expert_parallel=True` places its experts over every replica's workers, which then
    step in lockstep (`enginecore/lockstep.py`, as the VLLM_DP_* ranks do) through a store this
    process hosts on a free loopback port; other models run independent replicas (no store)."""
    if not (config.parallel.enable_expert_parallel and num_experts(config)):
        return [config] * data_parallel_size, None
    from ember.workers.distributed import tcp_store

    store = tcp_store("127.0.0.1", 0, is_master=True, timeout_s=_LOCKSTEP_IDLE_S)
    configs = [
        dataclasses.replace(
            config,
            parallel=dataclasses.replace(
                config.parallel,
                lockstep=LockstepConfig(rank, data_parallel_size, "127.0.0.1", store.port),
            ),
        )
        for rank in range(data_parallel_size)
    ]
    logger.info("%d replicas of a MoE model with expert parallelism: lockstep", data_parallel_size)
    return configs, store


class DPEngineCoreClient:
    """Several `EngineCoreClient`s (one per replica) with the interface of one."""

    def __init__(self, config: EngineConfig, data_parallel_size: int):
        config = replica_config(config, data_parallel_size)
        envs = [replica_env(config, rank) for rank in range(data_parallel_size)]
        configs, self._lockstep_store = lockstep_replica_configs(config, data_parallel_size)
        self.replicas: list[EngineCoreClient] = []
        # Replicas start together (each start waits on its handshake, which releases the GIL).
        with ThreadPoolExecutor(max_workers=data_parallel_size) as pool:
            futures = [
                pool.submit(EngineCoreClient, replica, env=env)
                for replica, env in zip(configs, envs)
            ]
            errors = []
            for future in futures:
                try:
                    self.replicas.append(future.result())
                except BaseException as exc:  # noqa: BLE001 - re-raised below, once all stop
                    errors.append(exc)
        if errors:
            self.shutdown()
            raise errors[0]
        self.ready_info = self.replicas[0].ready_info
        self.dead_reason: str | None = None
        self._owner: dict[str, int] = {}  # request id -> replica index
        self._cost: dict[str, int] = {}  # request id -> its pending tokens
        self.pending_tokens = [0] * data_parallel_size
        self._stats: list[SchedulerStats | None] = [None] * data_parallel_size
        self._next_read = 0
        self._poller = zmq.Poller()
        for replica in self.replicas:
            self._poller.register(replica.output_socket, zmq.POLLIN)

    @property
    def data_parallel_size(self) -> int:
        return len(self.replicas)

    @property
    def processes(self) -> list:
        return [replica.process for replica in self.replicas]

    @property
    def process(self):
        """Replica 0's engine-core process (`processes` lists them all)."""
        return self.replicas[0].process

    @property
    def asleep(self) -> str | None:
        return self.replicas[0].asleep if self.replicas else None

    @asleep.setter
    def asleep(self, value: str | None) -> None:
        for replica in self.replicas:
            replica.asleep = value

    # ---- requests ----------------------------------------------------------------------

    def add_requests(self, requests: list[EngineCoreRequest]) -> None:
        self._check_alive()
        batches: list[list[EngineCoreRequest]] = [[] for _ in self.replicas]
        previous_prompt, previous_index = None, 0
        for request in requests:
            cost = len(request.prompt_token_ids)
            if request.sampling_params is not None:
                cost += request.sampling_params.max_tokens or 0
            if request.prompt_token_ids is previous_prompt:  # a child of the same prompt
                index = previous_index
            else:
                index = min(range(len(self.replicas)), key=self.pending_tokens.__getitem__)
            previous_prompt, previous_index = request.prompt_token_ids, index
            self._owner[request.request_id] = index
            self._cost[request.request_id] = cost
            self.pending_tokens[index] += cost
            batches[index].append(request)
        for replica, batch in zip(self.replicas, batches):
            if batch:
                replica.add_requests(batch)

    def abort_requests(self, request_ids: list[str]) -> None:
        if not request_ids or not self.is_alive():
            return
        per_replica: list[list[str]] = [[] for _ in self.replicas]
        for request_id in request_ids:
            index = self._owner.get(request_id)
            if index is not None:
                per_replica[index].append(request_id)
                self._forget(request_id)
        for replica, ids in zip(self.replicas, per_replica):
            if ids:
                replica.abort_requests(ids)

    def _forget(self, request_id: str) -> None:
        index = self._owner.pop(request_id)
        self.pending_tokens[index] -= self._cost.pop(request_id)

    def get_outputs(self, timeout_s: float) -> EngineCoreOutputs | None:
        """The next batch of outputs of any replica (read in turn, so none starves), or None
        after `timeout_s`; raises EngineDeadError when any replica is dead."""
        deadline = time.monotonic() + timeout_s
        for replica in self.replicas:
            replica._last_heard = time.monotonic()
        while True:
            self._check_alive()
            for replica in self.replicas:
                replica._ping_if_quiet()
            wait_ms = int(min(_POLL_MS, max(0.0, deadline - time.monotonic()) * 1000))
            ready = dict(self._poller.poll(wait_ms))
            if ready:
                count = len(self.replicas)
                for offset in range(count):
                    index = (self._next_read + offset) % count
                    replica = self.replicas[index]
                    if replica.output_socket not in ready:
                        continue
                    outputs = self._receive(index)
                    if outputs is not None:
                        self._next_read = (index + 1) % count
                        return outputs
            elif time.monotonic() >= deadline:
                return None

    def _receive(self, index: int) -> EngineCoreOutputs | None:
        replica = self.replicas[index]
        try:
            outputs = replica._receive()
        except EngineDeadError as exc:
            self._die(index, str(exc))
        if outputs is None:
            return None
        for output in outputs.outputs:
            if output.finished and output.request_id in self._owner:
                self._forget(output.request_id)
        if outputs.scheduler_stats is not None:
            self._stats[index] = outputs.scheduler_stats
            outputs.scheduler_stats = self.combined_stats()
        return outputs

    def combined_stats(self) -> SchedulerStats:
        """The replicas' last scheduler stats together: counts summed, KV usage averaged."""
        known = [stats for stats in self._stats if stats is not None]
        total = SchedulerStats()
        for stats in known:
            total.num_running_reqs += stats.num_running_reqs
            total.num_waiting_reqs += stats.num_waiting_reqs
            total.prefix_cache_queries += stats.prefix_cache_queries
            total.prefix_cache_hits += stats.prefix_cache_hits
            total.num_preemptions += stats.num_preemptions
            total.kv_cache_usage += stats.kv_cache_usage / len(self.replicas)
        return total

    # ---- utilities ---------------------------------------------------------------------

    def call_utility(self, method: str, *args: object, timeout_s: float = 60.0) -> object:
        """`method` on the replicas, its answers combined (see the module's docstring)."""
        if method not in _KNOWN:
            raise NotImplementedError(
                f"{method} is not supported with data_parallel_size > 1 (ember does not know "
                "how to combine the replicas' answers)"
            )
        self._check_alive()
        if method in _ASK_ONE:
            return self._call(0, method, args, timeout_s)
        results = [self._call(i, method, args, timeout_s) for i in range(len(self.replicas))]
        if method in _CONCATENATE:
            return [item for result in results for item in result]
        if method in _ALL:
            return all(results)
        if method in _EVERY:
            return results[0]
        if method == "is_sleeping":
            return any(results)
        if method == "get_scheduler_stats":
            self._stats = [msgspec.convert(result, SchedulerStats) for result in results]
            return self.combined_stats()
        if method == "get_stats":
            return {
                key: sum(result[key] for result in results)
                for key in results[0]
                if all(isinstance(result.get(key), (int, float)) for result in results)
            }
        raise AssertionError(f"{method} is in _KNOWN without a way to combine it")

    def _call(self, index: int, method: str, args: tuple, timeout_s: float) -> object:
        try:
            return self.replicas[index].call_utility(method, *args, timeout_s=timeout_s)
        except EngineDeadError as exc:
            self._die(index, str(exc))

    # ---- liveness and shutdown ---------------------------------------------------------

    def _die(self, index: int, reason: str) -> None:
        """Replica `index` is dead: stop every replica and raise EngineDeadError."""
        if self.dead_reason is None:
            self.dead_reason = f"data-parallel replica {index} of {len(self.replicas)}: {reason}"
            self.shutdown()
        raise EngineDeadError(self.dead_reason)

    def _check_alive(self) -> None:
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        for index, replica in enumerate(self.replicas):
            try:
                replica._check_alive()
            except EngineDeadError as exc:
                self._die(index, str(exc))

    def is_alive(self) -> bool:
        try:
            self._check_alive()
        except EngineDeadError:
            return False
        return True

    def shutdown(self) -> None:
        """Stop every replica: each is told to stop first, then each is waited for. Lockstep
        replicas first finish the wave they are in, so that none stops inside a collective."""
        if self._lockstep_store is not None:
            for replica in self.replicas:
                try:
                    replica.call_utility("lockstep_idle", timeout_s=_LOCKSTEP_IDLE_S)
                except (EngineDeadError, TimeoutError, RuntimeError):
                    break  # a replica is dead or stuck: stop them all as they are
        for replica in self.replicas:
            process = replica.process
            if process is not None and process.stdin is not None and not process.stdin.closed:
                try:
                    process.stdin.close()
                except OSError:
                    pass
        for replica in self.replicas:
            replica.shutdown()
