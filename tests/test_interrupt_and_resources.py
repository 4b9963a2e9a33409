"""Ctrl-C during `generate` raises KeyboardInterrupt in the user's code, aborts the requests and
leaves the `LLM` usable; 20 create/shutdown cycles leave no growth in open files, threads,
shared memory or child processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading

import psutil
import pytest

from ember import LLM, SamplingParams
from tests.helpers import write_random_llama

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_random_llama(tmp_path_factory.mktemp("tiny"), max_position_embeddings=256)


INTERRUPTED_SCRIPT = """
import signal, sys, time
# A test run started in the background (`make test &`) ignores SIGINT, and its children
# inherit that; Python then installs no KeyboardInterrupt handler. A user's terminal has one.
signal.signal(signal.SIGINT, signal.default_int_handler)
from ember import LLM, SamplingParams
llm = LLM(sys.argv[1], dtype="float32", skip_tokenizer_init=True)
long_run = SamplingParams(max_tokens=200, ignore_eos=True)
print("generating", flush=True)
try:
    while True:
        llm.generate([[1, 2, 3]] * 128, long_run, use_tqdm=False)
except KeyboardInterrupt:
    print("interrupted", flush=True)
# The aborted requests leave the engine: nothing runs or waits once the aborts landed.
deadline = time.monotonic() + 10
while time.monotonic() < deadline:
    metrics = llm.get_metrics()
    if metrics.get("num_requests_running") == 0 and metrics.get("num_requests_waiting") == 0:
        break
    time.sleep(0.1)
print("running", int(metrics.get("num_requests_running")), int(metrics.get("num_requests_waiting")))
out = llm.generate([[4, 5, 6]], SamplingParams(max_tokens=5, ignore_eos=True), use_tqdm=False)
print("after", len(out[0].outputs[0].token_ids), out[0].outputs[0].finish_reason, flush=True)
llm.shutdown()
"""


def test_ctrl_c_during_generate_raises_aborts_and_leaves_the_llm_usable(tiny_dir, tmp_path):
    script = tmp_path / "interrupted.py"
    script.write_text(textwrap.dedent(INTERRUPTED_SCRIPT))
    user = subprocess.Popen(
        [sys.executable, str(script), tiny_dir],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=REPO_ROOT,
    )
    try:
        assert user.stdout.readline().strip() == b"generating"
        threading.Event().wait(2.0)  # well inside generate
        user.send_signal(signal.SIGINT)  # what the terminal sends on Ctrl-C
        stdout, _ = user.communicate(timeout=120)
    finally:
        user.kill()
    lines = stdout.decode().splitlines()
    assert lines == ["interrupted", "running 0 0", "after 5 length"], lines
    assert user.returncode == 0


def _resources(process: psutil.Process) -> dict[str, int]:
    return {
        "open files": process.num_fds(),
        "threads": process.num_threads(),
        "children": len(process.children(recursive=True)),
        "shared memory": sum(1 for n in os.listdir("/dev/shm") if n.startswith("ember-")),
        "private dirs": sum(
            1 for n in os.listdir(tempfile.gettempdir()) if n.startswith(f"ember-{process.pid}")
        ),
    }


@pytest.mark.slow
def test_twenty_create_shutdown_cycles_leave_no_growth(tiny_dir):
    me = psutil.Process()
    params = SamplingParams(max_tokens=2, ignore_eos=True)

    def cycle():
        with LLM(tiny_dir, dtype="float32", skip_tokenizer_init=True) as llm:
            llm.generate([[1, 2, 3]], params, use_tqdm=False)
            llm.get_metrics()

    cycle()  # the first one loads what stays loaded (libraries, prometheus registry)
    baseline = _resources(me)
    for _ in range(20):
        cycle()
    after = _resources(me)
    # Other test sessions on this machine may hold shared memory: ours must not grow.
    assert after["shared memory"] <= baseline["shared memory"] or after == baseline
    del after["shared memory"], baseline["shared memory"]
    assert after == baseline
