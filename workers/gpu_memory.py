"""KV-cache sizing on CUDA from `gpu_memory_utilization`, after a profiling step.

Called by `ember.workers.worker.Worker`. The worker notes the device's used memory before it
loads anything; then, with the weights loaded, it runs one dummy step at the engine's limits
(`max_num_batched_tokens` tokens over `max_num_seqs` requests, through the model and the
sampler with top-k and top-p on every row) and one decode-shaped forward at the largest CUDA
graph batch size, and the KV cache gets what the utilization leaves:

    kv_cache_bytes = total * gpu_memory_utilization
                     - torch peak during the profiling step  (weights + activations + sampler)
                     - non-torch growth since the baseline    (CUDA context, cuBLAS workspaces)
                     - CUDA graph pool estimate               (activations of the largest graph)

Memory other processes used before the engine started does not count against it (as in vLLM),
but the engine refuses to start when less than total * gpu_memory_utilization is free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ember.kernels.attention import AttentionMetadata
from ember.workers.sampler import SamplingMetadata

if TYPE_CHECKING:
    from ember.workers.model_runner import ModelRunner


@dataclass(frozen=True, slots=True)
class MemoryBaseline:
    """The device before the engine loaded anything on it."""

    total_bytes: int
    free_bytes: int


@dataclass(frozen=True, slots=True)
class MemoryProfile:
    """What the profiling step measured (bytes)."""

    total_bytes: int
    baseline_used_bytes: int  # used on the device before the engine started
    used_bytes: int  # used on the device after the profiling step
    torch_reserved_bytes: int  # held by torch's caching allocator after it
    torch_peak_bytes: int  # torch's peak allocation during it (dummy KV cache excluded)
    cuda_graph_bytes: int  # estimated pool of the CUDA graphs (0 when eager)


def check_requested_memory(baseline: MemoryBaseline, gpu_memory_utilization: float) -> None:
    """Refuse to start when other processes already use what the engine is asked to take."""
    requested = baseline.total_bytes * gpu_memory_utilization
    if baseline.free_bytes < requested:
        raise ValueError(
            f"gpu_memory_utilization={gpu_memory_utilization} asks for "
            f"{requested / 2**30:.2f} GiB of the GPU's {baseline.total_bytes / 2**30:.2f} GiB, "
            f"but only {baseline.free_bytes / 2**30:.2f} GiB are free; lower "
            "gpu_memory_utilization or free the GPU"
        )


def kv_cache_budget_bytes(profile: MemoryProfile, gpu_memory_utilization: float) -> int:
    """The bytes the KV cache may take (see the module's docstring); may be <= 0."""
    requested = int(profile.total_bytes * gpu_memory_utilization)
    non_torch_growth = max(
        profile.used_bytes - profile.baseline_used_bytes - profile.torch_reserved_bytes, 0
    )
    return requested - profile.torch_peak_bytes - non_torch_growth - profile.cuda_graph_bytes


def split_evenly(num_tokens: int, num_parts: int) -> list[int]:
    """`num_tokens` as `num_parts` lengths differing by at most one, all >= 1."""
    num_parts = max(1, min(num_parts, num_tokens))
    base, extra = divmod(num_tokens, num_parts)
    return [base + 1] * extra + [base] * (num_parts - extra)


def dummy_batch(
    query_lens: list[int], block_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, int]:
    """Inputs for fresh prompts of `query_lens` tokens, each in its own blocks of a scratch KV
    cache starting at block 1 (0 is the null block). Returns (input_ids, positions, metadata,
    number of blocks the scratch cache needs)."""
    query_start_loc, seq_blocks, slots, positions = [0], [], [], []
    next_block = 1
    for query_len in query_lens:
        num_blocks = math.ceil(query_len / block_size)
        blocks = list(range(next_block, next_block + num_blocks))
        next_block += num_blocks
        seq_blocks.append(blocks)
        positions.extend(range(query_len))
        slots.extend(
            blocks[p // block_size] * block_size + p % block_size for p in range(query_len)
        )
        query_start_loc.append(query_start_loc[-1] + query_len)
    width = max(len(blocks) for blocks in seq_blocks)
    block_table = [blocks + [0] * (width - len(blocks)) for blocks in seq_blocks]
    metadata = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(query_lens, dtype=torch.int32, device=device),
        block_table=torch.tensor(block_table, dtype=torch.int64, device=device),
        num_decodes=sum(1 for query_len in query_lens if query_len == 1),
        max_query_len=max(query_lens),
        max_seq_len=max(query_lens),
        query_start_loc_cpu=query_start_loc,
        seq_lens_cpu=list(query_lens),
    )
    input_ids = torch.zeros(len(positions), dtype=torch.int64, device=device)
    return input_ids, torch.tensor(positions, device=device), metadata, next_block


@torch.inference_mode()
def run_dummy_step(runner: ModelRunner, num_tokens: int, num_seqs: int, sample: bool) -> int:
    """One forward of `num_tokens` tokens over `num_seqs` fresh prompts (decodes when they are
    equal) on a scratch KV cache, then, if `sample`, the sampler on one row per request with
    temperature, top-k and top-p on. Returns the scratch cache's bytes; the layers are left
    without a cache, as before."""
    query_lens = split_evenly(num_tokens, num_seqs)
    input_ids, positions, metadata, num_blocks = dummy_batch(
        query_lens, runner.block_size, runner.device
    )
    runner.initialize_kv_cache(num_blocks)
    scratch_bytes = sum(cache.numel() * cache.element_size() for cache in runner.kv_caches)
    try:
        hidden_states = runner.model(input_ids, positions, metadata)
        if sample:
            last_rows = metadata.query_start_loc[1:].long() - 1
            logits = runner.model.compute_logits(hidden_states.index_select(0, last_rows))
            num_rows = logits.shape[0]
            vocab_size = logits.shape[-1]
            sampling = SamplingMetadata(
                temperature=torch.full((num_rows,), 0.8, device=runner.device),
                top_k=torch.full((num_rows,), max(vocab_size // 2, 1), device=runner.device),
                top_p=torch.full((num_rows,), 0.9, device=runner.device),
                generators={},
                all_greedy=False,
                all_random=True,
            )
            runner.sampler(logits.float(), sampling)
    finally:
        for layer in runner.attention_layers:
            layer.kv_cache = torch.empty(0)
        runner.kv_caches = []
    return scratch_bytes


def profile_memory(
    runner: ModelRunner, baseline: MemoryBaseline, graph_batch_size: int | None
) -> MemoryProfile:
    """Measure the profiling step on CUDA (see the module's docstring)."""
    device = runner.device
    scheduler = runner.config.scheduler
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    scratch_bytes = run_dummy_step(
        runner,
        scheduler.max_num_batched_tokens,
        min(scheduler.max_num_seqs, scheduler.max_num_batched_tokens),
        sample=True,
    )
    torch.cuda.synchronize(device)
    torch_peak = torch.cuda.max_memory_allocated(device) - scratch_bytes
    graph_bytes = 0
    if graph_batch_size:
        allocated_before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        scratch_bytes = run_dummy_step(runner, graph_batch_size, graph_batch_size, sample=False)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - scratch_bytes
        graph_bytes = max(peak - allocated_before, 0)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    return MemoryProfile(
        total_bytes=total,
        baseline_used_bytes=baseline.total_bytes - baseline.free_bytes,
        used_bytes=total - free,
        torch_reserved_bytes=torch.cuda.memory_reserved(device),
        torch_peak_bytes=torch_peak,
        cuda_graph_bytes=graph_bytes,
    )
