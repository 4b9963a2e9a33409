"""quantization="gguf": a GGUF file's 4- and 8-bit groups kept packed on the CPU (the formats are
in `packed_int4` and `tiled_weight`).

The checkpoint loads dense (dequantised from the file, sharded by the layers' weight loaders like
any weight); `process_weights_after_loading` then finds the groups in each rank's shard and packs
them. Decode-sized batches multiply by the packed groups; larger ones by a dense copy (bfloat16,
or float32 where the CPU has no native bfloat16: `dense_weight`).
An embedding reads its rows from the packed table, and an LM head tied to it shares that table.

Shards: a column-parallel shard splits rows, which never cuts a group. A row-parallel shard
splits each row, so its width per rank must be a whole number of 32-value groups; otherwise the
layer is refused with a `ValueError` (dtype="float32" dequantises instead).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.kernels import block_matmul, tile_matmul
from ember.kernels.top_k import top_k_indices
from ember.workers.layers.packed_int4 import (
    GROUP_SIZE,
    PackedInt4Weight,
    QuantizedWeight,
    pack_weight,
    tiled_groups,
)
from ember.workers.layers.quantization.base import (
    EmbeddingMethodBase,
    LinearMethodBase,
    QuantizationConfig,
)
from ember.workers.layers.quantization.unquantized import (
    UnquantizedEmbeddingMethod,
    UnquantizedLinearMethod,
)
from ember.workers.layers.tiled_weight import TiledWeight, dense_dtype

# Rows of logits recomputed in float32 after the packed LM head: the argmax and the head of the
# distribution that top-k and logprobs (at most 20 by default) read; each costs one dense row.
REFINED_LOGITS = 32


def refine_top_logits(logits: torch.Tensor, hidden_states: torch.Tensor, read_rows) -> torch.Tensor:
    """Recompute in float32 the `REFINED_LOGITS` largest of `logits` [M, V] (float32, from the
    packed LM head, whose products take bfloat16 activations) from the weight's
    rows (`read_rows(ids)`: [*ids.shape, H]): the argmax and the top of the distribution become
    float32 products."""
    top = top_k_indices(logits, min(REFINED_LOGITS, logits.shape[1]))  # [M, k]
    rows = read_rows(top).float()  # [M, k, H]
    exact = torch.bmm(rows, hidden_states.float().unsqueeze(-1)).squeeze(-1)
    return logits.scatter_(1, top, exact)


def _set_weight_dtype(layer: nn.Module, dtype: torch.dtype, convert: bool) -> None:
    """`layer.weight` in `dtype`: its values converted, or (an unloaded layer) only the dtype."""
    weight = layer.weight
    if weight.dtype == dtype:
        return
    data = weight.data.to(dtype) if convert else torch.empty_like(weight.data, dtype=dtype)
    layer.weight = nn.Parameter(data, requires_grad=False)
    layer.weight.weight_loader = getattr(weight, "weight_loader", None)


class GGUFPackedLinearMethod(UnquantizedLinearMethod):
    """A dense weight for loading; packed groups (`layer.packed_weight`) for decode batches, and
    the dense weight kept in bfloat16 for larger ones."""

    layers_independent = True  # packing reads and writes only its own layer

    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_size_per_partition: int,
        input_size: int,
        output_size: int,
        weight_loader,
    ) -> None:
        if input_size_per_partition != input_size and input_size_per_partition % GROUP_SIZE:
            raise ValueError(
                f"quantization='gguf': {type(layer).__name__} [{output_size} x {input_size}] "
                f"splits its input into {input_size_per_partition} columns per rank, which is "
                f"not a multiple of GGUF's {GROUP_SIZE}-value groups; use another "
                "tensor_parallel_size, or dtype='float32' to dequantise"
            )
        super().create_weights(
            layer,
            input_size_per_partition,
            output_size_per_partition,
            input_size,
            output_size,
            weight_loader,
        )
        layer.packed_weight = None

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        layer.packed_weight = pack_weight(layer.weight)
        if layer.packed_weight is not None:
            _set_weight_dtype(layer, torch.bfloat16, convert=True)

    def apply(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Through the packed groups for up to their `max_tokens` rows; larger batches
        (prefill chunks) are compute-bound: through the tiles in float32 where those are the
        faster there (`TiledWeight.serves_prefill`), else on the dense weight."""
        packed = layer.packed_weight
        if packed is None:
            return super().apply(layer, x, bias)
        if x.shape[0] <= packed.max_tokens:
            out = packed.matmul(x)
        elif isinstance(packed, TiledWeight) and packed.serves_prefill:
            out = packed.matmul_float32(x).to(x.dtype)
        else:
            weight = dense_weight(layer)
            out = F.linear(x.to(weight.dtype), weight).to(x.dtype)
        return out if bias is None else out + bias

    def input_dtype(self, layer: nn.Module, num_tokens: int) -> torch.dtype | None:
        """bfloat16 where `apply` computes in it: the packed kernels (up to `max_tokens`
        rows) and bfloat16 dense weights; None for float32 ones and for batches the tiles take
        in float32 (`TiledWeight.serves_prefill`)."""
        packed = layer.packed_weight
        if packed is None:
            return None
        if num_tokens <= packed.max_tokens:
            return torch.bfloat16
        if isinstance(packed, TiledWeight):
            in_bfloat16 = not packed.serves_prefill and dense_dtype() == torch.bfloat16
            return torch.bfloat16 if in_bfloat16 else None
        return torch.bfloat16 if layer.weight.dtype == torch.bfloat16 else None

    # ---- the converted-weights cache ----------------------------------------------------

    def packed_tensors(
        self, layer: nn.Module, name: str, saved: set[int]
    ) -> dict[str, torch.Tensor]:
        return _linear_tensors(name, layer.packed_weight)

    def restore(self, layer: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> bool:
        """Take the packed weight saved under `name` (none saved: the layer stays dense)."""
        packed = _linear_from(name, tensors, tuple(layer.weight.shape))
        if packed is False:
            return False
        layer.packed_weight = packed
        if packed is not None:
            _set_weight_dtype(layer, torch.bfloat16, convert=False)
        return True

    def reset(self, layer: nn.Module, dtype: torch.dtype) -> None:
        layer.packed_weight = None
        _set_weight_dtype(layer, dtype, convert=False)


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The dense weight a large batch multiplies by: made from the layer's tiles for this one
    matmul when it has them (`tiled_weight.dense_dtype`: bfloat16 or float32; `layer.weight`
    is then never read into memory), else `layer.weight`."""
    packed = getattr(layer, "packed_weight", None)
    if isinstance(packed, TiledWeight):
        return packed.dense()
    return layer.weight


class GGUFPackedEmbeddingMethod(UnquantizedEmbeddingMethod):
    """Rows read from packed groups (`layer.packed_rows`); an LM head also multiplies by them
    (`layer.packed_weight`). A table tied to another shares its packed rows (`shared`: the
    rows packed so far by weight, one per model)."""

    def __init__(self, shared: dict[int, object]):
        self.shared = shared

    def create_weights(
        self, layer: nn.Module, rows_per_partition: int, embedding_dim: int, weight_loader
    ) -> None:
        super().create_weights(layer, rows_per_partition, embedding_dim, weight_loader)
        layer.packed_rows = None
        if getattr(layer, "is_lm_head", False):  # an embedding is only read: never multiplied
            layer.packed_weight = None

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        key = id(layer.weight)
        if key not in self.shared:
            self.shared[key] = tiled_groups(QuantizedWeight.from_weight(layer.weight))
        layer.packed_rows = self.shared[key]
        if getattr(layer, "is_lm_head", False):
            layer.packed_weight = self._head_weight(layer) or pack_weight(layer.weight)

    @staticmethod
    def _head_weight(layer: nn.Module) -> TiledWeight | QuantizedWeight | None:
        """The rows serve the head's matmul as tiles, or as groups through the C kernel."""
        rows = layer.packed_rows
        if rows is not None and (isinstance(rows, TiledWeight) or block_matmul.available()):
            return rows
        return None

    def embedding(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        if layer.packed_rows is not None:
            return layer.packed_rows.rows(ids)
        return F.embedding(ids, layer.weight)

    def apply(self, layer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        if getattr(layer, "packed_weight", None) is None:
            return super().apply(layer, hidden_states)
        # packed at any batch size: the dense rows are read only for the refined top
        packed = layer.packed_weight
        if isinstance(packed, TiledWeight):
            logits = packed.matmul_logits(hidden_states)
        else:
            logits = packed.matmul(hidden_states).float()
        return refine_top_logits(logits, hidden_states, lambda ids: self.embedding(layer, ids))

    # ---- the converted-weights cache ----------------------------------------------------

    def packed_tensors(
        self, layer: nn.Module, name: str, saved: set[int]
    ) -> dict[str, torch.Tensor]:
        """The rows under "<name>.rows.*" unless a table in `saved` (ids of rows saved
        earlier) holds them; a head's own packed weight (torch's halves) under "<name>.*"."""
        tensors = {}
        rows = layer.packed_rows
        if rows is not None and id(rows) not in saved:
            saved.add(id(rows))
            if isinstance(rows, TiledWeight):
                tensors[f"{name}.rows.tiles"] = rows.tiles
            else:
                tensors.update(_groups_tensors(f"{name}.rows", rows))
        own = getattr(layer, "packed_weight", None)
        if own is not None and own is not rows:
            tensors.update(_linear_tensors(name, own))
        return tensors

    def restore(self, layer: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> bool:
        shape = tuple(layer.weight.shape)
        rows = _rows_from(name, tensors, shape)
        if rows is False:
            return False
        if rows is None:
            rows = self.shared.get(id(layer.weight))  # tied: the table's rows, restored first
        self.shared[id(layer.weight)] = rows
        layer.packed_rows = rows
        if getattr(layer, "is_lm_head", False):
            own = _linear_from(name, tensors, shape)
            if own is False:
                return False
            layer.packed_weight = self._head_weight(layer) or own
        return True

    def reset(self, layer: nn.Module, dtype: torch.dtype) -> None:
        self.shared.clear()
        layer.packed_rows = None
        if getattr(layer, "is_lm_head", False):
            layer.packed_weight = None


class GGUFPackedConfig(QuantizationConfig):
    """The layers of one model; embedding tables tied to each other share their rows."""

    def __init__(self):
        self.shared_rows: dict[int, object] = {}

    @classmethod
    def get_name(cls) -> str:
        return "gguf"

    def get_quant_method(self, layer: nn.Module) -> LinearMethodBase | EmbeddingMethodBase:
        from ember.workers.layers.embedding import VocabParallelEmbedding

        if isinstance(layer, VocabParallelEmbedding):
            return GGUFPackedEmbeddingMethod(self.shared_rows)
        return GGUFPackedLinearMethod()


# ---- a whole model's packed weights, saved and mapped back -----------------------------------


def packed_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers whose method is GGUF's, in module order (a table before a head tied to it)."""
    kinds = (GGUFPackedLinearMethod, GGUFPackedEmbeddingMethod)
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(getattr(module, "quant_method", None), kinds)
    ]


def packed_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The packed weights of `model` by name: "<layer>.tiles" (`TiledWeight`), or
    "<layer>.<part>.packed" and ".scales_zeros" (torch's layout); for row tables
    "<table>.rows.tiles", or "<table>.rows.codes", ".scale", ".offset" (`QuantizedWeight`). A
    head whose packed weight is its rows is saved once, as rows."""
    tensors, saved = {}, set()
    for name, layer in packed_layers(model):
        tensors.update(layer.quant_method.packed_tensors(layer, name, saved))
    return tensors


def attach_packed_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> bool:
    """Give the layers of `model` the packed weights of `tensors` (from `packed_tensors`);
    False when they do not fit the model's layers (then `reset_packed_layers`)."""
    layers = packed_layers(model)
    if not all(layer.quant_method.restore(layer, name, tensors) for name, layer in layers):
        return False
    return set(packed_tensors(model)) == set(tensors)  # nothing missing, nothing left over


def reset_packed_layers(model: nn.Module, dtype: torch.dtype) -> None:
    """Undo a partial `attach_packed_tensors` on an unloaded model: no packed weights, dense
    weights in `dtype`."""
    for _, layer in packed_layers(model):
        layer.quant_method.reset(layer, dtype)


def _linear_tensors(name: str, packed) -> dict[str, torch.Tensor]:
    if packed is None:
        return {}
    if isinstance(packed, TiledWeight):
        return {f"{name}.tiles": packed.tiles}
    tensors = {}
    for index, (codes, scales_zeros) in enumerate(packed.parts):
        tensors[f"{name}.{index}.packed"] = codes
        tensors[f"{name}.{index}.scales_zeros"] = scales_zeros
    return tensors


def _linear_from(name: str, tensors: dict[str, torch.Tensor], shape: tuple[int, int]):
    """The packed weight saved under `name`: None when none was saved, False when what was
    saved does not fit a [N, K] `shape` layer."""
    if f"{name}.tiles" in tensors:
        tiled = _tiles_from(tensors[f"{name}.tiles"], shape)
        return False if tiled is None else tiled
    parts = []
    while f"{name}.{len(parts)}.packed" in tensors:
        index = len(parts)
        packed = tensors[f"{name}.{index}.packed"]
        scales_zeros = tensors.get(f"{name}.{index}.scales_zeros")
        rows, cols = shape
        if (
            scales_zeros is None
            or packed.shape != (rows, cols // 2)
            or scales_zeros.shape[1:] != (rows, 2)
        ):
            return False
        parts.append((packed, scales_zeros))
    return PackedInt4Weight(parts) if parts else None


def _rows_from(name: str, tensors: dict[str, torch.Tensor], shape: tuple[int, int]):
    """The rows saved under "<name>.rows": None when none, False when they do not fit."""
    prefix = f"{name}.rows"
    if f"{prefix}.tiles" in tensors:
        tiled = _tiles_from(tensors[f"{prefix}.tiles"], shape)
        return False if tiled is None else tiled
    codes, scale = tensors.get(f"{prefix}.codes"), tensors.get(f"{prefix}.scale")
    if codes is None and scale is None:
        return None
    offset = tensors.get(f"{prefix}.offset")
    if codes is None or scale is None or (offset is None) != (codes.dtype == torch.int8):
        return False
    groups = QuantizedWeight(codes, scale, offset)
    return groups if groups.shape == shape else False


def _groups_tensors(prefix: str, groups: QuantizedWeight) -> dict[str, torch.Tensor]:
    tensors = {f"{prefix}.codes": groups.codes, f"{prefix}.scale": groups.scale}
    if groups.offset is not None:
        tensors[f"{prefix}.offset"] = groups.offset
    return tensors


def _tiles_from(tiles: torch.Tensor | None, shape: tuple[int, ...]) -> TiledWeight | None:
    """`tiles` as the packed weight of a [N, K] `shape` layer, or None when they do not fit."""
    if tiles is None or tiles.dim() != 3 or tiles.dtype != torch.uint8:
        return None
    if tiles.shape[-1] not in tile_matmul.TILE_BYTES.values():
        return None
    tiled = TiledWeight(tiles)
    return tiled if tiled.shape == tuple(shape) else None
