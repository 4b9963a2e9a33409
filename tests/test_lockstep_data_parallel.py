"""Lockstep data parallelism (#22): under the VLLM_DP_* environment a MoE model with
`enable_expert_parallel=True` places its experts over every worker of every data-parallel
rank, and the ranks step together (`enginecore/lockstep.py`; a rank without work runs idle
steps that serve the others' MoE tokens). Each rank's greedy outputs against Hugging Face, the
experts each worker holds, the steps the ranks share, vLLM's example as written, and a rank
killed mid-generation."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ember.data_parallel import DataParallelEnv, with_lockstep
from ember.enginecore.arg_utils import EngineArgs
from ember.workers.layers.fused_moe import expert_placement
from tests.helpers import hf_greedy, write_random_model
from tests.test_data_parallel import (
    EXAMPLE_PROMPTS,
    RUN_WITH_INFO_LOGS,
    _env,
    _free_port,
    _rank_env,
    _seed_example,
    _write_word_tokenizer,
    example_results,
)
from tests.test_fault_injection import _assert_all_gone, _process_tree

NUM_EXPERTS = 5  # does not divide over 2 or 4 workers
ARCHITECTURES = {
    "MixtralForCausalLM": "num_local_experts",
    "Qwen2MoeForCausalLM": "num_experts",  # with a shared expert (tensor-parallel)
    "Qwen3MoeForCausalLM": "num_experts",
    "GraniteMoeForCausalLM": "num_local_experts",
}

RANK_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from ember import LLM, SamplingParams
    from tests.helpers import random_prompts
    from tests.test_expert_parallel import first_moe_layer_experts
    model, tp, count, max_tokens, strategy = sys.argv[1:6]
    rank = int(os.environ["VLLM_DP_RANK"])
    prompts = random_prompts(int(count), 512, [5, 17, 33, 9], seed=rank)
    llm = LLM(model, tensor_parallel_size=int(tp), enable_expert_parallel=True,
              expert_placement_strategy=strategy, dtype="float32", skip_tokenizer_init=True,
              block_size=4, max_num_batched_tokens=64)
    print("PIDS", os.getpid(), llm.engine.process.pid, flush=True)
    params = SamplingParams(temperature=0.0, max_tokens=int(max_tokens), ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    results = [[p, list(o.outputs[0].token_ids)] for p, o in zip(prompts, outputs)]
    print("RESULT", json.dumps(results), flush=True)
    print("EXPERTS", json.dumps(llm.apply_model(first_moe_layer_experts)), flush=True)
    # answered once the ranks are between waves: after the other rank's last token
    print("STEPS", json.dumps(llm.engine.call_utility("lockstep_idle")), flush=True)
    llm.shutdown()
    print("SHUTDOWN OK", flush=True)
    """
)


def _lines(output: str, tag: str) -> list:
    return [
        json.loads(line[len(tag) + 1 :]) for line in output.splitlines() if line.startswith(tag)
    ]


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    """architecture -> (directory, Hugging Face model), 5 experts, a word tokenizer."""
    cache: dict[str, tuple] = {}

    def get(architecture: str) -> tuple:
        if architecture not in cache:
            path = tmp_path_factory.mktemp(architecture)
            overrides = {ARCHITECTURES[architecture]: NUM_EXPERTS}
            model_dir = write_random_model(path, architecture, **overrides)
            _write_word_tokenizer(model_dir, 512)
            hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            cache[architecture] = (model_dir, hf_model.eval())
        return cache[architecture]

    return get


def _run_ranks(tmp_path, model_dir, tp, counts, max_tokens, strategy, **env):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    port = _free_port()
    ranks = [
        subprocess.Popen(
            [sys.executable, str(script), model_dir, str(tp), str(count), str(tokens), strategy],
            env=_rank_env(rank, len(counts), port, **env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank, (count, tokens) in enumerate(zip(counts, max_tokens))
    ]
    return ranks


# Two cases by default (Qwen2-MoE's shared expert at TP=2); the others are slow.
_DEFAULT = {("MixtralForCausalLM", 1, "linear"), ("Qwen2MoeForCausalLM", 2, "round_robin")}
CASES = [
    pytest.param(
        architecture,
        tp,
        strategy,
        marks=() if (architecture, tp, strategy) in _DEFAULT else pytest.mark.slow,
        id=f"{architecture}-tp{tp}-{strategy}",
    )
    for architecture in ARCHITECTURES
    for tp, strategy in ((1, "linear"), (2, "round_robin"))
]


@pytest.mark.parametrize("architecture,tp,strategy", CASES)
def test_ranks_with_different_work_step_together_and_each_matches_hf(
    architecture, tp, strategy, moe_models, tmp_path
):
    """Two ranks, one with 2 prompts of 4 tokens and one with 5 prompts of 12: each rank's
    greedy tokens are HF's; the experts are placed over the 2 x tp workers as vLLM places
    them over its expert-parallel group (rank d's TP rank t is worker d * tp + t); both ranks
    ran the same number of steps, and the rank that finished first ran idle steps."""
    model_dir, hf_model = moe_models(architecture)
    ranks = _run_ranks(
        tmp_path, model_dir, tp, counts=[2, 5], max_tokens=[4, 12], strategy=strategy
    )
    outputs = []
    for process in ranks:
        out, err = process.communicate(timeout=240)
        assert process.returncode == 0, err[-3000:]
        assert "SHUTDOWN OK" in out, out
        outputs.append(out)
    steps = []
    # the ranks' prompts differ (seeded by rank): a rank given another's tokens would fail
    assert _lines(outputs[0], "RESULT")[0][0][0] != _lines(outputs[1], "RESULT")[0][0][0]
    for rank, out in enumerate(outputs):
        (results,) = _lines(out, "RESULT")
        assert len(results) == [2, 5][rank]
        for prompt, tokens in results:
            assert tokens == hf_greedy(hf_model, prompt, len(tokens)), (rank, prompt)
        (workers,) = _lines(out, "EXPERTS")
        for tp_rank, held in enumerate(workers):
            expected = expert_placement(NUM_EXPERTS, 2 * tp, rank * tp + tp_rank, strategy)
            assert held["experts"] == expected
        (counts,) = _lines(out, "STEPS")
        steps.append(counts)
    assert steps[0]["steps"] == steps[1]["steps"]
    assert steps[0]["idle_steps"] >= 12 - 4  # its work ended while the other rank's went on
    assert steps[0]["idle_steps"] > steps[1]["idle_steps"]


@pytest.mark.slow
def test_seed_example_on_a_moe_model_two_ranks_of_tp2_match_hf(moe_models, tmp_path):
    """vLLM's data_parallel.py example as written (enable_expert_parallel=True, TP=2 per rank,
    the ranks' max_tokens 16 and 20), on a random Mixtral through 127.0.0.2: the ranks run in
    lockstep (logged), rank 0 ran idle steps for rank 1's last tokens, and every output is
    HF's greedy."""
    model_dir, hf_model = moe_models("MixtralForCausalLM")
    command = [sys.executable, "-c", RUN_WITH_INFO_LOGS, _seed_example(tmp_path), "--model"]
    command += [model_dir, "--dp-size", "2", "--tp-size", "2", "--master-addr", "127.0.0.2"]
    command += ["--master-port", str(_free_port())]
    done = subprocess.run(
        command, env=_env(), capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("the ranks step in lockstep") == 2, done.stderr[-3000:]
    idle = [
        int(line.split(" of them idle")[0].rsplit(" ", 1)[1])
        for line in done.stderr.splitlines()
        if "of them idle steps" in line
    ]
    assert len(idle) == 2 and max(idle) >= 4, done.stderr[-3000:]
    results = example_results(done.stdout)
    assert sorted(results) == [0, 1]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for rank, rank_results in results.items():
        for prompt in EXAMPLE_PROMPTS:
            expected = hf_greedy(hf_model, tokenizer(prompt)["input_ids"], [16, 20][rank])
            assert next(t for p, t in rank_results if p == prompt) == expected, (rank, prompt)


@pytest.mark.slow
@pytest.mark.parametrize("victim_rank", [1, 0], ids=["the-busy-rank", "the-idle-rank-0"])
def test_a_rank_killed_mid_generation_fails_the_other_fast_and_leaves_nothing(
    moe_models, tmp_path, victim_rank
):
    """SIGKILL of one rank while rank 1 still generates: rank 1 killed, rank 0 (whose engine
    served its experts) raises at its shutdown; rank 0 killed (idle, the store's host), rank
    1's generation fails at its next collective. Either way the other rank raises within
    30 s and the dead rank's processes are gone."""
    model_dir, _ = moe_models("MixtralForCausalLM")
    ranks = _run_ranks(
        tmp_path, model_dir, 1, counts=[2, 4], max_tokens=[4, 2000], strategy="linear",
        EMBER_DP_DEAD_AFTER_S="4",
    )  # fmt: skip
    victim, survivor = ranks[victim_rank], ranks[1 - victim_rank]
    try:
        line = victim.stdout.readline()
        assert line.startswith("PIDS"), line
        victim_pids = _process_tree(int(line.split()[2]))
        time.sleep(2.0)
        victim.kill()
        killed_at = time.monotonic()
        out, err = survivor.communicate(timeout=60)
        assert time.monotonic() - killed_at < 30
        assert survivor.returncode != 0
        assert "SHUTDOWN OK" not in out
        assert "DataParallelError" in err or "EngineDeadError" in err, err[-2000:]
        _assert_all_gone(victim_pids, [])
    finally:
        for process in ranks:
            process.kill()
            process.wait()


def _config(model_dir: str, **kwargs):
    return EngineArgs(model=model_dir, dtype="float32", **kwargs).create_engine_config()


def test_lockstep_is_chosen_for_moe_models_with_expert_parallelism_only(moe_models, tmp_path):
    model_dir, _ = moe_models("MixtralForCausalLM")
    env = DataParallelEnv(1, 1, 2, "127.0.0.9", 4321, 60.0, dead_after_s=10.0)
    lockstep = with_lockstep(_config(model_dir, enable_expert_parallel=True), env)
    assert lockstep.parallel.lockstep is not None
    assert (lockstep.parallel.lockstep.rank, lockstep.parallel.lockstep.size) == (1, 2)
    assert lockstep.parallel.lockstep.master_ip == "127.0.0.9"
    assert with_lockstep(_config(model_dir), env).parallel.lockstep is None  # no EP: replicas
    dense = write_random_model(tmp_path / "llama", "LlamaForCausalLM")
    assert with_lockstep(_config(dense, enable_expert_parallel=True), env).parallel.lockstep is None
    alone = DataParallelEnv(0, 0, 1, "127.0.0.9", 4321, 60.0, dead_after_s=10.0)
    assert (
        with_lockstep(_config(model_dir, enable_expert_parallel=True), alone).parallel.lockstep
        is None
    )


def test_data_parallel_size_2_of_a_moe_model_places_experts_over_both_replicas(moe_models):
    """`LLM(data_parallel_size=2, enable_expert_parallel=True)` on a MoE model: the replicas
    step in lockstep through a store the user's process hosts, each holding its experts of the
    2-replica placement; prompts of different lengths (so one replica finishes first and
    serves the other's last tokens in idle steps) give HF's greedy tokens, in input order."""
    from ember import LLM, SamplingParams
    from tests.helpers import random_prompts
    from tests.test_expert_parallel import first_moe_layer_experts

    model_dir, hf_model = moe_models("MixtralForCausalLM")
    prompts = random_prompts(3, 512, [5, 17, 33], seed=3)
    lengths = [4, 12, 8]
    with LLM(
        model_dir, data_parallel_size=2, enable_expert_parallel=True, dtype="float32",
        skip_tokenizer_init=True,
    ) as llm:  # fmt: skip
        outputs = llm.generate(
            [{"prompt_token_ids": p} for p in prompts],
            [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths],
            use_tqdm=False,
        )
        held = [rank["experts"] for rank in llm.apply_model(first_moe_layer_experts)]
        steps = [replica.call_utility("lockstep_idle") for replica in llm.engine.replicas]
        with pytest.raises(NotImplementedError, match="lockstep data-parallel ranks"):
            llm.sleep()  # its experts serve the other replica's steps
    assert held == [expert_placement(NUM_EXPERTS, 2, rank, "linear") for rank in (0, 1)]
    for prompt, output, n in zip(prompts, outputs, lengths):
        assert list(output.outputs[0].token_ids) == hf_greedy(hf_model, prompt, n)
    assert steps[0]["steps"] == steps[1]["steps"] > 0
    assert max(s["idle_steps"] for s in steps) > 0
