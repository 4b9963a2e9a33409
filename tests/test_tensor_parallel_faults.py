"""Faults of a tensor-parallel engine (TP=2 on CPU, gloo): a rank SIGKILLed during `generate`,
and a rank stopped (SIGSTOP) during `generate`, as if stuck in a collective. Each ends in
`EngineDeadError` within seconds, never a hang, and leaves no process, shared-memory segment
or rendezvous file behind. Each rank's log lines carry its rank."""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest

from ember import LLM, EngineDeadError, SamplingParams
from tests.helpers import write_random_llama
from tests.test_fault_injection import _assert_all_gone, _process_tree, _worker_config_dir

LONG_RUN = SamplingParams(max_tokens=200, ignore_eos=True)
STEP_TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_random_llama(tmp_path_factory.mktemp("tiny"), max_position_embeddings=256)


def _signal_during_generate(llm: LLM, pid: int, signum: int) -> tuple[float, str]:
    """Send `signum` to `pid` a second into a long `generate`: (seconds from the signal to
    the EngineDeadError, its message)."""
    sent_at = []

    def send_soon():
        time.sleep(1.0)
        sent_at.append(time.monotonic())
        os.kill(pid, signum)

    threading.Thread(target=send_soon, daemon=True).start()
    with pytest.raises(EngineDeadError) as raised:
        llm.generate([[1, 2, 3]] * 64, LONG_RUN, use_tqdm=False)
    return time.monotonic() - sent_at[0], str(raised.value)


def _tp2_engine(tiny_dir: str) -> tuple[LLM, list[int], list[str]]:
    llm = LLM(
        tiny_dir,
        dtype="float32",
        skip_tokenizer_init=True,
        tensor_parallel_size=2,
        execute_model_timeout_s=STEP_TIMEOUT_S,
    )
    pids = _process_tree(llm.engine.process.pid)
    assert len(pids) == 3  # the engine core and two ranks
    workers = [psutil.Process(pid) for pid in pids[1:]]
    rendezvous = [w.cmdline()[w.cmdline().index("--rendezvous") + 1] for w in workers]
    assert len(set(rendezvous)) == 1 and rendezvous[0].startswith("file://")
    store_dir = os.path.dirname(rendezvous[0].removeprefix("file://"))
    assert not os.path.exists(store_dir)  # removed once every rank had joined
    paths = [llm.engine._resources.private_dir, _worker_config_dir(pids[1]), store_dir]
    return llm, pids, paths


def _rank_pid(pids: list[int], rank: int) -> int:
    for pid in pids[1:]:
        command = psutil.Process(pid).cmdline()
        if command[command.index("--rank") + 1] == str(rank):
            return pid
    raise AssertionError(f"no worker of rank {rank} among {pids}")


@pytest.mark.parametrize("rank", [0, 1])
def test_sigkill_of_any_rank_raises_within_5_s_and_leaves_nothing(tiny_dir, rank):
    llm, pids, paths = _tp2_engine(tiny_dir)
    seconds, message = _signal_during_generate(llm, _rank_pid(pids, rank), signal.SIGKILL)
    assert seconds < 5, message
    _assert_all_gone(pids, paths)
    llm.shutdown()


def test_a_stopped_rank_is_reported_within_the_step_timeout(tiny_dir):
    llm, pids, paths = _tp2_engine(tiny_dir)
    stopped = _rank_pid(pids, 1)
    try:
        seconds, message = _signal_during_generate(llm, stopped, signal.SIGSTOP)
    finally:
        try:
            os.kill(stopped, signal.SIGCONT)  # nothing is left stopped, whatever happened
        except ProcessLookupError:
            pass
    assert seconds < STEP_TIMEOUT_S + 5, message
    assert f"within {STEP_TIMEOUT_S:g} s" in message and "rank 1: stopped" in message
    _assert_all_gone(pids, paths)
    llm.shutdown()


def test_each_rank_logs_with_its_rank(tiny_dir, capfd):
    with _tp2_engine(tiny_dir)[0] as llm:
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)
    log = capfd.readouterr().err
    for rank in (0, 1):
        assert f"[worker {rank}] joined the gloo rank group: rank {rank} of 2" in log
