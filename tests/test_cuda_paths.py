"""The CUDA-only machinery, checked on CPU where the check is honest: the CUDA graph batch
sizes and their padding rows (run eagerly through the torch attention), the KV-sizing
arithmetic and the profiling step that feeds it, the host-to-device copies, and that CPU use
never imports triton."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from ember.enginecore.arg_utils import EngineArgs
from ember.kernels.attention import AttentionMetadata
from ember.workers.cuda_graphs import CudaGraphRunner, capture_batch_sizes, padded_batch_size
from ember.workers.gpu_memory import (
    MemoryBaseline,
    MemoryProfile,
    check_requested_memory,
    dummy_batch,
    kv_cache_budget_bytes,
    run_dummy_step,
    split_evenly,
)
from ember.workers.host_to_device import to_device
from ember.workers.model_runner import ModelRunner

GiB = 2**30


@pytest.fixture(scope="module")
def model_runner(tiny_llama_dir) -> ModelRunner:
    config = EngineArgs(model=tiny_llama_dir, device="cpu").create_engine_config()
    return ModelRunner(config, torch.device("cpu"))


# ---- CUDA graphs -----------------------------------------------------------------------------


def test_capture_batch_sizes_follow_vllm_and_end_at_the_largest_decode_batch():
    sizes = capture_batch_sizes(max_num_seqs=256, max_num_batched_tokens=8192)
    assert sizes == [1, 2, 4, *range(8, 257, 8)]
    assert capture_batch_sizes(100, 8192)[-3:] == [88, 96, 100]
    assert capture_batch_sizes(1024, 8192)[-2:] == [496, 512]  # capped at 512
    assert capture_batch_sizes(256, 48)[-1] == 48  # a step holds at most 48 tokens
    assert capture_batch_sizes(1, 8192) == [1]


def test_padded_batch_size_is_the_smallest_captured_size_that_fits():
    sizes = capture_batch_sizes(256, 8192)
    assert [padded_batch_size(n, sizes) for n in (1, 3, 4, 5, 8, 9, 250, 256)] == [
        1, 4, 4, 8, 8, 16, 256, 256,
    ]  # fmt: skip
    assert padded_batch_size(257, sizes) is None


def _forward(model_runner, input_ids, positions, metadata):
    with torch.inference_mode():
        return model_runner.model(input_ids, positions, metadata)


def test_graph_padding_rows_leave_the_real_rows_unchanged(model_runner):
    """Three decodes padded to a captured size of 8 (as a graph replays them, here run eagerly
    with the torch attention) give the same hidden states as the three alone."""
    prompt_lens = [5, 17, 9]
    input_ids, positions, prefill, num_blocks = dummy_batch(prompt_lens, 4, torch.device("cpu"))
    model_runner.block_size = 4
    model_runner.initialize_kv_cache(num_blocks + 1)
    try:
        input_ids.random_(3, 100)
        _forward(model_runner, input_ids, positions, prefill)
        # One decode per request: the token after each prompt, whose slot is still in the
        # prompt's last block (5, 17 and 9 tokens fill none of theirs).
        block_size = model_runner.block_size
        decode_pos = torch.tensor(prompt_lens)
        slots = torch.stack(
            [prefill.block_table[i, p // block_size] * block_size + p % block_size
             for i, p in enumerate(prompt_lens)]
        )  # fmt: skip
        seq_lens = [p + 1 for p in prompt_lens]
        decode = AttentionMetadata(
            slot_mapping=slots,
            query_start_loc=torch.arange(4, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            block_table=prefill.block_table,
            num_decodes=3,
            max_query_len=1,
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=[0, 1, 2, 3],
            seq_lens_cpu=seq_lens,
        )
        decode_ids = torch.tensor([11, 12, 13])
        expected = _forward(model_runner, decode_ids, decode_pos, decode)

        graphs = CudaGraphRunner(model_runner.model, [1, 2, 8], 8, torch.device("cpu"))
        graphs.positions.fill_(7)  # stale values from an earlier step
        graphs.slot_mapping.fill_(3)
        graphs.block_table.fill_(2)
        assert graphs.fill_buffers(decode_ids, decode_pos, decode) == 8
        assert graphs.slot_mapping[3:].eq(-1).all() and graphs.seq_lens[3:].eq(1).all()
        assert graphs.block_table[3:].eq(0).all() and graphs.positions[3:].eq(0).all()
        assert graphs.input_ids[:3].tolist() == [11, 12, 13]
        padded = graphs.graph_metadata(8)
        # The torch reference reads host copies; a graph's Triton attention does not.
        padded.seq_lens_cpu = padded.seq_lens.tolist()
        padded.max_seq_len = max(padded.seq_lens_cpu)
        out = _forward(model_runner, graphs.input_ids[:8], graphs.positions[:8], padded)
        torch.testing.assert_close(out[:3], expected, atol=1e-5, rtol=1e-5)
        assert torch.isfinite(out).all()
        assert graphs.can_replay(3, decode) is False  # nothing captured on CPU
    finally:
        model_runner.block_size = model_runner.config.cache.block_size


# ---- KV sizing ---------------------------------------------------------------------------------


def test_kv_cache_budget_is_the_utilization_less_peak_non_torch_and_graphs():
    profile = MemoryProfile(
        total_bytes=80 * GiB,
        baseline_used_bytes=1 * GiB,  # another process, before the engine started
        used_bytes=int(16.75 * GiB),  # that, torch's 15 GiB, and 0.75 GiB of CUDA context
        torch_reserved_bytes=15 * GiB,
        torch_peak_bytes=18 * GiB,  # weights and the profiling step's activations
        cuda_graph_bytes=GiB // 4,
    )
    assert kv_cache_budget_bytes(profile, 0.9) == int(72 * GiB - 18 * GiB - 0.75 * GiB - GiB / 4)
    assert kv_cache_budget_bytes(profile, 0.2) < 0  # the caller then refuses to start


def test_startup_refused_when_the_requested_memory_is_not_free():
    check_requested_memory(MemoryBaseline(total_bytes=80 * GiB, free_bytes=79 * GiB), 0.9)
    with pytest.raises(ValueError, match="gpu_memory_utilization=0.9"):
        check_requested_memory(MemoryBaseline(total_bytes=80 * GiB, free_bytes=40 * GiB), 0.9)


def test_dummy_batch_lays_fresh_prompts_in_their_own_blocks():
    assert split_evenly(10, 4) == [3, 3, 2, 2]
    assert split_evenly(3, 8) == [1, 1, 1]
    input_ids, positions, metadata, num_blocks = dummy_batch([5, 1, 8], 4, torch.device("cpu"))
    assert metadata.query_start_loc.tolist() == [0, 5, 6, 14] and len(input_ids) == 14
    assert positions.tolist() == [0, 1, 2, 3, 4, 0, *range(8)]
    slots = metadata.slot_mapping.tolist()
    assert len(set(slots)) == 14 and min(slots) >= 4 and max(slots) < num_blocks * 4
    assert num_blocks == 1 + 2 + 1 + 2  # the null block, then 2, 1 and 2 blocks


def test_profiling_step_runs_the_model_and_sampler_and_unbinds_its_scratch_cache(model_runner):
    block_bytes = model_runner.kv_cache_block_bytes()
    scratch_bytes = run_dummy_step(model_runner, num_tokens=50, num_seqs=4, sample=True)
    # 4 prompts of 13/13/12/12 tokens in blocks of 16: one block each, plus the null block.
    assert scratch_bytes == 5 * block_bytes
    assert model_runner.kv_caches == []
    assert all(layer.kv_cache.numel() == 0 for layer in model_runner.attention_layers)
    assert run_dummy_step(model_runner, num_tokens=8, num_seqs=8, sample=False) > 0


# ---- host to device ----------------------------------------------------------------------------


def test_to_device_converts_arrays_lists_and_tensors():
    cpu = torch.device("cpu")
    out = to_device(np.arange(4, dtype=np.int64), cpu, torch.int32)
    assert out.dtype == torch.int32 and out.tolist() == [0, 1, 2, 3]
    assert to_device([0.5, 1.5], cpu, torch.float32).tolist() == [0.5, 1.5]
    assert to_device(torch.tensor([1, 2]), cpu, torch.int64).tolist() == [1, 2]


# ---- dispatch --------------------------------------------------------------------------------


def test_cpu_kernels_and_the_engine_core_never_import_triton():
    """A fresh interpreter: the frontend, the engine core's process module and every kernel
    called on CPU tensors leave triton unimported."""
    script = (
        "import sys, torch\n"
        "import ember, ember.enginecore.core_process\n"
        "from ember.kernels import apply_rotary_emb, apply_top_k_top_p, gelu_and_mul\n"
        "from ember.kernels import rms_norm, silu_and_mul, fused_add_rms_norm\n"
        "x = torch.randn(3, 8)\n"
        "rms_norm(x, torch.ones(8), 1e-6); fused_add_rms_norm(x, x, torch.ones(8), 1e-6)\n"
        "silu_and_mul(x); gelu_and_mul(x, 'tanh')\n"
        "apply_top_k_top_p(x, torch.tensor([2, 3, 4]), torch.tensor([0.5, 0.9, 1.0]))\n"
        "q = torch.randn(3, 2, 8)\n"
        "apply_rotary_emb(torch.tensor([0, 1, 2]), q, q, torch.randn(4, 8))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'triton'"
        " or m.endswith('_triton')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "[]"
