"""A linear weight of 4- or 8-bit groups in VNNI tiles (`ember.kernels.tile_matmul`): the packed
form of a layer, an embedding or an LM head on CPUs with AVX-512 VNNI.

One copy of the tiles serves every use: the matmul of a decode step (SmolLM2's layers: 127 ->
61 us a token against torch's 4-bit kernel, its 49152 x 576 head 1.2 -> 0.6 ms), rows read
dequantised (an embedding lookup, the LM head's refined rows), and the matmul of larger
batches: through the tiles too where a VNNI kernel beats the dense copy's float32 matmul
(`tiles_serve_prefill`) and where bfloat16 batches take AMX tiles or AVX-512 BF16 vectors
(`max_tokens`), else through a dense copy made on the fly (bfloat16 where the CPU multiplies
it natively, float32 elsewhere).
"""

from __future__ import annotations

import sys

import torch

from ember.kernels import tile_matmul
from ember.kernels.cpu_features import native_bfloat16
from ember.kernels.tile_matmul import GROUP, TILE_ROWS

# Up to this many rows the tiles are multiplied directly; beyond, a matmul is compute-bound and
# torch's bfloat16 one on a copy written from the tiles is faster. SmolLM2's 30 layers, 2 cores:
# 32 rows 23 ms against 38, 64 rows 49 against 58, 96 rows 78 against 75, 256 rows 183
# against 160.
TILED_MAX_TOKENS = 64
# With AMX (the avx512 build on Sapphire Rapids and later Xeons) bfloat16 batches multiply
# the tiles' weights dequantised in tiles, faster than the dense copies up to here: SmolLM2's
# 30 layers, 2 cores, 100 rows 18 ms against 41, 300 rows 41 against 69-84, 512 73 against
# 85-96, 1000 132 against 158-174; 2048 310 against 220.
AMX_TILED_MAX_TOKENS = 1024
# With AVX-512 BF16 and no AMX (Zen 4, Cooper Lake) bfloat16 batches multiply the weights
# dequantised a row tile at a time with vdpbf16ps, at least as fast as the dense copies'
# oneDNN matmul at every size measured (SmolLM2's 30 layers, 2 cores of a Zen 4, the copies'
# writing not counted: 64 rows 34 ms against 40, 256 129 against 136, 512 252 against 271,
# 2048 1043 against 1058), so every batch takes the tiles and no dense copy is made.
BF16_VECTORS_MAX_TOKENS = sys.maxsize


def dense_dtype() -> torch.dtype:
    """The dtype of the dense copies large batches multiply by: bfloat16 on CPUs that compute
    in it natively, float32 elsewhere. SmolLM2's 30 layers at 256 rows, 2 cores: bfloat16 173
    ms against float32 452 with AVX-512 BF16; under the AVX2 override float32 562 ms against
    bfloat16 1992 and float16 2089 (both converted in software)."""
    return torch.bfloat16 if native_bfloat16() else torch.float32


def tiles_serve_prefill() -> bool:
    """Whether the tiles are also the faster matmul for batches beyond `TILED_MAX_TOKENS`
    (prefill chunks): with a VNNI kernel (AVX-512's, or AVX-VNNI's on 256-bit vectors) where
    the dense copies would be float32. SmolLM2's 30 layers, 2 cores of a Sapphire Rapids, 256
    rows: AVX-VNNI tiles 198 ms against float32 sgemm 252 ms under the AVX2 override, AVX-512
    VNNI tiles 149 ms against 184 ms; but the AVX2 kernel without VNNI 346 ms against 260, and
    bfloat16 dense copies, where the CPU has them, win beyond about 90 rows."""
    return dense_dtype() == torch.float32 and tile_matmul.kernel_name() in (
        "avx512-vnni",
        "avx2-vnni",
    )


class TiledWeight:
    """A [N, K] weight as `tile_matmul.pack_tiles` lays it out: tiles [N / 16, K / 32, bytes].
    Batches up to `max_tokens` rows (decode steps; with AMX, prefill chunks up to
    `AMX_TILED_MAX_TOKENS` too; with AVX-512 BF16 and no AMX, every batch) go through the
    tiles in bfloat16 as the fused decode step computes them; larger ones in float32 where
    `serves_prefill`, else through a dense copy (`dense`)."""

    def __init__(self, tiles: torch.Tensor):
        self.tiles = tiles
        self.bits = tile_matmul.tile_bits(tiles)
        self.serves_prefill = tiles_serve_prefill()
        bfloat16_path = tile_matmul.path(AMX_TILED_MAX_TOKENS, torch.bfloat16, self.bits)
        self.max_tokens = {
            "amx-bf16": AMX_TILED_MAX_TOKENS,
            "avx512-bf16": BF16_VECTORS_MAX_TOKENS,
        }.get(bfloat16_path, TILED_MAX_TOKENS)

    @classmethod
    def from_groups(
        cls, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None
    ) -> TiledWeight | None:
        """The tiles of GGUF-style groups (`packed_int4.QuantizedWeight`'s fields), or None
        when the kernel is not available here or the layout does not take the weight."""
        if not tile_matmul.available():
            return None
        tiles = tile_matmul.pack_tiles(codes, scale, offset)
        return None if tiles is None else cls(tiles)

    @property
    def shape(self) -> tuple[int, int]:
        row_tiles, groups = self.tiles.shape[:2]
        return row_tiles * TILE_ROWS, groups * GROUP

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] (float32 or bfloat16) @ w.T -> [M, N] in x's dtype, through bfloat16 as the
        fused decode step computes it (both paths give the same values)."""
        return self.matmul_bfloat16(x.to(torch.bfloat16)).to(x.dtype)

    def matmul_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> [M, N] float32 from x in bfloat16, as `matmul` computes it but with the
        sums left in float32 (an LM head's logits: no bfloat16 rounding, no copy widening
        them; SmolLM2's 32 x 49152 at a decode step: 0.5 ms less)."""
        out = tile_matmul.tile_matmul(x.to(torch.bfloat16), self.tiles, torch.float32)
        if out is None:  # only where the library vanished after packing
            raise RuntimeError("the tile matmul kernel is not available")
        return out

    def matmul_bfloat16(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] bfloat16 -> [M, N] bfloat16."""
        out = tile_matmul.tile_matmul(x, self.tiles, torch.bfloat16)
        if out is None:  # only where the library vanished after packing
            raise RuntimeError("the tile matmul kernel is not available")
        return out

    def matmul_float32(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] float32 -> [M, N] float32, the activations' 15-bit groups taken from
        float32 (batches beyond `max_tokens` where `serves_prefill`)."""
        out = tile_matmul.tile_matmul(x.float(), self.tiles, torch.float32)
        if out is None:  # only where the library vanished after packing
            raise RuntimeError("the tile matmul kernel is not available")
        return out

    def dense(self) -> torch.Tensor:
        """The weight as a new dense [N, K] tensor, made for one matmul and then dropped: the
        values of a bfloat16 copy of the dequantised weight where the CPU multiplies bfloat16
        in hardware, else the float32 values (`dense_dtype`)."""
        dense = tile_matmul.dequantize_tiles(self.tiles, dense_dtype())
        if dense is None:  # only where the library vanished after packing
            raise RuntimeError("the tile matmul kernel is not available")
        return dense

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """The rows `index` (any shape) as float32 [*index.shape, K]: each read from its own
        lane of the tiles in C (`tile_matmul.tile_rows`), else by copying their whole tiles
        (`rows_torch`; the LM head's 32 x 32 refined rows of SmolLM2: 2.2 ms against 0.1)."""
        rows = tile_matmul.tile_rows(self.tiles, index)
        return self.rows_torch(index) if rows is None else rows

    def rows_torch(self, index: torch.Tensor) -> torch.Tensor:
        """`rows` in torch: the whole tiles of the rows copied, then their lanes picked."""
        flat = index.reshape(-1)
        vectors = 4 if self.bits == 4 else 8
        tiles = self.tiles.index_select(0, flat // TILE_ROWS)  # [R, G, bytes]
        lane = (flat % TILE_ROWS).view(-1, 1, 1, 1, 1)
        groups = tiles.shape[1]
        codes = tiles[..., : 64 * vectors].view(-1, groups, vectors, TILE_ROWS, 4)
        codes = codes.gather(3, lane.expand(-1, groups, vectors, 1, 4)).squeeze(3)
        if self.bits == 4:  # low nibbles: k 0-15, high ones: k 16-31
            q = torch.cat((codes & 15, codes >> 4), dim=2)
        else:
            q = codes
        q = q.reshape(-1, groups, GROUP).float()
        halves = tiles[..., 64 * vectors :].contiguous().view(torch.float16)  # [R, G, 16|32]
        halves = halves.view(-1, groups, halves.shape[-1] // TILE_ROWS, TILE_ROWS).float()
        picked = halves.gather(3, lane.view(-1, 1, 1, 1).expand(-1, groups, halves.shape[2], 1))
        if self.bits == 4:
            w = q * picked[:, :, 0] + picked[:, :, 1]  # scale, offset: [R, G, 1]
        else:
            w = (q - 128) * picked[:, :, 0]
        return w.reshape(*index.shape, -1)
