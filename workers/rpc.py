"""Calls the engine core broadcasts to every worker, and each worker's reply (msgspec, tagged).

Defined here, the lowest layer using them; `ember.enginecore.multiproc_executor` sends calls and
reads replies, `ember.workers.worker_process` answers them. Functions and classes travel as
`FunctionRef`s (`reference_to` / `resolve_reference`), never pickled.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from typing import Any

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
    lockstep_wave: int = 0  # the engine core's wave number (lockstep data parallelism only)


class LockstepIdleStep(_Call, tag="idle_step"):
    """A lockstep data-parallel rank's step that runs none of its own tokens
    (`Worker.idle_step`); `busy`: it still has requests (waiting for a grammar)."""

    wave: int
    busy: bool = False


class Shutdown(_Call, tag="shutdown"):
    pass


class StartProfile(_Call, tag="start_profile"):
    profile_dir: str
    prefix: str = ""  # vLLM's profile_prefix: the trace file is "<prefix>_ember-worker-<rank>"


class StopProfile(_Call, tag="stop_profile"):
    pass


class FunctionRef(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """A function sent by reference, as pickle sends one (never pickled): the worker imports
    `module` (adding `path`, the directory it was found under, to the end of `sys.path` when
    missing) and looks `qualname` up in it. `on_model`: called with the model (`apply_model`)
    rather than with the worker (`collective_rpc`)."""

    module: str
    qualname: str
    path: str | None = None
    on_model: bool = False


def reference_to(obj: Any, argument: str, kind: str = "function") -> FunctionRef:
    """`obj` (a function or class at the top level of an importable module, or a static
    method of a class there) as a reference another process can import. Lambdas, closures,
    bound methods and what the `__main__` script defines cannot be found by name there: a
    TypeError naming `argument`."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    found: Any = sys.modules.get(module or "")
    for name in (qualname or "").split("."):
        found = getattr(found, name, None)
    bound_to = getattr(obj, "__self__", None)
    if (
        not module
        or not qualname
        or module == "__main__"
        or "<" in qualname
        or (bound_to is not None and not isinstance(bound_to, (type, types.ModuleType)))
        or found != obj
    ):
        raise TypeError(
            f"{argument}: {obj!r} cannot be sent to the workers. ember sends a {kind} by "
            "reference (its module and name, as pickle does), so define it at the top level "
            "of an importable module (not in the __main__ script, nor as a lambda or inside "
            "a function)"
        )
    return FunctionRef(module, qualname, _import_root(module))


def _import_root(module: str) -> str | None:
    """The sys.path entry `module` was found under, so that the workers find it too."""
    file = getattr(sys.modules[module], "__file__", None)
    if file is None:
        return None
    root = os.path.dirname(os.path.abspath(file))
    if os.path.basename(file).startswith("__init__."):
        root = os.path.dirname(root)
    for _ in range(module.count(".")):
        root = os.path.dirname(root)
    return root


def resolve_reference(ref: FunctionRef) -> Any:
    """What `ref` names, imported as pickle would import it (its directory appended to
    `sys.path` when missing)."""
    if ref.path and ref.path not in sys.path:
        sys.path.append(ref.path)
    found: Any = importlib.import_module(ref.module)
    for name in ref.qualname.split("."):
        found = getattr(found, name)
    return found


class CollectiveRPC(_Call, tag="rpc"):
    """`LLM.collective_rpc`: a public method of `Worker` by name, or a function by reference,
    run on every rank with these arguments; each rank answers with its result."""

    method: str | FunctionRef
    args: list = []
    kwargs: dict[str, Any] = {}


class Sleep(_Call, tag="sleep"):
    level: int  # 1: drop the KV cache (and on a GPU move the weights to host); 2: drop both


class WakeUp(_Call, tag="wake_up"):
    tags: list[str]  # what to bring back: "weights", "kv_cache"


WorkerCall = (
    DetermineNumKVBlocks
    | InitializeKVCache
    | ExecuteModel
    | LockstepIdleStep
    | Shutdown
    | StartProfile
    | StopProfile
    | CollectiveRPC
    | Sleep
    | WakeUp
)


class WorkerReply(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """`error` holds "ExceptionType: message" when the call failed on this rank."""

    rank: int
    num_blocks: int | None = None
    runner_output: ModelRunnerOutput | None = None
    trace_path: str | None = None
    result: Any = None  # a CollectiveRPC's result (plain data)
    error: str | None = None
    error_type: str | None = None


call_encoder = msgspec.msgpack.Encoder()
call_decoder = msgspec.msgpack.Decoder(WorkerCall)
reply_encoder = msgspec.msgpack.Encoder()
reply_decoder = msgspec.msgpack.Decoder(WorkerReply)
