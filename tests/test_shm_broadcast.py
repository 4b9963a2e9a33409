"""Tests of the shared-memory broadcast queue with readers and writers in real processes."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time

import msgspec
import psutil
import pytest

from ember.workers.shm_broadcast import MessageQueue, QueueHandle

# A reader process: attaches as `rank`, prints "attached", then in mode "collect" reads until the
# writer closes the queue and prints the message count and a digest of every message in order;
# in mode "one" reads a single message and prints its length.
READER_CODE = r"""
import hashlib, sys
import msgspec
from ember.workers.shm_broadcast import MessageQueue, QueueHandle

handle = msgspec.msgpack.decode(bytes.fromhex(sys.argv[1]), type=QueueHandle)
mode = sys.argv[3]
queue = MessageQueue.attach(handle, int(sys.argv[2]))
print("attached", flush=True)
if mode == "collect":
    digest, count = hashlib.sha256(), 0
    while True:
        try:
            message = queue.dequeue(timeout_s=20)
        except EOFError:
            break
        assert isinstance(message, bytes), type(message)
        digest.update(len(message).to_bytes(8, "little") + message)
        count += 1
    print(count, digest.hexdigest(), flush=True)
else:
    print(len(queue.dequeue(timeout_s=30)), flush=True)
queue.close()
"""

# A writer process: creates a queue, prints its handle, waits for one reader, sends one message,
# prints "sent", then sleeps until it is killed.
WRITER_CODE = r"""
import sys, time
import msgspec
from ember.workers.shm_broadcast import MessageQueue

queue = MessageQueue(1, chunk_bytes=4096, num_chunks=4)
print(msgspec.msgpack.encode(queue.export_handle()).hex(), flush=True)
queue.wait_until_ready(timeout_s=20)
queue.enqueue(b"x" * 10_000)  # overflow: data on the socket too
print("sent", flush=True)
time.sleep(60)
"""


def _start_readers(queue: MessageQueue, num_readers: int, mode: str) -> list[subprocess.Popen]:
    handle_hex = msgspec.msgpack.encode(queue.export_handle()).hex()
    readers = [
        subprocess.Popen(
            [sys.executable, "-c", READER_CODE, handle_hex, str(rank), mode],
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in range(num_readers)
    ]
    queue.wait_until_ready(timeout_s=20)
    for reader in readers:
        assert reader.stdout.readline().strip() == "attached"
    return readers


def _expected_digest(messages: list[bytes]) -> str:
    digest = hashlib.sha256()
    for message in messages:
        digest.update(len(message).to_bytes(8, "little") + bytes(message))
    return digest.hexdigest()


def _send_and_collect(
    queue: MessageQueue, num_readers: int, messages: list[bytes | bytearray | memoryview]
) -> None:
    """Broadcast `messages`, close the queue, and check every reader got all of them in order."""
    readers = _start_readers(queue, num_readers, "collect")
    try:
        for message in messages:
            queue.enqueue(message, timeout_s=20)
        queue.close()
        expected = f"{len(messages)} {_expected_digest(messages)}"
        for reader in readers:
            out, _ = reader.communicate(timeout=30)
            assert out.strip() == expected
            assert reader.returncode == 0
    finally:
        for reader in readers:
            reader.kill()
        queue.close()


def _names_of_pid(pid: int) -> list[str]:
    """Leftover shared memory and socket directories of the writer process `pid`."""
    prefix = f"ember-{pid}-"
    return [
        name
        for directory in ("/dev/shm", tempfile.gettempdir())
        for name in os.listdir(directory)
        if name.startswith(prefix)
    ]


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


@pytest.mark.parametrize("num_readers", [1, 4])
def test_every_reader_receives_every_message_in_order(num_readers: int) -> None:
    queue = MessageQueue(num_readers, chunk_bytes=4096, num_chunks=4)
    messages: list[bytes | bytearray | memoryview] = [
        i.to_bytes(4, "little") * (i % 50) for i in range(300)
    ]
    messages[7] = bytearray(b"bytearray payload")
    messages[8] = memoryview(b"memoryview payload")
    messages[9] = b""
    _send_and_collect(queue, num_readers, messages)


def test_message_larger_than_chunk_arrives_intact() -> None:
    queue = MessageQueue(2, chunk_bytes=1 << 20, num_chunks=4)
    big = os.urandom(3 << 20)
    messages = [b"before", big, b"between", big[::-1], os.urandom(1 << 20), b"after"]
    _send_and_collect(queue, 2, messages)


def test_ring_wraps_many_times_without_loss() -> None:
    queue = MessageQueue(2, chunk_bytes=256, num_chunks=2)
    messages = [os.urandom(i % 300) for i in range(3000)]  # 1500 laps; about 1 in 7 overflows
    _send_and_collect(queue, 2, messages)


def test_idle_reader_blocks_with_little_cpu_and_wakes_on_enqueue() -> None:
    queue = MessageQueue(1, chunk_bytes=4096, num_chunks=4)
    (reader,) = _start_readers(queue, 1, "one")
    try:
        process = psutil.Process(reader.pid)
        time.sleep(0.3)  # past the spin phase: now blocked in dequeue
        cpu_before = _cpu_seconds(process)
        time.sleep(1.0)
        idle_cpu_s = _cpu_seconds(process) - cpu_before
        assert idle_cpu_s < 0.1, f"idle reader used {idle_cpu_s:.3f} s of CPU in 1 s"
        queue.enqueue(b"wake up", timeout_s=5)
        out, _ = reader.communicate(timeout=10)
        assert out.strip() == "7"
    finally:
        reader.kill()
        queue.close()


def test_dequeue_timeout_raises_timeout_error() -> None:
    with MessageQueue(1, chunk_bytes=1024, num_chunks=2, spin_s=0.01) as queue:
        reader = MessageQueue.attach(queue.export_handle(), 0)
        try:
            queue.wait_until_ready(timeout_s=10)
            start = time.monotonic()
            with pytest.raises(TimeoutError):
                reader.dequeue(timeout_s=0.2)
            assert time.monotonic() - start >= 0.2
            queue.enqueue(b"late", timeout_s=1)
            assert reader.dequeue(timeout_s=1) == b"late"
        finally:
            reader.close()


def test_enqueue_times_out_while_ring_is_full() -> None:
    with MessageQueue(1, chunk_bytes=1024, num_chunks=2) as queue:
        reader = MessageQueue.attach(queue.export_handle(), 0)
        try:
            queue.enqueue(b"0", timeout_s=5)
            queue.enqueue(b"1", timeout_s=5)
            with pytest.raises(TimeoutError):
                queue.enqueue(b"2", timeout_s=0.1)
            assert reader.dequeue(timeout_s=1) == b"0"
            queue.enqueue(b"2", timeout_s=1)
            assert [reader.dequeue(timeout_s=1) for _ in range(2)] == [b"1", b"2"]
        finally:
            reader.close()


def test_wait_until_ready_times_out_without_readers() -> None:
    with MessageQueue(2) as queue, pytest.raises(TimeoutError, match="readers"):
        queue.wait_until_ready(timeout_s=0.1)


def test_reader_gets_eof_after_writer_closes() -> None:
    queue = MessageQueue(1, chunk_bytes=1024, num_chunks=4, spin_s=0.0)
    reader = MessageQueue.attach(queue.export_handle(), 0)
    try:
        queue.enqueue(b"last", timeout_s=5)
        queue.close()
        assert reader.dequeue(timeout_s=1) == b"last"  # what was sent is still read
        with pytest.raises(EOFError):
            reader.dequeue(timeout_s=1)
    finally:
        reader.close()


def test_names_are_unique_and_prefixed() -> None:
    with MessageQueue(1) as first, MessageQueue(1) as second:
        first_handle, second_handle = first.export_handle(), second.export_handle()
        assert first_handle.shm_name != second_handle.shm_name
        assert first_handle.socket_address != second_handle.socket_address
        assert first_handle.shm_name.startswith(f"ember-{os.getpid()}-")


def test_close_removes_every_name() -> None:
    queue = MessageQueue(1, chunk_bytes=1024, num_chunks=2)
    handle = queue.export_handle()
    socket_path = handle.socket_address.removeprefix("ipc://")
    assert os.path.exists(f"/dev/shm/{handle.shm_name}") and os.path.exists(socket_path)
    queue.close()
    queue.close()  # idempotent
    assert not os.path.exists(f"/dev/shm/{handle.shm_name}")
    assert not os.path.exists(os.path.dirname(socket_path))
    assert _names_of_pid(os.getpid()) == []


def test_names_are_unlinked_once_all_readers_attached() -> None:
    with MessageQueue(1, chunk_bytes=1024, num_chunks=2) as queue:
        handle = queue.export_handle()
        reader = MessageQueue.attach(handle, 0)
        try:
            queue.wait_until_ready(timeout_s=10)
            assert not os.path.exists(f"/dev/shm/{handle.shm_name}")
            queue.enqueue(b"still works", timeout_s=1)
            assert reader.dequeue(timeout_s=1) == b"still works"
        finally:
            reader.close()


def test_sigkilled_writer_leaves_nothing_in_dev_shm() -> None:
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER_CODE], stdout=subprocess.PIPE, text=True
    )
    try:
        handle = msgspec.msgpack.decode(bytes.fromhex(writer.stdout.readline()), type=QueueHandle)
        reader = MessageQueue.attach(handle, 0)
        try:
            assert reader.dequeue(timeout_s=20) == b"x" * 10_000
            assert writer.stdout.readline().strip() == "sent"
            os.kill(writer.pid, signal.SIGKILL)
            writer.wait(timeout=10)
            assert _names_of_pid(writer.pid) == []
            with pytest.raises(TimeoutError):
                reader.dequeue(timeout_s=0.1)
        finally:
            reader.close()
    finally:
        writer.kill()
        writer.wait()
