"""The experts of a mixture-of-experts block, all in two stacked parameters, with top-k routing.

Used by the MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE, GraniteMoE). vLLM's layout and names:

    w13_weight [E, 2 * I, H]   per expert e: [ gate (w1) | up (w3) ] rows
    w2_weight  [E, H, I]       per expert e: down (w2)

Checkpoints store one tensor per expert and projection (`experts.3.gate_proj.weight`, or
Mixtral's `experts.3.w1.weight`) or all experts at once (GraniteMoE's `input_linear.weight`
[E, 2I, H]); `make_expert_params_mapping` tells the generic loader how names map, and
`weight_loader` copies each into its place. The forward pass is the plain-torch reference: each
expert runs on the tokens routed to it.

Experts of a quantized checkpoint (GPTQ, AWQ: `QuantizationConfig.quantizes_experts`) are
instead one `MergedColumnParallelLinear` (gate | up) and one `RowParallelLinear` (down) per
expert, `experts.w13.<e>` and `experts.w2.<e>`, each holding the format's tensors through its
method; their down projections' partial sums are all-reduced once, with the rest.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.workers.distributed import divide
from ember.workers.layers.activation import get_gated_activation
from ember.workers.layers.context import ModelContext
from ember.workers.layers.linear import (
    MergedColumnParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    check_shape,
    default_weight_loader,
)


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
        self.rows_per_rank = divide(intermediate_size, self.tp_size, "MoE intermediate size")
        rows = self.rows_per_rank
        self.act_fn = get_gated_activation(hidden_act)
        self.quantized = ctx.quant_config.quantizes_experts
        if self.quantized:  # one linear layer per expert and projection, in the format's method
            self.w13 = nn.ModuleList(
                MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, ctx=ctx)
                for _ in range(num_experts)
            )
            self.w2 = nn.ModuleList(
                RowParallelLinear(intermediate_size, hidden_size, ctx=ctx)
                for _ in range(num_experts)
            )
            return
        self.w13_weight = nn.Parameter(
            torch.empty(num_experts, 2 * rows, hidden_size), requires_grad=False
        )
        self.w2_weight = nn.Parameter(
            torch.empty(num_experts, hidden_size, rows), requires_grad=False
        )
        self.w13_weight.weight_loader = self.weight_loader
        self.w2_weight.weight_loader = self.weight_loader

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
        rows, offset = self.rows_per_rank, self.tp_rank * self.rows_per_rank
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
        target = param.data[expert_id]
        if shard == "w2":
            check_shape(loaded_weight, (target.shape[0], self.intermediate_size))
            default_weight_loader(target, loaded_weight.narrow(1, offset, rows))
            return
        check_shape(loaded_weight, (self.intermediate_size, target.shape[1]))
        start = 0 if shard == "w1" else rows
        default_weight_loader(target.narrow(0, start, rows), loaded_weight.narrow(0, offset, rows))

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """hidden_states [T, H], router_logits [T, E] -> [T, H] (summed over ranks)."""
        topk_weights, topk_ids = select_experts(router_logits, self.top_k, self.renormalize)
        output = torch.zeros_like(hidden_states)
        for expert_id in topk_ids.unique().tolist():
            token_index, slot = torch.where(topk_ids == expert_id)
            x = hidden_states.index_select(0, token_index)
            if self.quantized:  # the row-parallel down projection without its all-reduce
                w13, w2 = self.w13[expert_id], self.w2[expert_id]
                x = w2.quant_method.apply(w2, self.act_fn(w13.quant_method.apply(w13, x)))
            else:
                x = self.act_fn(F.linear(x, self.w13_weight[expert_id]))
                x = F.linear(x, self.w2_weight[expert_id])
            x = x * topk_weights[token_index, slot, None].to(x.dtype)
            output.index_add_(0, token_index, x)
        return self.parallel.all_reduce(output)


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
