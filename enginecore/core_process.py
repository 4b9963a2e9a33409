"""The engine-core process (`python -m ember.enginecore`): ZeroMQ I/O on two threads around a
busy loop that drains inputs, steps the `EngineCore`, and sends outputs.

    clients' DEALERs ──▶ input ROUTER ── input thread ──▶ input queue ──▶ busy loop
    clients' DEALERs ◀── output ROUTER ◀─ output thread ◀─ output queue ◀─┘

Each client connects a DEALER to both sockets under one identity; outputs of a request go to the
client that sent it, so several frontends can share one engine. A client that stops sending
(PING while it waits) for `CLIENT_TIMEOUT_S` has its requests aborted. With a token, only clients
whose HELLO carried it are served. Frames that do not decode are logged and dropped.

Started two ways: by a frontend (`--config`, private ipc:// addresses; the engine stops when its
stdin reaches EOF), or standalone (`--model ... --listen ADDR`, serves until SIGTERM).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import queue
import secrets
import signal
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import Future

import msgspec
import zmq

from ember.enginecore import lockstep
from ember.enginecore.addresses import is_loopback, socket_addresses
from ember.enginecore.engine_core import EngineCore
from ember.enginecore.exceptions import EngineDeadError
from ember.enginecore.lockstep import LockstepWaves
from ember.enginecore.messages import (
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreReadyInfo,
    EngineCoreRequest,
    EngineError,
    FinishReason,
    Hello,
    MessageType,
    UtilityOutput,
    UtilityRequest,
)
from ember.enginecore.multiproc_executor import MultiprocExecutor
from ember.enginecore.pooling_config import pooling_ready_info
from ember.enginecore.profiling import ProfileSession
from ember.enginecore.request_validation import request_problem
from ember.enginecore.stats import scheduler_stats
from ember.enginecore.step_trace import StepTrace
from ember.enginecore.tensor_frames import split_tensor_frames
from ember.workers.config import EngineConfig
from ember.workers.hf_config import HFConfig
from ember.workers.lora_request import lora_module_shapes
from ember.workers.parent_watch import set_process_name, watch_parent
from ember.workers.rpc import FunctionRef

logger = logging.getLogger("ember.enginecore")

_IDLE_POLL_S = 0.5
_STARTUP_ERROR_GRACE_S = 5.0
CLIENT_TIMEOUT_S = 10.0
_STOP = object()  # an input-queue item that wakes the busy loop to stop


def _lora_module_shapes(config: EngineConfig) -> dict[str, list[int]]:
    """With LoRA on, the shapes of the modules an adapter may target (for the frontend's check);
    {} without LoRA or without a config snapshot (the workers check every adapter anyway)."""
    if config.lora is None or not config.model.hf_config:
        return {}
    return lora_module_shapes(HFConfig(config.model.hf_config))


class EngineCoreProc:
    def __init__(
        self,
        config: EngineConfig,
        input_address: str,
        output_address: str,
        token: str | None = None,
        client_timeout_s: float = CLIENT_TIMEOUT_S,
        allow_functions: bool = False,
    ):
        self.config = config
        self.token = token
        self.client_timeout_s = client_timeout_s
        # Whether collective_rpc may run a function by reference (import a module and call
        # a function of it): only for the frontend that started this engine core, never for
        # clients of a standalone one, which may be other users.
        self.allow_functions = allow_functions
        self.profile: ProfileSession | None = None
        self.context = zmq.Context(io_threads=1)
        self.input_socket = self.context.socket(zmq.ROUTER)
        self.input_socket.bind(input_address)
        self.output_socket = self.context.socket(zmq.ROUTER)
        self.output_socket.setsockopt(zmq.LINGER, 1000)
        self.output_socket.bind(output_address)
        self.input_queue: queue.Queue = queue.Queue()
        self.output_queue: queue.Queue = queue.Queue()
        self.stop_event = threading.Event()
        self.request_client: dict[str, bytes] = {}
        self.client_requests: dict[bytes, set[str]] = defaultdict(set)
        self.client_last_seen: dict[bytes, float] = {}
        self.authenticated: set[bytes] = set()
        self.engine_core: EngineCore | None = None
        # lockstep data parallelism (`enginecore/lockstep.py`); None for any other engine
        self.lockstep: LockstepWaves | None = None
        self._idle_waiters: list[Future] = []  # `utility_lockstep_idle` calls to answer
        self._next_health_check = 0.0
        self.trace = StepTrace()
        self.decoders = {
            MessageType.HELLO: msgspec.msgpack.Decoder(Hello),
            MessageType.ADD: msgspec.msgpack.Decoder(list[EngineCoreRequest]),
            MessageType.ABORT: msgspec.msgpack.Decoder(list[str]),
            MessageType.UTILITY: msgspec.msgpack.Decoder(UtilityRequest),
        }
        self.encoder = msgspec.msgpack.Encoder()

    # ---- threads -----------------------------------------------------------------------

    def stop(self) -> None:
        self.stop_event.set()
        self.input_queue.put(_STOP)

    def _input_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.input_socket, zmq.POLLIN)
        while not self.stop_event.is_set():
            if not poller.poll(timeout=int(_IDLE_POLL_S * 1000)):
                continue
            frames = self.input_socket.recv_multipart(copy=False)
            try:
                self.input_queue.put(self._decode(frames))
            except Exception as exc:  # noqa: BLE001 (a malformed frame must not kill the engine)
                logger.warning("dropped a malformed message (%d frames): %s", len(frames), exc)

    def _decode(self, frames: list[zmq.Frame]) -> tuple[bytes, bytes, object]:
        if len(frames) < 2:
            raise ValueError("expected [identity, type, payload...]")
        identity, message_type = frames[0].bytes, frames[1].bytes
        if message_type == MessageType.PING:
            return identity, message_type, None
        if message_type == MessageType.HELLO and len(frames) == 2:
            return identity, message_type, Hello()
        if message_type not in self.decoders or len(frames) < 3:
            raise ValueError(f"unknown message type {message_type[:16]!r}")
        return identity, message_type, self.decoders[message_type].decode(frames[2].buffer)

    def _output_loop(self) -> None:
        while True:
            item = self.output_queue.get()
            if item is _STOP:
                return
            identity, message_type, payload = item
            frames: list[bytes] = []
            if message_type == MessageType.OUTPUTS:  # pooled tensors go as raw frames
                payload, frames = split_tensor_frames(payload)
            try:
                self.output_socket.send_multipart(
                    [identity, message_type, self.encoder.encode(payload), *frames], copy=False
                )
            except zmq.ZMQError as exc:
                logger.warning("could not send to a client: %s", exc)

    def _send(self, identity: bytes, message_type: bytes, payload: object) -> None:
        self.output_queue.put((identity, message_type, payload))

    # ---- busy loop ---------------------------------------------------------------------

    def start_engine(self) -> bool:
        """Build the engine core (workers, KV cache); on failure tell the client why."""
        try:
            self.engine_core = EngineCore(self.config, MultiprocExecutor)
            if self.config.parallel.lockstep is not None:
                self.lockstep = LockstepWaves(self.config.parallel.lockstep)
                self.lockstep.meet()
            return True
        except Exception as exc:  # noqa: BLE001 (reported to the client, then exit)
            logger.error("engine core failed to start: %s: %s", type(exc).__name__, exc)
            self._report_startup_error(exc)
            return False

    def run(self, on_ready=None) -> None:
        input_thread = threading.Thread(target=self._input_loop, name="input", daemon=True)
        output_thread = threading.Thread(target=self._output_loop, name="output", daemon=True)
        input_thread.start()
        output_thread.start()
        try:
            if self.start_engine():
                if on_ready is not None:
                    on_ready(self)
                self._busy_loop()
        finally:
            self._abort_everything("the engine core is shutting down")
            if self.engine_core is not None:
                self.engine_core.shutdown()
            self.output_queue.put(_STOP)
            output_thread.join(timeout=5)
            self.stop_event.set()
            input_thread.join(timeout=5)
            self.context.destroy(linger=1000)

    def _report_startup_error(self, exc: Exception) -> None:
        """Answer the handshake with the error, so the user's process can raise it."""
        error = EngineError(type(exc).__name__, str(exc))
        try:
            while True:
                item = self.input_queue.get(timeout=_STARTUP_ERROR_GRACE_S)
                if item is _STOP:
                    return
                identity, message_type, _ = item
                if message_type == MessageType.HELLO:
                    self._send(identity, MessageType.STARTUP_ERROR, error)
                    return
        except queue.Empty:
            return

    def _busy_loop(self) -> None:
        core = self.engine_core
        next_client_check = time.monotonic() + _IDLE_POLL_S
        while not self.stop_event.is_set():
            try:
                if self.lockstep is not None:
                    self._lockstep_iteration()
                    continue
                if not core.has_unfinished_requests():
                    try:
                        item = self.input_queue.get(timeout=_IDLE_POLL_S)
                    except queue.Empty:
                        core.executor.check_health()
                        continue
                    self._handle_input(item)
                while not self.input_queue.empty():
                    self._handle_input(self.input_queue.get_nowait())
                if time.monotonic() >= next_client_check:
                    self._drop_silent_clients()
                    next_client_check = time.monotonic() + _IDLE_POLL_S
                if core.has_unfinished_requests():
                    with self.trace.span("step"):
                        outputs = core.step()
                    with self.trace.span("emit"):
                        self._emit(outputs)
                    if self.profile is not None:
                        self._emit(core.drain())  # the profiler's calls need idle workers
                        self.profile.step_done()
            except Exception as exc:  # every client is told, then the engine stops
                if isinstance(exc, EngineDeadError):
                    logger.error("engine is dead: %s", exc)
                else:
                    logger.exception("engine core failed")
                dead = EngineError("EngineDeadError", f"{type(exc).__name__}: {exc}")
                for identity in list(self.client_last_seen):
                    self._send(identity, MessageType.ENGINE_DEAD, dead)
                self.request_client.clear()
                return

    def _lockstep_iteration(self) -> None:
        """One pass of the busy loop of a lockstep data-parallel rank (`enginecore/lockstep.py`):
        take the input; step while a wave is on (this rank's tokens, or an idle step for the
        others'); otherwise wait a poll interval for input or another rank's wave."""
        core, waves = self.engine_core, self.lockstep
        while not self.input_queue.empty():
            self._handle_input(self.input_queue.get_nowait())
        waves.begin(core.has_unfinished_requests())
        if not waves.active:
            self._answer_idle_waiters()
            try:
                self._handle_input(self.input_queue.get(timeout=lockstep.POLL_S))
            except queue.Empty:
                if time.monotonic() >= self._next_health_check:
                    core.executor.check_health()
                    self._drop_silent_clients()
                    self._next_health_check = time.monotonic() + _IDLE_POLL_S
            return
        with self.trace.span("step"):
            ran_tokens = core.has_unfinished_requests()
            outputs, any_busy, largest_wave = core.lockstep_step(waves.wave)
        waves.end_step(any_busy, largest_wave, ran_tokens)
        with self.trace.span("emit"):
            self._emit(outputs)
        if self.profile is not None:
            self.profile.step_done()
        if time.monotonic() >= self._next_health_check:
            self._drop_silent_clients()
            self._next_health_check = time.monotonic() + _IDLE_POLL_S

    def _answer_idle_waiters(self) -> None:
        waiters, self._idle_waiters = self._idle_waiters, []
        for future in waiters:
            future.set_result(
                {"steps": self.lockstep.steps, "idle_steps": self.lockstep.idle_steps}
            )

    def utility_lockstep_idle(self) -> Future:
        """Lockstep data parallelism: answered once this rank is between waves (no step of
        the ranks' collectives is left for it), with its step counts; the user's process asks
        it before shutting the engine down."""
        future: Future = Future()
        if self.lockstep is None:
            future.set_exception(RuntimeError("this engine is not a lockstep data-parallel rank"))
        else:
            self._idle_waiters.append(future)
        return future

    def _handle_input(self, item) -> None:
        if item is _STOP:
            return
        identity, message_type, payload = item
        self.client_last_seen[identity] = time.monotonic()
        if message_type == MessageType.HELLO:
            self._hello(identity, payload)
            return
        if self.token is not None and identity not in self.authenticated:
            logger.warning("dropped a message from a client that did not present the token")
            return
        core = self.engine_core
        if message_type == MessageType.PING:
            self._send(identity, MessageType.PONG, None)
        elif message_type == MessageType.ADD:
            model_config = core.config.model
            for request in payload:
                if request.request_id in self.request_client:
                    logger.warning("dropped a request with a duplicate id %r", request.request_id)
                    continue
                problem = request_problem(
                    request,
                    model_config.max_model_len,
                    model_config.vocab_size,
                    model_config.runner,
                )
                if (
                    problem is None
                    and request.lora_request is not None
                    and core.config.lora is None
                ):
                    problem = "a lora_request needs LLM(enable_lora=True)"
                if problem is None and core.is_sleeping:  # refused, not queued: none waits
                    problem = "the engine is asleep (LLM.sleep); call LLM.wake_up() first"
                if problem is not None:
                    logger.warning("refused request %r: %s", request.request_id[:64], problem)
                    refused = EngineCoreOutput(request.request_id, [], FinishReason.ERROR)
                    self._send(identity, MessageType.OUTPUTS, EngineCoreOutputs([refused]))
                    continue
                self.request_client[request.request_id] = identity
                self.client_requests[identity].add(request.request_id)
                core.add_request(request)
        elif message_type == MessageType.ABORT:
            own = [r for r in payload if self.request_client.get(r) == identity]
            self._emit(core.abort_requests(own))
        elif message_type == MessageType.UTILITY:
            self._call_utility(identity, payload)

    def _hello(self, identity: bytes, hello: Hello) -> None:
        if self.token is not None and not secrets.compare_digest(
            (hello.token or "").encode(), self.token.encode()
        ):
            logger.warning("refused a client with a wrong or missing token")
            error = EngineError("PermissionError", "the engine core refused the token")
            self._send(identity, MessageType.STARTUP_ERROR, error)
            return
        self.authenticated.add(identity)
        self._send(identity, MessageType.READY, self._ready_info())

    def _drop_silent_clients(self) -> None:
        """Abort the requests of clients that stopped sending: they died or disconnected."""
        deadline = time.monotonic() - self.client_timeout_s
        for identity, request_ids in list(self.client_requests.items()):
            if request_ids and self.client_last_seen.get(identity, 0.0) < deadline:
                logger.warning(
                    "client %s silent for %.0f s: aborting its %d requests",
                    identity.hex(),
                    self.client_timeout_s,
                    len(request_ids),
                )
                self._emit(self.engine_core.abort_requests(list(request_ids)))
                self.client_requests.pop(identity, None)
                self.authenticated.discard(identity)

    def _abort_everything(self, reason: str) -> None:
        """On shutdown: finish every request as aborted and tell its client."""
        if self.engine_core is None or not self.request_client:
            return
        self._emit(self.engine_core.abort_requests(list(self.request_client)))
        logger.info("%s: in-flight requests aborted", reason)

    def _call_utility(self, identity: bytes, request: UtilityRequest) -> None:
        """Run a utility and send its result. One that returns a Future (work done on another
        thread, such as compiling grammars) is answered when the future is done, while the
        loop runs on."""
        # A utility sees the requests, and may call the workers, between steps.
        self._emit(self.engine_core.drain())
        method = getattr(self, f"utility_{request.method}", None) or getattr(
            self.engine_core, f"utility_{request.method}", None
        )
        if method is None:
            error = f"unknown utility {request.method!r}"
            self._send(
                identity, MessageType.UTILITY_OUTPUT, UtilityOutput(request.call_id, error=error)
            )
            return
        try:
            result = method(*request.args)
        except Exception as exc:  # noqa: BLE001 (the caller gets the error)
            self._send(identity, MessageType.UTILITY_OUTPUT, _utility_error(request, exc))
            return
        if not isinstance(result, Future):
            self._send(identity, MessageType.UTILITY_OUTPUT, UtilityOutput(request.call_id, result))
            return

        def answer(future: Future) -> None:
            exc = future.exception()
            if exc is not None:
                output = _utility_error(request, exc)
            else:
                output = UtilityOutput(request.call_id, result=future.result())
            self._send(identity, MessageType.UTILITY_OUTPUT, output)

        result.add_done_callback(answer)

    def utility_start_profile(
        self,
        profile_dir: str,
        profile_prefix: str | None = None,
        delay_iterations: int | None = None,
        max_iterations: int | None = None,
    ) -> None:
        """Trace this loop and every worker (torch.profiler) until `stop_profile`: after
        `delay_iterations` engine steps, for `max_iterations` steps (0 or None: no limit)."""
        if self.profile is not None:
            raise RuntimeError("a profiling session is running: call stop_profile() first")
        self.profile = ProfileSession(
            self.trace,
            self.engine_core.executor,
            profile_dir,
            profile_prefix,
            delay_iterations,
            max_iterations,
        )

    def utility_stop_profile(self) -> list[str]:
        """Write the traces; return their paths."""
        if self.profile is None:
            raise RuntimeError("the profiler was not started")
        profile, self.profile = self.profile, None
        return profile.finish()

    def utility_sleep(self, level: int = 1, mode: str = "abort") -> None:
        """vLLM's `sleep`: every request in the engine is aborted (mode "abort", telling their
        clients), then the engine sleeps at `level` (`EngineCore.sleep`)."""
        if self.lockstep is not None:
            raise NotImplementedError(
                "sleep is not supported on lockstep data-parallel ranks: their experts serve "
                "the other ranks' steps"
            )
        if mode in ("wait", "keep"):
            raise NotImplementedError(
                f"sleep(mode={mode!r}) is not supported: ember's LLM runs one call at a time, "
                "so none of its requests is in flight; use mode='abort'"
            )
        if mode != "abort":
            raise ValueError(f"mode must be 'abort', 'wait' or 'keep', got {mode!r}")
        self.engine_core.check_sleep_level(level)
        self._abort_everything("the engine goes to sleep")
        self.engine_core.sleep(level)

    def utility_collective_rpc(
        self,
        method: object,
        timeout: float | None = None,
        args: list | None = None,
        kwargs: dict | None = None,
    ) -> list:
        """Run a Worker method (by name) or a function (by reference) on every rank; the
        results, one per rank (vLLM's `collective_rpc`)."""
        try:
            method = msgspec.convert(method, str | FunctionRef)
        except msgspec.ValidationError:
            raise TypeError(
                f"method must be a Worker method name or a function, got {method!r}"
            ) from None
        if isinstance(method, FunctionRef) and not self.allow_functions:
            raise PermissionError(
                "collective_rpc with a function runs only on an engine core started by its "
                "LLM; a standalone engine core runs Worker methods by name"
            )
        if timeout is not None and (
            not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0
        ):
            raise ValueError(
                f"timeout must be a positive number of seconds or None, got {timeout!r}"
            )
        if not isinstance(args or [], list) or not isinstance(kwargs or {}, dict):
            raise TypeError("args must be a tuple or list and kwargs a dict")
        return self.engine_core.executor.collective_rpc(
            method, timeout, list(args or []), dict(kwargs or {})
        )

    def utility_get_engine_config(self) -> EngineConfig:
        """The engine's configuration, with the KV capacity it found (`LLM.llm_engine`)."""
        return self.engine_core.config

    def _ready_info(self) -> EngineCoreReadyInfo:
        config = self.engine_core.config
        return EngineCoreReadyInfo(
            max_model_len=config.model.max_model_len,
            num_kv_blocks=config.cache.num_kv_blocks,
            block_size=config.cache.block_size,
            dtype=config.model.dtype,
            vocab_size=config.model.vocab_size,
            max_num_seqs=config.scheduler.max_num_seqs,
            max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
            model=config.model.model,
            tokenizer=config.model.tokenizer,
            max_logprobs=config.model.max_logprobs,
            generation_config=config.model.generation_config,
            default_sampling_params=config.model.default_sampling_params,
            max_lora_rank=0 if config.lora is None else config.lora.max_lora_rank,
            lora_module_shapes=_lora_module_shapes(config),
            **pooling_ready_info(config.model),
        )

    def _emit(self, outputs) -> None:
        """Send each client the outputs of its own requests."""
        by_client = defaultdict(list)
        for output in outputs:
            if output.finished:
                identity = self.request_client.pop(output.request_id, None)
                if identity is not None:
                    self.client_requests[identity].discard(output.request_id)
            else:
                identity = self.request_client.get(output.request_id)
            if identity is not None:
                by_client[identity].append(output)
        stats = scheduler_stats(self.engine_core) if by_client else None
        for identity, client_outputs in by_client.items():
            self._send(
                identity,
                MessageType.OUTPUTS,
                EngineCoreOutputs(outputs=client_outputs, scheduler_stats=stats),
            )


def _utility_error(request: UtilityRequest, exc: BaseException) -> UtilityOutput:
    return UtilityOutput(request.call_id, error=f"{type(exc).__name__}: {exc}")


# ---- command line ----------------------------------------------------------------------


def remove_private_dir(path: str) -> None:
    """Remove a frontend's private directory (`ember-*`: a config file and ipc sockets)."""
    if not os.path.basename(path).startswith("ember-"):
        return
    try:
        for name in os.listdir(path):
            os.unlink(os.path.join(path, name))
        os.rmdir(path)
    except OSError:
        pass


def _engine_option_parser(parser: argparse.ArgumentParser) -> None:
    """One `--flag` per EngineArgs field (standalone mode), typed from its default."""
    from ember.enginecore.arg_utils import EngineArgs

    group = parser.add_argument_group("engine options (as LLM(...) keyword arguments)")
    for field in dataclasses.fields(EngineArgs):
        flag = "--" + field.name.replace("_", "-")
        if field.name == "model":
            continue
        if isinstance(field.default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default)
            continue
        kind = str(field.type)
        convert = int if "int" in kind else float if "float" in kind else str
        group.add_argument(flag, type=convert, default=field.default)


def _standalone_config(args: argparse.Namespace) -> EngineConfig:
    from ember.enginecore.arg_utils import EngineArgs

    names = {f.name for f in dataclasses.fields(EngineArgs)}
    values = {name: getattr(args, name) for name in names if hasattr(args, name)}
    values["model"] = args.model
    return EngineArgs(**values).create_engine_config()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m ember.enginecore",
        description="ember's engine core. Standalone: --model M --listen ADDR [options].",
    )
    parser.add_argument("--model", help="standalone: the model to serve")
    parser.add_argument("--listen", help="standalone: ipc:///path or tcp://HOST:PORT")
    parser.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a tcp address beyond loopback (then a token is required)",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("EMBER_ENGINE_TOKEN"),
        help="clients must present it (default: $EMBER_ENGINE_TOKEN)",
    )
    parser.add_argument(
        "--client-timeout-s",
        type=float,
        default=CLIENT_TIMEOUT_S,
        help="abort the requests of a client silent this long",
    )
    parser.add_argument("--config", help="(started by a frontend) EngineConfig as a JSON file")
    parser.add_argument("--input-address", help=argparse.SUPPRESS)
    parser.add_argument("--output-address", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    if "--config" not in argv:  # standalone: EngineArgs (and torch) are needed to build a config
        _engine_option_parser(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("EMBER_LOG_LEVEL", "INFO"),
        format="%(levelname)s %(asctime)s [enginecore] %(message)s",
        datefmt="%H:%M:%S",
    )
    set_process_name("ember-enginecore")
    if args.config is not None:  # started by a frontend
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the user's process
        with open(args.config, "rb") as f:
            config = msgspec.json.decode(f.read(), type=EngineConfig)
        # Its one client is the parent, watched through the stdin pipe: no silence timeout.
        proc = EngineCoreProc(
            config,
            args.input_address,
            args.output_address,
            client_timeout_s=float("inf"),
            allow_functions=True,
        )
        signal.signal(signal.SIGTERM, lambda *_: proc.stop())

        def parent_gone() -> None:
            logger.info("the frontend that started this engine core is gone: stopping")
            proc.stop()

        watch_parent(parent_gone)
        try:
            proc.run()
        finally:
            # The frontend's private directory (config, sockets): removed here too, so that
            # nothing is left when the frontend was killed and could not remove it.
            remove_private_dir(os.path.dirname(args.config))
        return
    if args.listen is None:
        parser.error("give --listen ADDR (standalone) or --config (started by a frontend)")
    token = args.token
    if not is_loopback(args.listen):
        if not args.allow_remote:
            parser.error(
                f"{args.listen} is not a loopback address: add --allow-remote "
                "(clients will need the token) or listen on 127.0.0.1"
            )
        if token is None:
            token = secrets.token_urlsafe(24)
            print(f"EMBER ENGINE TOKEN {token}", flush=True)
    config = _standalone_config(args)
    input_address, output_address = socket_addresses(args.listen)
    proc = EngineCoreProc(
        config, input_address, output_address, token=token, client_timeout_s=args.client_timeout_s
    )
    signal.signal(signal.SIGTERM, lambda *_: proc.stop())
    signal.signal(signal.SIGINT, lambda *_: proc.stop())

    def announce(ready: EngineCoreProc) -> None:
        info = ready._ready_info()
        print(
            "EMBER ENGINE READY "
            + json.dumps(
                {
                    "address": args.listen,
                    "model": info.model,
                    "max_model_len": info.max_model_len,
                    "num_kv_blocks": info.num_kv_blocks,
                }
            ),
            flush=True,
        )

    proc.run(on_ready=announce)
    sys.exit(0)
