"""Process hygiene: every way an `LLM` ends leaves no ember process and no shared memory, dead
children are reported instead of hanging, and garbage on the socket does not stop the engine."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
import zmq

from ember import LLM, EngineDeadError, SamplingParams
from tests.helpers import write_random_llama


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_random_llama(tmp_path_factory.mktemp("tiny"), max_position_embeddings=256)


def _ember_pids(llm: LLM) -> list[int]:
    core = psutil.Process(llm.engine.process.pid)
    return [core.pid] + [child.pid for child in core.children(recursive=True)]


def _ember_shm(pids: list[int]) -> list[str]:
    """ember's shared-memory segments created by these processes (names are
    ember-<creator pid>-<random>; other engines on the machine are none of our business)."""
    prefixes = tuple(f"ember-{pid}-" for pid in pids)
    return [name for name in os.listdir("/dev/shm") if name.startswith(prefixes)]


def _assert_gone(pids: list[int], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = [
            pid
            for pid in pids
            if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        ]
        if not alive:
            return
        time.sleep(0.1)
    raise AssertionError(f"processes still alive after {timeout_s} s: {alive}")


def _new_llm(tiny_dir) -> LLM:
    return LLM(tiny_dir, dtype="float32", skip_tokenizer_init=True)


def test_shutdown_stops_children_and_unlinks_shared_memory(tiny_dir):
    llm = _new_llm(tiny_dir)
    pids = _ember_pids(llm)
    assert len(pids) == 2  # engine core and one worker
    # Linux keeps 15 characters of a process name.
    assert psutil.Process(pids[0]).name() == "ember-enginecore"[:15]
    assert psutil.Process(pids[1]).name() == "ember-worker-0"
    private_dir = llm.engine._resources.private_dir
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)
    llm.shutdown()
    _assert_gone(pids, timeout_s=1.0)
    assert _ember_shm(pids) == []
    assert not os.path.exists(private_dir)
    llm.shutdown()  # twice is fine


def test_with_block_cleans_up(tiny_dir):
    with _new_llm(tiny_dir) as llm:
        pids = _ember_pids(llm)
    _assert_gone(pids, timeout_s=1.0)
    assert _ember_shm(pids) == []


def test_collected_llm_cleans_up(tiny_dir):
    llm = _new_llm(tiny_dir)
    pids = _ember_pids(llm)
    del llm
    gc.collect()
    _assert_gone(pids)
    assert _ember_shm(pids) == []


def test_two_llms_live_side_by_side(tiny_dir):
    with _new_llm(tiny_dir) as first, _new_llm(tiny_dir) as second:
        params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
        a = first.generate([[5, 6, 7]], params, use_tqdm=False)[0].outputs[0].token_ids
        b = second.generate([[5, 6, 7]], params, use_tqdm=False)[0].outputs[0].token_ids
        assert a == b and len(a) == 5


def test_killed_worker_makes_generate_raise(tiny_dir):
    llm = _new_llm(tiny_dir)
    pids = _ember_pids(llm)
    worker = psutil.Process(pids[1])
    params = SamplingParams(max_tokens=250, ignore_eos=True)  # ~64k tokens: many seconds

    def kill_soon():
        time.sleep(1.0)
        worker.send_signal(signal.SIGKILL)

    import threading

    threading.Thread(target=kill_soon, daemon=True).start()
    start = time.monotonic()
    with pytest.raises(EngineDeadError):
        llm.generate([[1, 2, 3]] * 256, params, use_tqdm=False)
    assert time.monotonic() - start < 11
    llm.shutdown()
    _assert_gone(pids)
    assert _ember_shm(pids) == []


USER_SCRIPT = """
import sys, time
from ember import LLM, SamplingParams
llm = LLM(sys.argv[1], dtype="float32", skip_tokenizer_init=True)
out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
print(len(out[0].outputs[0].token_ids), flush=True)
print(llm.engine.process.pid, flush=True)
time.sleep(600)
"""


def test_killed_user_process_takes_the_engine_down(tiny_dir, tmp_path):
    # The script has no `if __name__ == "__main__":` guard, and needs none.
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent(USER_SCRIPT))
    user = subprocess.Popen(
        [sys.executable, str(script), tiny_dir],
        stdout=subprocess.PIPE,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    try:
        assert user.stdout.readline().strip() == b"3"
        core_pid = int(user.stdout.readline())
        pids = [core_pid] + [c.pid for c in psutil.Process(core_pid).children(recursive=True)]
        assert len(pids) == 2
        user.send_signal(signal.SIGKILL)
        user.wait()
        _assert_gone(pids, timeout_s=10)
    finally:
        user.kill()
    assert _ember_shm(pids) == []


def test_garbage_frames_are_dropped_and_the_engine_keeps_serving(tiny_dir):
    with _new_llm(tiny_dir) as llm:
        context = zmq.Context.instance()
        socket = context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(llm.engine.input_address)
        for frames in (
            [b"\xff\x00garbage"],
            [b"A", b"not msgpack"],
            [b"A", b"\x93\x01\x02"],
            [b"Z", b"", b""],
            [b"U", b"\x92\xa1x"],
        ):
            socket.send_multipart(frames)
        time.sleep(0.3)
        out = llm.generate(
            [[1, 2, 3]], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False
        )
        assert len(out[0].outputs[0].token_ids) == 4
        socket.close()


EXITING_SCRIPT = """
import sys
import psutil
from ember import LLM
llm = LLM(sys.argv[1], dtype="float32", skip_tokenizer_init=True)
core = psutil.Process(llm.engine.process.pid)
print(" ".join(str(p.pid) for p in [core, *core.children(recursive=True)]), flush=True)
"""


def test_interpreter_exit_without_shutdown_cleans_up(tiny_dir, tmp_path):
    script = tmp_path / "exiting_script.py"
    script.write_text(textwrap.dedent(EXITING_SCRIPT))
    result = subprocess.run(
        [sys.executable, str(script), tiny_dir],
        check=False,
        capture_output=True,
        timeout=120,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    pids = [int(pid) for pid in result.stdout.split()]
    assert len(pids) == 2
    _assert_gone(pids, timeout_s=5)
    assert _ember_shm(pids) == []
