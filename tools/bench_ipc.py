"""IPC benchmark (issue 7): ember's shared-memory `MessageQueue` beside `multiprocessing.Queue`
and ZeroMQ PUB/SUB, one writer and 1 or N reader processes, for several message sizes.

What it measures, per transport x readers x size (one table row each):

- **One-way latency** (median and p99, microseconds). The writer stamps each message with
  ``time.monotonic_ns()`` (CLOCK_MONOTONIC, one clock for every process on Linux) just before it
  builds and sends it; each reader stamps it again as soon as its receive call has returned the
  message as ``bytes``, and sends that stamp back on a return channel. A sample is
  ``max(reader stamps) - send stamp``: with N readers, until the *last* reader has the message.
  The writer waits for every reader's answer before the next message (ping-pong pacing, so
  messages never queue up behind each other), but the return trip is not part of the sample.
  Before the counted messages, a tenth as many (at most 50) warm up and are not counted. The
  JSON output also has half the median round trip, as a cross-check.
- **Throughput** (messages/s and MB/s, MB = 10**6 bytes of payload sent by the writer; with N
  readers each reader receives all of it). The writer sends a burst of messages back to back, the
  last one marked; the clock stops when every reader has answered the marked one. Each reader
  also reports how many burst messages it got, and the run fails if one was lost.

Messages per row (column ``n``): ``--iterations`` (default 2000) latency samples for sizes up to
16 KiB, scaled down in proportion to the size above that, but never below a tenth of it (200 by
default for 256 KiB and 1 MiB). The burst (column ``burst``) starts at the same length and grows
x4 until it lasts 0.1 s, up to 16 x ``n``, and for mp.Queue and PUB/SUB (which buffer a burst in
memory without limit) to 256 MiB. Sizes are binary: ``1K`` = 1024 bytes, ``1M`` = 1048576 bytes.

Transports (``--transports``, in this order by default):

- ``ember-shm``: ``MessageQueue(readers, chunk_bytes=--chunk-bytes)`` from
  ``ember.workers.shm_broadcast`` with its default ``spin_s``, as the engine core uses it to reach
  its workers; each reader answers on its own one-reader ``MessageQueue`` (as workers do). A
  message larger than ``--chunk-bytes`` (default 1 MiB, the queue's default) overflows to the
  queue's ZeroMQ socket; the table marks such rows with ``*``.
- ``mp.Queue``: ``multiprocessing`` (spawn context) queues, which are point-to-point: the writer
  ``put``s one immutable copy of the message on each reader's own queue; readers answer on one
  shared queue.
- ``zmq-pubsub``: a PUB socket bound to ``ipc://`` in a private temporary directory and one SUB
  socket per reader (high-water marks off, so nothing is dropped); readers answer on PUSH to one
  PULL socket. The writer repeats a hello message until every subscription is in place, then
  removes the directory (connections stay up).

Readers are ``multiprocessing`` processes started with the spawn context (``mp.Queue`` can only
reach a child that way); one set of reader processes serves all sizes of a transport x readers
group. SIGINT is blocked while they start, so Ctrl-C reaches only this process, which then stops
its readers (STOP message, then SIGTERM, then SIGKILL), closes every queue and removes what it
created (and anything ``/dev/shm/ember-<pid>-*`` or ``<tmp>/ember-<pid>-*`` of its own or its
readers' pids); a reader whose parent has died exits within a second.

Target (checked and printed at the end): ember-shm, 1 reader, 1 KiB: median one-way latency
<= 20 us. On a shared machine, measure when the load average is low (it is printed).

Examples::

    python tools/bench_ipc.py                                 # all: ~20 s on 2 idle cores
    python tools/bench_ipc.py --sizes 1K --readers 1 --transports ember-shm --iterations 5000
    python tools/bench_ipc.py --json ipc.json                 # also write the results as JSON
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import math
import multiprocessing
import multiprocessing.connection
import multiprocessing.resource_tracker
import os
import platform
import queue
import shutil
import signal
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import msgspec
import zmq

from ember.workers.shm_broadcast import MessageQueue, QueueHandle

TRANSPORTS = ("ember-shm", "mp.Queue", "zmq-pubsub")
DEFAULT_SIZES = "1K,16K,256K,1M"
TARGET_LATENCY_US = 20.0
TARGET_SIZE = 1024

# Message header: kind, 7 pad, seq, send time (ns). Answer: rank, seq, receive time, burst count.
_HDR = struct.Struct("<B7xQq")
_ACK = struct.Struct("<IQqQ")
_PING, _BURST, _BURST_END, _HELLO, _STOP = 1, 2, 3, 4, 5
_HELLO_SEQ_BASE = 1 << 62  # hello sequence numbers never collide with the measured ones

_READY_TIMEOUT_S = 60.0  # reader start-up (spawn + imports) on a loaded machine
_ACK_TIMEOUT_S = 60.0
_POLL_S = 1.0  # how often an idle reader checks that its parent is alive
_ZMQ_HELLO_INTERVAL_S = 0.02
_MIN_BURST_S = 0.1
_MAX_BUFFERED_BYTES = 256 << 20  # mp.Queue and PUB/SUB queue a burst in memory without limit


# --------------------------------------------------------------------------------------------
# Reader side (runs in the child processes)
# --------------------------------------------------------------------------------------------


class _Orphaned(Exception):
    """The writer process is gone: the reader stops."""


class _ReaderChannel:
    """A reader's two ends: the broadcast to receive on and a return channel to answer on."""

    def __init__(self, parent_pid: int) -> None:
        self.parent_pid = parent_pid

    def check_parent(self) -> None:
        if os.getppid() != self.parent_pid:
            raise _Orphaned

    def ready_message(self) -> bytes:
        return b"ready"

    def recv(self, timeout_s: float) -> bytes | None:
        """The next message, None after `timeout_s`; EOFError once the writer closed."""
        raise NotImplementedError

    def answer(self, ack: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _EmberReader(_ReaderChannel):
    def __init__(self, parent_pid: int, setup: bytes, rank: int) -> None:
        super().__init__(parent_pid)
        self.rx: MessageQueue | None = None
        self.tx: MessageQueue | None = None
        handle = msgspec.msgpack.decode(setup, type=QueueHandle)
        self.rx = MessageQueue.attach(handle, rank)
        self.tx = MessageQueue(1, chunk_bytes=_ACK.size, num_chunks=8)

    def ready_message(self) -> bytes:
        assert self.tx is not None
        return msgspec.msgpack.encode(self.tx.export_handle())

    def after_ready(self) -> None:
        assert self.tx is not None
        while True:
            try:
                self.tx.wait_until_ready(timeout_s=_POLL_S)
                return
            except TimeoutError:
                self.check_parent()

    def recv(self, timeout_s: float) -> bytes | None:
        assert self.rx is not None
        try:
            return self.rx.dequeue(timeout_s=timeout_s)
        except TimeoutError:
            return None

    def answer(self, ack: bytes) -> None:
        assert self.tx is not None
        while True:
            try:
                self.tx.enqueue(ack, timeout_s=_POLL_S)
                return
            except TimeoutError:
                self.check_parent()

    def close(self) -> None:
        for mq in (self.rx, self.tx):
            if mq is not None:
                mq.close()


class _MpReader(_ReaderChannel):
    def __init__(self, parent_pid: int, setup: tuple[Any, Any], rank: int) -> None:
        super().__init__(parent_pid)
        self.rx, self.tx = setup

    def recv(self, timeout_s: float) -> bytes | None:
        try:
            return self.rx.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def answer(self, ack: bytes) -> None:
        self.tx.put(ack)

    def close(self) -> None:
        # Every answer that matters was taken before STOP; never block at exit on a dead parent.
        self.tx.cancel_join_thread()
        self.rx.close()
        self.tx.close()


class _ZmqReader(_ReaderChannel):
    def __init__(self, parent_pid: int, setup: tuple[str, str], rank: int) -> None:
        super().__init__(parent_pid)
        pub_address, pull_address = setup
        self.ctx = zmq.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.RCVHWM, 0)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.connect(pub_address)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.connect(pull_address)

    def recv(self, timeout_s: float) -> bytes | None:
        if self.sub.poll(int(timeout_s * 1000)):
            return self.sub.recv()
        return None

    def answer(self, ack: bytes) -> None:
        while True:
            try:
                self.push.send(ack, zmq.NOBLOCK)
                return
            except zmq.Again:
                self.check_parent()
                time.sleep(1e-3)

    def close(self) -> None:
        self.sub.close()
        self.push.close()
        self.ctx.term()


_READERS: dict[str, type[_ReaderChannel]] = {
    "ember-shm": _EmberReader,
    "mp.Queue": _MpReader,
    "zmq-pubsub": _ZmqReader,
}


def _raise_system_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _watch_parent(ppid: int) -> None:
    """Exit at once if the writer dies while this reader is stuck in a blocking call (e.g. the
    rest of an mp.Queue message that a SIGKILLed writer never finished writing)."""
    while True:
        time.sleep(_POLL_S)
        if os.getppid() != ppid:
            os._exit(1)  # nothing of ours to unlink: every name was removed at the handshake


def _reader_main(
    transport: str, rank: int, setup: Any, conn: multiprocessing.connection.Connection, ppid: int
) -> None:
    """Child process: answer pings and burst ends until STOP, EOF or the parent's death."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    signal.signal(signal.SIGTERM, _raise_system_exit)  # run the finally below: close the queues
    threading.Thread(target=_watch_parent, args=(ppid,), daemon=True).start()
    chan: _ReaderChannel | None = None
    try:
        chan = _READERS[transport](ppid, setup, rank)
        conn.send_bytes(chan.ready_message())
        if isinstance(chan, _EmberReader):
            chan.after_ready()
        count = 0
        while True:
            try:
                message = chan.recv(_POLL_S)
            except EOFError:
                return
            t_recv = time.monotonic_ns()
            if message is None:
                chan.check_parent()
                continue
            kind, seq, _ = _HDR.unpack_from(message)
            if kind == _BURST:
                count += 1
                continue
            if kind == _STOP:
                return
            if kind == _BURST_END:
                count += 1
            chan.answer(_ACK.pack(rank, seq, t_recv, count))
            if kind == _BURST_END:
                count = 0
    except _Orphaned:
        return
    finally:
        if chan is not None:
            chan.close()
        conn.close()


# --------------------------------------------------------------------------------------------
# Writer side (this process)
# --------------------------------------------------------------------------------------------


class _Writer:
    """The writer's ends of one transport for `num_readers` readers."""

    per_reader_answers = False  # one return channel per reader (else one shared)
    backpressure = False  # send() blocks while readers are behind (else it buffers)

    def __init__(self, num_readers: int) -> None:
        self.num_readers = num_readers

    def reader_setup(self, rank: int) -> Any:
        """What reader `rank` gets as its process argument."""
        raise NotImplementedError

    def handshake(self, ready: list[bytes]) -> None:
        """Called with every reader's ready message, in rank order."""

    def send(self, buf: bytearray) -> None:
        raise NotImplementedError

    def recv_ack(self, rank: int, timeout_s: float) -> bytes | None:
        """The next answer (from `rank`, for transports with one return channel per reader)."""
        raise NotImplementedError

    def wait_acks(self, seq: int, timeout_s: float = _ACK_TIMEOUT_S) -> list[tuple[int, int]]:
        """(receive time, burst count) of every reader for message `seq`; older answers (stray
        hellos) are skipped."""
        deadline = time.monotonic() + timeout_s
        got: dict[int, tuple[int, int]] = {}
        while len(got) < self.num_readers:
            rank_hint = len(got) if self.per_reader_answers else 0
            ack = self.recv_ack(rank_hint, max(0.0, deadline - time.monotonic()))
            if ack is None:
                missing = sorted(set(range(self.num_readers)) - set(got))
                raise RuntimeError(f"readers {missing} did not answer message {seq} in time")
            rank, ack_seq, t_recv, count = _ACK.unpack(ack)
            if ack_seq == seq:
                got[rank] = (t_recv, count)
        return [got[rank] for rank in range(self.num_readers)]

    def sync(self) -> None:
        """Make sure every reader receives from now on (ZeroMQ's slow joiner)."""

    def send_stop(self) -> None:
        """Best effort, never blocks for long."""
        buf = bytearray(_HDR.size)
        _HDR.pack_into(buf, 0, _STOP, 0, 0)
        self.send(buf)

    def close(self) -> None:
        raise NotImplementedError


class _EmberWriter(_Writer):
    per_reader_answers = True
    backpressure = True  # the ring

    def __init__(self, num_readers: int, chunk_bytes: int) -> None:
        super().__init__(num_readers)
        self.answers: list[MessageQueue] = []
        self.mq = MessageQueue(num_readers, chunk_bytes=chunk_bytes)
        self.handle = msgspec.msgpack.encode(self.mq.export_handle())

    def reader_setup(self, rank: int) -> bytes:
        return self.handle

    def handshake(self, ready: list[bytes]) -> None:
        for rank, message in enumerate(ready):
            handle = msgspec.msgpack.decode(message, type=QueueHandle)
            self.answers.append(MessageQueue.attach(handle, 0))
            assert len(self.answers) == rank + 1
        self.mq.wait_until_ready(timeout_s=_READY_TIMEOUT_S)

    def send(self, buf: bytearray) -> None:
        self.mq.enqueue(buf)

    def recv_ack(self, rank: int, timeout_s: float) -> bytes | None:
        try:
            return self.answers[rank].dequeue(timeout_s=timeout_s)
        except (TimeoutError, EOFError):
            return None

    def send_stop(self) -> None:
        buf = bytearray(_HDR.size)
        _HDR.pack_into(buf, 0, _STOP, 0, 0)
        with contextlib.suppress(TimeoutError, RuntimeError):
            self.mq.enqueue(buf, timeout_s=0.5)

    def close(self) -> None:
        self.mq.close()  # readers that sleep are woken and see EOF
        for mq in self.answers:
            mq.close()


class _MpWriter(_Writer):
    def __init__(self, num_readers: int, ctx: multiprocessing.context.SpawnContext) -> None:
        super().__init__(num_readers)
        self.answers = ctx.Queue()
        self.queues = [ctx.Queue() for _ in range(num_readers)]

    def reader_setup(self, rank: int) -> tuple[Any, Any]:
        return self.queues[rank], self.answers

    def send(self, buf: bytearray) -> None:
        message = bytes(buf)  # put() pickles later, in a feeder thread: hand it a frozen copy
        for q in self.queues:
            q.put(message)

    def recv_ack(self, rank: int, timeout_s: float) -> bytes | None:
        try:
            return self.answers.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def close(self) -> None:
        for q in [*self.queues, self.answers]:
            q.cancel_join_thread()  # a dead reader must not make exit hang on a full pipe
            q.close()


class _ZmqWriter(_Writer):
    def __init__(self, num_readers: int) -> None:
        super().__init__(num_readers)
        self.tmpdir: str | None = tempfile.mkdtemp(prefix="bench-ipc-")  # mode 0700
        self.ctx = zmq.Context()
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.SNDHWM, 0)  # never drop (PUB drops at the high-water mark)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub_address = f"ipc://{self.tmpdir}/pub.sock"
        self.pub.bind(self.pub_address)
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.pull_address = f"ipc://{self.tmpdir}/answers.sock"
        self.pull.bind(self.pull_address)

    def reader_setup(self, rank: int) -> tuple[str, str]:
        return self.pub_address, self.pull_address

    def send(self, buf: bytearray) -> None:
        self.pub.send(buf)  # copies: the caller reuses buf

    def send_stop(self) -> None:
        buf = bytearray(_HDR.size)
        _HDR.pack_into(buf, 0, _STOP, 0, 0)
        with contextlib.suppress(zmq.ZMQError):
            self.pub.send(buf, zmq.NOBLOCK)

    def recv_ack(self, rank: int, timeout_s: float) -> bytes | None:
        if self.pull.poll(max(0, math.ceil(timeout_s * 1000))):
            return self.pull.recv()
        return None

    def sync(self) -> None:
        buf = bytearray(_HDR.size)
        seen: set[int] = set()
        deadline = time.monotonic() + _READY_TIMEOUT_S
        hello = _HELLO_SEQ_BASE
        while len(seen) < self.num_readers:
            if time.monotonic() > deadline:
                raise RuntimeError("zmq readers did not subscribe in time")
            hello += 1
            _HDR.pack_into(buf, 0, _HELLO, hello, 0)
            self.pub.send(buf)
            until = time.monotonic() + _ZMQ_HELLO_INTERVAL_S
            while (left := until - time.monotonic()) > 0:
                ack = self.recv_ack(0, left)
                if ack is not None:
                    seen.add(_ACK.unpack(ack)[0])
        self._remove_tmpdir()  # every reader is connected both ways: the names can go now

    def _remove_tmpdir(self) -> None:
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None

    def close(self) -> None:
        self.pub.close()
        self.pull.close()
        self.ctx.term()
        self._remove_tmpdir()


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """'1K' -> 1024, '1M' -> 1048576, '300' -> 300 (binary suffixes K, M, G; 'KB'/'KiB' too)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    number = t[:-1] if scale > 1 else t
    size = int(float(number) * scale)
    if size < _HDR.size:
        raise argparse.ArgumentTypeError(f"size {text!r} is below the {_HDR.size}-byte header")
    return size


def format_size(size: int) -> str:
    for suffix, scale in (("M", 1 << 20), ("K", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{suffix}"
    return str(size)


def messages_for(size: int, iterations: int) -> int:
    """Messages per row: `iterations` up to 16 KiB, fewer for larger messages (>= 1/10)."""
    return max(1, min(iterations, max(iterations // 10, iterations * (16 << 10) // size)))


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of sorted values."""
    index = max(0, math.ceil(fraction * len(sorted_values)) - 1)
    return sorted_values[index]


def measure(writer: _Writer, size: int, count: int, seq: int) -> tuple[dict[str, Any], int]:
    """Latency then throughput for one size; returns the row and the last sequence number."""
    buf = bytearray(size)
    warmup = min(50, count // 10)
    samples_ns: list[int] = []
    round_trips_ns: list[int] = []  # cross-check only (JSON): includes the answer's way back
    for i in range(warmup + count):
        seq += 1
        t_send = time.monotonic_ns()
        _HDR.pack_into(buf, 0, _PING, seq, t_send)
        writer.send(buf)
        acks = writer.wait_acks(seq)
        if i >= warmup:
            round_trips_ns.append(time.monotonic_ns() - t_send)
            samples_ns.append(max(t_recv for t_recv, _ in acks) - t_send)
    samples_us = sorted(ns / 1e3 for ns in samples_ns)

    # A short burst measures mostly start and stop: grow it (x4) until it lasts _MIN_BURST_S, up
    # to 16 x count, and for transports that buffer without limit to _MAX_BUFFERED_BYTES.
    max_burst = 16 * count
    if not writer.backpressure:
        max_burst = max(count, min(max_burst, _MAX_BUFFERED_BYTES // size))
    burst = count
    while True:
        t_start = time.monotonic_ns()
        for i in range(burst):
            seq += 1
            _HDR.pack_into(buf, 0, _BURST_END if i == burst - 1 else _BURST, seq, 0)
            writer.send(buf)
        acks = writer.wait_acks(seq)
        elapsed_s = (time.monotonic_ns() - t_start) / 1e9
        lost = {rank: burst - got for rank, (_, got) in enumerate(acks) if got != burst}
        if lost:
            raise RuntimeError(f"burst of {burst}: readers lost messages {lost}")
        if elapsed_s >= _MIN_BURST_S or burst >= max_burst:
            break
        burst = min(max_burst, burst * 4)
    row = {
        "size": size,
        "lat_samples": count,
        "burst": burst,
        "lat_p50_us": statistics.median(samples_us),
        "lat_p99_us": percentile(samples_us, 0.99),
        "lat_min_us": samples_us[0],
        "lat_max_us": samples_us[-1],
        "lat_mean_us": statistics.fmean(samples_us),
        "half_round_trip_p50_us": statistics.median(round_trips_ns) / 2e3,
        "burst_s": elapsed_s,
        "msgs_per_s": burst / elapsed_s,
        "mb_per_s": burst * size / elapsed_s / 1e6,
    }
    return row, seq


def _make_writer(
    transport: str, num_readers: int, chunk_bytes: int, ctx: multiprocessing.context.SpawnContext
) -> _Writer:
    if transport == "ember-shm":
        return _EmberWriter(num_readers, chunk_bytes)
    if transport == "mp.Queue":
        return _MpWriter(num_readers, ctx)
    return _ZmqWriter(num_readers)


def _wait_ready(
    conns: list[multiprocessing.connection.Connection], procs: list[multiprocessing.Process]
) -> list[bytes]:
    """Each reader's ready message, in rank order."""
    ready: dict[int, bytes] = {}
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while len(ready) < len(conns):
        pending = [c for r, c in enumerate(conns) if r not in ready]
        left = deadline - time.monotonic()
        if left <= 0 or not multiprocessing.connection.wait(pending, timeout=left):
            raise RuntimeError(f"readers not ready in {_READY_TIMEOUT_S} s")
        for rank, conn in enumerate(conns):
            if rank in ready or not conn.poll():
                continue
            try:
                ready[rank] = conn.recv_bytes()
            except EOFError:
                raise RuntimeError(
                    f"reader {rank} died while starting (exit code {procs[rank].exitcode})"
                ) from None
    return [ready[rank] for rank in range(len(conns))]


def _sweep_names(pids: Sequence[int]) -> None:
    """Remove ember queue names that processes of ours may have left (killed mid-creation)."""
    tmp = tempfile.gettempdir()
    for pid in pids:
        for path in glob.glob(f"/dev/shm/ember-{pid}-*"):
            with contextlib.suppress(OSError):
                os.unlink(path)
        for path in glob.glob(os.path.join(tmp, f"ember-{pid}-*")):
            shutil.rmtree(path, ignore_errors=True)


def _stop_readers(procs: list[multiprocessing.Process], grace_s: float) -> None:
    deadline = time.monotonic() + grace_s
    for proc in procs:
        if proc.pid is not None:
            proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.pid is not None and proc.is_alive():
            proc.terminate()
    for proc in procs:
        if proc.pid is not None:
            proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join(2.0)


def run_group(
    transport: str,
    num_readers: int,
    sizes: Sequence[int],
    iterations: int,
    chunk_bytes: int,
) -> Iterator[dict[str, Any]]:
    """Start `num_readers` readers for `transport`, yield one row per size, clean up."""
    ctx = multiprocessing.get_context("spawn")
    procs: list[multiprocessing.Process] = []
    conns: list[multiprocessing.connection.Connection] = []
    writer: _Writer | None = None
    finished = False
    # Start multiprocessing's resource tracker now: starting it unblocks SIGINT (see below).
    multiprocessing.resource_tracker.ensure_running()
    try:
        writer = _make_writer(transport, num_readers, chunk_bytes, ctx)
        for rank in range(num_readers):
            parent_end, child_end = ctx.Pipe(duplex=False)
            conns.append(parent_end)
            proc = ctx.Process(
                target=_reader_main,
                args=(transport, rank, writer.reader_setup(rank), child_end, os.getpid()),
                name=f"bench-ipc-reader-{rank}",
                daemon=True,
            )
            procs.append(proc)
            # Readers inherit a blocked SIGINT: Ctrl-C in the terminal reaches only this process.
            old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                proc.start()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            child_end.close()
        writer.handshake(_wait_ready(conns, procs))
        writer.sync()
        seq = 0
        for size in sizes:
            row, seq = measure(writer, size, messages_for(size, iterations), seq)
            row = {"transport": transport, "readers": num_readers, **row}
            row["overflow"] = transport == "ember-shm" and size > chunk_bytes
            yield row
        finished = True
    finally:
        # A second Ctrl-C must not cut the clean-up short.
        old_handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            if writer is not None:
                with contextlib.suppress(Exception):
                    writer.send_stop()
            _stop_readers(procs, grace_s=3.0 if finished else 0.5)
            if writer is not None:
                writer.close()
            for conn in conns:
                conn.close()
            _sweep_names([os.getpid(), *(p.pid for p in procs if p.pid is not None)])
        finally:
            signal.signal(signal.SIGINT, old_handler)


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

_COLUMNS = (
    ("transport", 11, "<"),
    ("rd", 2, ">"),
    ("size", 5, ">"),
    ("p50 us", 8, ">"),
    ("p99 us", 8, ">"),
    ("msg/s", 9, ">"),
    ("MB/s", 8, ">"),
    ("n", 5, ">"),
    ("burst", 6, ">"),
)


def _format_line(cells: Sequence[str]) -> str:
    return "  ".join(f"{c:{align}{width}}" for c, (_, width, align) in zip(cells, _COLUMNS))


def format_row(row: dict[str, Any]) -> str:
    return _format_line(
        [
            row["transport"] + ("*" if row["overflow"] else ""),
            str(row["readers"]),
            format_size(row["size"]),
            f"{row['lat_p50_us']:.1f}",
            f"{row['lat_p99_us']:.1f}",
            f"{row['msgs_per_s']:.0f}",
            f"{row['mb_per_s']:.1f}",
            str(row["lat_samples"]),
            str(row["burst"]),
        ]
    )


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def parse_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", default=DEFAULT_SIZES, help="message sizes (default %(default)s)"
    )
    parser.add_argument("--readers", default="1,4", help="reader counts (default %(default)s)")
    parser.add_argument(
        "--iterations",
        type=int,
        default=2000,
        help="latency samples per row up to 16K, scaled down above; throughput bursts start "
        "at the same length (default %(default)s)",
    )
    parser.add_argument(
        "--transports", default=",".join(TRANSPORTS), help="subset of %(default)s, in order"
    )
    parser.add_argument(
        "--chunk-bytes",
        type=parse_size,
        default=1 << 20,
        help="ember-shm chunk size; larger messages overflow to ZeroMQ (default 1M)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results here as JSON")
    args = parser.parse_args(argv)

    try:
        sizes = [parse_size(s) for s in parse_list(args.sizes)]
        readers = [int(r) for r in parse_list(args.readers)]
    except (ValueError, argparse.ArgumentTypeError) as exc:
        parser.error(str(exc))
    transports = parse_list(args.transports)
    unknown = sorted(set(transports) - set(TRANSPORTS))
    if unknown:
        parser.error(f"unknown transports {unknown}; choose from {', '.join(TRANSPORTS)}")
    if not sizes or not readers or min(readers) < 1 or args.iterations < 1:
        parser.error("need at least one size, reader counts >= 1 and --iterations >= 1")

    load_start = loadavg()
    print(
        f"bench_ipc: {os.cpu_count()} CPUs, load average {load_start}, python "
        f"{platform.python_version()}, zmq {zmq.zmq_version()}, iterations {args.iterations}"
    )
    print(_format_line([name for name, _, _ in _COLUMNS]))
    rows: list[dict[str, Any]] = []
    t_start = time.monotonic()
    try:
        for transport in transports:
            for num_readers in readers:
                group = run_group(transport, num_readers, sizes, args.iterations, args.chunk_bytes)
                with contextlib.closing(group):  # its clean-up runs now, even on Ctrl-C
                    for row in group:
                        rows.append(row)
                        print(format_row(row), flush=True)
    except KeyboardInterrupt:
        print("interrupted: readers stopped, queues removed", file=sys.stderr)
        return 130
    except RuntimeError as exc:  # a reader died or stopped answering
        print(f"error: {exc}", file=sys.stderr)
        return 1
    elapsed_s = time.monotonic() - t_start
    load_end = loadavg()

    print(
        "latency: one-way, until the last reader has the message (n samples); throughput: "
        "a burst of `burst` messages; MB = 1e6 B of payload sent"
    )
    if any(row["overflow"] for row in rows):
        print(f"* larger than --chunk-bytes {format_size(args.chunk_bytes)}: overflows to ZeroMQ")
    target_rows = [
        r
        for r in rows
        if (r["transport"], r["readers"], r["size"]) == ("ember-shm", 1, TARGET_SIZE)
    ]
    verdict = None
    if target_rows:
        p50 = target_rows[0]["lat_p50_us"]
        verdict = p50 <= TARGET_LATENCY_US
        print(
            f"target: ember-shm, 1 reader, 1K median one-way latency {p50:.1f} us "
            f"<= {TARGET_LATENCY_US:.0f} us: {'PASS' if verdict else 'FAIL'}"
        )
    print(f"done in {elapsed_s:.1f} s; load average {load_start} at start, {load_end} at end")

    if args.json:
        report = {
            "meta": {
                "argv": sys.argv,
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "zmq": zmq.zmq_version(),
                "pyzmq": zmq.__version__,
                "iterations": args.iterations,
                "chunk_bytes": args.chunk_bytes,
                "loadavg_start": load_start,
                "loadavg_end": load_end,
                "elapsed_s": elapsed_s,
                "clock": "time.monotonic_ns (CLOCK_MONOTONIC)",
                "target_latency_us": TARGET_LATENCY_US,
                "target_met": verdict,
            },
            "rows": rows,
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
