"""Fault injection: SIGKILL to the worker, to the engine core, and to the user's process (a
subprocess of the test). In each case no ember process survives 10 s later, nothing of ember is
left in /dev/shm or in the socket and config directories, and the surviving side reports the
death (`EngineDeadError` in the user's call; the engine core's log line when the user is gone)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import psutil
import pytest

from ember import LLM, EngineDeadError, SamplingParams
from tests.helpers import write_random_llama

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LONG_RUN = SamplingParams(max_tokens=200, ignore_eos=True)  # 256 requests: many seconds


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_random_llama(tmp_path_factory.mktemp("tiny"), max_position_embeddings=256)


def _process_tree(core_pid: int) -> list[int]:
    return [core_pid] + [child.pid for child in psutil.Process(core_pid).children(recursive=True)]


def _leftovers(pids: list[int], paths: list[str]) -> list[str]:
    """What of these ember processes is left: their shared-memory segments and private
    directories (named ember-<pid>-...), and the given paths."""
    prefixes = tuple(f"ember-{pid}-" for pid in pids)
    left = [p for p in paths if os.path.exists(p)]
    for directory in ("/dev/shm", tempfile.gettempdir()):
        left += [
            os.path.join(directory, n) for n in os.listdir(directory) if n.startswith(prefixes)
        ]
    return left


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def _assert_all_gone(pids: list[int], paths: list[str], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pids) and not _leftovers(pids, paths):
            return
        time.sleep(0.1)
    raise AssertionError(
        f"{timeout_s} s after the kill: alive {_alive(pids)}, left {_leftovers(pids, paths)}"
    )


def _worker_config_dir(worker_pid: int) -> str:
    command = psutil.Process(worker_pid).cmdline()
    return os.path.dirname(command[command.index("--config") + 1])


def _kill_during_generate(llm: LLM, victim_pid: int) -> float:
    """SIGKILL `victim_pid` a second into a long `generate`; seconds until it raised."""
    killed_at = []

    def kill_soon():
        time.sleep(1.0)
        killed_at.append(time.monotonic())
        os.kill(victim_pid, signal.SIGKILL)

    threading.Thread(target=kill_soon, daemon=True).start()
    with pytest.raises(EngineDeadError):
        llm.generate([[1, 2, 3]] * 256, LONG_RUN, use_tqdm=False)
    return time.monotonic() - killed_at[0]


@pytest.mark.parametrize(
    "victim, async_scheduling",
    [("worker", False), ("engine core", False), ("worker", True)],
)
def test_sigkill_of_an_engine_process_raises_and_leaves_nothing(tiny_dir, victim, async_scheduling):
    """async_scheduling: the worker dies with the next step already queued for it."""
    llm = LLM(
        tiny_dir, dtype="float32", skip_tokenizer_init=True, async_scheduling=async_scheduling
    )
    pids = _process_tree(llm.engine.process.pid)
    assert len(pids) == 2
    paths = [llm.engine._resources.private_dir, _worker_config_dir(pids[1])]
    victim_pid = pids[1] if victim == "worker" else pids[0]
    seconds_to_raise = _kill_during_generate(llm, victim_pid)
    assert seconds_to_raise < 5
    # Without shutdown(): what is left must go by itself.
    _assert_all_gone(pids, paths)
    with pytest.raises(EngineDeadError):  # and the LLM keeps saying so
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)
    llm.shutdown()


def test_sigkill_of_an_idle_engine_is_reported_at_the_next_call(tiny_dir):
    llm = LLM(tiny_dir, dtype="float32", skip_tokenizer_init=True)
    pids = _process_tree(llm.engine.process.pid)
    os.kill(pids[1], signal.SIGKILL)  # the worker, while nothing runs
    _assert_all_gone(pids, [])  # the engine core stops when a worker dies
    start = time.monotonic()
    with pytest.raises(EngineDeadError, match="worker 0 died"):
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)
    assert time.monotonic() - start < 2
    llm.shutdown()


USER_SCRIPT = """
import sys
from ember import LLM, SamplingParams
llm = LLM(sys.argv[1], dtype="float32", skip_tokenizer_init=True)
core = llm.engine.process.pid
print(core, llm.engine._resources.private_dir, flush=True)
while True:
    llm.generate([[1, 2, 3]] * 64, SamplingParams(max_tokens=100, ignore_eos=True), use_tqdm=False)
"""


def test_sigkill_of_the_user_process_takes_the_engine_down_cleanly(tiny_dir, tmp_path):
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent(USER_SCRIPT))
    user = subprocess.Popen(
        [sys.executable, str(script), tiny_dir],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    try:
        core_pid, private_dir = user.stdout.readline().split()
        pids = _process_tree(int(core_pid))
        assert len(pids) == 2
        paths = [private_dir.decode(), _worker_config_dir(pids[1])]
        time.sleep(1.0)  # generating
        user.send_signal(signal.SIGKILL)
        user.wait()
        _assert_all_gone([user.pid, *pids], paths)
        # The children inherited the user's stderr: reading it to its end means all are gone.
        log = user.stderr.read().decode()
    finally:
        user.kill()
        user.wait()
    assert "the frontend that started this engine core is gone" in log
