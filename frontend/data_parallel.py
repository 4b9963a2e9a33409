"""The environment mode of data parallelism (vLLM's examples/offline_inference/data_parallel.py):
an `LLM` built in a process with VLLM_DP_RANK / VLLM_DP_SIZE / VLLM_DP_MASTER_IP /
VLLM_DP_MASTER_PORT set is one data-parallel rank. `LLM.__init__` and `LLM.shutdown` call it.

Ranks of a dense model run independently; they meet only at start and at shutdown, through a
`torch.distributed.TCPStore` at VLLM_DP_MASTER_IP:VLLM_DP_MASTER_PORT that rank 0 hosts:

    start:     each rank writes  size/<rank> = VLLM_DP_SIZE, then waits for every rank's key
               (a different size: ValueError naming VLLM_DP_SIZE; none after
               EMBER_DP_TIMEOUT_S: TimeoutError naming the missing ranks)
    meanwhile: each rank adds 1 to alive/<rank> every second (a thread with its own connection)
    shutdown:  each rank writes done/<rank>, then waits for every done/<r> while alive/<r> still
               moves; a rank silent for EMBER_DP_DEAD_AFTER_S (10 s) is dead: DataParallelError.
               Rank 0 keeps the store up until every rank has read the others' done keys.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

logger = logging.getLogger(__name__)

DP_ENV = ("VLLM_DP_RANK", "VLLM_DP_SIZE", "VLLM_DP_MASTER_IP", "VLLM_DP_MASTER_PORT")
# How long a rank waits at start for every other rank to check in (ember's; seconds).
TIMEOUT_ENV = "EMBER_DP_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 300.0
# A rank whose heartbeat has not moved for this long is dead (ember's; seconds).
DEAD_AFTER_ENV = "EMBER_DP_DEAD_AFTER_S"
DEFAULT_DEAD_AFTER_S = 10.0
_HEARTBEAT_S = 1.0
_POLL_S = 0.1
_STORE_OP_TIMEOUT_S = 30.0  # one store operation (set, add, check) on a live store
_GRACE_S = 2.0  # rank 0 keeps the store up this long after a failed check-in


class DataParallelError(RuntimeError):
    """Another data-parallel rank failed: it died, or the store that joins the ranks is gone."""


@dataclass(frozen=True, slots=True)
class DataParallelEnv:
    rank: int
    local_rank: int
    size: int
    master_ip: str
    master_port: int
    timeout_s: float
    dead_after_s: float


def _int_env(name: str, minimum: int) -> int:
    value = os.environ[name]
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {number}")
    return number


def _seconds_env(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {value!r}") from None
    if seconds <= 0:
        raise ValueError(f"{name} must be > 0 seconds, got {value!r}")
    return seconds


def data_parallel_env() -> DataParallelEnv | None:
    """The VLLM_DP_* settings of this process, or None when VLLM_DP_SIZE is unset or 1
    (vLLM reads them the same way). Raises ValueError naming a missing or bad variable."""
    if os.environ.get("VLLM_DP_SIZE") in (None, "", "1"):
        return None
    size = _int_env("VLLM_DP_SIZE", 1)
    missing = [name for name in DP_ENV if not os.environ.get(name)]
    if missing:
        raise ValueError(f"VLLM_DP_SIZE={size} also needs {', '.join(missing)} to be set")
    rank = _int_env("VLLM_DP_RANK", 0)
    if rank >= size:
        raise ValueError(f"VLLM_DP_RANK must be < VLLM_DP_SIZE ({size}), got {rank}")
    port = _int_env("VLLM_DP_MASTER_PORT", 1)
    if port > 65535:
        raise ValueError(f"VLLM_DP_MASTER_PORT must be a TCP port (1..65535), got {port}")
    local_rank = _int_env("VLLM_DP_RANK_LOCAL", 0) if os.environ.get("VLLM_DP_RANK_LOCAL") else rank
    return DataParallelEnv(
        rank=rank,
        local_rank=local_rank,
        size=size,
        master_ip=os.environ["VLLM_DP_MASTER_IP"],
        master_port=port,
        timeout_s=_seconds_env(TIMEOUT_ENV, DEFAULT_TIMEOUT_S),
        dead_after_s=_seconds_env(DEAD_AFTER_ENV, DEFAULT_DEAD_AFTER_S),
    )


class DataParallelRank:
    """This process's membership of the data-parallel group: checks in at construction,
    heartbeats until `leave()`, which waits for the other ranks."""

    def __init__(self, env: DataParallelEnv):
        self.env = env
        self._where = f"VLLM_DP_MASTER_IP:VLLM_DP_MASTER_PORT={env.master_ip}:{env.master_port}"
        self._store = self._connect(env.timeout_s)
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._left = False
        # called in `leave` once every rank is done, before this rank goes (lockstep: until its
        # engine has run the ranks' last step)
        self.before_leaving: Callable[[], object] | None = None
        try:
            self._check_in()
            heartbeat_store = self._connect(_STORE_OP_TIMEOUT_S, master=False)
            self._heartbeat = threading.Thread(
                target=self._beat, args=(heartbeat_store,), name="ember-dp-heartbeat", daemon=True
            )
            self._heartbeat.start()
        except BaseException:
            self._stop.set()
            self._store = None
            raise
        logger.info(
            "data-parallel rank %d of %d (local rank %d) joined at %s:%d",
            env.rank,
            env.size,
            env.local_rank,
            env.master_ip,
            env.master_port,
        )

    def _connect(self, timeout_s: float, master: bool | None = None) -> Any:
        from ember.workers.distributed import tcp_store

        env = self.env
        is_master = env.rank == 0 if master is None else master
        try:
            store = tcp_store(
                env.master_ip, env.master_port, is_master=is_master, timeout_s=timeout_s
            )
        except (RuntimeError, OSError) as exc:  # torch.distributed.DistError is a RuntimeError
            text = str(exc)
            if is_master:
                raise RuntimeError(
                    f"data-parallel rank 0 cannot host the rendezvous store at {self._where}: "
                    f"{text.splitlines()[0] if text else type(exc).__name__} (is the port in use? "
                    "choose a free VLLM_DP_MASTER_PORT)"
                ) from None
            raise TimeoutError(
                f"data-parallel rank {env.rank} could not reach rank 0's store at {self._where} "
                f"within {timeout_s:.0f} s ({TIMEOUT_ENV}): rank 0 never started, or "
                f"VLLM_DP_MASTER_IP / VLLM_DP_MASTER_PORT point elsewhere "
                f"({text.splitlines()[0] if text else type(exc).__name__})"
            ) from None
        store.set_timeout(timedelta(seconds=_STORE_OP_TIMEOUT_S))
        return store

    def _store_call(self, what: str, call: Any, *args: Any) -> Any:
        try:
            return call(*args)
        except (RuntimeError, OSError) as exc:
            raise DataParallelError(
                f"data-parallel rank {self.env.rank} lost the rendezvous store at {self._where} "
                f"while {what} (rank 0, which hosts it, died or stopped): {exc}"
            ) from None

    def _check_in(self) -> None:
        env, store = self.env, self._store
        self._store_call("checking in", store.set, f"size/{env.rank}", str(env.size))
        deadline = time.monotonic() + env.timeout_s
        waiting = set(range(env.size))
        while waiting:
            for rank in sorted(waiting):
                key = f"size/{rank}"
                if not self._store_call("checking in", store.check, [key]):
                    continue
                size = int(self._store_call("checking in", store.get, key))
                if size != env.size:
                    if env.rank == 0:  # keep the store up while the others read it too
                        time.sleep(_GRACE_S)
                    raise ValueError(
                        f"VLLM_DP_SIZE differs between data-parallel ranks: rank {rank} has "
                        f"VLLM_DP_SIZE={size}, rank {env.rank} has VLLM_DP_SIZE={env.size}"
                    )
                waiting.discard(rank)
            # A rank with a larger VLLM_DP_SIZE than ours may have checked in too.
            for rank in range(env.size, env.size + 8):
                key = f"size/{rank}"
                if self._store_call("checking in", store.check, [key]):
                    size = int(self._store_call("checking in", store.get, key))
                    if env.rank == 0:
                        time.sleep(_GRACE_S)
                    raise ValueError(
                        f"VLLM_DP_SIZE differs between data-parallel ranks: rank {rank} has "
                        f"VLLM_DP_SIZE={size}, rank {env.rank} has VLLM_DP_SIZE={env.size}"
                    )
            if not waiting:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"data-parallel rank(s) {sorted(waiting)} of VLLM_DP_SIZE={env.size} did "
                    f"not check in at {self._where} within {env.timeout_s:.0f} s "
                    f"(set {TIMEOUT_ENV} to wait longer)"
                )
            time.sleep(_POLL_S)

    def _beat(self, store: Any) -> None:
        key = f"alive/{self.env.rank}"
        while not self._stop.is_set():
            try:
                store.add(key, 1)
            except (RuntimeError, OSError):  # the store is gone: `leave` reports it
                return
            self._stop.wait(_HEARTBEAT_S)

    def abandon(self) -> None:
        """This rank will not reach shutdown (its engine failed to start): stop the heartbeat,
        so the other ranks report it dead at their shutdown rather than wait."""
        self._stop_heartbeat()
        self._left = True
        self._store = None

    def _stop_heartbeat(self) -> None:
        """Stop the heartbeat thread and wait for it: left running into the interpreter's exit
        inside a store call (which a dead rank 0 makes fail), the thread was killed there and
        the C++ runtime aborted the process ("terminate called without an active exception",
        exit status -6 instead of the DataParallelError's)."""
        self._stop.set()
        heartbeat = self._heartbeat
        if heartbeat is not None and heartbeat is not threading.current_thread():
            heartbeat.join(timeout=_STORE_OP_TIMEOUT_S)

    def leave(self) -> None:
        """Meet the other ranks at shutdown: returns once every rank has finished; raises
        DataParallelError when one died (its heartbeat stopped) or the store is gone."""
        if self._left or self._store is None:
            return
        self._left = True
        env, store = self.env, self._store
        try:
            self._store_call("leaving", store.set, f"done/{env.rank}", "1")
            self._wait_for("done")
            if self.before_leaving is not None:
                self.before_leaving()
            self._store_call("leaving", store.set, f"left/{env.rank}", "1")
            if env.rank == 0:  # keep the store up until every rank has seen every done key
                self._wait_for("left")
            logger.info("data-parallel rank %d: all %d ranks finished", env.rank, env.size)
        finally:
            self._stop_heartbeat()
            self._store = None

    def _wait_for(self, prefix: str) -> None:
        env, store = self.env, self._store
        waiting = set(range(env.size)) - {env.rank}
        last_beat: dict[int, tuple[int, float]] = {}
        while waiting:
            for rank in sorted(waiting):
                if self._store_call(
                    "waiting for the other ranks", store.check, [f"{prefix}/{rank}"]
                ):
                    waiting.discard(rank)
                    continue
                beats = self._store_call(
                    "waiting for the other ranks", store.add, f"alive/{rank}", 0
                )
                now = time.monotonic()
                previous = last_beat.get(rank)
                if previous is None or previous[0] != beats:
                    last_beat[rank] = (beats, now)
                elif now - previous[1] > env.dead_after_s:
                    raise DataParallelError(
                        f"data-parallel rank {rank} of {env.size} died: it stopped without "
                        f"reaching shutdown (no heartbeat for {env.dead_after_s:.0f} s, "
                        f"{DEAD_AFTER_ENV}); its outputs are lost"
                    )
            if waiting:
                time.sleep(_POLL_S)


def leave_at_exit(rank: DataParallelRank) -> None:
    """Have `rank` leave when the process ends, also in a `multiprocessing.Process` child (as
    vLLM's example starts ranks), which skips atexit: multiprocessing runs its own finalizers
    there, and at the exit of any other process too."""
    import multiprocessing.util

    multiprocessing.util.Finalize(None, leave_quietly, args=(rank,), exitpriority=0)


def leave_quietly(rank: DataParallelRank) -> None:
    """`leave` at garbage collection or process exit, where raising helps no one: a failure
    is logged (call `LLM.shutdown()` to have it raised)."""
    try:
        rank.leave()
    except Exception as exc:  # noqa: BLE001 - logged: nothing above us can handle it
        logger.error("%s", exc)


def check_data_parallel(
    data_parallel_size: Any, engine_address: str | None
) -> DataParallelEnv | None:
    """Check `LLM(data_parallel_size=...)` against the VLLM_DP_* environment; returns the
    environment's settings when this process is one rank of such a group."""
    if isinstance(data_parallel_size, bool) or not isinstance(data_parallel_size, int):
        raise TypeError(
            f"data_parallel_size must be an int, got {type(data_parallel_size).__name__}"
        )
    if data_parallel_size < 1:
        raise ValueError(f"data_parallel_size must be >= 1, got {data_parallel_size}")
    env = data_parallel_env()
    if engine_address is not None and (data_parallel_size > 1 or env is not None):
        raise NotImplementedError(
            "data parallelism with engine_address is not supported: attach one LLM per engine"
        )
    if env is not None and data_parallel_size > 1:
        raise ValueError(
            f"data_parallel_size={data_parallel_size} and VLLM_DP_SIZE={env.size} both ask "
            "for data parallelism: set one of them (VLLM_DP_SIZE makes this process one rank)"
        )
    return env


def num_experts(config: Any) -> int | None:
    """The routed experts of the model's MoE layers; None for a dense model."""
    from ember.workers.hf_config import HFConfig

    hf_config = HFConfig(config.model.hf_config) if config.model.hf_config else None
    text_config = getattr(hf_config, "text_config", None) or hf_config
    keys = ("num_local_experts", "num_experts", "n_routed_experts")
    return next((getattr(text_config, k) for k in keys if getattr(text_config, k, None)), None)


def with_lockstep(config: Any, env: DataParallelEnv) -> Any:
    """The engine config of this rank: a MoE model with `enable_expert_parallel=True` places
    its experts over every worker of every rank, which then step in lockstep
    (`enginecore/lockstep.py`); a dense model, or a MoE model without expert parallelism, runs
    on each rank as an independent replica (logged for MoE, where vLLM would shard the experts
    across the ranks)."""
    from ember.workers.config import LockstepConfig

    experts = num_experts(config)
    if not experts or env.size == 1:
        return config
    if not config.parallel.enable_expert_parallel:
        logger.warning(
            "VLLM_DP_* set on a MoE model (%s experts) without enable_expert_parallel: each "
            "rank runs the whole model as an independent replica",
            experts,
        )
        return config
    lockstep = LockstepConfig(env.rank, env.size, env.master_ip, env.master_port, env.timeout_s)
    logger.info(
        "MoE model (%s experts) with expert parallelism over %d data-parallel ranks: the ranks "
        "step in lockstep",
        experts,
        env.size,
    )
    return dataclasses.replace(
        config, parallel=dataclasses.replace(config.parallel, lockstep=lockstep)
    )


def wait_until_lockstep_idle(engine: Any) -> None:
    """Lockstep: return once this rank's engine is between waves. Called when every rank is
    done, so the ranks' last step has run and no rank waits on this one's collectives."""
    from ember.enginecore.exceptions import EngineDeadError

    try:
        counts = engine.call_utility("lockstep_idle", timeout_s=_STORE_OP_TIMEOUT_S * 2)
    except EngineDeadError:  # already reported to the calls that ran on it
        return
    logger.info(
        "lockstep data parallelism: this rank's engine ran %d steps, %d of them idle steps "
        "serving the other ranks' experts",
        counts["steps"],
        counts["idle_steps"],
    )


def start_engine(config: Any, data_parallel_size: int, env: DataParallelEnv | None) -> Any:
    """The engine client `LLM` talks to: one engine core, or `data_parallel_size` replicas
    (`ember.dp_client`); a VLLM_DP_* rank on CUDA gets its slice of the visible GPUs."""
    from ember.core_client import EngineCoreClient
    from ember.dp_client import DPEngineCoreClient, replica_env

    if data_parallel_size > 1:
        return DPEngineCoreClient(config, data_parallel_size)
    child_env = None if env is None else replica_env(config, env.local_rank, sliced_by_user=True)
    return EngineCoreClient(config, env=child_env)
