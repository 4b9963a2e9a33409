"""The worker process (`python -m ember.workers`): one tensor-parallel rank driven by the
engine core over the shared-memory broadcast queue.

Startup: read the EngineConfig and the broadcast queue's handle (JSON lines on argv files),
create this rank's reply queue, print its handle as one JSON line on stdout, build the Worker,
then answer calls until `Shutdown`, the queue closes, or the engine core goes away.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

import msgspec

from ember.workers.config import EngineConfig
from ember.workers.parent_watch import set_process_name, watch_parent
from ember.workers.rpc import (
    CollectiveRPC,
    DetermineNumKVBlocks,
    ExecuteModel,
    InitializeKVCache,
    LockstepIdleStep,
    Shutdown,
    Sleep,
    StartProfile,
    StopProfile,
    WakeUp,
    WorkerCall,
    WorkerReply,
    call_decoder,
    reply_encoder,
)
from ember.workers.shm_broadcast import MessageQueue, QueueHandle

logger = logging.getLogger("ember.worker")

_POLL_S = 1.0
# A waiting worker spins this long after a message before it blocks: the engine core's next
# call follows a reply within microseconds, while a longer spin would take CPU from the model.
_SPIN_S = 0.0005


def _freeze_heap() -> None:
    from ember.workers.worker import freeze_heap  # loaded with the worker (and torch) by now

    freeze_heap()


def _answer(worker, call: WorkerCall, rank: int) -> WorkerReply:
    if isinstance(call, ExecuteModel):
        output = worker.execute_model(call.scheduler_output, call.lockstep_wave)
        return WorkerReply(rank=rank, runner_output=output if rank == 0 else None)
    if isinstance(call, LockstepIdleStep):
        return WorkerReply(rank=rank, result=list(worker.idle_step(call.wave, call.busy)))
    if isinstance(call, DetermineNumKVBlocks):
        return WorkerReply(rank=rank, num_blocks=worker.num_available_kv_blocks())
    if isinstance(call, InitializeKVCache):
        worker.initialize_kv_cache(call.num_blocks)
        _freeze_heap()  # the startup's last call: what exists now lives as long as the process
        return WorkerReply(rank=rank)
    if isinstance(call, StartProfile):
        worker.start_profile(call.profile_dir, call.prefix)
        return WorkerReply(rank=rank)
    if isinstance(call, StopProfile):
        return WorkerReply(rank=rank, trace_path=worker.stop_profile())
    if isinstance(call, CollectiveRPC):
        result = worker.call(call.method, call.args, call.kwargs)
        try:
            reply_encoder.encode(result)
        except TypeError as exc:
            method = call.method
            name = method if isinstance(method, str) else f"{method.module}.{method.qualname}"
            raise TypeError(
                f"the result of {name} on rank {rank} cannot be sent back ({exc}): return plain "
                "data (numbers, strings, lists, dicts; e.g. tensor.tolist())"
            ) from None
        return WorkerReply(rank=rank, result=result)
    if isinstance(call, Sleep):
        worker.sleep(call.level)
        return WorkerReply(rank=rank)
    if isinstance(call, WakeUp):
        worker.wake_up(call.tags)
        _freeze_heap()  # the weights and cache loaded again
        return WorkerReply(rank=rank)
    raise TypeError(f"unknown worker call {type(call).__name__}")


def run_worker(
    config: EngineConfig, broadcast_handle: QueueHandle, rank: int, rendezvous: str | None = None
) -> None:
    stop = threading.Event()
    watch_parent(stop.set)
    broadcast = MessageQueue.attach(broadcast_handle, reader_rank=rank)
    replies = MessageQueue(1, chunk_bytes=1 << 20, num_chunks=4, spin_s=_SPIN_S)
    sys.stdout.write(msgspec.json.encode(replies.export_handle()).decode() + "\n")
    sys.stdout.flush()
    replies.wait_until_ready(timeout_s=60)
    from ember.workers.worker import Worker  # torch loads here, after the handshake is out

    worker = None
    try:
        worker = Worker(config, rank, rendezvous)
        replies.enqueue(reply_encoder.encode(WorkerReply(rank=rank)))  # ready
    except Exception as exc:
        logger.exception("worker %d failed to start", rank)
        replies.enqueue(reply_encoder.encode(_error_reply(rank, exc)))
    try:
        while worker is not None and not stop.is_set():
            try:
                payload = broadcast.dequeue(timeout_s=_POLL_S)
            except TimeoutError:
                continue
            except EOFError:
                break
            try:
                call = call_decoder.decode(payload)
            except msgspec.DecodeError as exc:  # answered, so the engine core never waits
                logger.warning("worker %d got a malformed call: %s", rank, exc)
                replies.enqueue(reply_encoder.encode(_error_reply(rank, exc)))
                continue
            if isinstance(call, Shutdown):
                break
            try:
                reply = _answer(worker, call, rank)
            except Exception as exc:
                logger.exception("worker %d failed in %s", rank, type(call).__name__)
                reply = _error_reply(rank, exc)
            replies.enqueue(reply_encoder.encode(reply))
            if reply.error is not None and _ends_lockstep(worker, call):
                # The other data-parallel ranks' workers wait in this step's collectives:
                # leaving closes this rank's connections, so that they fail now rather than
                # at the collectives' timeout (the engine is dead either way).
                logger.error("worker %d leaves the lockstep world after the failed step", rank)
                break
    finally:
        replies.close()
        broadcast.close()
        if worker is not None:
            worker.shutdown()


def _ends_lockstep(worker, call: WorkerCall) -> bool:
    """Whether a failure of `call` ends a lockstep data-parallel rank's worker."""
    steps = (ExecuteModel, LockstepIdleStep)
    return isinstance(call, steps) and worker.parallel.lockstep is not None


def _error_reply(rank: int, exc: BaseException) -> WorkerReply:
    return WorkerReply(rank=rank, error=str(exc), error_type=type(exc).__name__)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m ember.workers")
    parser.add_argument("--config", required=True, help="EngineConfig as a JSON file")
    parser.add_argument("--broadcast-handle", required=True, help="QueueHandle as JSON")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument(
        "--rendezvous", default=None, help="where the ranks meet (file:// store), TP > 1 only"
    )
    args = parser.parse_args()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the user's process
    set_process_name(f"ember-worker-{args.rank}")
    logging.basicConfig(
        level=os.environ.get("EMBER_LOG_LEVEL", "INFO"),
        format=f"%(levelname)s %(asctime)s [worker {args.rank}] %(message)s",
        datefmt="%H:%M:%S",
    )
    with open(args.config, "rb") as f:
        config = msgspec.json.decode(f.read(), type=EngineConfig)
    handle = msgspec.json.decode(args.broadcast_handle.encode(), type=QueueHandle)
    run_worker(config, handle, args.rank, args.rendezvous)


if __name__ == "__main__":
    main()
