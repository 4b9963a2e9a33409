"""The engine-core process (`python -m ember.enginecore`): ZeroMQ I/O on two threads around a
busy loop that drains inputs, steps the `EngineCore`, and sends outputs.

    clients' DEALERs ──▶ input ROUTER ── input thread ──▶ input queue ──▶ busy loop
    clients' DEALERs ◀── output ROUTER ◀─ output thread ◀─ output queue ◀─┘

Each client connects a DEALER to both sockets under one identity; outputs of a request go to
the client that sent it. Frames that do not decode are logged and dropped. This process does
not import torch: the model lives in the worker processes.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import threading
from collections import defaultdict

import msgspec
import zmq

from ember.enginecore.engine_core import EngineCore
from ember.enginecore.exceptions import EngineDeadError
from ember.enginecore.messages import (
    EngineCoreOutputs,
    EngineCoreReadyInfo,
    EngineCoreRequest,
    EngineError,
    MessageType,
    UtilityOutput,
    UtilityRequest,
)
from ember.enginecore.multiproc_executor import MultiprocExecutor
from ember.workers.config import EngineConfig
from ember.workers.parent_watch import set_process_name, watch_parent

logger = logging.getLogger("ember.enginecore")

_IDLE_POLL_S = 0.5
_STARTUP_ERROR_GRACE_S = 5.0
_STOP = object()  # an input-queue item that wakes the busy loop to stop


class EngineCoreProc:
    def __init__(self, config: EngineConfig, input_address: str, output_address: str):
        self.config = config
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
        self.clients: set[bytes] = set()
        self.engine_core: EngineCore | None = None
        self.decoders = {
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
        if message_type == MessageType.HELLO:
            return identity, message_type, None
        if message_type not in self.decoders or len(frames) < 3:
            raise ValueError(f"unknown message type {message_type[:16]!r}")
        return identity, message_type, self.decoders[message_type].decode(frames[2].buffer)

    def _output_loop(self) -> None:
        while True:
            item = self.output_queue.get()
            if item is _STOP:
                return
            identity, message_type, payload = item
            try:
                self.output_socket.send_multipart(
                    [identity, message_type, self.encoder.encode(payload)], copy=False
                )
            except zmq.ZMQError as exc:
                logger.warning("could not send to a client: %s", exc)

    def _send(self, identity: bytes, message_type: bytes, payload: object) -> None:
        self.output_queue.put((identity, message_type, payload))

    # ---- busy loop ---------------------------------------------------------------------

    def run(self) -> None:
        input_thread = threading.Thread(target=self._input_loop, name="input", daemon=True)
        output_thread = threading.Thread(target=self._output_loop, name="output", daemon=True)
        input_thread.start()
        output_thread.start()
        try:
            try:
                self.engine_core = EngineCore(self.config, MultiprocExecutor)
            except Exception as exc:  # noqa: BLE001 (reported to the client, then exit)
                logger.error("engine core failed to start: %s: %s", type(exc).__name__, exc)
                self._report_startup_error(exc)
                return
            self._busy_loop()
        finally:
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
        while not self.stop_event.is_set():
            try:
                if not core.has_unfinished_requests():
                    try:
                        item = self.input_queue.get(timeout=_IDLE_POLL_S)
                    except queue.Empty:
                        core.executor.check_health()
                        continue
                    self._handle_input(item)
                while not self.input_queue.empty():
                    self._handle_input(self.input_queue.get_nowait())
                if core.has_unfinished_requests():
                    self._emit(core.step())
            except EngineDeadError as exc:
                logger.error("engine is dead: %s", exc)
                for identity in self.clients:
                    self._send(
                        identity, MessageType.ENGINE_DEAD, EngineError("EngineDeadError", str(exc))
                    )
                return

    def _handle_input(self, item) -> None:
        if item is _STOP:
            return
        identity, message_type, payload = item
        core = self.engine_core
        self.clients.add(identity)
        if message_type == MessageType.HELLO:
            self._send(identity, MessageType.READY, self._ready_info())
        elif message_type == MessageType.ADD:
            for request in payload:
                self.request_client[request.request_id] = identity
                core.add_request(request)
        elif message_type == MessageType.ABORT:
            outputs = core.abort_requests(payload)
            self._emit(outputs)
        elif message_type == MessageType.UTILITY:
            self._send(identity, MessageType.UTILITY_OUTPUT, self._call_utility(payload))

    def _call_utility(self, request: UtilityRequest) -> UtilityOutput:
        method = getattr(self.engine_core, f"utility_{request.method}", None)
        if method is None:
            return UtilityOutput(request.call_id, error=f"unknown utility {request.method!r}")
        try:
            return UtilityOutput(request.call_id, result=method(*request.args))
        except Exception as exc:  # noqa: BLE001 (the caller gets the error)
            return UtilityOutput(request.call_id, error=f"{type(exc).__name__}: {exc}")

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
        )

    def _emit(self, outputs) -> None:
        """Send each client the outputs of its own requests."""
        by_client = defaultdict(list)
        for output in outputs:
            if output.finished:
                identity = self.request_client.pop(output.request_id, None)
            else:
                identity = self.request_client.get(output.request_id)
            if identity is not None:
                by_client[identity].append(output)
        for identity, client_outputs in by_client.items():
            self._send(identity, MessageType.OUTPUTS, EngineCoreOutputs(outputs=client_outputs))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m ember.enginecore")
    parser.add_argument("--config", required=True, help="EngineConfig as a JSON file")
    parser.add_argument("--input-address", required=True)
    parser.add_argument("--output-address", required=True)
    args = parser.parse_args()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the user's process
    set_process_name("ember-enginecore")
    logging.basicConfig(
        level=os.environ.get("EMBER_LOG_LEVEL", "INFO"),
        format="%(levelname)s %(asctime)s [enginecore] %(message)s",
        datefmt="%H:%M:%S",
    )
    with open(args.config, "rb") as f:
        config = msgspec.json.decode(f.read(), type=EngineConfig)
    proc = EngineCoreProc(config, args.input_address, args.output_address)
    signal.signal(signal.SIGTERM, lambda *_: proc.stop())
    watch_parent(proc.stop)
    proc.run()
