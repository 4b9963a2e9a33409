"""Linear layers sharded over the tensor-parallel group, with vLLM's names and weight loaders.

Each parameter carries `weight_loader(param, loaded_weight, shard_id=None)`, which copies this
rank's slice of a checkpoint tensor into it. Fused layers (QKV, gate|up) take one checkpoint
tensor per `shard_id`:

    QKVParallelLinear.weight rows:  [ q (Hq*D) | k (Hkv*D) | v (Hkv*D) ]   (this rank's heads)
    MergedColumnParallelLinear:     [ gate (I) | up (I) ]                  (this rank's slice)

A checkpoint that already stores the fused tensor (Phi-3's `qkv_proj`, `gate_up_proj`; GPT-2's
`c_attn`) passes `shard_id=None`; the loader splits it and loads each part as its own shard.

Each layer is built with a `ModelContext` (its rank and group, and the model's quantization
config) and owns its weight format through `quant_method` (`quantization/base.py`): the method
creates the parameters, processes them once loaded, and applies them in `forward`.
"""

from __future__ import annotations

import torch
from torch import nn

from ember.workers.distributed import divide
from ember.workers.layers.context import ModelContext
from ember.workers.layers.quantization.unquantized import make_parameter


def default_weight_loader(param: torch.Tensor, loaded_weight: torch.Tensor) -> None:
    """Copy a whole checkpoint tensor into `param`; the shapes must match."""
    if param.shape != loaded_weight.shape:
        raise ValueError(
            f"shape mismatch: checkpoint has {tuple(loaded_weight.shape)}, "
            f"model expects {tuple(param.shape)}"
        )
    param.data.copy_(loaded_weight)


def check_shape(loaded_weight: torch.Tensor, expected: tuple[int, ...]) -> None:
    """Fail before slicing when a checkpoint tensor is not the full shape the layer expects."""
    if tuple(loaded_weight.shape) != tuple(expected):
        raise ValueError(
            f"shape mismatch: checkpoint has {tuple(loaded_weight.shape)}, "
            f"model expects {tuple(expected)}"
        )


class LinearBase(nn.Module):
    """A linear layer whose weight format is its `quant_method`'s (see `quantization.base`)."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        input_size_per_partition: int,
        output_size_per_partition: int,
        ctx: ModelContext,
    ):
        super().__init__()
        self.tp_rank, self.tp_size = ctx.tp_rank, ctx.tp_size
        self.parallel = ctx.parallel
        self.input_size_per_partition = input_size_per_partition  # this rank's [out, in]
        self.output_size_per_partition = output_size_per_partition
        self.quant_method = ctx.quant_config.get_quant_method(self)
        self.quant_method.create_weights(
            self,
            input_size_per_partition,
            output_size_per_partition,
            input_size,
            output_size,
            self.weight_loader,
        )


class ReplicatedLinear(LinearBase):
    """A linear layer every rank holds whole."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, *, ctx: ModelContext):
        super().__init__(input_size, output_size, input_size, output_size, ctx)
        self.bias = make_parameter(output_size, weight_loader=self.weight_loader) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        default_weight_loader(param, loaded_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)


class ColumnParallelLinear(LinearBase):
    """Y = X A^T with A's rows (output features) split across ranks; the output stays sharded."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, *, ctx: ModelContext):
        self.output_size_per_rank = divide(output_size, ctx.tp_size, "output size")
        super().__init__(input_size, output_size, input_size, self.output_size_per_rank, ctx)
        self.bias = (
            make_parameter(self.output_size_per_rank, weight_loader=self.weight_loader)
            if bias
            else None
        )

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None
    ) -> None:
        rows = param.shape[0]
        check_shape(loaded_weight, (rows * self.tp_size, *param.shape[1:]))
        default_weight_loader(param, loaded_weight.narrow(0, self.tp_rank * rows, rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel layers of one input fused into one matmul (e.g. gate | up)."""

    def __init__(
        self, input_size: int, output_sizes: list[int], bias: bool = False, *, ctx: ModelContext
    ):
        self.output_sizes = output_sizes
        for size in output_sizes:
            divide(size, ctx.tp_size, "output size")
        super().__init__(input_size, sum(output_sizes), bias, ctx=ctx)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None):
        if shard_id is None:  # the fused tensor: [ shard 0 | shard 1 | ... ] whole
            check_shape(loaded_weight, (sum(self.output_sizes), *param.shape[1:]))
            for index, part in enumerate(loaded_weight.split(self.output_sizes)):
                self.weight_loader(param, part, index)
            return
        shard_rows = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        check_shape(loaded_weight, (self.output_sizes[shard_id], *param.shape[1:]))
        target = param.data.narrow(0, offset, shard_rows)
        default_weight_loader(
            target, loaded_weight.narrow(0, self.tp_rank * shard_rows, shard_rows)
        )


class QKVParallelLinear(ColumnParallelLinear):
    """The query, key and value projections fused; heads are split across ranks.

    With fewer KV heads than ranks, each KV head is replicated on tp_size / num_kv_heads ranks.
    """

    def __init__(
        self,
        hidden_size: int,
        head_size: int,
        total_num_heads: int,
        total_num_kv_heads: int | None = None,
        bias: bool = False,
        *,
        ctx: ModelContext,
    ):
        tp_size = ctx.tp_size
        total_num_kv_heads = total_num_kv_heads or total_num_heads
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = total_num_kv_heads
        self.head_size = head_size
        self.num_heads = divide(total_num_heads, tp_size, "number of attention heads")
        if tp_size >= total_num_kv_heads:
            self.num_kv_heads = 1
            self.kv_head_replicas = divide(tp_size, total_num_kv_heads, "tensor_parallel_size")
        else:
            self.num_kv_heads = divide(total_num_kv_heads, tp_size, "number of KV heads")
            self.kv_head_replicas = 1
        output_size = (self.num_heads + 2 * self.num_kv_heads) * tp_size * head_size
        super().__init__(hidden_size, output_size, bias, ctx=ctx)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None):
        if shard_id is None:  # the fused tensor [ q | k | v ] of all heads
            sizes = [
                self.total_num_heads * self.head_size,
                self.total_num_kv_heads * self.head_size,
                self.total_num_kv_heads * self.head_size,
            ]
            check_shape(loaded_weight, (sum(sizes), *param.shape[1:]))
            for part, name in zip(loaded_weight.split(sizes), ("q", "k", "v")):
                self.weight_loader(param, part, name)
            return
        q_rows = self.num_heads * self.head_size
        kv_rows = self.num_kv_heads * self.head_size
        if shard_id == "q":
            offset, rows, rank_index = 0, q_rows, self.tp_rank
        elif shard_id in ("k", "v"):
            offset = q_rows if shard_id == "k" else q_rows + kv_rows
            rows, rank_index = kv_rows, self.tp_rank // self.kv_head_replicas
        else:
            raise ValueError(f"QKVParallelLinear takes shard_id 'q', 'k' or 'v', got {shard_id!r}")
        num_ranks = self.tp_size if shard_id == "q" else self.tp_size // self.kv_head_replicas
        check_shape(loaded_weight, (rows * num_ranks, *param.shape[1:]))
        target = param.data.narrow(0, offset, rows)
        default_weight_loader(target, loaded_weight.narrow(0, rank_index * rows, rows))


class RowParallelLinear(LinearBase):
    """Y = X A^T with A's columns (input features) split across ranks; the partial products
    are summed over the ranks (all-reduce), then the bias is added once."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, *, ctx: ModelContext):
        self.input_size_per_rank = divide(input_size, ctx.tp_size, "input size")
        super().__init__(input_size, output_size, self.input_size_per_rank, output_size, ctx)
        self.bias = make_parameter(output_size, weight_loader=self.bias_loader) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        cols = param.shape[1]
        check_shape(loaded_weight, (param.shape[0], cols * self.tp_size))
        default_weight_loader(param, loaded_weight.narrow(1, self.tp_rank * cols, cols))

    def bias_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        default_weight_loader(param, loaded_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.parallel.all_reduce(self.quant_method.apply(self, x))
        if self.bias is not None:
            out = out + self.bias
        return out
