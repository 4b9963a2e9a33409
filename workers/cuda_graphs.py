"""CUDA graphs for decode-only steps: one graph per padded batch size, replayed with
persistent input buffers.

Built by `ember.workers.worker.Worker` after the KV cache is allocated (unless
`enforce_eager=True`); `ember.workers.model_runner.ModelRunner` replays it for steps whose
requests all decode one token. A step of n decodes runs the graph of the smallest captured size
>= n; the rows n.. of that size are padding requests of one token each:

    captured 8, step of 5 decodes:
      input_ids  [t0 t1 t2 t3 t4 | 0 0 0]     positions likewise, padding at position 0
      slot_mapping [s0 .. s4 | -1 -1 -1]      padding writes nothing to the cache
      seq_lens   [l0 .. l4 | 1 1 1]           padding attends to slot 0 of the null block 0
      query_start_loc = [0 1 2 .. 8]          fixed: one token per request

Only the first n rows of the output are read. The graphs share one memory pool, captured from
the largest size down so that the smaller ones reuse its buffers.
"""

from __future__ import annotations

import bisect
import logging
import time

import torch
from torch import nn

from ember.kernels.attention import AttentionMetadata

logger = logging.getLogger(__name__)

MAX_CAPTURE_SIZE = 512
_WARMUP_RUNS = 2


def capture_batch_sizes(max_num_seqs: int, max_num_batched_tokens: int) -> list[int]:
    """vLLM's sizes (1, 2, 4, every 8 up to 256, then every 16) up to the largest decode batch
    a step can hold (capped at 512), plus that largest batch itself."""
    limit = min(max_num_seqs, max_num_batched_tokens, MAX_CAPTURE_SIZE)
    candidates = [1, 2, 4, *range(8, 256, 8), *range(256, MAX_CAPTURE_SIZE + 1, 16)]
    sizes = [size for size in candidates if size <= limit]
    if sizes[-1] != limit:
        sizes.append(limit)
    return sizes


def padded_batch_size(num_tokens: int, batch_sizes: list[int]) -> int | None:
    """The smallest size in `batch_sizes` (ascending) that holds `num_tokens`, or None."""
    index = bisect.bisect_left(batch_sizes, num_tokens)
    return batch_sizes[index] if index < len(batch_sizes) else None


class CudaGraphRunner:
    """The captured graphs of one model, and the persistent buffers they read."""

    def __init__(
        self,
        model: nn.Module,
        batch_sizes: list[int],
        max_blocks_per_req: int,
        device: torch.device,
    ):
        self.model = model
        self.batch_sizes = sorted(batch_sizes)
        self.device = device
        max_size = self.batch_sizes[-1]
        self.input_ids = torch.zeros(max_size, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_size, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((max_size,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(max_size, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(max_size + 1, dtype=torch.int32, device=device)
        self.block_table = torch.zeros(
            max_size, max_blocks_per_req, dtype=torch.int64, device=device
        )
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def graph_metadata(self, batch_size: int) -> AttentionMetadata:
        """Views of the persistent buffers, as a graph of `batch_size` reads them."""
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:batch_size],
            query_start_loc=self.query_start_loc[: batch_size + 1],
            seq_lens=self.seq_lens[:batch_size],
            block_table=self.block_table[:batch_size],
            num_decodes=batch_size,
            max_query_len=1,
            max_seq_len=self.block_table.shape[1],
            query_start_loc_cpu=list(range(batch_size + 1)),
            seq_lens_cpu=[1] * batch_size,
        )

    @torch.inference_mode()
    def capture(self) -> int:
        """Capture every size, largest first; return the device bytes the graphs took."""
        start_s = time.perf_counter()
        torch.cuda.synchronize(self.device)
        free_before, _ = torch.cuda.mem_get_info(self.device)
        pool = None
        for batch_size in reversed(self.batch_sizes):
            metadata = self.graph_metadata(batch_size)
            input_ids = self.input_ids[:batch_size]
            positions = self.positions[:batch_size]
            for _ in range(_WARMUP_RUNS):  # compiles the Triton kernels, settles cuBLAS
                self.model(input_ids, positions, metadata)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[batch_size] = self.model(input_ids, positions, metadata)
            pool = graph.pool()
            self.graphs[batch_size] = graph
        torch.cuda.synchronize(self.device)
        free_after, _ = torch.cuda.mem_get_info(self.device)
        graph_bytes = max(free_before - free_after, 0)
        logger.info(
            "captured CUDA graphs for %d decode batch sizes (1..%d) in %.1f s, %.0f MiB",
            len(self.batch_sizes),
            self.batch_sizes[-1],
            time.perf_counter() - start_s,
            graph_bytes / 2**20,
        )
        return graph_bytes

    def can_replay(self, num_tokens: int, metadata: AttentionMetadata) -> bool:
        """Whether a step is decode-only and small enough for a captured graph."""
        return (
            metadata.max_query_len == 1
            and num_tokens == metadata.num_reqs
            and metadata.block_table.shape[1] <= self.block_table.shape[1]
            and padded_batch_size(num_tokens, self.batch_sizes) in self.graphs
        )

    def replay(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        """The hidden states [num_tokens, hidden] of a decode-only step, through its graph."""
        batch_size = self.fill_buffers(input_ids, positions, metadata)
        self.graphs[batch_size].replay()
        return self.outputs[batch_size][: input_ids.shape[0]]

    def fill_buffers(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> int:
        """Copy a step's inputs into the persistent buffers, padding rows after them (see the
        module's docstring); return the padded batch size. Device-to-device copies only."""
        num_tokens = input_ids.shape[0]
        batch_size = padded_batch_size(num_tokens, self.batch_sizes)
        self.input_ids[:num_tokens].copy_(input_ids, non_blocking=True)
        self.positions[:num_tokens].copy_(positions, non_blocking=True)
        self.positions[num_tokens:batch_size].zero_()
        self.slot_mapping[:num_tokens].copy_(metadata.slot_mapping, non_blocking=True)
        self.slot_mapping[num_tokens:batch_size].fill_(-1)
        self.seq_lens[:num_tokens].copy_(metadata.seq_lens, non_blocking=True)
        self.seq_lens[num_tokens:batch_size].fill_(1)
        width = metadata.block_table.shape[1]
        self.block_table[:num_tokens, :width].copy_(metadata.block_table, non_blocking=True)
        self.block_table[num_tokens:batch_size].zero_()
        return batch_size
