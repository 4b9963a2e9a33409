"""Expert parallelism (`enable_expert_parallel`, `expert_placement_strategy`) on CPU: the
placement against vLLM's rule, one MoE layer split over two simulated ranks against the whole
layer (both forward paths, both checkpoint layouts), every MoE architecture at TP=2 against
Hugging Face with 5 experts on 2 ranks, what each rank holds, and the argument checks."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from ember import LLM, SamplingParams
from ember.enginecore import vllm_engine_args
from ember.enginecore.arg_utils import EngineArgs
from ember.workers.distributed import ParallelContext
from ember.workers.layers.context import ModelContext
from ember.workers.layers.fused_moe import FusedMoE, expert_placement, select_experts
from ember.workers.layers.quantization.gptq import GPTQConfig
from ember.workers.model_loader.loader import get_model
from tests.helpers import hf_greedy, hf_prompt_logprobs, random_prompts, write_random_model
from tests.test_gptq_awq import (  # the quantized MoE checkpoints and their checks
    check_against_hf,
    moe_checkpoints,  # noqa: F401 (a fixture)
    packed_forms,
    prompts,  # noqa: F401 (a fixture)
)

MOE_ARCHITECTURES = {  # architecture -> its config's name for the number of experts
    "MixtralForCausalLM": "num_local_experts",
    "Qwen2MoeForCausalLM": "num_experts",
    "Qwen3MoeForCausalLM": "num_experts",
    "GraniteMoeForCausalLM": "num_local_experts",
}
STRATEGIES = ("linear", "round_robin")
NUM_EXPERTS = 5  # does not divide over 2 ranks
PROMPTS = random_prompts(4, 512, [5, 17, 33, 9], seed=1)
MAX_TOKENS = 12
ENGINE_OPTIONS = {
    "dtype": "float32",
    "skip_tokenizer_init": True,
    "block_size": 4,
    "max_num_batched_tokens": 64,
}


def _vllm_expert_map(num_experts: int, ep_size: int, ep_rank: int, strategy: str) -> list[int]:
    """vLLM's `determine_expert_map` (vllm/model_executor/layers/fused_moe/layer.py) as it
    reads: global expert id -> local index, -1 for another rank's expert."""
    base_experts = num_experts // ep_size
    remainder = num_experts % ep_size
    local_num_experts = base_experts + 1 if ep_rank < remainder else base_experts
    expert_map = torch.full((num_experts,), -1, dtype=torch.int32)
    if strategy == "linear":
        start = ep_rank * base_experts + min(ep_rank, remainder)
        expert_map[start : start + local_num_experts] = torch.arange(local_num_experts)
    else:
        local = torch.arange(ep_rank, num_experts, ep_size)
        expert_map[local] = torch.arange(local_num_experts, dtype=torch.int32)
    return expert_map.tolist()


# ---- placement ---------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_expert_placement_follows_vllms_expert_map(strategy):
    for num_experts in (1, 2, 4, 5, 8, 60, 64, 128):
        for ep_size in (1, 2, 3, 4, 8):
            if ep_size > num_experts:  # vLLM's round_robin map fails there; nothing to compare
                continue
            held = []
            for ep_rank in range(ep_size):
                local = expert_placement(num_experts, ep_size, ep_rank, strategy)
                expected = _vllm_expert_map(num_experts, ep_size, ep_rank, strategy)
                assert [expected[e] for e in local] == list(range(len(local)))
                assert sum(index >= 0 for index in expected) == len(local)
                held += local
            assert sorted(held) == list(range(num_experts))  # each expert on one rank


def test_expert_placement_of_five_experts_on_two_ranks():
    assert expert_placement(5, 2, 0, "linear") == [0, 1, 2]
    assert expert_placement(5, 2, 1, "linear") == [3, 4]
    assert expert_placement(5, 2, 0, "round_robin") == [0, 2, 4]
    assert expert_placement(5, 2, 1, "round_robin") == [1, 3]
    with pytest.raises(ValueError, match="expert_placement_strategy"):
        expert_placement(5, 2, 0, "striped")


# ---- one layer over two simulated ranks --------------------------------------------------

HIDDEN, INTERMEDIATE, TOP_K = 32, 48, 2


def _layer(rank: int = 0, world_size: int = 1, strategy: str | None = None) -> FusedMoE:
    parallel = ParallelContext(
        rank=rank,
        world_size=world_size,
        enable_expert_parallel=strategy is not None,
        expert_placement_strategy=strategy or "linear",
    )
    return FusedMoE(NUM_EXPERTS, TOP_K, HIDDEN, INTERMEDIATE, ctx=ModelContext(parallel))


def _load_per_expert(layer: FusedMoE, gate, up, down) -> None:
    """Every expert's tensors, as the generic loader hands them over (all experts, each rank)."""
    for expert in range(NUM_EXPERTS):
        layer.weight_loader(layer.w13_weight, gate[expert], (expert, "w1"))
        layer.weight_loader(layer.w13_weight, up[expert], (expert, "w3"))
        layer.weight_loader(layer.w2_weight, down[expert], (expert, "w2"))


def _load_stacked(layer: FusedMoE, gate, up, down) -> None:
    """GraniteMoE's layout: every expert of a projection in one tensor."""
    layer.weight_loader(layer.w13_weight, torch.cat([gate, up], dim=1))
    layer.weight_loader(layer.w2_weight, down)


@pytest.mark.parametrize("load", [_load_per_expert, _load_stacked], ids=["per-expert", "stacked"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_experts_over_two_ranks_sum_to_the_whole_layer(strategy, load):
    generator = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(NUM_EXPERTS, INTERMEDIATE, HIDDEN, generator=generator) for _ in "gu")
    down = torch.randn(NUM_EXPERTS, HIDDEN, INTERMEDIATE, generator=generator)
    hidden_states = torch.randn(7, HIDDEN, generator=generator)
    router_logits = torch.randn(7, NUM_EXPERTS, generator=generator)
    weights, ids = select_experts(router_logits, TOP_K, renormalize=True)

    whole = _layer()
    load(whole, gate, up, down)
    expected = whole.forward_routed(hidden_states, weights, ids)
    static = whole.forward_static(hidden_states, weights, ids)
    torch.testing.assert_close(static, expected, rtol=1e-5, atol=1e-4)

    routed, static = torch.zeros_like(expected), torch.zeros_like(expected)
    for rank in range(2):
        layer = _layer(rank, 2, strategy)
        load(layer, gate, up, down)
        local = expert_placement(NUM_EXPERTS, 2, rank, strategy)
        assert layer.local_experts == local
        # whole experts, this rank's only: every intermediate row, no other expert
        assert tuple(layer.w13_weight.shape) == (len(local), 2 * INTERMEDIATE, HIDDEN)
        assert tuple(layer.w2_weight.shape) == (len(local), HIDDEN, INTERMEDIATE)
        for index, expert in enumerate(local):
            torch.testing.assert_close(layer.w13_weight[index], whole.w13_weight[expert])
            torch.testing.assert_close(layer.w2_weight[index], whole.w2_weight[expert])
        routed += layer.forward_routed(hidden_states, weights, ids)
        static += layer.forward_static(hidden_states, weights, ids)
    torch.testing.assert_close(routed, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(static, expected, rtol=1e-5, atol=1e-4)


def test_rank_without_experts_contributes_zero():
    layer = FusedMoE(
        2,
        1,
        HIDDEN,
        INTERMEDIATE,
        ctx=ModelContext(ParallelContext(rank=2, world_size=3, enable_expert_parallel=True)),
    )
    assert layer.num_local_experts == 0
    hidden_states = torch.randn(3, HIDDEN)
    weights, ids = select_experts(torch.randn(3, 2), 1, renormalize=True)
    for forward in (layer.forward_routed, layer.forward_static):
        assert torch.equal(forward(hidden_states, weights, ids), torch.zeros(3, HIDDEN))


def test_quantized_experts_under_expert_parallelism_are_whole_layers_of_this_ranks_experts():
    config = GPTQConfig({"bits": 4, "group_size": 16, "desc_act": False, "sym": True})
    parallel = ParallelContext(rank=1, world_size=2, enable_expert_parallel=True)
    layer = FusedMoE(NUM_EXPERTS, TOP_K, HIDDEN, INTERMEDIATE, ctx=ModelContext(parallel, config))
    assert list(layer.w13) == list(layer.w2) == ["3", "4"]  # linear: rank 1 holds 3 and 4
    for expert in layer.w13.values():  # whole: every output row, no all-reduce of their own
        assert expert.tp_size == 1 and expert.output_size_per_partition == 2 * INTERMEDIATE
    assert layer.foreign_expert_prefixes("model.layers.0.mlp.experts") == tuple(
        f"model.layers.0.mlp.experts.{expert}." for expert in (0, 1, 2)
    )


# ---- every MoE architecture at TP=2 against Hugging Face ---------------------------------


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    """architecture -> (directory, Hugging Face model, ember's TP=1 model), 5 experts each,
    written once per module."""
    cache: dict[str, tuple] = {}

    def get(architecture: str) -> tuple:
        if architecture not in cache:
            overrides = {MOE_ARCHITECTURES[architecture]: NUM_EXPERTS}
            path = tmp_path_factory.mktemp(architecture)
            model_dir = write_random_model(path, architecture, **overrides)
            hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            config = EngineArgs(model=model_dir, dtype="float32").create_engine_config()
            cache[architecture] = (
                model_dir,
                hf_model.eval(),
                get_model(config.model, torch.device("cpu")),
            )
        return cache[architecture]

    return get


def first_moe_layer_experts(model) -> dict:
    """Run on each rank (`LLM.apply_model`): the experts the first MoE layer holds, the shapes
    of its parameters and the sum of each local expert's gate | up weights."""
    layer = next(module for module in model.modules() if isinstance(module, FusedMoE))
    return {
        "experts": layer.local_experts,
        "w13": list(layer.w13_weight.shape),
        "w2": list(layer.w2_weight.shape),
        "sums": [float(weight.double().sum()) for weight in layer.w13_weight],
    }


def _assert_prompt_logprobs_close(outputs, reference, atol: float = 1e-3) -> None:
    for i, (output, expected) in enumerate(zip(outputs, reference)):
        for position, logprobs in enumerate(output.prompt_logprobs[1:], start=1):
            for token_id, logprob in logprobs.items():
                diff = abs(logprob.logprob - expected[position - 1, token_id].item())
                assert diff <= atol, f"prompt {i}, position {position}, token {token_id}: {diff}"


# Two cases run by default (one per strategy; GraniteMoE loads its experts stacked); the rest
# are slow.
_DEFAULT_CASES = {("GraniteMoeForCausalLM", "linear"), ("MixtralForCausalLM", "round_robin")}
CASES = [
    pytest.param(
        architecture,
        strategy,
        marks=() if (architecture, strategy) in _DEFAULT_CASES else pytest.mark.slow,
        id=f"{architecture}-{strategy}",
    )
    for architecture in MOE_ARCHITECTURES
    for strategy in STRATEGIES
]


@pytest.mark.parametrize("architecture,strategy", CASES)
def test_tp2_expert_parallel_matches_hf_and_each_rank_holds_its_experts(
    architecture, strategy, moe_models
):
    model_dir, hf_model, whole_model = moe_models(architecture)
    with LLM(
        model_dir,
        tensor_parallel_size=2,
        enable_expert_parallel=True,
        expert_placement_strategy=strategy,
        **ENGINE_OPTIONS,
    ) as llm:
        assert llm.config.parallel.enable_expert_parallel
        outputs = llm.generate(
            PROMPTS,
            SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, prompt_logprobs=3),
            use_tqdm=False,
        )
        ranks = llm.apply_model(first_moe_layer_experts)
    for prompt, output in zip(PROMPTS, outputs):
        assert list(output.outputs[0].token_ids) == hf_greedy(hf_model, prompt, MAX_TOKENS)
    _assert_prompt_logprobs_close(outputs, hf_prompt_logprobs(hf_model, PROMPTS))

    whole = first_moe_layer_experts(whole_model)
    rows, hidden = whole["w13"][1], whole["w13"][2]
    assert len(ranks) == 2
    for rank, held in enumerate(ranks):
        local = expert_placement(NUM_EXPERTS, 2, rank, strategy)
        assert held["experts"] == local
        assert held["w13"] == [len(local), rows, hidden]  # whole experts: every row
        assert held["w2"] == [len(local), hidden, rows // 2]
        assert held["sums"] == pytest.approx([whole["sums"][e] for e in local], rel=1e-9)


@pytest.mark.parametrize(
    "architecture",
    ["MixtralForCausalLM", pytest.param("Qwen3MoeForCausalLM", marks=pytest.mark.slow)],
    ids=["gptq-act-order", "awq"],
)
def test_tp2_expert_parallel_with_quantized_experts_matches_hf(
    architecture,
    moe_checkpoints,  # noqa: F811 (the fixture imported above)
    prompts,  # noqa: F811
):
    quantized, dequantized = moe_checkpoints[architecture]
    with LLM(
        quantized, tensor_parallel_size=2, enable_expert_parallel=True, skip_tokenizer_init=True
    ) as llm:
        forms = llm.apply_model(packed_forms)
        check_against_hf(llm, dequantized, prompts[:2])
    # each rank: attention's qkv and o, then each of its 2 of 4 experts' gate|up and down,
    # in 2 layers
    assert [len(rank_forms) for rank_forms in forms] == [2 * (2 + 2 * 2)] * 2


# ---- arguments ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory) -> str:
    return write_random_model(tmp_path_factory.mktemp("mixtral"), "MixtralForCausalLM")


def test_unknown_placement_strategy_is_refused_in_the_users_process(mixtral_dir):
    with pytest.raises(ValueError, match="expert_placement_strategy.*'linear' or 'round_robin'"):
        LLM(
            mixtral_dir,
            tensor_parallel_size=2,
            enable_expert_parallel=True,
            expert_placement_strategy="striped",
        )


def test_enable_expert_parallel_must_be_a_bool(mixtral_dir):
    with pytest.raises(TypeError, match="enable_expert_parallel"):
        EngineArgs(model=mixtral_dir, enable_expert_parallel="yes").create_engine_config()


def test_expert_options_reach_the_parallel_config(mixtral_dir):
    config = EngineArgs(
        model=mixtral_dir,
        tensor_parallel_size=2,
        enable_expert_parallel=True,
        expert_placement_strategy="round_robin",
    ).create_engine_config()
    assert config.parallel.enable_expert_parallel
    assert config.parallel.expert_placement_strategy == "round_robin"
    assert not EngineArgs(model=mixtral_dir).create_engine_config().parallel.enable_expert_parallel


def test_expert_parallel_on_a_dense_model_is_logged_and_ignored(tmp_path, caplog):
    model_dir = write_random_model(tmp_path, "LlamaForCausalLM")
    vllm_engine_args._logged_names().clear()
    caplog.set_level(logging.INFO, logger="ember.enginecore.vllm_engine_args")
    try:
        config = EngineArgs(
            model=model_dir, tensor_parallel_size=2, enable_expert_parallel=True
        ).create_engine_config()
    finally:
        vllm_engine_args._logged_names().clear()
    assert not config.parallel.enable_expert_parallel
    assert "enable_expert_parallel=True is accepted and has no effect" in caplog.text
    assert "no experts" in caplog.text
