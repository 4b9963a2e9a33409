"""Drives one worker process per tensor-parallel rank over the shared-memory broadcast queue.

    engine core ──MessageQueue(N readers)──▶ worker 0 .. worker N-1
                ◀──MessageQueue(1 reader)─── worker r   (one reply queue per worker)

Workers are started with `subprocess` (`python -m ember.workers`); each prints its reply
queue's handle on stdout. With several ranks, the workers form their `torch.distributed` group
through a file store in a directory private to this executor (removed once they have met), so
engines on one machine never share a port.

Faults: while it waits for replies the executor polls every worker; one that died makes the
call raise `EngineDeadError` at once, and a step that no rank answers within
`execute_model_timeout_s` (a rank stopped, or stuck in a collective) raises it too, naming the
ranks. The engine core then shuts the executor down, which kills what is left.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import msgspec
import psutil

from ember.enginecore.exceptions import EngineDeadError, EngineStartupError
from ember.enginecore.executor import Executor
from ember.workers.config import EngineConfig
from ember.workers.rpc import (
    CollectiveRPC,
    DetermineNumKVBlocks,
    ExecuteModel,
    FunctionRef,
    InitializeKVCache,
    LockstepIdleStep,
    Shutdown,
    Sleep,
    StartProfile,
    StopProfile,
    WakeUp,
    WorkerCall,
    WorkerReply,
    call_encoder,
    reply_decoder,
)
from ember.workers.scheduler_output import ModelRunnerOutput, SchedulerOutput
from ember.workers.shm_broadcast import MessageQueue, QueueHandle

logger = logging.getLogger(__name__)

_POLL_S = 0.5
_STARTUP_TIMEOUT_S = 600.0
_SHUTDOWN_TIMEOUT_S = 5.0
# The engine core's next call follows a reply at once; spinning longer would take CPU from
# the model's threads on small machines.
_BROADCAST_SPIN_S = 0.0005
# Steps that took longer than this are waited for without the spin (see `execute_model`).
_STEP_SPIN_LIMIT_S = 0.001


class MultiprocExecutor(Executor):
    def __init__(self, config: EngineConfig):
        super().__init__(config)
        self.world_size = config.parallel.tensor_parallel_size
        self.workers: list[subprocess.Popen] = []
        self.reply_queues: list[MessageQueue] = []
        self.execute_timeout_s = config.parallel.execute_model_timeout_s
        self._last_step_s = 0.0  # how long the last synchronous step took, reply included
        self._faulted = False  # a rank died or stopped: shutdown kills instead of waiting
        # Per rank, replies still owed for collective_rpc calls that timed out: dropped when
        # they come, so that every later call reads its own reply.
        self._stale_replies = [0] * self.world_size
        self._private_dir = tempfile.mkdtemp(prefix="ember-workers-")
        # The rank group's file store: kept until every rank has joined (the config directory
        # above goes as soon as the workers have read it).
        self._rendezvous_dir = tempfile.mkdtemp(prefix=f"ember-{os.getpid()}-rendezvous-")
        self.broadcast = MessageQueue(
            self.world_size, chunk_bytes=1 << 20, num_chunks=8, spin_s=_BROADCAST_SPIN_S
        )
        try:
            self._start_workers()
        except BaseException:
            self.shutdown()
            raise

    def _start_workers(self) -> None:
        config_path = os.path.join(self._private_dir, "config.json")
        with open(config_path, "wb") as f:
            f.write(msgspec.json.encode(self.config))
        handle = msgspec.json.encode(self.broadcast.export_handle()).decode()
        for rank in range(self.world_size):
            command = [
                sys.executable,
                "-m",
                "ember.workers",
                "--config",
                config_path,
                "--broadcast-handle",
                handle,
                "--rank",
                str(rank),
            ]
            if self.world_size > 1:
                rendezvous = os.path.join(self._rendezvous_dir, "store")
                command += ["--rendezvous", f"file://{rendezvous}"]
            self.workers.append(
                subprocess.Popen(
                    command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True
                )
            )
        for rank, process in enumerate(self.workers):
            line = process.stdout.readline()
            if not line:
                raise EngineStartupError(
                    f"worker {rank} exited during startup (exit code {process.wait()})"
                )
            reply_handle = msgspec.json.decode(line, type=QueueHandle)
            self.reply_queues.append(MessageQueue.attach(reply_handle, reader_rank=0))
        # Every worker has read its config (it prints its handle after): nothing stays on disk,
        # even if this process is killed later.
        _remove_dir(self._private_dir)
        self.broadcast.wait_until_ready(timeout_s=60)
        # Each worker says it is ready once its model is loaded.
        for reply in self._collect(timeout_s=_STARTUP_TIMEOUT_S, what="startup"):
            if reply.error is not None:
                raise _rebuild_error(reply)
        shutil.rmtree(self._rendezvous_dir, ignore_errors=True)  # every rank has joined

    def _collect(
        self,
        timeout_s: float | None = None,
        what: str = "call",
        fatal_timeout: bool = True,
        spin_s: float | None = None,
    ) -> list[WorkerReply]:
        """One reply from every rank, watching that every worker stays alive. Past `timeout_s`
        the engine is dead, or with `fatal_timeout=False` the call alone fails (TimeoutError)
        and the late replies are dropped when they come."""
        replies: list[WorkerReply | None] = [None] * len(self.reply_queues)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            for rank, queue in enumerate(self.reply_queues):
                if replies[rank] is None:
                    try:
                        reply = reply_decoder.decode(queue.dequeue(_POLL_S, spin_s))
                    except (TimeoutError, EOFError):
                        continue
                    if self._stale_replies[rank]:
                        self._stale_replies[rank] -= 1
                    else:
                        replies[rank] = reply
            if all(reply is not None for reply in replies):
                return replies
            self.check_health()
            if deadline is not None and time.monotonic() > deadline:
                missing = [rank for rank, reply in enumerate(replies) if reply is None]
                if not fatal_timeout:
                    for rank in missing:
                        self._stale_replies[rank] += 1
                    raise TimeoutError(
                        f"worker rank(s) {missing} did not answer {what} within "
                        f"timeout={timeout_s:g} s"
                    )
                self._faulted = True
                raise EngineDeadError(
                    f"worker rank(s) {missing} did not answer {what} within {timeout_s:g} s "
                    f"({self._describe(missing)}); the engine stops"
                )

    def _describe(self, ranks: list[int]) -> str:
        """What the workers of `ranks` are doing, as the OS sees them (e.g. 'rank 1: stopped')."""
        states = []
        for rank in ranks:
            try:
                states.append(f"rank {rank}: {psutil.Process(self.workers[rank].pid).status()}")
            except psutil.Error:
                states.append(f"rank {rank}: gone")
        return ", ".join(states)

    def _check_alive(self, rank: int) -> None:
        code = self.workers[rank].poll()
        if code is not None:
            self._faulted = True
            raise EngineDeadError(f"worker {rank} died (exit code {code})")

    def check_health(self) -> None:
        for rank in range(len(self.workers)):
            self._check_alive(rank)

    def _call(
        self, call: WorkerCall, timeout_s: float | None = None, spin_s: float | None = None
    ) -> list[WorkerReply]:
        self.broadcast.enqueue(call_encoder.encode(call))
        return self._replies(timeout_s, type(call).__name__, spin_s)

    def _replies(
        self, timeout_s: float | None, what: str, spin_s: float | None
    ) -> list[WorkerReply]:
        """Every rank's reply to the call made last; a rank's error raised as its own type."""
        replies = self._collect(timeout_s, what, spin_s=spin_s)
        for reply in replies:
            if reply.error is not None:
                raise _rebuild_error(reply)
        return replies

    def determine_num_kv_blocks(self) -> int:
        return min(reply.num_blocks for reply in self._call(DetermineNumKVBlocks()))

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self._call(InitializeKVCache(num_blocks))

    def execute_model(
        self, scheduler_output: SchedulerOutput, lockstep_wave: int = 0
    ) -> ModelRunnerOutput:
        started = time.perf_counter()
        # A reply spin only pays when steps end within it; past that it takes a core from the
        # model's threads for nothing (on a small CPU, a tenth of a 5 ms step).
        spin_s = None if self._last_step_s < _STEP_SPIN_LIMIT_S else 0.0
        call = ExecuteModel(scheduler_output, lockstep_wave)
        replies = self._call(call, self.execute_timeout_s, spin_s)
        self._last_step_s = time.perf_counter() - started
        return replies[0].runner_output

    def submit_model(self, scheduler_output: SchedulerOutput) -> None:
        self.broadcast.enqueue(call_encoder.encode(ExecuteModel(scheduler_output)))

    def await_model(self) -> ModelRunnerOutput:
        # The workers have the next step already: a late wake-up here costs them nothing,
        # while a spin would take a core from them for the whole step.
        return self._replies(self.execute_timeout_s, "ExecuteModel", 0.0)[0].runner_output

    def idle_step(self, wave: int, busy: bool = False) -> tuple[bool, int]:
        call = LockstepIdleStep(wave, busy)
        any_busy, largest = self._call(call, self.execute_timeout_s)[0].result
        return bool(any_busy), int(largest)

    def start_profile(self, profile_dir: str, prefix: str = "") -> None:
        self._call(StartProfile(profile_dir, prefix))

    def stop_profile(self) -> list[str]:
        return [reply.trace_path for reply in self._call(StopProfile())]

    def collective_rpc(
        self,
        method: str | FunctionRef,
        timeout_s: float | None,
        args: list,
        kwargs: dict[str, Any],
    ) -> list[Any]:
        self.broadcast.enqueue(call_encoder.encode(CollectiveRPC(method, args, kwargs)))
        name = method if isinstance(method, str) else f"{method.module}.{method.qualname}"
        replies = self._collect(timeout_s, f"collective_rpc({name!r})", fatal_timeout=False)
        for reply in replies:
            if reply.error is not None:
                raise _rebuild_error(reply)
        return [reply.result for reply in replies]

    def sleep(self, level: int) -> None:
        self._call(Sleep(level))

    def wake_up(self, tags: list[str]) -> None:
        self._call(WakeUp(tags))

    def shutdown(self) -> None:
        if getattr(self, "_shut_down", False):
            return
        self._shut_down = True
        if self._faulted:
            # A rank died or stopped: the others may be stuck in a collective with it and
            # would never read Shutdown. Nothing of theirs is worth waiting for.
            for process in self.workers:
                process.kill()
        alive = [p for p in self.workers if p.poll() is None]
        if alive and self.reply_queues:
            try:
                self.broadcast.enqueue(call_encoder.encode(Shutdown()), timeout_s=1.0)
            except (TimeoutError, OSError, RuntimeError):
                pass
        for process in self.workers:
            if process.stdin:
                process.stdin.close()
        deadline = time.monotonic() + _SHUTDOWN_TIMEOUT_S
        for process in self.workers:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stdout:
                process.stdout.close()
        for queue in self.reply_queues:
            queue.close()
        self.broadcast.close()
        _remove_dir(self._private_dir)
        shutil.rmtree(self._rendezvous_dir, ignore_errors=True)


_KNOWN_ERRORS = {
    cls.__name__: cls
    for cls in (
        ValueError,
        TypeError,
        FileNotFoundError,
        NotImplementedError,
        MemoryError,
        AttributeError,
    )
}


def _rebuild_error(reply: WorkerReply) -> Exception:
    """The worker's exception as the same builtin type where it is a plain one."""
    error_class = _KNOWN_ERRORS.get(reply.error_type or "", RuntimeError)
    message = (
        reply.error
        if error_class is not RuntimeError
        else (f"worker {reply.rank}: {reply.error_type}: {reply.error}")
    )
    return error_class(message)


def _remove_dir(path: str) -> None:
    try:
        for name in os.listdir(path):
            os.unlink(os.path.join(path, name))
        os.rmdir(path)
    except FileNotFoundError:
        pass
