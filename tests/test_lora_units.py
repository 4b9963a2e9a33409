"""LoRA without an engine: the batched shrink/expand against a per-token loop, the LoRA layer
over fused q|k|v slices, the scheduler's max_loras rule, prefix-cache keys by adapter, and the
checks of an adapter's config in the user's process."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from ember.enginecore.kv_cache_manager import KVCacheManager
from ember.enginecore.request import Request
from ember.enginecore.scheduler import Scheduler
from ember.kernels.lora import add_lora_reference, lora_expand_, lora_shrink, slot_groups
from ember.lora.request import LoRARequest
from ember.lora.resolve import lora_requests_per_prompt
from ember.workers.config import SchedulerConfig
from ember.workers.layers.context import ModelContext
from ember.workers.layers.linear import QKVParallelLinear, RowParallelLinear
from ember.workers.layers.lora import LoRAStep, add_lora_layers
from ember.workers.sampling_params import SamplingParams
from ember.workers.scheduler_output import ModelRunnerOutput


@pytest.mark.parametrize("one_adapter", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shrink_expand_equals_a_per_token_loop(dtype, one_adapter):
    """Mixed slots (tokens gathered per slot), and one adapter for every token (whole
    activations multiplied, `slot_groups` gives rows None)."""
    torch.manual_seed(0)
    num_tokens, num_slots, rank, in_size, out_size = 23, 3, 8, 32, 48
    x = torch.randn(num_tokens, in_size, dtype=dtype)
    y = torch.randn(num_tokens, out_size, dtype=dtype)
    lora_a = torch.randn(num_slots, rank, in_size, dtype=dtype)
    lora_b = torch.randn(num_slots, out_size, rank, dtype=dtype)
    scales = torch.tensor([0.5, 2.0, 1.25])
    token_slots = torch.randint(-1, num_slots, (num_tokens,))
    token_slots[:3] = torch.tensor([-1, 0, 2])
    if one_adapter:
        token_slots.fill_(1)
        assert slot_groups(token_slots) == [(1, None)]
    expected = add_lora_reference(y, x, lora_a, lora_b, scales, token_slots)
    groups = slot_groups(token_slots)
    out = y.clone()
    buffer = lora_shrink(x, lora_a, token_slots, groups)
    lora_expand_(out, buffer, lora_b, scales, token_slots, groups)
    tolerance = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance * 10)
    base_rows = token_slots == -1
    assert torch.equal(out[base_rows], y[base_rows])  # untouched, bit for bit


def test_no_adapter_in_the_step_skips_the_lora_math():
    assert slot_groups(torch.full((5,), -1)) == []


@pytest.mark.parametrize("rows", [3, 300], ids=["decode", "prefill"])
def test_fused_qkv_layer_adds_each_slice_its_own_adapter(rows):
    """q and v adapted (different ranks), k not: the delta lands in each slice's rows only;
    a prefill's rows take the slice-by-slice expand (`SLICED_EXPAND_MIN_ROWS`)."""
    torch.manual_seed(1)
    hidden, head, heads, kv_heads = 16, 4, 4, 2
    layer = QKVParallelLinear(hidden, head, heads, kv_heads, ctx=ModelContext())
    layer.weight.data.normal_()
    module = torch.nn.Module()
    module.qkv_proj = layer
    module.packed_modules_mapping = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k")}
    module.packed_modules_mapping["v_proj"] = ("qkv_proj", "v")
    step = LoRAStep()
    targets = add_lora_layers(module, 2, 8, step, torch.float32, torch.device("cpu"))
    assert set(targets) == {"q_proj", "k_proj", "v_proj"}
    method = targets["q_proj"].method
    a_q, b_q = torch.randn(4, hidden), torch.randn(heads * head, 4)
    a_v, b_v = torch.randn(8, hidden), torch.randn(kv_heads * head, 8)
    method.set_slot(1, {"q": (a_q, b_q, 0.5), "v": (a_v, b_v, 2.0)})
    x = torch.randn(rows, hidden)
    base = x @ layer.weight.T
    slots = torch.tensor([1, -1, 1] * (rows // 3))
    step.set_token_slots(slots)
    out = layer(x)
    q_rows, kv_rows = heads * head, kv_heads * head
    expected = base.clone()
    adapted = slots == 1
    expected[adapted, :q_rows] += (x[adapted] @ a_q.T @ b_q.T) * 0.5
    expected[adapted, q_rows + kv_rows :] += (x[adapted] @ a_v.T @ b_v.T) * 2.0
    torch.testing.assert_close(out, expected)
    step.set_token_slots(None)
    torch.testing.assert_close(layer(x), base)


# ---- scheduling -------------------------------------------------------------------------


def _lora_request(request_id: str, lora_id: int | None, first_token: int = 10) -> Request:
    lora = None if lora_id is None else LoRARequest(f"adapter{lora_id}", lora_id, "/nowhere")
    return Request(
        request_id=request_id,
        prompt_token_ids=list(range(first_token, first_token + 8)),
        sampling_params=SamplingParams(temperature=0.0, max_tokens=2),
        eos_token_ids=(2,),
        lora_request=lora,
        lora_name=None if lora is None else lora.lora_name,
    )


def test_scheduler_never_runs_more_than_max_loras_adapters_at_once():
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256, max_model_len=64)
    scheduler = Scheduler(config, KVCacheManager(64, 4), max_loras=2)
    for request_id, lora_id in [("a", 1), ("b", 2), ("c", 3), ("base", None), ("a2", 1)]:
        scheduler.add_request(_lora_request(request_id, lora_id, first_token=10 + len(request_id)))
    seen_steps = []
    while scheduler.has_unfinished_requests():
        output = scheduler.schedule()
        running = {r.lora_request.lora_int_id for r in scheduler.running if r.lora_request}
        assert len(running) <= 2
        seen_steps.append(set(output.num_scheduled_tokens))
        adapters = {
            scheduler.requests[r].lora_request.lora_int_id
            for r in output.num_scheduled_tokens
            if scheduler.requests[r].lora_request is not None
        }
        assert len(adapters) <= 2
        done = [r for r in output.num_scheduled_tokens]
        scheduler.update_from_output(
            output, ModelRunnerOutput(req_ids=done, sampled_token_ids=[7] * len(done))
        )
    # "c" (a third adapter) waited while the base request and a second "adapter1" one ran
    assert seen_steps[0] == {"a", "b", "base", "a2"}
    assert "c" in set().union(*seen_steps[1:])


def test_prefix_cache_blocks_are_keyed_by_adapter():
    manager = KVCacheManager(64, 4)
    first, second, base = (
        _lora_request("x", 1, 10),
        _lora_request("y", 2, 10),
        _lora_request("z", None, 10),
    )
    blocks, _ = manager.get_computed_blocks(first)
    manager.allocate_slots(first, 8, blocks)
    manager.allocate_slots(first, 0)  # hashes its full blocks
    for other in (second, base):
        assert manager.get_computed_blocks(other)[1] == 0
    same = _lora_request("w", 1, 10)
    assert manager.get_computed_blocks(same)[1] > 0


# ---- checks in the user's process -----------------------------------------------------


def _engine_info(max_lora_rank: int) -> SimpleNamespace:
    return SimpleNamespace(max_lora_rank=max_lora_rank, lora_module_shapes={})


def _adapter_dir(tmp_path, **config) -> str:
    path = tmp_path / "adapter"
    path.mkdir()
    settings = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}
    (path / "adapter_config.json").write_text(json.dumps({**settings, **config}))
    (path / "adapter_model.bin").write_bytes(b"")
    return str(path)


def test_lora_request_checks_name_the_problem(tmp_path):
    good = LoRARequest("good", 1, _adapter_dir(tmp_path))
    rank16, rank4, off = _engine_info(16), _engine_info(4), _engine_info(0)
    assert lora_requests_per_prompt(good, 2, rank16) == [good, good]
    assert lora_requests_per_prompt([None, good], 2, rank16) == [None, good]
    assert lora_requests_per_prompt(None, 2, off) is None
    with pytest.raises(ValueError, match="enable_lora=True"):
        lora_requests_per_prompt(good, 1, off)
    with pytest.raises(ValueError, match="rank 8 is greater than max_lora_rank 4"):
        lora_requests_per_prompt(good, 1, rank4)
    with pytest.raises(ValueError, match="is not a directory"):
        lora_requests_per_prompt(LoRARequest("gone", 2, str(tmp_path / "gone")), 1, rank16)
    with pytest.raises(ValueError, match="2 entries for 3 prompts"):
        lora_requests_per_prompt([good, good], 3, rank16)
    with pytest.raises(TypeError, match="lora_request must be a LoRARequest"):
        lora_requests_per_prompt("good", 1, rank16)
    with pytest.raises(ValueError, match="id must be > 0"):
        LoRARequest("zero", 0, "/x")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"target_modules": ["q_proj", "embed_tokens"]}, "'embed_tokens' is not supported"),
        ({"target_modules": ["lm_head"]}, "'lm_head' is not supported"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ],
)
def test_unsupported_adapters_raise_not_implemented(tmp_path, config, message):
    request = LoRARequest("bad", 1, _adapter_dir(tmp_path, **config))
    with pytest.raises(NotImplementedError, match=message):
        lora_requests_per_prompt(request, 1, _engine_info(16))


# ---- the Triton kernels (CUDA), interpreted on CPU ----------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_shrink_expand_match_the_loop_on_slices(dtype):
    """As a fused layer calls them: y is a column slice of the output, B a row slice of the
    stacked lora_b, the scales a column of [slots, slices]."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("without a GPU the kernels need TRITON_INTERPRET=1 (set in tests/conftest.py)")
    from ember.kernels.lora_triton import lora_expand_triton_, lora_shrink_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(3)
    num_tokens, num_slots, rank, in_size, out_size = 5, 2, 8, 40, 150
    x = torch.randn(num_tokens, in_size, dtype=dtype, device=device)
    lora_a = torch.randn(num_slots, rank, in_size, dtype=dtype, device=device)
    lora_b = torch.randn(num_slots, out_size + 10, rank, dtype=dtype, device=device)
    scales = torch.tensor([[0.5, 1.0], [2.0, 3.0]], device=device)
    token_slots = torch.tensor([1, -1, 0, 1, -1], device=device)
    output = torch.randn(num_tokens, out_size + 20, dtype=dtype, device=device)
    expected = output.clone()
    expected[:, 20:] = add_lora_reference(
        output[:, 20:], x, lora_a, lora_b[:, 10:], scales[:, 1], token_slots
    )
    buffer = lora_shrink_triton(x, lora_a, token_slots)
    lora_expand_triton_(output[:, 20:], buffer, lora_b[:, 10:], scales[:, 1], token_slots)
    tolerance = (
        {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 0.5, "rtol": 2e-2}
    )
    torch.testing.assert_close(output.float(), expected.float(), **tolerance)
    assert torch.equal(output[[1, 4]], expected[[1, 4]])  # tokens without an adapter


_COMPILE_LORA_KERNELS = """
import json
from ember.kernels import lora_triton
from tests.triton_compile import compile_for_h100
for dtype in ("*bf16", "*fp32"):
    print(json.dumps(compile_for_h100(
        lora_triton._lora_shrink_kernel,
        {"out_ptr": "*fp32", "x_ptr": dtype, "lora_a_ptr": dtype, "slots_ptr": "*i64"}, (),
        {"BLOCK_N": lora_triton.BLOCK_N, "BLOCK_K": lora_triton.BLOCK_K})))
    print(json.dumps(compile_for_h100(
        lora_triton._lora_expand_kernel,
        {"y_ptr": dtype, "buffer_ptr": "*fp32", "lora_b_ptr": dtype, "scales_ptr": "*fp32",
         "slots_ptr": "*i64"}, (),
        {"BLOCK_N": lora_triton.BLOCK_N, "BLOCK_K": lora_triton.BLOCK_K})))
"""


@pytest.mark.slow
def test_triton_lora_kernels_compile_for_h100():
    """Triton's compiler is stricter than its interpreter; as tests/test_triton_compile.py."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE_LORA_KERNELS],
        check=False,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    compiled = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(compiled) == 4
    assert all(entry["cubin_bytes"] > 0 for entry in compiled)


def test_the_workers_grouping_takes_whole_activations_when_one_adapter_serves_the_step():
    """The model runner's grouping (`LoRAManager.set_token_slots`): one adapter for every
    token is one group without rows (no gather or scatter per layer); mixed steps list rows."""
    import numpy as np

    from ember.workers.lora_manager import LoRAManager

    manager = SimpleNamespace(step=LoRAStep(), device=torch.device("cpu"))
    LoRAManager.set_token_slots(manager, np.array([1, 1, 1]))
    assert manager.step.groups == [(1, None)]
    LoRAManager.set_token_slots(manager, np.array([1, -1, 0, 1]))
    assert [(slot, rows.tolist()) for slot, rows in manager.step.groups] == [(0, [2]), (1, [0, 3])]
    LoRAManager.set_token_slots(manager, np.array([-1, -1]))
    assert manager.step.groups == [] and manager.step.token_slots is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_cpu_delta_on_the_decode_steps_activations_matches_the_definition(dtype):
    """`add_delta` as the fused CPU decode loop calls it (activations and base output in
    bfloat16 there; bfloat16 copies of A and B where the CPU multiplies bfloat16 natively):
    one adapter for the whole step and a mixed step give each token its own delta, within
    the activations' rounding of the float64 definition."""
    torch.manual_seed(2)
    hidden, out_rows = 64, 96
    layer = torch.nn.Module()
    layer.o_proj = RowParallelLinear(hidden, out_rows, ctx=ModelContext())
    step = LoRAStep()
    targets = add_lora_layers(layer, 2, 8, step, torch.float32, torch.device("cpu"))
    method = targets["o_proj"].method
    adapters = [(torch.randn(8, hidden), torch.randn(out_rows, 8), 0.5) for _ in range(2)]
    for slot, weights in enumerate(adapters):
        method.set_slot(slot, {None: weights})
    x = torch.randn(6, hidden).to(dtype)
    base = torch.randn(6, out_rows).to(dtype)

    def expected(slots: list[int]) -> torch.Tensor:
        wide = base.double().clone()
        for row, slot in enumerate(slots):
            if slot >= 0:
                a, b, scale = adapters[slot]
                wide[row] += (x[row].double() @ a.double().T) @ b.double().T * scale
        return wide

    tolerance = (
        {"atol": 1e-4, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.3, "rtol": 0.02}
    )
    for slots in ([0] * 6, [1, -1, 0, 1, 0, -1]):
        step.set_token_slots(torch.tensor(slots))
        out = method.add_delta(x, base.clone())
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), expected(slots), **tolerance)
        untouched = torch.tensor(slots) == -1
        assert torch.equal(out[untouched], base[untouched])


def _c_weights(sizes: list[int], rank: int, slots: int, seed: int):
    """Random adapters of a layer with output slices `sizes` in the C kernel's form, and the
    per-slice (A, B, scale) of each slot they came from."""
    from ember.kernels.lora_cpu import LoRACWeights

    generator = torch.Generator().manual_seed(seed)
    hidden, n = 64, len(sizes)
    lora_a = torch.randn(slots, n * rank, hidden, generator=generator) * 0.1
    parts = [
        [
            (
                lora_a[s, i * rank : (i + 1) * rank],
                torch.randn(size, rank, generator=generator) * 0.1,
                0.5 + i,
            )
            for i, size in enumerate(sizes)
        ]
        for s in range(slots)
    ]
    lora_bt = torch.zeros(slots, rank, sum(sizes))
    for s in range(slots):
        start = 0
        for i, (_, b, scale) in enumerate(parts[s]):
            lora_bt[s, :, start : start + sizes[i]] = (b * scale).T
            start += sizes[i]
    ends = torch.tensor(list(itertools.accumulate(sizes)), dtype=torch.int64)
    return LoRACWeights(lora_a.transpose(1, 2).contiguous(), lora_bt, rank, ends), parts


@pytest.mark.parametrize(
    "sizes, rank",
    [([48], 8), ([64, 16, 16], 8), ([40, 40], 8), ([96, 32, 32], 16), ([200, 200], 24)],
    ids=["one", "qkv", "gate-up", "qkv-rank16", "gate-up-rank24"],
)
def test_c_kernel_adds_each_tokens_adapter_as_the_definition(cpu_isa, sizes, rank):
    """`kernels/lora_cpu.lora_add` (the fused decode step's LoRA) under each ISA: bfloat16
    rows of a step mixing two adapters and the base model, each row within bfloat16's
    rounding of the float64 definition, base rows untouched, and a row's result the same
    bits whether it runs alone or among the others. The sizes take every path of the
    kernel's blocks: three vectors, one, and the columns after the last whole vector."""
    from ember.kernels.lora_cpu import available, lora_add

    if not available():
        pytest.skip("no C compiler: the torch path serves")
    weights, parts = _c_weights(sizes, rank=rank, slots=2, seed=3)
    generator = torch.Generator().manual_seed(4)
    # slot 0's 13 rows fill a group of eight (four on AVX2) and leave a part-filled one
    slots = torch.tensor([0, 1, -1, 0, 0, 1, 0, -1, 1, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, -1])
    tokens = len(slots)
    x = torch.randn(tokens, 64, generator=generator).bfloat16()
    base = torch.randn(tokens, sum(sizes), generator=generator).bfloat16()
    out = base.clone()
    assert lora_add(x, out, slots, weights)
    expected = base.double().clone()
    for t, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        start = 0
        for a, b, scale in parts[slot]:
            delta = (x[t].double() @ a.double().T) @ b.double().T * scale
            expected[t, start : start + b.shape[0]] += delta
            start += b.shape[0]
    torch.testing.assert_close(out.double(), expected, atol=1e-2, rtol=1e-2)
    assert torch.equal(out[slots < 0], base[slots < 0])
    for t in (0, 5, 16):  # alone: the same bits
        row = base[t : t + 1].clone()
        assert lora_add(x[t : t + 1].clone(), row, slots[t : t + 1].clone(), weights)
        assert torch.equal(row, out[t : t + 1])


def test_c_kernel_refuses_what_it_cannot_take_and_leaves_the_output():
    from ember.kernels.lora_cpu import available, lora_add

    if not available():
        pytest.skip("no C compiler: the torch path serves")
    weights, _ = _c_weights([48], rank=8, slots=1, seed=5)
    x, out = torch.randn(2, 64).bfloat16(), torch.zeros(2, 48).bfloat16()
    slots = torch.zeros(2, dtype=torch.int64)
    assert not lora_add(x.float(), out, slots, weights)  # float32 activations: torch's path
    assert not lora_add(x, out[:, ::2], slots, weights)  # a strided output
    assert torch.equal(out, torch.zeros(2, 48).bfloat16())
