"""The user's side of the engine core: starts `python -m ember.enginecore` in a private
directory (or attaches to a standalone one by address), talks to it over ZeroMQ with msgspec
messages, and stops it.

A spawned child notices this process's death by itself (EOF on its stdin pipe); this side
notices the child's death while waiting for outputs and raises `EngineDeadError`. While waiting,
the client PINGs every second; an attached engine that stays silent is reported dead, and the
engine aborts the requests of a client that stays silent.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import weakref

import msgspec
import zmq

from ember.enginecore.addresses import socket_addresses
from ember.enginecore.exceptions import EngineDeadError, EngineStartupError
from ember.enginecore.messages import (
    EngineCoreOutputs,
    EngineCoreReadyInfo,
    EngineCoreRequest,
    EngineError,
    Hello,
    MessageType,
    UtilityOutput,
    UtilityRequest,
)
from ember.enginecore.tensor_frames import attach_tensor_frames
from ember.workers.config import EngineConfig

logger = logging.getLogger(__name__)

_POLL_MS = 100
_HANDSHAKE_RESEND_S = 0.5
_STARTUP_TIMEOUT_S = 900.0
_ATTACH_TIMEOUT_S = 30.0
_SHUTDOWN_TIMEOUT_S = 10.0
_PING_INTERVAL_S = 1.0
_ENGINE_SILENCE_S = 30.0  # an attached engine silent this long while we wait is dead
_ERROR_TYPES = {
    cls.__name__: cls
    for cls in (
        ValueError,
        TypeError,
        FileNotFoundError,
        NotImplementedError,
        MemoryError,
        PermissionError,
    )
}


def _utility_error(error: str) -> Exception:
    """A utility's error ("TypeName: message") as that type where it is a plain builtin one,
    else a RuntimeError."""
    name, separator, message = error.partition(": ")
    error_type = _ERROR_TYPES.get(name) or _UTILITY_ERROR_TYPES.get(name)
    if not separator or error_type is None:
        return RuntimeError(error)
    return error_type(message)


_UTILITY_ERROR_TYPES = {
    cls.__name__: cls for cls in (AttributeError, KeyError, TimeoutError, RuntimeError)
}


class _Resources:
    """Everything the client must release; closed by `shutdown()` or by `weakref.finalize`
    (garbage collection, interpreter exit), never by `__del__`."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.context: zmq.Context | None = None
        self.sockets: list[zmq.Socket] = []
        self.private_dir: str | None = None

    def close(self) -> None:
        process = self.process
        if process is not None:
            if process.stdin is not None and not process.stdin.closed:
                try:
                    process.stdin.close()  # EOF: the engine core stops and stops its workers
                except OSError:
                    pass
            try:
                process.wait(timeout=_SHUTDOWN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.terminate()
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        for socket in self.sockets:
            socket.close(linger=0)
        self.sockets = []
        if self.context is not None:
            self.context.term()
            self.context = None
        if self.private_dir is not None:
            shutil.rmtree(self.private_dir, ignore_errors=True)
            self.private_dir = None


class EngineCoreClient:
    """Either spawns an engine core for `config`, or attaches to one listening at `address`."""

    def __init__(
        self,
        config: EngineConfig | None = None,
        *,
        address: str | None = None,
        token: str | None = None,
        env: dict[str, str] | None = None,
    ):
        """`env`: the spawned engine core's environment (None: this process's)."""
        self._resources = _Resources()
        self._finalizer = weakref.finalize(self, self._resources.close)
        self.dead_reason: str | None = None
        self._utility_ids = itertools.count()
        self._pending_utility: UtilityOutput | None = None
        # Set by `LLM.sleep` (what it said), cleared by `LLM.wake_up`: requests are refused
        # here, before they are sent, rather than left waiting for an engine that sleeps.
        self.asleep: str | None = None
        self._output_decoder = msgspec.msgpack.Decoder(EngineCoreOutputs)
        self._encoder = msgspec.msgpack.Encoder()
        self._last_sent = self._last_heard = time.monotonic()
        try:
            if address is None:
                self._start(config, env)
            else:
                self._attach(address)
            self.ready_info = self._handshake(token)
        except BaseException:
            self.shutdown()
            raise

    def _start(self, config: EngineConfig, env: dict[str, str] | None = None) -> None:
        resources = self._resources
        resources.private_dir = tempfile.mkdtemp(prefix="ember-")  # mode 0700
        config_path = os.path.join(resources.private_dir, "config.json")
        with open(config_path, "wb") as f:
            f.write(msgspec.json.encode(config))
        input_address = f"ipc://{resources.private_dir}/input.sock"
        output_address = f"ipc://{resources.private_dir}/output.sock"
        resources.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ember.enginecore",
                "--config",
                config_path,
                "--input-address",
                input_address,
                "--output-address",
                output_address,
            ],
            stdin=subprocess.PIPE,
            env=env,
            start_new_session=True,  # the terminal's Ctrl-C reaches only the user's process
        )
        self._connect(input_address, output_address)

    def _attach(self, address: str) -> None:
        self._connect(*socket_addresses(address))

    def _connect(self, input_address: str, output_address: str) -> None:
        resources = self._resources
        self.input_address = input_address
        self.identity = b"c" + secrets.token_bytes(7)
        resources.context = zmq.Context(io_threads=1)
        self.input_socket = resources.context.socket(zmq.DEALER)
        self.output_socket = resources.context.socket(zmq.DEALER)
        for socket, address in (
            (self.input_socket, input_address),
            (self.output_socket, output_address),
        ):
            socket.setsockopt(zmq.IDENTITY, self.identity)
            socket.setsockopt(zmq.LINGER, 0)
            socket.connect(address)
            resources.sockets.append(socket)

    @property
    def process(self) -> subprocess.Popen | None:
        """The engine-core process, when this client started it (None when attached)."""
        return self._resources.process

    def _handshake(self, token: str | None) -> EngineCoreReadyInfo:
        timeout_s = _STARTUP_TIMEOUT_S if self.process is not None else _ATTACH_TIMEOUT_S
        deadline = time.monotonic() + timeout_s
        hello = self._encoder.encode(Hello(token=token))
        next_hello = 0.0
        while time.monotonic() < deadline:
            if time.monotonic() >= next_hello:
                self.input_socket.send_multipart([MessageType.HELLO, hello])
                next_hello = time.monotonic() + _HANDSHAKE_RESEND_S
            if self.output_socket.poll(_POLL_MS):
                message_type, payload = self.output_socket.recv_multipart()[:2]
                if message_type == MessageType.READY:
                    return msgspec.msgpack.decode(payload, type=EngineCoreReadyInfo)
                if message_type == MessageType.STARTUP_ERROR:
                    error = msgspec.msgpack.decode(payload, type=EngineError)
                    raise _ERROR_TYPES.get(error.error_type, EngineStartupError)(error.message)
            code = None if self.process is None else self.process.poll()
            if code is not None:
                raise EngineStartupError(
                    f"the engine core exited during startup (exit code {code}); "
                    "its log above says why"
                )
        raise EngineStartupError(f"the engine core did not answer within {timeout_s} s")

    # ---- requests ----------------------------------------------------------------------

    def _send(self, message_type: bytes, payload: object) -> None:
        self._check_alive()
        self.input_socket.send_multipart([message_type, self._encoder.encode(payload)])
        self._last_sent = time.monotonic()

    def _ping_if_quiet(self) -> None:
        if time.monotonic() - self._last_sent >= _PING_INTERVAL_S:
            self.input_socket.send(MessageType.PING)
            self._last_sent = time.monotonic()

    def add_requests(self, requests: list[EngineCoreRequest]) -> None:
        if self.asleep is not None:
            raise RuntimeError(
                f"the engine is asleep ({self.asleep}): call LLM.wake_up() before new requests"
            )
        self._send(MessageType.ADD, requests)

    def abort_requests(self, request_ids: list[str]) -> None:
        if request_ids and self.is_alive():
            self._send(MessageType.ABORT, request_ids)

    def get_outputs(self, timeout_s: float) -> EngineCoreOutputs | None:
        """The next batch of outputs, or None after `timeout_s`; raises EngineDeadError."""
        deadline = time.monotonic() + timeout_s
        self._last_heard = time.monotonic()
        while True:
            self._check_alive()
            self._ping_if_quiet()
            wait_ms = int(min(_POLL_MS, max(0.0, deadline - time.monotonic()) * 1000))
            if self.output_socket.poll(wait_ms):
                message = self._receive()
                if message is not None:
                    return message
            elif time.monotonic() >= deadline:
                return None

    def _receive(self) -> EngineCoreOutputs | None:
        frames = self.output_socket.recv_multipart(copy=False)
        self._last_heard = time.monotonic()
        message_type = frames[0].bytes
        if message_type == MessageType.OUTPUTS:
            outputs = self._output_decoder.decode(frames[1].buffer)
            if len(frames) > 2:  # pooled tensors: each output's values, without a copy
                buffers = attach_tensor_frames(outputs, frames[2:])
                for output in outputs.outputs:
                    if output.pooling_output is not None:
                        output.pooling_output.data = buffers[output.request_id]
            return outputs
        if message_type == MessageType.PONG:
            return None
        if message_type == MessageType.UTILITY_OUTPUT:
            self._pending_utility = msgspec.msgpack.decode(frames[1].buffer, type=UtilityOutput)
        elif message_type == MessageType.ENGINE_DEAD:
            error = msgspec.msgpack.decode(frames[1].buffer, type=EngineError)
            self.dead_reason = error.message
            self._check_alive()
        return None

    def call_utility(self, method: str, *args: object, timeout_s: float = 60.0) -> object:
        call_id = next(self._utility_ids)
        self._pending_utility = None
        self._send(MessageType.UTILITY, UtilityRequest(call_id, method, list(args)))
        deadline = time.monotonic() + timeout_s
        self._last_heard = time.monotonic()
        while time.monotonic() < deadline:
            self._check_alive()
            self._ping_if_quiet()
            if self.output_socket.poll(_POLL_MS):
                self._receive()
                reply = self._pending_utility
                if reply is not None and reply.call_id == call_id:
                    if reply.error is not None:
                        raise _utility_error(reply.error)
                    return reply.result
        raise TimeoutError(f"the engine core did not answer {method!r} in {timeout_s} s")

    def _check_alive(self) -> None:
        if self.dead_reason is None:
            if self.process is not None:
                code = self.process.poll()
                if code is not None:
                    self.dead_reason = (
                        self._last_words() or f"the engine core process exited (exit code {code})"
                    )
            elif time.monotonic() - self._last_heard > _ENGINE_SILENCE_S:
                self.dead_reason = (
                    f"the engine core at {self.input_address} stopped answering "
                    f"for {_ENGINE_SILENCE_S:.0f} s"
                )
        if self.dead_reason is not None:
            if self.process is not None and self._finalizer.alive:
                # The engine we started is gone: release the sockets and the private
                # directory now, not at shutdown, so nothing lingers while the user handles it.
                self.shutdown()
            raise EngineDeadError(self.dead_reason)

    def _last_words(self) -> str | None:
        """The reason an engine core gave as it stopped (ENGINE_DEAD), if that message is still
        waiting on the socket: a worker's death says more than the core's exit code. Any
        outputs queued before it are dropped, as the engine is gone."""
        try:
            while self.output_socket.poll(0):
                frames = self.output_socket.recv_multipart()
                if frames[0] == MessageType.ENGINE_DEAD:
                    return msgspec.msgpack.decode(frames[1], type=EngineError).message
        except (zmq.ZMQError, msgspec.DecodeError):
            return None
        return None

    def is_alive(self) -> bool:
        try:
            self._check_alive()
        except EngineDeadError:
            return False
        return True

    def shutdown(self) -> None:
        self._finalizer()
