"""Linear layers sharded over the tensor-parallel group, with vLLM's names and weight loaders.

Each parameter carries `weight_loader(param, loaded_weight, shard_id=None)`, which copies this
rank's slice of a checkpoint tensor into it. Fused layers (QKV, gate|up) take one checkpoint
tensor per `shard_id`:

    QKVParallelLinear.weight rows:  [ q (Hq*D) | k (Hkv*D) | v (Hkv*D) ]   (this rank's heads)
    MergedColumnParallelLinear:     [ gate (I) | up (I) ]                  (this rank's slice)

A checkpoint that already stores the fused tensor (Phi-3's `qkv_proj`, `gate_up_proj`; GPT-2's
`c_attn`) passes `shard_id=None`; the loader splits it and loads each part as its own shard.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.workers.distributed import divide, get_tp_rank, get_tp_size, tp_all_reduce
from ember.workers.layers.tiled_weight import TiledWeight


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


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The dense weight a large batch multiplies by: made from the layer's tiles for this one
    matmul when it has them (bfloat16, the values of `layer.weight`, which is then never read
    into memory), else `layer.weight`."""
    packed = layer.packed_weight
    if isinstance(packed, TiledWeight):
        return packed.dense_bfloat16()
    return layer.weight


def apply_linear(
    layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x @ layer.weight.T (+ bias) in x's dtype: through `layer.packed_weight` for decode-sized
    batches (up to its `max_tokens` rows; larger ones, prefill chunks, are compute-bound and run
    faster on the dense weight, `dense_weight`) when the layer has one (`packed_int4`), and in
    the weight's dtype when that differs from x's (bfloat16 weights under float32 activations)."""
    packed = layer.packed_weight
    if packed is not None and x.shape[0] <= packed.max_tokens:
        out = packed.matmul(x)
    else:
        weight = dense_weight(layer) if packed is not None else layer.weight
        if weight.dtype == x.dtype:
            return F.linear(x, weight, bias)
        out = F.linear(x.to(weight.dtype), weight).to(x.dtype)
    return out if bias is None else out + bias


def _make_param(*shape: int, weight_loader) -> nn.Parameter:
    param = nn.Parameter(torch.empty(*shape), requires_grad=False)
    param.weight_loader = weight_loader
    return param


class ReplicatedLinear(nn.Module):
    """A linear layer every rank holds whole."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__()
        self.weight = _make_param(output_size, input_size, weight_loader=self.weight_loader)
        self.bias = _make_param(output_size, weight_loader=self.weight_loader) if bias else None
        self.packed_weight = None

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        default_weight_loader(param, loaded_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_linear(self, x, self.bias)


class ColumnParallelLinear(nn.Module):
    """Y = X A^T with A's rows (output features) split across ranks; the output stays sharded."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.output_size_per_rank = divide(output_size, self.tp_size, "output size")
        self.weight = _make_param(
            self.output_size_per_rank, input_size, weight_loader=self.weight_loader
        )
        self.bias = (
            _make_param(self.output_size_per_rank, weight_loader=self.weight_loader)
            if bias
            else None
        )
        self.packed_weight = None

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None
    ) -> None:
        rows = param.shape[0]
        check_shape(loaded_weight, (rows * self.tp_size, *param.shape[1:]))
        default_weight_loader(param, loaded_weight.narrow(0, self.tp_rank * rows, rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_linear(self, x, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel layers of one input fused into one matmul (e.g. gate | up)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False):
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias)

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
    ):
        tp_size = get_tp_size()
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
        super().__init__(hidden_size, output_size, bias)

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


class RowParallelLinear(nn.Module):
    """Y = X A^T with A's columns (input features) split across ranks; outputs are summed."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.input_size_per_rank = divide(input_size, self.tp_size, "input size")
        self.weight = _make_param(
            output_size, self.input_size_per_rank, weight_loader=self.weight_loader
        )
        self.bias = _make_param(output_size, weight_loader=self.bias_loader) if bias else None
        self.packed_weight = None

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        cols = param.shape[1]
        check_shape(loaded_weight, (param.shape[0], cols * self.tp_size))
        default_weight_loader(param, loaded_weight.narrow(1, self.tp_rank * cols, cols))

    def bias_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        default_weight_loader(param, loaded_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = apply_linear(self, x)
        out = tp_all_reduce(out)
        if self.bias is not None:
            out = out + self.bias
        return out
