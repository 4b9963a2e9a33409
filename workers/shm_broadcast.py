"""One-writer, N-reader broadcast queue over a shared-memory ring buffer (DESIGN.md §3).

The engine core writes each step's `SchedulerOutput` here and every worker reads it; each worker
answers on its own one-reader queue. Payloads are bytes (callers encode with msgspec); nothing is
pickled.

Layout of the shared-memory segment (N readers, C chunks, B = chunk_bytes; every row starts on a
64-byte boundary, the flag groups are padded to 64 bytes):

    offset 0        closed u8 | sleeping[0..N-1] u8     (sleeping[r] = 1: r blocks on the socket)
    chunk 0         written u8 | read[0..N-1] u8 || kind u8, 7 pad | length u64 || data: B bytes
    chunk 1         written u8 | read[0..N-1] u8 || kind u8, 7 pad | length u64 || data: B bytes
    ...
    chunk C-1       written u8 | read[0..N-1] u8 || kind u8, 7 pad | length u64 || data: B bytes

    chunk state     written  read[r]   meaning for reader r
    never used         0       1       nothing to read
    published          1       0       message waiting: copy it out, then set read[r] = 1
    consumed by r      1       1       r is done; the writer reuses the chunk once all read[] = 1

kind INLINE: the message is `data[:length]`. kind OVERFLOW (message longer than B): the message was
published on the ZeroMQ socket before the chunk was marked written; the chunk only says "take the
next data frame from the socket".

Notification: a reader spins for `spin_s` seconds, then raises sleeping[r], re-checks its chunk and
blocks in `zmq.Poller.poll`. The writer, after publishing a chunk, reads sleeping[] and sends a
wake-up frame (topic "W" + rank) to each sleeping reader. A memory fence sits between each side's
store and its load (the Dekker pattern), so either the reader sees the chunk or the writer sees the
flag: no wake-up is lost. One XPUB socket carries both overflow data (topic "D", all readers) and
wake-ups; the writer learns from the subscriptions (XPUB_VERBOSE) when every reader is connected.

Names: the segment is /dev/shm/ember-<pid>-<token>; the socket is <ipc_dir>/ember-<pid>-<token>.sock
or, without `ipc_dir`, mq.sock in a private directory ember-<pid>-<token>-* (mode 0700) under the
temporary directory. The writer unlinks them as soon as all readers are attached (mappings and
connections stay valid), and again in `close()` / at exit, so a process SIGKILLed after
`wait_until_ready` leaves nothing behind (one killed before it leaves the names: nothing can
remove them then).

Not thread-safe: one thread per side.
"""

from __future__ import annotations

import mmap
import os
import secrets
import shutil
import struct
import tempfile
import threading
import time
import weakref
from collections import deque
from typing import TYPE_CHECKING

import msgspec
import zmq

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["MessageQueue", "QueueHandle"]

_SHM_DIR = "/dev/shm"
_ALIGN = 64
_KIND_INLINE = 0
_KIND_OVERFLOW = 1
_MSG_HEADER = struct.Struct("<B7xQ")  # kind, pad, length: 16 bytes before the data
_DATA_TOPIC = b"D"
_WAKE_TOPIC = b"W"
_RANK = struct.Struct(">I")
_DEFAULT_SPIN_S = 0.005
_SOCKET_LINGER_MS = 1000

_fence_lock = threading.Lock()


def _memory_fence() -> None:
    """Full memory barrier: acquiring a lock is an atomic read-modify-write (`lock cmpxchg`).

    Python offers no fence; stores into the mmap are plain stores. Between a store of one flag and
    a load of another (reader: sleeping -> written, writer: written -> sleeping) the CPU may
    otherwise reorder, and a wake-up would be lost.
    """
    _fence_lock.acquire()
    _fence_lock.release()


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def _deadline(timeout_s: float | None) -> float | None:
    """Monotonic deadline for a timeout; None (or infinity) waits forever."""
    if timeout_s is None or timeout_s == float("inf"):
        return None
    return time.monotonic() + timeout_s


def _remaining_ms(deadline: float | None) -> int:
    """Milliseconds to the deadline for zmq's poll: -1 forever, 0 once passed, rounded up."""
    if deadline is None:
        return -1
    remaining_s = deadline - time.monotonic()
    return 0 if remaining_s <= 0 else int(remaining_s * 1000) + 1


def _wake_topic(reader_rank: int) -> bytes:
    return _WAKE_TOPIC + _RANK.pack(reader_rank)


class QueueHandle(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True, gc=False):
    """Everything a reader in another process needs to attach to a `MessageQueue`."""

    shm_name: str  # file name under /dev/shm
    num_readers: int
    chunk_bytes: int
    num_chunks: int
    socket_address: str  # zmq address of the writer's XPUB socket
    writer_pid: int  # lets a reader check that the writer is alive
    spin_s: float = _DEFAULT_SPIN_S


class _Layout:
    """Byte offsets inside the segment, computed identically by the writer and the readers."""

    __slots__ = (
        "chunk_bytes",
        "chunk_stride",
        "chunks_offset",
        "meta_bytes",
        "num_chunks",
        "num_readers",
        "total_bytes",
    )

    def __init__(self, num_readers: int, chunk_bytes: int, num_chunks: int) -> None:
        self.num_readers = num_readers
        self.chunk_bytes = chunk_bytes
        self.num_chunks = num_chunks
        self.meta_bytes = _round_up(1 + num_readers, _ALIGN)  # written + read flags
        self.chunk_stride = _round_up(self.meta_bytes + _MSG_HEADER.size + chunk_bytes, _ALIGN)
        self.chunks_offset = _round_up(1 + num_readers, _ALIGN)  # closed + sleeping flags
        self.total_bytes = self.chunks_offset + num_chunks * self.chunk_stride

    def written_offset(self, chunk_index: int) -> int:
        return self.chunks_offset + chunk_index * self.chunk_stride

    def read_offset(self, chunk_index: int, reader_rank: int) -> int:
        return self.written_offset(chunk_index) + 1 + reader_rank

    def message_offset(self, chunk_index: int) -> int:
        return self.written_offset(chunk_index) + self.meta_bytes

    @staticmethod
    def sleeping_offset(reader_rank: int) -> int:
        return 1 + reader_rank


class _Resources:
    """What a queue must release; kept apart from the queue so `weakref.finalize` can own it."""

    def __init__(self) -> None:
        self.shm: mmap.mmap | None = None
        self.shm_view: memoryview | None = None
        self.shm_path: str | None = None  # writer only: the name to unlink
        self.socket: zmq.Socket | None = None
        self.socket_path: str | None = None  # writer only, ipc:// file to unlink
        self.private_dir: str | None = None  # writer only, created by us, removed by us

    def unlink_names(self) -> None:
        """Remove the names (segment, socket file, private directory); mappings stay valid."""
        for path in (self.shm_path, self.socket_path):
            if path is not None:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        self.shm_path = self.socket_path = None
        if self.private_dir is not None:
            shutil.rmtree(self.private_dir, ignore_errors=True)
            self.private_dir = None

    def release(self) -> None:
        self.unlink_names()
        if self.socket is not None:
            self.socket.close()  # the writer lingers so queued data and wake-ups still go out
            self.socket = None
        if self.shm_view is not None:
            self.shm_view.release()
            self.shm_view = None
        if self.shm is not None:
            self.shm.close()
            self.shm = None


class MessageQueue:
    """Broadcast queue: `MessageQueue(n)` builds the writer, `MessageQueue.attach` a reader."""

    def __init__(
        self,
        num_readers: int,
        *,
        chunk_bytes: int = 1 << 20,
        num_chunks: int = 8,
        ipc_dir: str | None = None,
        spin_s: float = _DEFAULT_SPIN_S,
    ) -> None:
        if num_readers < 1:
            raise ValueError(f"num_readers must be >= 1, got {num_readers}")
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
        if num_chunks < 2:
            raise ValueError(f"num_chunks must be >= 2, got {num_chunks}")
        if spin_s < 0:
            raise ValueError(f"spin_s must be >= 0, got {spin_s}")
        if not os.path.isdir(_SHM_DIR):
            raise RuntimeError(f"MessageQueue needs {_SHM_DIR} (Linux shared memory)")
        self._init_common(_Layout(num_readers, chunk_bytes, num_chunks), reader_rank=None)
        self._spin_s = spin_s
        unique = f"ember-{os.getpid()}-{secrets.token_hex(8)}"
        res = self._resources

        shm_path = os.path.join(_SHM_DIR, unique)
        fd = os.open(shm_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        res.shm_path = shm_path
        self._finalizer = weakref.finalize(self, _Resources.release, res)
        try:
            os.ftruncate(fd, self._layout.total_bytes)
            res.shm = mmap.mmap(fd, self._layout.total_bytes)
        finally:
            os.close(fd)
        res.shm_view = memoryview(res.shm)
        self._mm = res.shm
        self._buf = res.shm_view
        for chunk_index in range(num_chunks):  # "never used": written 0, every read flag 1
            offset = self._layout.written_offset(chunk_index)
            self._buf[offset + 1 : offset + 1 + num_readers] = b"\x01" * num_readers

        if ipc_dir is None:
            res.private_dir = tempfile.mkdtemp(prefix=unique + "-")  # mode 0700
            socket_path = os.path.join(res.private_dir, "mq.sock")  # short: sun_path is 108 bytes
        else:
            socket_path = os.path.join(ipc_dir, unique + ".sock")
        socket = zmq.Context.instance().socket(zmq.XPUB)
        res.socket = socket
        socket.setsockopt(zmq.XPUB_VERBOSE, 1)  # pass every subscription up: readiness count
        socket.setsockopt(zmq.SNDHWM, 0)  # never drop: the ring bounds what is in flight
        socket.setsockopt(zmq.LINGER, _SOCKET_LINGER_MS)
        socket.bind(f"ipc://{socket_path}")
        res.socket_path = socket_path
        self._socket = socket
        self._socket_address = f"ipc://{socket_path}"
        self._shm_name = unique
        self._subscribed_ranks: set[int] = set()
        self._ready = False

    def _init_common(self, layout: _Layout, reader_rank: int | None) -> None:
        self._layout = layout
        self._reader_rank = reader_rank
        self._resources = _Resources()
        self._chunk_index = 0
        self._closed = False

    # ----------------------------------------------------------------------------------- writer

    def export_handle(self) -> QueueHandle:
        """What a reader process needs for `attach`; send it to the reader (e.g. with msgspec)."""
        self._require_writer("export_handle")
        return QueueHandle(
            shm_name=self._shm_name,
            num_readers=self._layout.num_readers,
            chunk_bytes=self._layout.chunk_bytes,
            num_chunks=self._layout.num_chunks,
            socket_address=self._socket_address,
            writer_pid=os.getpid(),
            spin_s=self._spin_s,
        )

    def wait_until_ready(self, timeout_s: float) -> None:
        """Block until every reader has attached, then unlink the segment and socket names.

        Raises TimeoutError if some reader has not attached within `timeout_s`.
        """
        self._require_writer("wait_until_ready")
        self._check_open()
        if self._ready:
            return
        deadline = _deadline(timeout_s)
        num_readers = self._layout.num_readers
        while len(self._subscribed_ranks) < num_readers:
            if not self._socket.poll(_remaining_ms(deadline), zmq.POLLIN):
                missing = sorted(set(range(num_readers)) - self._subscribed_ranks)
                raise TimeoutError(
                    f"readers {missing} of {num_readers} did not attach within {timeout_s} s"
                )
            event = self._socket.recv()
            # b"\x01" + topic: subscribe. Readers subscribe to data first, then to their wake-up
            # topic, so seeing the wake-up topic means both are in place.
            if event[:2] == b"\x01" + _WAKE_TOPIC and len(event) == 2 + _RANK.size:
                rank = _RANK.unpack(event[2:])[0]
                if rank < num_readers:
                    self._subscribed_ranks.add(rank)
        self._resources.unlink_names()
        self._ready = True

    def enqueue(
        self, payload: bytes | bytearray | memoryview, timeout_s: float | None = None
    ) -> None:
        """Publish `payload` to every reader; waits up to `timeout_s` while the ring is full.

        Raises TimeoutError if the readers do not free the next chunk (or attach) in time.
        """
        self._require_writer("enqueue")
        self._check_open()
        deadline = _deadline(timeout_s)
        if not self._ready:
            self.wait_until_ready(float("inf") if timeout_s is None else timeout_s)
        view = memoryview(payload)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        layout, buf = self._layout, self._buf
        chunk_index = self._chunk_index
        written_offset = layout.written_offset(chunk_index)
        read_start = written_offset + 1
        read_end = read_start + layout.num_readers
        all_read = b"\x01" * layout.num_readers
        if buf[read_start:read_end] != all_read:
            self._wait_for_chunk(read_start, read_end, all_read, deadline)
        _memory_fence()  # readers' last loads from this chunk happen before our stores

        length = view.nbytes
        message_offset = layout.message_offset(chunk_index)
        buf[written_offset] = 0
        if length <= layout.chunk_bytes:
            _MSG_HEADER.pack_into(buf, message_offset, _KIND_INLINE, length)
            data_offset = message_offset + _MSG_HEADER.size
            buf[data_offset : data_offset + length] = view
        else:
            _MSG_HEADER.pack_into(buf, message_offset, _KIND_OVERFLOW, length)
            self._socket.send_multipart((_DATA_TOPIC, view))  # before the chunk is published
        _memory_fence()  # data before flags
        buf[read_start:read_end] = bytes(layout.num_readers)
        buf[written_offset] = 1
        _memory_fence()  # publish before reading sleeping[] (pairs with the reader's fence)
        self._chunk_index = (chunk_index + 1) % layout.num_chunks
        sleeping = buf[1 : 1 + layout.num_readers]
        if any(sleeping):
            for rank, flag in enumerate(sleeping):
                if flag:
                    self._socket.send(_wake_topic(rank))

    def _wait_for_chunk(
        self, read_start: int, read_end: int, all_read: bytes, deadline: float | None
    ) -> None:
        """Ring full: back off from yielding to sleeping up to 1 ms until all readers are done."""
        buf = self._buf
        pause_s = 0.0
        while buf[read_start:read_end] != all_read:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError("enqueue timed out: the ring is full (a reader is behind)")
            if pause_s == 0.0:
                os.sched_yield()
            else:
                time.sleep(pause_s)
            pause_s = min(1e-3, pause_s * 2 if pause_s else 1e-5)

    # ----------------------------------------------------------------------------------- reader

    @classmethod
    def attach(cls, handle: QueueHandle, reader_rank: int) -> MessageQueue:
        """Attach reader `reader_rank` (0 <= rank < num_readers) to the writer's queue."""
        if not 0 <= reader_rank < handle.num_readers:
            raise ValueError(f"reader_rank must be in [0, {handle.num_readers}), got {reader_rank}")
        self = cls.__new__(cls)
        self._init_common(
            _Layout(handle.num_readers, handle.chunk_bytes, handle.num_chunks), reader_rank
        )
        self._spin_s = handle.spin_s
        res = self._resources
        self._finalizer = weakref.finalize(self, _Resources.release, res)
        shm_path = os.path.join(_SHM_DIR, handle.shm_name)
        try:
            fd = os.open(shm_path, os.O_RDWR)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"shared memory {shm_path} is gone: the writer exited or all "
                f"{handle.num_readers} readers already attached"
            ) from None
        try:
            size = os.fstat(fd).st_size
            if size != self._layout.total_bytes:
                raise ValueError(
                    f"shared memory {shm_path} has {size} bytes, the handle implies "
                    f"{self._layout.total_bytes}"
                )
            res.shm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        res.shm_view = memoryview(res.shm)
        self._mm = res.shm
        self._buf = res.shm_view

        socket = zmq.Context.instance().socket(zmq.SUB)
        res.socket = socket
        socket.setsockopt(zmq.RCVHWM, 0)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(handle.socket_address)
        socket.setsockopt(zmq.SUBSCRIBE, _DATA_TOPIC)
        socket.setsockopt(zmq.SUBSCRIBE, _wake_topic(reader_rank))  # last: the writer waits on it
        self._socket = socket
        self._poller = zmq.Poller()
        self._poller.register(socket, zmq.POLLIN)
        self._overflow: deque[bytes] = deque()  # data frames received while waiting for a chunk
        self._writer_pid = handle.writer_pid
        return self

    @property
    def writer_pid(self) -> int:
        """Reader side: the writer's pid, for callers that check it is alive between timeouts."""
        return self._writer_pid if self._reader_rank is not None else os.getpid()

    def dequeue(self, timeout_s: float | None = None, spin_s: float | None = None) -> bytes:
        """Next message, in order. Raises TimeoutError after `timeout_s` without one, and
        EOFError once the writer has closed the queue and every message was read. `spin_s`:
        this wait's spin before it sleeps (None: the queue's)."""
        rank = self._reader_rank
        if rank is None:
            raise RuntimeError("dequeue is for readers; the writer calls enqueue")
        self._check_open()
        deadline = _deadline(timeout_s)
        layout, buf = self._layout, self._buf
        chunk_index = self._chunk_index
        written_offset = layout.written_offset(chunk_index)
        read_offset = layout.read_offset(chunk_index, rank)
        if not (buf[written_offset] == 1 and buf[read_offset] == 0):
            spin_s = self._spin_s if spin_s is None else spin_s
            self._wait_for_message(written_offset, read_offset, deadline, timeout_s, spin_s)
        _memory_fence()  # flags before data

        message_offset = layout.message_offset(chunk_index)
        kind, length = _MSG_HEADER.unpack_from(buf, message_offset)
        if kind == _KIND_INLINE:
            data_offset = message_offset + _MSG_HEADER.size
            payload = self._mm[data_offset : data_offset + length]
        else:
            payload = self._next_overflow(length, deadline, timeout_s)
        _memory_fence()  # our loads before the writer may reuse the chunk
        buf[read_offset] = 1
        self._chunk_index = (chunk_index + 1) % layout.num_chunks
        return payload

    def _wait_for_message(
        self,
        written_offset: int,
        read_offset: int,
        deadline: float | None,
        timeout_s: float | None,
        spin_s: float,
    ) -> None:
        """Spin for spin_s, then sleep on the socket with sleeping[r] raised."""
        buf = self._buf
        spin_until = time.monotonic() + spin_s
        if deadline is not None:
            spin_until = min(spin_until, deadline)
        while time.monotonic() < spin_until:
            if buf[written_offset] == 1 and buf[read_offset] == 0:
                return
            os.sched_yield()

        sleeping_offset = _Layout.sleeping_offset(self._reader_rank)
        buf[sleeping_offset] = 1
        try:
            while True:
                _memory_fence()  # sleeping[r] = 1 before reading the chunk (pairs with writer)
                if buf[written_offset] == 1 and buf[read_offset] == 0:
                    return
                if buf[0]:
                    raise EOFError("the writer closed the queue")
                wait_ms = _remaining_ms(deadline)
                if wait_ms == 0:
                    raise TimeoutError(f"dequeue: no message within {timeout_s} s")
                if self._poller.poll(wait_ms):
                    self._drain_socket()
        finally:
            buf[sleeping_offset] = 0

    def _drain_socket(self) -> None:
        """Read every frame waiting on the socket: keep data, drop wake-ups."""
        while True:
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if frames[0] == _DATA_TOPIC:
                self._overflow.append(frames[1])

    def _next_overflow(self, length: int, deadline: float | None, timeout_s: float | None) -> bytes:
        """The data frame for an overflow chunk (sent before the chunk was published)."""
        while not self._overflow:
            wait_ms = _remaining_ms(deadline)
            if wait_ms == 0:
                raise TimeoutError(f"dequeue: overflow data not received within {timeout_s} s")
            if self._poller.poll(wait_ms):
                self._drain_socket()
        payload = self._overflow.popleft()
        if len(payload) != length:
            raise RuntimeError(f"overflow frame has {len(payload)} bytes, the chunk says {length}")
        return payload

    # ----------------------------------------------------------------------------------- common

    @property
    def is_writer(self) -> bool:
        return self._reader_rank is None

    def close(self) -> None:
        """Release the mapping and socket; the writer also removes every name it created and
        tells sleeping readers (they raise EOFError once they have read everything)."""
        if self._closed:
            return
        self._closed = True
        if self._reader_rank is None and self._resources.shm is not None:
            num_readers = self._layout.num_readers
            self._buf[0] = 1
            _memory_fence()
            if self._ready:
                for rank in range(num_readers):
                    if self._buf[_Layout.sleeping_offset(rank)]:
                        self._socket.send(_wake_topic(rank))
        self._buf = None
        self._mm = None
        self._finalizer()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("MessageQueue is closed")

    def _require_writer(self, method: str) -> None:
        if self._reader_rank is not None:
            raise RuntimeError(f"{method} is for the writer; this is reader {self._reader_rank}")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
