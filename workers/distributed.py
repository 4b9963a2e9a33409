"""The tensor-parallel group of one worker: `ParallelContext` (rank, size, process group and the
collectives the layers call), and `init_rank_group`, which joins the ranks of one engine.

A context is made once per worker and handed to the model and its layers when they are built
(`ModelContext`); no layer reads global distributed state. With one rank every collective is
the identity and torch.distributed is never initialised.

Rendezvous is private to each engine: the executor names a file store in a directory of its
own (`file://<private dir>/rendezvous`), so two engines on one machine never share a port.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ParallelContext:
    """This worker's place in the tensor-parallel group. `group` is None with one rank."""

    rank: int = 0
    world_size: int = 1
    group: dist.ProcessGroup | None = None
    # vLLM's enable_expert_parallel / expert_placement_strategy: the MoE layers place whole
    # experts over these ranks (`fused_moe.expert_placement`) instead of cutting every expert's
    # intermediate size; the rest of the model stays tensor-parallel. Data parallelism is 1, so
    # the expert-parallel group is this group.
    enable_expert_parallel: bool = False
    expert_placement_strategy: str = "linear"

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of `x` over the ranks, in place."""
        if self.world_size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's `x` concatenated along `dim` (rank order), on every rank."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor | None:
        """Every rank's `x` concatenated along `dim` on rank 0; None on the other ranks."""
        if self.world_size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)] if self.rank == 0 else None
        dist.gather(x, parts, dst=0, group=self.group)
        return torch.cat(parts, dim=dim) if parts is not None else None

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's `x` on every rank, in place (`x` has the same shape and dtype everywhere)."""
        if self.world_size > 1:
            dist.broadcast(x, src=0, group=self.group)
        return x


SINGLE_RANK = ParallelContext()


def init_rank_group(
    rank: int,
    world_size: int,
    init_method: str,
    device: torch.device,
    timeout_s: float = 600.0,
    *,
    enable_expert_parallel: bool = False,
    expert_placement_strategy: str = "linear",
) -> ParallelContext:
    """Join the engine's rank group through `init_method` (a `file://` store private to the
    engine): gloo on CPU, NCCL on CUDA. Returns after every rank has joined. The expert
    options go into the context (one rank holds every expert whatever they say)."""
    if world_size == 1:
        return SINGLE_RANK
    backend = "nccl" if device.type == "cuda" else "gloo"
    start = time.perf_counter()
    options = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
        **options,
    )
    group = dist.group.WORLD
    # One collective now, so that every connection is made before the engine core removes the
    # rendezvous file and before the first step is timed.
    dist.all_reduce(torch.zeros(1, device=device), group=group)
    logger.info(
        "joined the %s rank group: rank %d of %d (%.2f s)",
        backend,
        rank,
        world_size,
        time.perf_counter() - start,
    )
    return ParallelContext(
        rank=rank,
        world_size=world_size,
        group=group,
        enable_expert_parallel=enable_expert_parallel,
        expert_placement_strategy=expert_placement_strategy,
    )


def destroy_rank_group(parallel: ParallelContext) -> None:
    if parallel.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(
            f"{what} ({numerator}) must be divisible by tensor_parallel_size ({denominator})"
        )
    return numerator // denominator
