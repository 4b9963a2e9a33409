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

from ember.workers.config import LockstepConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LockstepGroups:
    """Expert parallelism across data-parallel ranks (`LockstepConfig`): the world is every
    worker of every DP rank, `ep_rank = dp_rank * tp_size + tp_rank`; the MoE layers place
    their experts over it, gather the DP ranks' tokens through `dp_group` (this TP rank's peers
    in the other DP ranks) and sum the experts' outputs over `ep_group` (the world)."""

    dp_rank: int
    dp_size: int
    dp_group: dist.ProcessGroup
    ep_rank: int
    ep_size: int
    ep_group: dist.ProcessGroup

    def all_gather_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Every DP rank's rows of `x` [n_d, ...] (n_d may differ, and be 0) concatenated in
        rank order, and each rank's row count."""
        count = torch.tensor([x.shape[0]], dtype=torch.int64)
        counts = [torch.empty_like(count) for _ in range(self.dp_size)]
        dist.all_gather(counts, count, group=self.dp_group)
        sizes = [int(c) for c in counts]
        widest = max(sizes)
        padded = x.new_zeros((widest, *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(self.dp_size)]
        dist.all_gather(parts, padded, group=self.dp_group)
        return torch.cat([part[:size] for part, size in zip(parts, sizes)]), sizes

    def agree(self, busy: bool, wave: int) -> tuple[bool, int]:
        """(whether any rank was busy, the largest wave number of any rank): the ranks'
        agreement at the end of every lockstep step."""
        values = torch.tensor([int(busy), wave], dtype=torch.int64)
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.ep_group)
        return bool(values[0]), int(values[1])


@dataclass(frozen=True, slots=True)
class ParallelContext:
    """This worker's place in the tensor-parallel group. `group` is None with one rank."""

    rank: int = 0
    world_size: int = 1
    group: dist.ProcessGroup | None = None
    # vLLM's enable_expert_parallel / expert_placement_strategy: the MoE layers place whole
    # experts over these ranks (`fused_moe.expert_placement`) instead of cutting every expert's
    # intermediate size; the rest of the model stays tensor-parallel. Without `lockstep` the
    # expert-parallel group is this group.
    enable_expert_parallel: bool = False
    expert_placement_strategy: str = "linear"
    # expert parallelism across data-parallel ranks (None: the experts stay in this group)
    lockstep: LockstepGroups | None = None
    # the global rank of this group's rank 0 (the lockstep world holds several groups)
    root: int = 0

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
        dist.gather(x, parts, dst=self.root, group=self.group)
        return torch.cat(parts, dim=dim) if parts is not None else None

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's `x` on every rank, in place (`x` has the same shape and dtype everywhere)."""
        if self.world_size > 1:
            dist.broadcast(x, src=self.root, group=self.group)
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


def tcp_store(host: str, port: int, *, is_master: bool, timeout_s: float) -> dist.TCPStore:
    """A `torch.distributed.TCPStore` at host:port: hosted here (`is_master`; port 0 takes a
    free one, read back as `.port`) or joined as a client; `timeout_s` bounds connecting and
    every operation. The one form the data-parallel ranks, their engines and workers use."""
    return dist.TCPStore(
        host,
        port,
        is_master=is_master,
        timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False,
        use_libuv=True,
    )


def init_lockstep_groups(
    tp_rank: int,
    tp_size: int,
    lockstep: LockstepConfig,
    device: torch.device,
    timeout_s: float,
    expert_placement_strategy: str,
) -> ParallelContext:
    """Join the world of every worker of every data-parallel rank, through the store rank 0's
    user process hosts (VLLM_DP_MASTER_IP:PORT, keys under "lockstep/pg/"), and make its
    groups: each DP rank's tensor-parallel group (the context's own, as `init_rank_group`
    makes it) and each TP rank's group across the DP ranks. gloo on CPU, NCCL on CUDA; a
    collective that waits longer than `timeout_s` raises."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    start = time.perf_counter()
    client = tcp_store(
        lockstep.master_ip, lockstep.master_port, is_master=False, timeout_s=lockstep.timeout_s
    )
    world_size = lockstep.size * tp_size
    rank = lockstep.rank * tp_size + tp_rank
    options = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(
        backend,
        store=dist.PrefixStore("lockstep/pg", client),
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
        **options,
    )
    tp_groups = [
        dist.new_group([d * tp_size + t for t in range(tp_size)]) for d in range(lockstep.size)
    ]
    dp_groups = [
        dist.new_group([d * tp_size + t for d in range(lockstep.size)]) for t in range(tp_size)
    ]
    world = dist.group.WORLD
    dist.all_reduce(torch.zeros(1, device=device), group=world)
    logger.info(
        "joined the lockstep world of %d data-parallel ranks x %d: rank %d of %d (%.2f s)",
        lockstep.size,
        tp_size,
        rank,
        world_size,
        time.perf_counter() - start,
    )
    groups = LockstepGroups(
        dp_rank=lockstep.rank,
        dp_size=lockstep.size,
        dp_group=dp_groups[tp_rank],
        ep_rank=rank,
        ep_size=world_size,
        ep_group=world,
    )
    return ParallelContext(
        rank=tp_rank,
        world_size=tp_size,
        group=tp_groups[lockstep.rank],
        root=lockstep.rank * tp_size,
        enable_expert_parallel=True,
        expert_placement_strategy=expert_placement_strategy,
        lockstep=groups,
    )


def destroy_rank_group(parallel: ParallelContext) -> None:
    if (parallel.world_size > 1 or parallel.lockstep is not None) and dist.is_initialized():
        dist.destroy_process_group()


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(
            f"{what} ({numerator}) must be divisible by tensor_parallel_size ({denominator})"
        )
    return numerator // denominator
