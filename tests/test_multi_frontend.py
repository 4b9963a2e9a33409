"""One standalone engine core, several frontends: each gets only its own outputs, a frontend
that dies has its requests aborted, tokens and loopback are enforced, profiling writes one trace
per process, and SIGTERM stops the engine cleanly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from ember import LLM, SamplingParams
from tests.helpers import random_prompts, write_random_llama

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FRONTEND_SCRIPT = """
import json, sys
from ember import LLM, SamplingParams
address, seed, max_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sys.path.insert(0, {repo!r})
from tests.helpers import random_prompts
prompts = random_prompts(50, 512, [5, 17, 30, 8], seed=seed)
llm = LLM(engine_address=address, skip_tokenizer_init=True)
print("attached", flush=True)
params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
outputs = llm.generate(prompts, params, use_tqdm=False)
print(json.dumps([o.outputs[0].token_ids for o in outputs]), flush=True)
llm.shutdown()
"""


def _start_engine(model_dir: str, address: str, *extra: str) -> subprocess.Popen:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ember.enginecore",
            "--model",
            model_dir,
            "--listen",
            address,
            "--dtype",
            "float32",
            "--block-size",
            "4",
            *extra,
        ],
        stdout=subprocess.PIPE,
        cwd=REPO,
    )
    line = process.stdout.readline().decode()
    assert line.startswith("EMBER ENGINE READY"), line
    return process


def _stop_engine(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=20)
    finally:
        process.kill()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_random_llama(tmp_path_factory.mktemp("tiny"), max_position_embeddings=256)


@pytest.fixture(scope="module")
def engine(model_dir, tmp_path_factory):
    address = f"ipc://{tmp_path_factory.mktemp('sock')}/engine"
    process = _start_engine(model_dir, address, "--client-timeout-s", "2")
    yield address
    assert _stop_engine(process) == 0


def _frontend(address: str, seed: int, max_tokens: int, tmp_path) -> subprocess.Popen:
    script = tmp_path / "frontend.py"
    script.write_text(textwrap.dedent(FRONTEND_SCRIPT.format(repo=REPO)))
    return subprocess.Popen(
        [sys.executable, str(script), address, str(seed), str(max_tokens)],
        stdout=subprocess.PIPE,
        cwd=REPO,
    )


def test_three_frontends_get_their_own_outputs_and_a_dead_one_is_cleaned_up(engine, tmp_path):
    reference = LLM(engine_address=engine, skip_tokenizer_init=True)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    expected = {
        seed: [
            o.outputs[0].token_ids
            for o in reference.generate(
                random_prompts(50, 512, [5, 17, 30, 8], seed=seed), params, use_tqdm=False
            )
        ]
        for seed in (1, 2, 3)
    }
    doomed = _frontend(engine, 4, 200, tmp_path)  # long requests, killed midway
    assert doomed.stdout.readline().strip() == b"attached"
    frontends = {seed: _frontend(engine, seed, 12, tmp_path) for seed in (1, 2, 3)}
    time.sleep(1.0)
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    for seed, process in frontends.items():
        lines = process.stdout.read().decode().splitlines()
        assert process.wait(timeout=120) == 0
        assert json.loads(lines[-1]) == expected[seed]
    # The killed frontend's requests are aborted once it has been silent for 2 s.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        stats = reference.engine.call_utility("get_stats")
        if stats["num_running_reqs"] == 0 and stats["num_waiting_reqs"] == 0:
            break
        time.sleep(0.5)
    assert stats["num_running_reqs"] == 0 and stats["num_waiting_reqs"] == 0
    assert stats["kv_cache_usage"] == 0.0
    reference.shutdown()


def test_profiling_writes_one_trace_per_process(engine, tmp_path):
    llm = LLM(engine_address=engine, skip_tokenizer_init=True)
    llm.start_profile(str(tmp_path / "traces"))
    llm.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=5, ignore_eos=True), use_tqdm=False)
    paths = llm.stop_profile()
    llm.shutdown()
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ["ember-enginecore.trace.json", "ember-worker-0.trace.json"]
    assert sorted(os.listdir(tmp_path / "traces")) == names
    for path in paths:
        with open(path) as f:
            trace = json.load(f)
        assert trace["traceEvents"], path
    with open(tmp_path / "traces" / "ember-enginecore.trace.json") as f:
        assert {e["name"] for e in json.load(f)["traceEvents"]} >= {"step", "emit"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tcp_engine_refuses_a_wrong_token(model_dir):
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    process = _start_engine(model_dir, address, "--token", "s3cret")
    try:
        with pytest.raises(PermissionError, match="token"):
            LLM(engine_address=address, engine_token="wrong", skip_tokenizer_init=True)
        with LLM(engine_address=address, engine_token="s3cret", skip_tokenizer_init=True) as llm:
            out = llm.generate([[1, 2]], SamplingParams(max_tokens=2, ignore_eos=True))
            assert len(out[0].outputs[0].token_ids) == 2
    finally:
        assert _stop_engine(process) == 0


def test_no_bind_beyond_loopback_without_allow_remote(model_dir):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ember.enginecore",
            "--model",
            model_dir,
            "--listen",
            f"tcp://0.0.0.0:{_free_port()}",
        ],
        capture_output=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )
    assert result.returncode != 0
    assert b"--allow-remote" in result.stderr


def test_sigterm_aborts_in_flight_requests_and_exits_cleanly(model_dir, tmp_path):
    address = f"ipc://{tmp_path}/engine"
    process = _start_engine(model_dir, address)
    llm = LLM(engine_address=address, skip_tokenizer_init=True)
    results = []

    def generate():
        try:
            params = SamplingParams(max_tokens=250, ignore_eos=True)  # ~64k tokens: seconds
            results.append(llm.generate([[1, 2, 3]] * 256, params, use_tqdm=False))
        except Exception as exc:  # noqa: BLE001 (recorded for the assertion below)
            results.append(exc)

    thread = threading.Thread(target=generate)
    thread.start()
    time.sleep(1.5)
    assert _stop_engine(process) == 0
    thread.join(timeout=30)
    assert not thread.is_alive()
    outputs = results[0]
    assert not isinstance(outputs, Exception), outputs
    reasons = [o.outputs[0].finish_reason for o in outputs]
    assert set(reasons) <= {"abort", "length"} and "abort" in reasons
    assert not [n for n in os.listdir("/dev/shm") if n.startswith("ember")]
    llm.shutdown()
