"""What GPTQ and AWQ checkpoints share: integer codes in groups along the input, each group of
each output with a scale and a zero point, w = scale * (q - zero). `gptq.py` and `awq.py` say
how their tensors are named, shaped and packed; this module turns them into what ember
computes with.

On the CPU the codes go into the tiles of the GGUF fast path (`tiled_weight.TiledWeight`): a
tile group is 32 inputs of 16 outputs with one float16 scale and offset each, which a
checkpoint group of 32, 64 or 128 inputs (or a whole row, group_size -1) fills whole. The
offset is -scale * zero, rounded to float16 for 4-bit codes (at most 15/2048 of a step,
`OFFSET_ROUNDING`); 8-bit codes with zeros off 128 have tiles without offsets, and the
product takes them as a small float32 matmul of the activations' group sums
(`GroupQuantizedWeight.offsets`, 1/32 of the work). GPTQ's act-order (`desc_act`) assigns the
groups by `g_idx` instead of position: the inputs are sorted by group once at load, and the
activations are gathered into that order for each matmul. 8-bit codes take the tiles' 8-bit
form. Where the tiles do not take a layer (no kernel on this CPU, scales that are not float16,
a group cut by a shard) the codes go into GGUF's compact groups (`QuantizedWeight`, the C
block matmul) or, failing that, a dense copy. On CUDA the codes stay packed, 4 or 8 bits a
weight (`kernels/quant_matmul.py`: GPTQ's layout, AWQ's repacked into it, act-order groups
sorted), and a Triton GEMM dequantises them tile by tile (`layer.gpu_weight`).

Sharding follows vLLM: each tensor says which of its dimensions runs over the outputs and the
inputs (`output_dim`, `input_dim`), and the layers' loaders cut those (packed dimensions in
whole elements). A row-parallel layer splits its groups, so each rank's inputs must be whole
groups; with act-order (or one group a row) its scales and zeros are kept whole on every rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.kernels import block_matmul, tile_matmul
from ember.kernels.quant_matmul import pack_group_weight, quant_matmul
from ember.workers.layers.packed_int4 import QuantizedWeight
from ember.workers.layers.quantization.base import (
    EmbeddingMethodBase,
    LinearMethodBase,
    QuantizationConfig,
    WeightLoader,
)
from ember.workers.layers.tiled_weight import TILED_MAX_TOKENS, TiledWeight, dense_dtype

TILE_GROUP = 32


def quantized_parameter(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    weight_loader: WeightLoader,
    *,
    input_dim: int | None,
    output_dim: int | None,
) -> nn.Parameter:
    """An uninitialised checkpoint tensor of a quantized layer, with the dimensions its
    layer's loader shards along."""
    param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    param.weight_loader = weight_loader
    param.input_dim = input_dim
    param.output_dim = output_dim
    return param


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The `32 // bits` codes of each int32 of `packed`, lowest bits first, laid out along
    `dim` (which grows by that factor), as int32 values in [0, 2**bits)."""
    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    codes = (packed.unsqueeze(dim + 1) >> shifts.view([-1] + [1] * (packed.dim() - dim - 1))) & (
        (1 << bits) - 1
    )
    shape = list(packed.shape)
    shape[dim] *= per_word
    return codes.reshape(shape)


class GroupQuantizedWeight:
    """A [N, K] weight for x @ w.T: `packed` (tiles or compact groups, over the inputs in
    `order` when act-order sorted them), plus float32 `offsets` [N, K / 32] that multiply the
    activations' sums over each group of 32 (None when the packed form holds them)."""

    def __init__(
        self,
        packed: TiledWeight | QuantizedWeight,
        offsets: torch.Tensor | None,
        order: torch.Tensor | None,
    ):
        self.packed, self.offsets, self.order = packed, offsets, order

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] @ w.T -> [M, N] in x's dtype: the packed codes for decode batches, and for
        larger ones (prefill, compute-bound) too where the tiles are the faster there
        (`TiledWeight.serves_prefill`), else a dense copy made for this one matmul."""
        if self.order is not None:
            x = x.index_select(-1, self.order)
        tiles_serve = isinstance(self.packed, TiledWeight) and self.packed.serves_prefill
        if x.shape[0] > TILED_MAX_TOKENS and not tiles_serve:
            weight = self.dense_weight()
            return F.linear(x.to(weight.dtype), weight).to(x.dtype)
        out = self._packed_matmul(x)
        if self.offsets is not None:
            sums = x.float().unflatten(-1, (-1, TILE_GROUP)).sum(-1)
            out = out + (sums @ self.offsets.T).to(out.dtype)
        return out

    def dense_weight(self) -> torch.Tensor:
        """The weight over the inputs in `order`, dense for one matmul: the tiles' dense copy
        (`tiled_weight.dense_dtype`), with offsets added in float32 before that rounding."""
        if self.offsets is None and isinstance(self.packed, TiledWeight):
            return self.packed.dense()
        weight = self.dense_codes().float()
        if self.offsets is not None:
            weight += self.offsets.repeat_interleave(TILE_GROUP, dim=1)
        return weight.to(dense_dtype())

    def _packed_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """Float32 activations in and out of the C kernels (the GGUF layers go through
        bfloat16, as their fused decode step does; here only the kernels' activation groups
        round)."""
        if isinstance(self.packed, TiledWeight):
            out = tile_matmul.tile_matmul(x.float(), self.packed.tiles, torch.float32)
        else:
            p = self.packed
            out = block_matmul.block_matmul(x.float(), p.codes, p.scale, p.offset, torch.float32)
        return self.packed.matmul(x) if out is None else out.to(x.dtype)

    def dense_codes(self) -> torch.Tensor:
        """The packed part as a dense [N, K] matrix (inputs in `order`, no `offsets`)."""
        if isinstance(self.packed, TiledWeight):
            dense = tile_matmul.dequantize_tiles(self.packed.tiles, torch.float32)
            if dense is not None:
                return dense
        return self.packed.rows(torch.arange(self.packed.shape[0]))

    def dequantize(self) -> torch.Tensor:
        """The whole weight as float32 [N, K] in the checkpoint's input order (for tests)."""
        weight = self.dense_codes().float()
        if self.offsets is not None:
            weight += self.offsets.repeat_interleave(TILE_GROUP, dim=1)
        if self.order is not None:
            weight = torch.empty_like(weight).index_copy_(1, self.order, weight)
        return weight


def reference_dequantize(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_of_input: torch.Tensor
) -> torch.Tensor:
    """w [N, K] float32 = scales[n, g] * (codes[n, k] - zeros[n, g]) with g = group_of_input[k]:
    the formats' rule, in plain torch (the oracle of the packed forms)."""
    index = group_of_input.long()
    scale = scales.float().index_select(1, index)
    zero = zeros.float().index_select(1, index)
    return (codes.float() - zero) * scale


def pack_groups(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_of_input: torch.Tensor,
    bits: int,
) -> GroupQuantizedWeight | None:
    """codes [N, K] in [0, 2**bits), scales and zeros [N, G], the group of each input [K], as
    a `GroupQuantizedWeight`; None when the groups do not fill 32-input blocks (K not a
    multiple of 32, act-order groups of other sizes), or codes the CPU forms do not take."""
    inputs = codes.shape[1]
    if inputs % TILE_GROUP or bits not in (4, 8):
        return None
    group_of_input = group_of_input.long()
    order = None
    if bool((group_of_input[1:] < group_of_input[:-1]).any()):  # act-order: sort by group
        order = torch.sort(group_of_input, stable=True).indices
        codes = codes.index_select(1, order)
        group_of_input = group_of_input.index_select(0, order)
    blocks = group_of_input.view(-1, TILE_GROUP)
    if not bool((blocks == blocks[:, :1]).all()):
        return None
    block_group = blocks[:, 0]
    scale = scales.float().index_select(1, block_group)  # [N, K / 32]
    zero = zeros.float().index_select(1, block_group)
    if bits == 4:
        q = codes.to(torch.uint8)
        compact = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
        offset = -scale * zero
    else:
        compact = (codes.to(torch.int16) - 128).to(torch.int8)
        offset = scale * (128 - zero)
    packed = _tiles(compact, scale, offset, bits)
    if packed is not None:
        return GroupQuantizedWeight(*packed, order)
    tile_offset = offset if bits == 4 else None
    if bits == 8 and bool((offset != 0).any()):
        return GroupQuantizedWeight(QuantizedWeight(compact, scale, None), offset, order)
    return GroupQuantizedWeight(QuantizedWeight(compact, scale, tile_offset), None, order)


# A 4-bit offset (-scale * zero, zero <= 15) rounds to float16 by at most 15 / 2048 of a
# quantization step; the tiles take it rounded when that stays under this fraction of a step
# (a 64th of the rounding the codes already carry), so that the layer runs as pure tiles (the
# fused CPU decode step takes it).
OFFSET_ROUNDING = 1 / 64


def _tiles(
    compact: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int
) -> tuple[TiledWeight, torch.Tensor | None] | None:
    """Tiles of the codes and (tiles, offsets left over), or None where tiles do not serve."""
    rounded = offset.half().float()
    if bits == 4:
        fits = bool(((rounded - offset).abs() <= scale * OFFSET_ROUNDING).all())
        tiles = TiledWeight.from_groups(
            compact, scale, rounded if fits else torch.zeros_like(offset)
        )
    else:  # the 8-bit tiles have no offsets
        fits = not bool((offset != 0).any())
        tiles = TiledWeight.from_groups(compact, scale, None)
    if tiles is None:
        return None
    return tiles, None if fits else offset


class GroupQuantLinearMethod(LinearMethodBase):
    """A linear layer of a GPTQ or AWQ checkpoint: the subclasses create the checkpoint's
    tensors (`create_weights`) and read codes, scales and zeros out of them (`unpacked`)."""

    checkpoint_tensors: tuple[str, ...] = ()  # the layer's attributes `unpacked` reads

    def __init__(self, bits: int, group_size: int):
        self.bits, self.group_size = bits, group_size

    def groups_of(self, layer: nn.Module, inputs: int, whole_inputs: int) -> tuple[int, bool]:
        """(groups of this rank's scales, True when they are sharded with the inputs); a
        shard that cuts a group is refused, as vLLM's "input size is not aligned" is."""
        if self.group_size == -1:
            return 1, False
        if whole_inputs % self.group_size:
            raise ValueError(
                f"{type(layer).__name__}: input size {whole_inputs} is not a multiple of the "
                f"checkpoint's group_size {self.group_size}"
            )
        if inputs == whole_inputs:
            return inputs // self.group_size, True
        if inputs % self.group_size:
            raise ValueError(
                f"{type(layer).__name__}: input size per rank {inputs} is not aligned with "
                f"the checkpoint's group_size {self.group_size} (input size {whole_inputs}); "
                "use another tensor_parallel_size"
            )
        return inputs // self.group_size, True

    def unpacked(self, layer: nn.Module) -> tuple[torch.Tensor, ...]:
        """(codes [N, K], scales [N, G], zeros [N, G], group of each input [K]) of this rank."""
        raise NotImplementedError

    def positional_groups(self, inputs: int) -> torch.Tensor:
        """The group of each of this rank's `inputs` when groups follow positions."""
        if self.group_size == -1:
            return torch.zeros(inputs, dtype=torch.long)
        return torch.arange(inputs) // self.group_size

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        codes, scales, zeros, group_of_input = self.unpacked(layer)
        for name in self.checkpoint_tensors:
            delattr(layer, name)
        layer.gpu_weight = None
        if codes.device.type == "cuda":  # the codes stay packed for the Triton GEMM
            layer.gpu_weight = pack_group_weight(
                codes, scales, zeros, group_of_input, self.bits, layer.model_dtype
            )
            layer.dense_weight = None
            layer.quantized_weight = None
            layer.packed_weight = None
            return
        quantized = None
        if codes.device.type == "cpu":
            quantized = pack_groups(codes, scales, zeros, group_of_input, self.bits)
        if quantized is None:  # groups the packed forms do not take: dense, once
            weight = reference_dequantize(codes, scales, zeros, group_of_input)
            layer.dense_weight = weight.to(layer.model_dtype)
            layer.quantized_weight = None
            layer.packed_weight = None
            return
        layer.quantized_weight = quantized
        layer.dense_weight = None
        pure_tiles = (
            isinstance(quantized.packed, TiledWeight)
            and quantized.offsets is None
            and quantized.order is None
        )
        # The fused CPU decode step multiplies by `packed_weight` tiles directly.
        layer.packed_weight = quantized.packed if pure_tiles else None

    def apply(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if layer.gpu_weight is not None:
            out = quant_matmul(x, layer.gpu_weight)
        elif layer.quantized_weight is None:
            weight = layer.dense_weight
            out = F.linear(x.to(weight.dtype), weight).to(x.dtype)
        else:
            out = layer.quantized_weight.matmul(x)
        return out if bias is None else out + bias

    def dequantized_weight(self, layer: nn.Module) -> torch.Tensor:
        """The layer's weight [N, K] in the model's dtype, dense whatever form it is held in
        (made on demand from the codes; for whoever needs the dense matrix)."""
        if layer.gpu_weight is not None:
            return layer.gpu_weight.dequantize().to(layer.model_dtype)
        if layer.quantized_weight is not None:
            return layer.quantized_weight.dequantize().to(layer.model_dtype)
        return layer.dense_weight


class GroupQuantLMHeadMethod(EmbeddingMethodBase):
    """An LM head the checkpoint quantized too (GPTQModel's lm_head=True): `linear`'s tensors
    for this rank's rows of the padded vocabulary, loaded by vocabulary rows (a tensor packed
    along them, as GPTQ's qzeros, by rows / pack), its padding rows zero. It is only
    multiplied by: an embedding never reads it (a tied table is refused in the user's
    process)."""

    def __init__(self, linear: GroupQuantLinearMethod):
        self.linear = linear

    def create_weights(
        self, layer: nn.Module, rows_per_partition: int, embedding_dim: int, weight_loader
    ) -> None:
        pack = 32 // self.linear.bits
        if rows_per_partition % pack or layer.num_embeddings % pack:
            raise ValueError(
                f"a quantized lm_head needs a vocabulary of whole {pack}-row words: "
                f"{layer.num_embeddings} rows, {rows_per_partition} per rank"
            )

        def load_rows(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
            dim = param.output_dim
            if dim is None:  # g_idx: along the inputs, whole
                param.data.copy_(loaded)
                return
            per_row = rows_per_partition // param.shape[dim]  # 1, or pack along the rows
            rows = layer.num_local_rows // per_row
            if rows:
                start = layer.vocab_start // per_row
                param.data.narrow(dim, 0, rows).copy_(loaded.narrow(dim, start, rows))

        self.linear.create_weights(
            layer, embedding_dim, rows_per_partition, embedding_dim, rows_per_partition, load_rows
        )
        for name in self.linear.checkpoint_tensors:
            getattr(layer, name).data.zero_()  # the padding rows' codes and scales

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        self.linear.process_weights_after_loading(layer)

    def embedding(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("a quantized lm_head is not an embedding table")

    def apply(self, layer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.linear.apply(layer, hidden_states).float()


class GroupQuantConfig(QuantizationConfig):
    """A checkpoint format of `GroupQuantLinearMethod`s: embeddings and heads stay dense, and
    the experts of MoE blocks are quantized too."""

    quantizes_experts = True

    def linear_method(self) -> GroupQuantLinearMethod:
        raise NotImplementedError

    def get_quant_method(self, layer: nn.Module):
        from ember.workers.layers.embedding import VocabParallelEmbedding
        from ember.workers.layers.quantization.unquantized import UnquantizedEmbeddingMethod

        if isinstance(layer, VocabParallelEmbedding):
            return UnquantizedEmbeddingMethod()
        return self.linear_method()
