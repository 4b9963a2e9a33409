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
from ember.workers.layers.quantization.unquantized import (
    UnquantizedLinearMethod,
    make_parameter,
)


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


def output_dim(param: torch.Tensor) -> int | None:
    """The dimension of `param` that runs over the layer's outputs (0 for a dense [out, in]
    weight or a bias; a quantized format's tensors say otherwise with an `output_dim`
    attribute, None for one every output shares, such as GPTQ's `g_idx`)."""
    return getattr(param, "output_dim", 0)


def input_dim(param: torch.Tensor) -> int | None:
    """The dimension of `param` that runs over the layer's inputs (1 for a dense weight; a
    format's `input_dim` attribute otherwise, None for one every input shares)."""
    return getattr(param, "input_dim", 1 if param.dim() > 1 else None)


def scaled_shape(
    param: torch.Tensor, dim: int, factor: int = 1, size: int | None = None
) -> tuple[int, ...]:
    """`param`'s shape with dimension `dim` times `factor` (the whole of a sharded tensor), or
    set to `size`."""
    shape = list(param.shape)
    shape[dim] = shape[dim] * factor if size is None else size
    return tuple(shape)


def rows_per_element(layer: LinearBase, param: torch.Tensor, dim: int) -> int:
    """Output rows per element of `param` along `dim`: 1 for a dense weight, the packing
    factor for codes packed along the outputs (AWQ's `qweight`, GPTQ's `qzeros`)."""
    return layer.output_size_per_partition // param.shape[dim]


def packed_size(rows: int, ratio: int, layer: LinearBase) -> int:
    """`rows` output rows as elements of a tensor packed `ratio` to one; a shard that splits
    an element is refused, naming the layer."""
    if rows % ratio:
        raise ValueError(
            f"{type(layer).__name__}: {rows} output rows do not split into elements of {ratio} "
            "packed values; the checkpoint's format does not fit this shape or "
            "tensor_parallel_size"
        )
    return rows // ratio


def load_replicated(param: torch.Tensor, loaded_weight: torch.Tensor) -> None:
    """Copy a tensor every rank and every fused shard holds whole (GPTQ's `g_idx`); a fused
    layer whose shards bring different values is refused, since one tensor serves them all."""
    if getattr(param, "loaded_once", False) and not torch.equal(
        param.data, loaded_weight.to(param.device, param.dtype)
    ):
        raise ValueError(
            "the fused shards of this layer bring different values for a tensor they share "
            f"(shape {tuple(param.shape)}, e.g. GPTQ's g_idx)"
        )
    default_weight_loader(param, loaded_weight)
    param.loaded_once = True


class LinearBase(nn.Module):
    """A linear layer whose weight format is its `quant_method`'s (see `quantization.base`)."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        input_size_per_partition: int,
        output_size_per_partition: int,
        ctx: ModelContext,
        dense: bool = False,
    ):
        super().__init__()
        self.tp_rank, self.tp_size = ctx.tp_rank, ctx.tp_size
        self.parallel = ctx.parallel
        self.input_size_per_partition = input_size_per_partition  # this rank's [out, in]
        self.output_size_per_partition = output_size_per_partition
        self._weight_shape = (
            input_size_per_partition,
            output_size_per_partition,
            input_size,
            output_size,
        )
        # `dense`: a layer checkpoints never quantize (a MoE router), whatever the format
        self.quant_method = (
            UnquantizedLinearMethod() if dense else ctx.quant_config.get_quant_method(self)
        )
        self.quant_method.create_weights(self, *self._weight_shape, self.weight_loader)

    def input_dtype(self, num_tokens: int) -> torch.dtype | None:
        """The dtype this layer computes a batch of `num_tokens` rows in, rounding its input to
        it and giving its output in it (its quant method's `input_dtype`), or None: also where
        a bias or an all-reduce of the ranks' partial sums would add in another dtype."""
        if getattr(self, "bias", None) is not None or self.tp_size > 1:
            return None
        return self.quant_method.input_dtype(self, num_tokens)

    def replace_quant_method(self, method) -> None:
        """Hold the weight in `method`'s format instead (before loading): the parameters of
        the old method go, the new one creates its own (a layer a checkpoint keeps dense)."""
        for name, _ in list(self.named_parameters(recurse=False)):
            if name != "bias":
                delattr(self, name)
        self.quant_method = method
        method.create_weights(self, *self._weight_shape, self.weight_loader)


class ReplicatedLinear(LinearBase):
    """A linear layer every rank holds whole (`dense`: in the model's dtype whatever the
    checkpoint's format, as routers are)."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        *,
        ctx: ModelContext,
        dense: bool = False,
    ):
        super().__init__(input_size, output_size, input_size, output_size, ctx, dense)
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
        dim = output_dim(param)
        if dim is None:
            load_replicated(param, loaded_weight)
            return
        rows = param.shape[dim]
        check_shape(loaded_weight, scaled_shape(param, dim, self.tp_size))
        default_weight_loader(param, loaded_weight.narrow(dim, self.tp_rank * rows, rows))

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
        dim = output_dim(param)
        if dim is None:
            load_replicated(param, loaded_weight)
            return
        ratio = rows_per_element(self, param, dim)
        sizes = [packed_size(size, ratio, self) for size in self.output_sizes]
        if shard_id is None:  # the fused tensor: [ shard 0 | shard 1 | ... ] whole
            check_shape(loaded_weight, scaled_shape(param, dim, size=sum(sizes)))
            for index, part in enumerate(loaded_weight.split(sizes, dim)):
                self.weight_loader(param, part, index)
            return
        shard_rows = packed_size(self.output_sizes[shard_id] // self.tp_size, ratio, self)
        offset = packed_size(sum(self.output_sizes[:shard_id]) // self.tp_size, ratio, self)
        check_shape(loaded_weight, scaled_shape(param, dim, size=sizes[shard_id]))
        target = param.data.narrow(dim, offset, shard_rows)
        default_weight_loader(
            target, loaded_weight.narrow(dim, self.tp_rank * shard_rows, shard_rows)
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
        dim = output_dim(param)
        if dim is None:
            load_replicated(param, loaded_weight)
            return
        ratio = rows_per_element(self, param, dim)
        if shard_id is None:  # the fused tensor [ q | k | v ] of all heads
            sizes = [
                self.total_num_heads * self.head_size,
                self.total_num_kv_heads * self.head_size,
                self.total_num_kv_heads * self.head_size,
            ]
            sizes = [packed_size(size, ratio, self) for size in sizes]
            check_shape(loaded_weight, scaled_shape(param, dim, size=sum(sizes)))
            for part, name in zip(loaded_weight.split(sizes, dim), ("q", "k", "v")):
                self.weight_loader(param, part, name)
            return
        q_rows = packed_size(self.num_heads * self.head_size, ratio, self)
        kv_rows = packed_size(self.num_kv_heads * self.head_size, ratio, self)
        if shard_id == "q":
            offset, rows, rank_index = 0, q_rows, self.tp_rank
        elif shard_id in ("k", "v"):
            offset = q_rows if shard_id == "k" else q_rows + kv_rows
            rows, rank_index = kv_rows, self.tp_rank // self.kv_head_replicas
        else:
            raise ValueError(f"QKVParallelLinear takes shard_id 'q', 'k' or 'v', got {shard_id!r}")
        num_ranks = self.tp_size if shard_id == "q" else self.tp_size // self.kv_head_replicas
        check_shape(loaded_weight, scaled_shape(param, dim, size=rows * num_ranks))
        target = param.data.narrow(dim, offset, rows)
        default_weight_loader(target, loaded_weight.narrow(dim, rank_index * rows, rows))


class RowParallelLinear(LinearBase):
    """Y = X A^T with A's columns (input features) split across ranks; the partial products
    are summed over the ranks (all-reduce), then the bias is added once."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, *, ctx: ModelContext):
        self.input_size_per_rank = divide(input_size, ctx.tp_size, "input size")
        super().__init__(input_size, output_size, self.input_size_per_rank, output_size, ctx)
        self.bias = make_parameter(output_size, weight_loader=self.bias_loader) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        dim = input_dim(param)
        if dim is None:
            load_replicated(param, loaded_weight)
            return
        cols = param.shape[dim]
        check_shape(loaded_weight, scaled_shape(param, dim, self.tp_size))
        default_weight_loader(param, loaded_weight.narrow(dim, self.tp_rank * cols, cols))

    def bias_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        default_weight_loader(param, loaded_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.parallel.all_reduce(self.quant_method.apply(self, x))
        if self.bias is not None:
            out = out + self.bias
        return out
