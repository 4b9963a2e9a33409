"""The experts of a mixture-of-experts block, all in two stacked parameters, with top-k routing.

Used by the MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE, GraniteMoE). vLLM's layout and names:

    w13_weight [E, 2 * I, H]   per expert e: [ gate (w1) | up (w3) ] rows
    w2_weight  [E, H, I]       per expert e: down (w2)

Checkpoints store one tensor per expert and projection (`experts.3.gate_proj.weight`, or
Mixtral's `experts.3.w1.weight`) or all experts at once (GraniteMoE's `input_linear.weight`
[E, 2I, H]); `make_expert_params_mapping` tells the generic loader how names map, and
`weight_loader` copies each into its place.

Expert parallelism (`enable_expert_parallel`): each rank holds whole experts, its own
(`expert_placement`), instead of a slice of every expert's intermediate size:

    8 experts, 2 ranks     tensor parallel            expert parallel ("linear")
    rank 0                 experts 0-7, rows 0..I/2   experts 0-3, all rows
    rank 1                 experts 0-7, rows I/2..I   experts 4-7, all rows

Every rank has every token (data parallelism is 1), runs its experts on the tokens routed to
them, and the all-reduce that sums the tensor-parallel partial sums sums the ranks' experts
(vLLM's all-gather / reduce-scatter reduce to it when the tokens are on every rank already).

The forward runs in one of two plain-torch ways with equal results. On CUDA every local expert
runs on every token, weighted by its routing weight (zero for the experts a token did not pick):
static shapes and no host sync, so CUDA graphs capture MoE decode steps. On CPU, where reading
the chosen expert ids costs nothing, each chosen expert runs on its tokens only, which is
faster at every batch size measured (see `FusedMoE.forward`).

Experts of a quantized checkpoint (GPTQ, AWQ: `QuantizationConfig.quantizes_experts`) are
instead one `MergedColumnParallelLinear` (gate | up) and one `RowParallelLinear` (down) per
expert, `experts.w13.<e>` and `experts.w2.<e>`, each holding the format's tensors through its
method; their down projections' partial sums are all-reduced once, with the rest. With expert
parallelism a rank builds only its experts' layers, whole, and the checkpoint tensors of the
other experts are skipped (`foreign_expert_prefixes`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ember.workers.config import EXPERT_PLACEMENT_STRATEGIES
from ember.workers.cuda_graphs import MAX_CAPTURE_SIZE
from ember.workers.distributed import SINGLE_RANK, divide
from ember.workers.layers.activation import get_gated_activation
from ember.workers.layers.context import ModelContext
from ember.workers.layers.linear import (
    MergedColumnParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    check_shape,
    default_weight_loader,
)

# The largest token count of the static-shape expert forward on CUDA: the largest batch
# CUDA graphs capture.
STATIC_MAX_TOKENS = MAX_CAPTURE_SIZE


def select_experts(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] float32, expert ids [T, k]): softmax over all experts, keep the k largest,
    and rescale them to sum to one if `renormalize` (equal to a softmax over the k logits)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    topk_weights, topk_ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return topk_weights, topk_ids


def expert_placement(num_experts: int, ep_size: int, ep_rank: int, strategy: str) -> list[int]:
    """The experts (global ids, in local order) rank `ep_rank` of `ep_size` holds: vLLM's
    `determine_expert_map`. Each rank holds num_experts // ep_size experts, the first
    num_experts % ep_size ranks one more:

        5 experts, 2 ranks   "linear":      rank 0 [0, 1, 2]   rank 1 [3, 4]
                             "round_robin": rank 0 [0, 2, 4]   rank 1 [1, 3]
    """
    if strategy == "linear":
        base, remainder = divmod(num_experts, ep_size)
        start = ep_rank * base + min(ep_rank, remainder)
        return list(range(start, start + base + (ep_rank < remainder)))
    if strategy == "round_robin":
        return list(range(ep_rank, num_experts, ep_size))
    raise ValueError(
        f"expert_placement_strategy must be one of {EXPERT_PLACEMENT_STRATEGIES}, got {strategy!r}"
    )


class FusedMoE(nn.Module):
    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        renormalize: bool = True,
        hidden_act: str = "silu",
        *,
        ctx: ModelContext,
    ):
        super().__init__()
        self.parallel = ctx.parallel
        self.tp_rank, self.tp_size = ctx.tp_rank, ctx.tp_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.intermediate_size = intermediate_size
        self.hidden_size = hidden_size
        self.expert_parallel = ctx.expert_parallel
        self.lockstep = ctx.parallel.lockstep  # experts over every DP rank's workers
        if self.expert_parallel:  # whole experts, this rank's
            ep_size, ep_rank = self.tp_size, self.tp_rank
            if self.lockstep is not None:
                ep_size, ep_rank = self.lockstep.ep_size, self.lockstep.ep_rank
            self.local_experts = expert_placement(
                num_experts, ep_size, ep_rank, ctx.parallel.expert_placement_strategy
            )
            self.shard_rank, self.shard_size = 0, 1
        else:  # every expert, a slice of each
            self.local_experts = list(range(num_experts))
            self.shard_rank, self.shard_size = self.tp_rank, self.tp_size
        self.num_local_experts = len(self.local_experts)
        self.local_index = {expert: index for index, expert in enumerate(self.local_experts)}
        # global expert id -> index in this rank's parameters, -1 for another rank's expert
        expert_map = torch.full((num_experts,), -1, dtype=torch.long)
        expert_map[self.local_experts] = torch.arange(self.num_local_experts)
        self.register_buffer("expert_map", expert_map, persistent=False)
        self.rows_per_rank = divide(intermediate_size, self.shard_size, "MoE intermediate size")
        rows = self.rows_per_rank
        self.act_fn = get_gated_activation(hidden_act)
        self.quantized = ctx.quant_config.quantizes_experts
        if self.quantized:
            # One linear layer per local expert and projection, in the format's method, named
            # by the global expert id; with expert parallelism each is whole (built for one rank)
            expert_ctx = (
                ModelContext(SINGLE_RANK, ctx.quant_config) if self.expert_parallel else ctx
            )
            self.w13 = nn.ModuleDict(
                {
                    str(expert): MergedColumnParallelLinear(
                        hidden_size, [intermediate_size] * 2, ctx=expert_ctx
                    )
                    for expert in self.local_experts
                }
            )
            self.w2 = nn.ModuleDict(
                {
                    str(expert): RowParallelLinear(intermediate_size, hidden_size, ctx=expert_ctx)
                    for expert in self.local_experts
                }
            )
            return
        self.w13_weight = nn.Parameter(
            torch.empty(self.num_local_experts, 2 * rows, hidden_size), requires_grad=False
        )
        self.w2_weight = nn.Parameter(
            torch.empty(self.num_local_experts, hidden_size, rows), requires_grad=False
        )
        self.w13_weight.weight_loader = self.weight_loader
        self.w2_weight.weight_loader = self.weight_loader

    def foreign_expert_prefixes(self, module_name: str) -> tuple[str, ...]:
        """The checkpoint name prefixes of the experts of other ranks whose tensors have no
        parameter here (`experts.<e>.` of a quantized checkpoint, whose experts are layers of
        their own), for the loader to skip; empty otherwise."""
        if not (self.quantized and self.expert_parallel):
            return ()
        return tuple(
            f"{module_name}.{expert}."
            for expert in range(self.num_experts)
            if expert not in self.local_index
        )

    @staticmethod
    def make_expert_params_mapping(
        gate_name: str, down_name: str, up_name: str, num_experts: int, quantized: bool = False
    ) -> list[tuple[str, str, object]]:
        """(checkpoint name fragment, parameter name fragment, shard) for every expert, e.g.
        ("experts.3.gate_proj.", "experts.w13_", (3, "w1")); for `quantized` experts (a
        checkpoint format's, one linear layer each) ("experts.3.gate_proj.", "experts.w13.3.",
        0), whose layers' own loaders take every tensor of the format."""
        mapping = []
        for expert_id in range(num_experts):
            for name, shard in ((gate_name, "w1"), (up_name, "w3"), (down_name, "w2")):
                if quantized:
                    param = f"experts.{'w2' if shard == 'w2' else 'w13'}.{expert_id}."
                    merged_shard = {"w1": 0, "w3": 1, "w2": None}[shard]
                    mapping.append((f"experts.{expert_id}.{name}.", param, merged_shard))
                    continue
                param = "experts.w2_" if shard == "w2" else "experts.w13_"
                mapping.append((f"experts.{expert_id}.{name}.", param, (expert_id, shard)))
        return mapping

    def weight_loader(
        self,
        param: nn.Parameter,
        loaded_weight: torch.Tensor,
        shard_id: tuple[int, str] | None = None,
    ) -> None:
        rows, offset = self.rows_per_rank, self.shard_rank * self.rows_per_rank
        if shard_id is None:  # all experts at once: [E, 2I, H] or [E, H, I]
            if param is self.w13_weight:
                full = (self.num_experts, 2 * self.intermediate_size, param.shape[2])
                check_shape(loaded_weight, full)
                gate, up = loaded_weight.chunk(2, dim=1)
                for expert_id in range(self.num_experts):
                    self.weight_loader(param, gate[expert_id], (expert_id, "w1"))
                    self.weight_loader(param, up[expert_id], (expert_id, "w3"))
            else:
                check_shape(
                    loaded_weight, (self.num_experts, param.shape[1], self.intermediate_size)
                )
                for expert_id in range(self.num_experts):
                    self.weight_loader(param, loaded_weight[expert_id], (expert_id, "w2"))
            return
        expert_id, shard = shard_id
        if expert_id not in self.local_index:  # another rank's expert
            return
        target = param.data[self.local_index[expert_id]]
        if shard == "w2":
            check_shape(loaded_weight, (target.shape[0], self.intermediate_size))
            default_weight_loader(target, loaded_weight.narrow(1, offset, rows))
            return
        check_shape(loaded_weight, (self.intermediate_size, target.shape[1]))
        start = 0 if shard == "w1" else rows
        default_weight_loader(target.narrow(0, start, rows), loaded_weight.narrow(0, offset, rows))

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """hidden_states [T, H], router_logits [T, E] -> [T, H] (summed over ranks).

        CUDA, up to `STATIC_MAX_TOKENS` (every batch CUDA graphs capture): `forward_static`
        (no host sync); larger prefill chunks `forward_routed`, since the static form does
        E_local / k times the routed work and holds [E_local, T, 2I] activations. CPU:
        `forward_routed`, faster there at every batch size; a random Mixtral-shaped layer (H 512, I 896, 8
        experts, top 2, float32, one thread, best of 30) took 0.34 / 4.1 / 7.7 / 35 ms routed
        against 4.1 / 5.8 / 12.5 / 128 ms static at T = 1 / 4 / 32 / 512."""
        if self.lockstep is not None:
            return self.forward_across_data_parallel(hidden_states, router_logits)
        topk_weights, topk_ids = select_experts(router_logits, self.top_k, self.renormalize)
        if hidden_states.is_cuda and hidden_states.shape[0] <= STATIC_MAX_TOKENS:
            output = self.forward_static(hidden_states, topk_weights, topk_ids)
        else:
            output = self.forward_routed(hidden_states, topk_weights, topk_ids)
        return self.parallel.all_reduce(output)

    def forward_across_data_parallel(
        self, hidden_states: torch.Tensor, router_logits: torch.Tensor
    ) -> torch.Tensor:
        """Lockstep expert parallelism, vLLM's all-gather / reduce-scatter: every DP rank's
        tokens and router logits gathered (all-gather over this TP rank's peers), this worker's
        experts on all of them, and the experts' outputs summed over every worker and scattered
        back, each DP rank its own rows (reduce-scatter over the world). A rank with no tokens
        (its idle step) passes [0, H] and still serves the others' tokens."""
        lockstep = self.lockstep
        hidden = hidden_states.shape[1]
        rows = torch.cat((hidden_states.float(), router_logits.float()), dim=1)  # one gather
        gathered, sizes = lockstep.all_gather_rows(rows)
        if not gathered.shape[0]:  # every rank idle this step: the same on all of them
            return hidden_states
        tokens = gathered[:, :hidden].to(hidden_states.dtype)
        logits = gathered[:, hidden:]
        topk_weights, topk_ids = select_experts(logits, self.top_k, self.renormalize)
        output = self.forward_routed(tokens, topk_weights, topk_ids)
        # reduce-scatter over the world: worker (d, t) receives DP rank d's rows (padded to the
        # largest count), summed over every worker's experts
        chunks = output.new_zeros(lockstep.dp_size, max(sizes), hidden)
        for rank, part in enumerate(output.split(sizes)):
            chunks[rank, : part.shape[0]] = part
        tp_size = lockstep.ep_size // lockstep.dp_size
        inputs = [chunks[rank] for rank in range(lockstep.dp_size) for _ in range(tp_size)]
        mine = torch.empty_like(chunks[0])
        dist.reduce_scatter(mine, inputs, group=lockstep.ep_group)
        return mine[: hidden_states.shape[0]]

    def _expert(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Local expert `index` on the tokens `x` (this rank's share of its output)."""
        if self.quantized:  # the row-parallel down projection without its all-reduce
            expert = str(self.local_experts[index])
            w13, w2 = self.w13[expert], self.w2[expert]
            return w2.quant_method.apply(w2, self.act_fn(w13.quant_method.apply(w13, x)))
        return F.linear(self.act_fn(F.linear(x, self.w13_weight[index])), self.w2_weight[index])

    def forward_routed(
        self, hidden_states: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        """Each chosen local expert on the tokens that chose it (reads the ids on the host)."""
        output = torch.zeros_like(hidden_states)
        local_ids = self.expert_map[topk_ids]
        for index in local_ids.unique().tolist():
            if index < 0:  # another rank's expert
                continue
            token_index, slot = torch.where(local_ids == index)
            x = self._expert(index, hidden_states.index_select(0, token_index))
            x = x * topk_weights[token_index, slot, None].to(x.dtype)
            output.index_add_(0, token_index, x)
        return output

    def forward_static(
        self, hidden_states: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        """Every local expert on every token, weighted by the token's routing weight for it
        (zero where the token did not choose it): shapes fixed by T, no host sync."""
        num_tokens = hidden_states.shape[0]
        if self.num_local_experts == 0:  # fewer experts than ranks
            return torch.zeros_like(hidden_states)
        local_ids = self.expert_map[topk_ids]  # [T, k], -1: another rank's expert
        weights = torch.where(local_ids >= 0, topk_weights, 0.0)
        routing = torch.zeros(
            num_tokens, self.num_local_experts, dtype=weights.dtype, device=weights.device
        ).scatter_add_(1, local_ids.clamp(min=0), weights)  # [T, local experts]
        routing = routing.to(hidden_states.dtype)
        if self.quantized:
            output = torch.zeros_like(hidden_states)
            for index in range(self.num_local_experts):
                output += self._expert(index, hidden_states) * routing[:, index, None]
            return output
        # [E, T, 2I] -> [E, T, I] -> [E, T, H], summed over E with the routing weights
        x = self.act_fn(torch.matmul(hidden_states, self.w13_weight.transpose(1, 2)))
        x = torch.bmm(x, self.w2_weight.transpose(1, 2))
        return torch.einsum("eth,te->th", x, routing)


class SparseMoeBlock(nn.Module):
    """A router (`gate`), the experts, and optionally a shared expert every token also runs,
    scaled by sigmoid(`shared_expert_gate`) (Qwen2-MoE). Mixtral, Qwen-MoE and GraniteMoE all
    take this shape; their checkpoints differ only in names."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        renormalize: bool,
        hidden_act: str = "silu",
        shared_expert: nn.Module | None = None,
        *,
        ctx: ModelContext,
    ):
        super().__init__()
        self.gate = ReplicatedLinear(hidden_size, num_experts, ctx=ctx, dense=True)
        self.experts = FusedMoE(
            num_experts, top_k, hidden_size, intermediate_size, renormalize, hidden_act, ctx=ctx
        )
        self.shared_expert = shared_expert
        self.shared_expert_gate = (
            ReplicatedLinear(hidden_size, 1, ctx=ctx, dense=True)
            if shared_expert is not None
            else None
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        output = self.experts(hidden_states, self.gate(hidden_states))
        if self.shared_expert is not None:
            shared = self.shared_expert(hidden_states)
            output = output + torch.sigmoid(self.shared_expert_gate(hidden_states)) * shared
        return output
