"""Calls the engine core broadcasts to every worker, and each worker's reply (msgspec, tagged).

Defined here, the lowest layer using them; `ember.enginecore.multiproc_executor` sends calls and
reads replies, `ember.workers.worker_process` answers them.
"""

from __future__ import annotations

import msgspec

from ember.workers.scheduler_output import ModelRunnerOutput, SchedulerOutput


class _Call(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class DetermineNumKVBlocks(_Call, tag="blocks"):
    pass


class InitializeKVCache(_Call, tag="init_kv"):
    num_blocks: int


class ExecuteModel(_Call, tag="step"):
    scheduler_output: SchedulerOutput


class Shutdown(_Call, tag="shutdown"):
    pass


class StartProfile(_Call, tag="start_profile"):
    profile_dir: str


class StopProfile(_Call, tag="stop_profile"):
    pass


WorkerCall = (
    DetermineNumKVBlocks | InitializeKVCache | ExecuteModel | Shutdown | StartProfile | StopProfile
)


class WorkerReply(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """`error` holds "ExceptionType: message" when the call failed on this rank."""

    rank: int
    num_blocks: int | None = None
    runner_output: ModelRunnerOutput | None = None
    trace_path: str | None = None
    error: str | None = None
    error_type: str | None = None


call_encoder = msgspec.msgpack.Encoder()
call_decoder = msgspec.msgpack.Decoder(WorkerCall)
reply_encoder = msgspec.msgpack.Encoder()
reply_decoder = msgspec.msgpack.Decoder(WorkerReply)
