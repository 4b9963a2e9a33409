"""Data parallelism on CPU: `LLM(data_parallel_size=2)` (replicas behind one LLM) and the
VLLM_DP_* environment mode of vLLM's data_parallel.py example (ranks that meet at start and
shutdown through rank 0's TCP store), each against Hugging Face greedy, and the faults: a dead
replica or rank, a master port in use, ranks that disagree on VLLM_DP_SIZE, a rank that never
arrives."""

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
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ember import LLM, EngineDeadError, SamplingParams
from ember.data_parallel import DataParallelEnv, DataParallelRank
from tests.helpers import hf_greedy, random_prompts, write_random_llama
from tests.test_fault_injection import _assert_all_gone, _process_tree

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINE_OPTIONS = {"dtype": "float32", "block_size": 4, "max_num_batched_tokens": 64}
EXAMPLE_PROMPTS = [
    "Hello, my name is",
    "The president of the United States is",
    "The capital of France is",
    "The future of AI is",
]


def _write_word_tokenizer(model_dir: str, vocab_size: int) -> None:
    """A word-level tokenizer over the example's words (and filler words) for the random model,
    so that the example's text prompts run unchanged."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for p in EXAMPLE_PROMPTS for w in p.replace(",", " ,").split()})
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for word in words + [f"w{i}" for i in range(vocab_size)]:
        if len(vocab) < vocab_size:
            vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(model_dir)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(directory, Hugging Face model) of a tiny random dense Llama with a word tokenizer."""
    model_dir = write_random_llama(tmp_path_factory.mktemp("dp-llama"))
    _write_word_tokenizer(model_dir, 512)
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model_dir, hf_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- LLM(data_parallel_size=2) -------------------------------------------------------------


@pytest.fixture(scope="module")
def llm_dp2(llama):
    with LLM(llama[0], data_parallel_size=2, skip_tokenizer_init=True, **ENGINE_OPTIONS) as llm:
        yield llm


def test_dp2_outputs_come_back_in_input_order_and_equal_hf_greedy(llama, llm_dp2):
    prompts = random_prompts(7, 512, [5, 17, 33, 9, 12], seed=3)
    outputs = llm_dp2.generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=10), use_tqdm=False
    )
    assert [output.prompt_token_ids for output in outputs] == prompts
    for prompt, output in zip(prompts, outputs):
        assert list(output.outputs[0].token_ids) == hf_greedy(llama[1], prompt, 10)
    # Both replicas did work, and nothing is left pending on either.
    queried = [
        replica.call_utility("get_scheduler_stats")[3] for replica in llm_dp2.engine.replicas
    ]
    assert all(queries > 0 for queries in queried), queried
    assert llm_dp2.engine.pending_tokens == [0, 0]


def test_dp2_balances_by_pending_tokens_and_keeps_a_prompts_n_children_together(llm_dp2):
    engine = llm_dp2.engine
    prompts = [[5] * 40, [6] * 4, [7] * 4, [8] * 4]
    ids = llm_dp2.enqueue(prompts, SamplingParams(max_tokens=4, n=2), use_tqdm=False)
    owners = {request_id: engine._owner[request_id] for request_id in engine._owner}
    # 40 + 4 tokens x 2 children on one replica; the three short prompts fill the other.
    assert owners[f"0_{ids[0]}"] == owners[f"1_{ids[0]}"]
    first = owners[f"0_{ids[0]}"]
    assert {owners[f"{c}_{i}"] for i in ids[1:] for c in (0, 1)} == {1 - first}
    outputs = llm_dp2.wait_for_completion(use_tqdm=False)
    assert [len(output.outputs) for output in outputs] == [2, 2, 2, 2]
    assert engine.pending_tokens == [0, 0]


def _parameter_count(model) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def test_dp2_utilities_fan_out_to_every_replica(llm_dp2):
    block_bytes = llm_dp2.collective_rpc("kv_cache_block_bytes")  # one TP rank a replica
    assert len(block_bytes) == 2 and block_bytes[0] == block_bytes[1] > 0
    counts = llm_dp2.apply_model(_parameter_count)
    assert len(counts) == 2 and counts[0] == counts[1] > 0
    assert llm_dp2.get_world_size() == 2 and llm_dp2.get_world_size(include_dp=False) == 1
    assert llm_dp2.llm_engine.vllm_config.parallel_config.data_parallel_size == 2
    llm_dp2.sleep(level=0)
    assert llm_dp2.llm_engine.is_sleeping()
    with pytest.raises(RuntimeError, match="asleep"):
        llm_dp2.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)
    assert llm_dp2.wake_up() is True
    assert llm_dp2.reset_prefix_cache() is True
    metrics = {metric.name: metric for metric in llm_dp2.get_metrics()}
    assert metrics["vllm:num_requests_running"].value == 0
    with pytest.raises(NotImplementedError, match="no_such_utility"):
        llm_dp2.engine.call_utility("no_such_utility")


@pytest.mark.slow
def test_dp2_replica_killed_mid_generation_raises_engine_dead_and_leaves_nothing(llama):
    llm = LLM(llama[0], data_parallel_size=2, skip_tokenizer_init=True, **ENGINE_OPTIONS)
    pids = [pid for process in llm.engine.processes for pid in _process_tree(process.pid)]
    paths = [replica._resources.private_dir for replica in llm.engine.replicas]
    victim = llm.engine.processes[1].pid
    killed_at = []

    def kill_soon():
        time.sleep(0.5)
        killed_at.append(time.monotonic())
        os.kill(victim, signal.SIGKILL)

    threading.Thread(target=kill_soon, daemon=True).start()
    with pytest.raises(EngineDeadError, match="data-parallel replica 1 of 2"):
        llm.generate(
            [[1, 2, 3]] * 128, SamplingParams(max_tokens=400, ignore_eos=True), use_tqdm=False
        )
    assert time.monotonic() - killed_at[0] < 30
    _assert_all_gone(pids, paths)  # the other replica too, without shutdown()
    with pytest.raises(EngineDeadError):
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)
    llm.shutdown()


# ---- the VLLM_DP_* environment mode --------------------------------------------------------

# vLLM's examples/offline_inference/data_parallel.py, as a user runs it: a launcher that starts
# one process per DP rank, each setting VLLM_DP_* and building LLM(model, tensor_parallel_size).
# Changed for the test: greedy sampling, and each rank prints its token ids as JSON.
SEED_EXAMPLE = """
import os
from time import sleep

from ember import LLM, SamplingParams


def parse_args():
    import argparse

    parser = argparse.ArgumentParser(description="Data Parallel Inference")
    parser.add_argument("--model", type=str, default="ibm-research/PowerMoE-3b")
    parser.add_argument("--dp-size", type=int, default=2)
    parser.add_argument("--tp-size", type=int, default=2)
    parser.add_argument("--node-size", type=int, default=1)
    parser.add_argument("--node-rank", type=int, default=0)
    parser.add_argument("--master-addr", type=str, default="")
    parser.add_argument("--master-port", type=int, default=0)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--trust-remote-code", action="store_true")
    return parser.parse_args()


def main(model, dp_size, local_dp_rank, global_dp_rank, dp_master_ip, dp_master_port,
         GPUs_per_dp_rank, enforce_eager, trust_remote_code):
    os.environ["VLLM_DP_RANK"] = str(global_dp_rank)
    os.environ["VLLM_DP_RANK_LOCAL"] = str(local_dp_rank)
    os.environ["VLLM_DP_SIZE"] = str(dp_size)
    os.environ["VLLM_DP_MASTER_IP"] = dp_master_ip
    os.environ["VLLM_DP_MASTER_PORT"] = str(dp_master_port)

    prompts = PROMPTS * 25
    floor = len(prompts) // dp_size
    remainder = len(prompts) % dp_size

    def start(rank):
        return rank * floor + min(rank, remainder)

    prompts = prompts[start(global_dp_rank):start(global_dp_rank + 1)]
    if len(prompts) == 0:
        prompts = ["Placeholder"]
    print(f"DP rank {global_dp_rank} needs to process {len(prompts)} prompts")
    sampling_params = SamplingParams(temperature=0.0, max_tokens=[16, 20][global_dp_rank % 2])
    llm = LLM(model=model, tensor_parallel_size=GPUs_per_dp_rank, enforce_eager=enforce_eager,
              enable_expert_parallel=True, trust_remote_code=trust_remote_code)
    outputs = llm.generate(prompts, sampling_params)
    results = [[o.prompt, list(o.outputs[0].token_ids)] for o in outputs]
    print(f"RESULT {global_dp_rank} " + json.dumps(results), flush=True)
    sleep(1)


if __name__ == "__main__":
    args = parse_args()
    dp_size = args.dp_size
    tp_size = args.tp_size
    node_size = args.node_size
    node_rank = args.node_rank
    if node_size == 1:
        dp_master_ip = args.master_addr or "127.0.0.1"
        dp_master_port = args.master_port
    else:
        dp_master_ip = args.master_addr
        dp_master_port = args.master_port
    assert dp_size % node_size == 0, "dp_size should be divisible by node_size"
    dp_per_node = dp_size // node_size

    from multiprocessing import Process

    procs = []
    for local_dp_rank, global_dp_rank in enumerate(
        range(node_rank * dp_per_node, (node_rank + 1) * dp_per_node)
    ):
        proc = Process(target=main, args=(args.model, dp_size, local_dp_rank, global_dp_rank,
                                          dp_master_ip, dp_master_port, tp_size,
                                          args.enforce_eager, args.trust_remote_code))
        proc.start()
        procs.append(proc)
    exit_code = 0
    for proc in procs:
        proc.join(timeout=300)
        if proc.exitcode is None:
            print(f"Killing process {proc.pid} that didn't stop within 5 minutes.")
            proc.kill()
            exit_code = 1
        elif proc.exitcode:
            exit_code = proc.exitcode
    exit(exit_code)
"""


RUN_WITH_INFO_LOGS = (
    "import logging, runpy, sys; logging.basicConfig(level=logging.INFO); "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def _seed_example(tmp_path) -> str:
    script = tmp_path / "data_parallel.py"
    header = f"import json\nPROMPTS = {EXAMPLE_PROMPTS!r}\n"
    script.write_text(header + SEED_EXAMPLE)
    return str(script)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": REPO_ROOT}


@pytest.mark.slow
def test_seed_example_two_ranks_of_tp2_through_a_second_loopback_address_match_hf(llama, tmp_path):
    """Two DP ranks (two processes, each TP=2) that meet through 127.0.0.2, a "host" other
    than the default loopback address; each rank's greedy outputs equal HF's."""
    model_dir, hf_model = llama
    # The script runs as __main__, with INFO logs on (to see that the ranks met at exit).
    command = [sys.executable, "-c", RUN_WITH_INFO_LOGS, _seed_example(tmp_path), "--model"]
    command += [model_dir]
    command += ["--dp-size", "2", "--tp-size", "2", "--master-addr", "127.0.0.2"]
    command += ["--master-port", str(_free_port())]
    done = subprocess.run(
        command, env=_env(), capture_output=True, text=True, timeout=240, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):  # each rank met the other at its exit
        assert f"data-parallel rank {rank}: all 2 ranks finished" in done.stderr
    results = example_results(done.stdout)
    assert sorted(results) == [0, 1]
    assert [len(results[0]), len(results[1])] == [50, 50]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for rank, rank_results in results.items():
        expected = {}
        for prompt in EXAMPLE_PROMPTS:
            ids = tokenizer(prompt)["input_ids"]
            expected[prompt] = hf_greedy(hf_model, ids, [16, 20][rank])
        for prompt, token_ids in rank_results:
            assert token_ids == expected[prompt], (rank, prompt)


def example_results(stdout: str) -> dict[int, list]:
    """rank -> [[prompt, token ids], ...] from the "RESULT <rank> <json>" lines of the
    example's output."""
    results = {}
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            _, rank, payload = line.split(" ", 2)
            results[int(rank)] = json.loads(payload)
    return results


def _rank_env(rank: int, size: int, port: int, **extra: str) -> dict[str, str]:
    return {
        **_env(),
        "VLLM_DP_RANK": str(rank),
        "VLLM_DP_RANK_LOCAL": str(rank),
        "VLLM_DP_SIZE": str(size),
        "VLLM_DP_MASTER_IP": "127.0.0.1",
        "VLLM_DP_MASTER_PORT": str(port),
        **extra,
    }


RANK_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    from ember import LLM, SamplingParams
    llm = LLM(sys.argv[1], dtype="float32", skip_tokenizer_init=True)
    print("PIDS", os.getpid(), llm.engine.process.pid, flush=True)
    max_tokens = int(sys.argv[2])
    llm.generate([[1, 2, 3]] * 16, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                 use_tqdm=False)
    print("GENERATED", flush=True)
    start = time.monotonic()
    try:
        llm.shutdown()
    except Exception as exc:
        print(f"ERROR after {time.monotonic() - start:.1f} s: {type(exc).__name__}: {exc}",
              flush=True)
        sys.exit(3)
    print("SHUTDOWN OK", flush=True)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0])
def test_a_dp_rank_killed_mid_generation_fails_the_other_at_shutdown(llama, tmp_path, victim):
    """SIGKILL of one rank's process while it generates: the other rank raises
    DataParallelError at its shutdown, within 30 s, and the dead rank's engine is gone. Rank 1
    dead: its heartbeat stops; rank 0 dead: the store it hosted is gone."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    port = _free_port()
    ranks = {}
    for rank in (0, 1):
        max_tokens = "400" if rank == victim else "4"
        ranks[rank] = subprocess.Popen(
            [sys.executable, str(script), llama[0], max_tokens],
            env=_rank_env(rank, 2, port, EMBER_DP_DEAD_AFTER_S="4"),
            stdout=subprocess.PIPE,
            text=True,
        )
    try:
        victim_line = ranks[victim].stdout.readline()
        assert victim_line.startswith("PIDS"), victim_line
        victim_pids = _process_tree(int(victim_line.split()[2]))
        time.sleep(1.0)
        ranks[victim].kill()
        killed_at = time.monotonic()
        survivor = ranks[1 - victim]
        output, _ = survivor.communicate(timeout=60)
        assert time.monotonic() - killed_at < 30 + 5  # its own short generation included
        assert survivor.returncode == 3, output
        assert "DataParallelError" in output, output
        assert f"rank {victim}" in output, output
        if victim == 1:  # a rank's death is seen by its heartbeat, after the user's setting
            assert "no heartbeat for 4 s, EMBER_DP_DEAD_AFTER_S" in output, output
        _assert_all_gone(victim_pids, [])
    finally:
        for process in ranks.values():
            process.kill()
            process.wait()


# ---- start-up faults: no engine is started -------------------------------------------------


def _dp_env(rank: int, size: int, port: int, timeout_s: float = 20.0, ip="127.0.0.1"):
    return DataParallelEnv(rank, rank, size, ip, port, timeout_s, dead_after_s=10.0)


def test_master_port_in_use_raises_naming_vllm_dp_master_port(llama, monkeypatch):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        for name, value in _rank_env(0, 2, port).items():
            monkeypatch.setenv(name, value)
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="VLLM_DP_MASTER_PORT"):
            LLM(llama[0], skip_tokenizer_init=True)
        assert time.monotonic() - start < 10


def test_ranks_that_disagree_on_vllm_dp_size_both_raise_naming_it():
    port = _free_port()
    errors: dict[int, BaseException] = {}

    def join(rank: int, size: int) -> None:
        try:
            DataParallelRank(_dp_env(rank, size, port)).leave()
        except BaseException as exc:  # noqa: BLE001 - checked below
            errors[rank] = exc

    threads = [threading.Thread(target=join, args=args) for args in ((0, 2), (1, 3))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(errors) == [0, 1]
    for error in errors.values():
        assert isinstance(error, ValueError) and "VLLM_DP_SIZE" in str(error), error


def test_a_rank_that_never_arrives_times_out_after_the_users_timeout(llama, monkeypatch):
    for name, value in _rank_env(0, 2, _free_port(), EMBER_DP_TIMEOUT_S="2").items():
        monkeypatch.setenv(name, value)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"rank\(s\) \[1\].*EMBER_DP_TIMEOUT_S"):
        LLM(llama[0], skip_tokenizer_init=True)
    assert 2 <= time.monotonic() - start < 10
    # and a rank whose rank 0 never starts
    monkeypatch.setenv("VLLM_DP_RANK", "1")
    with pytest.raises(TimeoutError, match="could not reach rank 0"):
        LLM(llama[0], skip_tokenizer_init=True)


def test_three_ranks_meet_at_start_and_shutdown_through_127_0_0_3():
    port = _free_port()
    done: list[int] = []

    def join(rank: int) -> None:
        member = DataParallelRank(_dp_env(rank, 3, port, ip="127.0.0.3"))
        heartbeat = member._heartbeat
        assert heartbeat is not None and heartbeat.is_alive()
        time.sleep(0.5 * rank)  # ranks finish at different times
        member.leave()
        # no heartbeat left inside a store call for the interpreter's exit to kill
        assert not heartbeat.is_alive()
        done.append(rank)

    threads = [threading.Thread(target=join, args=(rank,)) for rank in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(done) == [0, 1, 2]


def test_data_parallel_size_and_vllm_dp_size_together_are_refused(llama, monkeypatch):
    for name, value in _rank_env(0, 2, _free_port()).items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="VLLM_DP_SIZE"):
        LLM(llama[0], data_parallel_size=2, skip_tokenizer_init=True)
