"""Matmuls against 4- and 8-bit weight groups laid out in tiles (`csrc/tile_matmul.c`): the
weights of 16 rows side by side, so that one AVX-512 VNNI vpdpbusd multiplies 64 of their codes
by a broadcast quad of activation bytes, and on AVX2 (+FMA, F16C) each half of a tile is 8 rows
whose codes are widened to int16 for vpmaddwd, or go to AVX-VNNI's 256-bit vpdpbusd where the
CPU has it (Intel client chips from Alder Lake on). The layout is the same on all; the ISA is chosen when the
library is built (`cpu_library.cpu_isa()`), and `kernel_name()` says which path it took. On
CPUs with AMX the avx512 build multiplies batches of 16 rows and more with AMX tiles (`use_amx`,
`multiplies_in_bfloat16`; `EMBER_CPU_AMX=0` turns them off).
`pack_tiles` builds the layout from GGUF-style groups (`packed_int4.QuantizedWeight`'s codes,
scales and offsets); `tile_matmul` multiplies by it; `tile_rows` reads rows of it.

`dequantize_tiles` writes the weight back as dense bfloat16 (CPUs with native bfloat16) or
float32 (the rest, where torch's bfloat16 matmul converts in software), for batches where
torch's dense matmul is faster (prefill chunks): a layer's copy at a time, so that no dense
copy of the model stays in memory.

`tile_matmul` and `dequantize_tiles` return None where the library cannot be built or the CPU
has neither AVX-512 VNNI nor AVX2; `pack_tiles` returns None for weights the layout does not take (rows not a
multiple of 16, scales that float16 does not hold). The caller keeps another path for both.
"""

from __future__ import annotations

import ctypes
import os

import torch

from ember.kernels.cpu_library import isa_cached, load_openmp_library

TILE_ROWS = 16
GROUP = 32


@isa_cached
def _library() -> ctypes.CDLL | None:
    library = load_openmp_library("tile_matmul.c")
    if library is None or not library.ember_tile_matmul_supported():
        return None
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    library.ember_tile_matmul.argtypes = [ptr, i32, i64, i64, ptr, i32, i64, ptr, i32]
    library.ember_tile_matmul.restype = ctypes.c_int
    library.ember_tile_dequantize.argtypes = [ptr, i32, i64, i64, ptr, i32]
    library.ember_tile_dequantize.restype = ctypes.c_int
    library.ember_tile_rows.argtypes = [ptr, i32, i64, i64, ptr, i64, ptr]
    library.ember_tile_rows.restype = ctypes.c_int
    library.ember_tile_kernel.restype = ctypes.c_char_p
    library.ember_tile_use_amx.argtypes = [i32]
    library.ember_tile_use_amx.restype = ctypes.c_int
    library.ember_tile_use_bf16_vectors.argtypes = [i32]
    library.ember_tile_use_bf16_vectors.restype = ctypes.c_int
    library.ember_tile_path.argtypes = [i64, i32, i32]
    library.ember_tile_path.restype = ctypes.c_int
    if os.environ.get("EMBER_CPU_AMX", "").strip() == "0":
        library.ember_tile_use_amx(0)
    return library


def available() -> bool:
    return _library() is not None


def kernel_name() -> str:
    """The path the library was built with: "avx512-vnni", "avx2-vnni" (AVX2 with AVX-VNNI's
    256-bit vpdpbusd), "avx2" (vpmaddubsw + vpmaddwd); "none" where the kernel is not
    available."""
    library = _library()
    return "none" if library is None else library.ember_tile_kernel().decode()


def use_amx(enabled: bool) -> bool:
    """Let the tile matmul use AMX tiles (or not) for batches of 16 rows and more, on CPUs
    that have them (Sapphire Rapids and later Xeons; the avx512 build); returns whether it now
    does. On by default where Linux grants the tile state, off with `EMBER_CPU_AMX=0`. See
    `multiplies_in_bfloat16` for what changes."""
    library = _library()
    return False if library is None else bool(library.ember_tile_use_amx(int(enabled)))


def use_bf16_vectors(enabled: bool) -> bool:
    """Let the tile matmul multiply bfloat16 batches of 16 rows and more with AVX-512 BF16's
    vdpbf16ps (or not) on CPUs that have it but no AMX tiles (Zen 4, Cooper Lake; or AMX
    turned off); returns whether it now does. On by default. See `multiplies_in_bfloat16`."""
    library = _library()
    return False if library is None else bool(library.ember_tile_use_bf16_vectors(int(enabled)))


# `ember_tile_path`'s codes.
_PATHS = {0: "vector", 1: "amx-int8", 2: "amx-bf16", 3: "avx512-bf16"}


def path(rows: int, x_dtype: torch.dtype, bits: int) -> str:
    """The kernel `tile_matmul` takes for `rows` rows of `x_dtype` by `bits`-bit tiles:
    "amx-bf16" or "avx512-bf16" (bfloat16 x from 16 rows: AMX tiles, or AVX-512 BF16 vectors on
    CPUs with native bfloat16 and no AMX; see `multiplies_in_bfloat16`), "amx-int8" (float32 x
    from 16 rows on AMX CPUs), "vector" (the build's VNNI or AVX2 kernel); "none" where the
    kernel is not available."""
    library = _library()
    if library is None:
        return "none"
    return _PATHS[library.ember_tile_path(rows, x_dtype == torch.bfloat16, bits)]


def multiplies_in_bfloat16(rows: int, x_dtype: torch.dtype, bits: int) -> bool:
    """Whether `tile_matmul` of `rows` rows of `x_dtype` by `bits`-bit tiles multiplies the
    activations as they are by the weights rounded to bfloat16 (bfloat16 x, 16 rows and more:
    AMX-BF16 tiles on an AMX CPU, AVX-512 BF16 vectors on other CPUs with native bfloat16; the
    values of `dequantize_tiles`' bfloat16 copy, exact products, float32 sums) rather than the
    exact weights by activations in 15-bit groups (every other call; float32 x from 16 rows
    goes through AMX-INT8 tiles on an AMX CPU, whose outputs are the VNNI path's bit for
    bit)."""
    return path(rows, x_dtype, bits) in ("amx-bf16", "avx512-bf16")


def activation_levels() -> int:
    """The steps of a group of 32 activations on each side of zero (qx = round(x * levels /
    max|x|)): 16383 for AVX-512 VNNI, 16256 for AVX2 (whose high bytes must stay off -128);
    0 where the kernel is not available."""
    library = _library()
    return 0 if library is None else library.ember_tile_activation_levels()


def _exact_half(values: torch.Tensor) -> torch.Tensor | None:
    half = values.half()
    return half if bool(torch.equal(half.float(), values.float())) else None


def pack_tiles(
    codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None
) -> torch.Tensor | None:
    """The tiles [N / 16, K / 32, bytes] uint8 of a weight given as 4-bit `codes` [N, K / 2]
    uint8 (two per byte, the even element low; w = q * scale + offset) or 8-bit `codes` [N, K]
    int8 (w = q * scale, no offset), `scale` and `offset` [N, K / 32]; None when N is not a
    multiple of 16 or a scale or offset is not exactly a float16."""
    rows, groups = scale.shape
    if rows % TILE_ROWS:
        return None
    if codes.dtype == torch.uint8:
        q = torch.stack((codes & 15, codes >> 4), dim=-1).flatten(-2)
        q = q.view(rows // TILE_ROWS, TILE_ROWS, groups, 2, 4, 4)
        packed = q[:, :, :, 0] | (q[:, :, :, 1] << 4)  # [tiles, j, g, c, b]
        vectors = 4
    else:
        if offset is not None:
            raise ValueError("8-bit codes take no offset")
        packed = (codes.to(torch.int16) + 128).to(torch.uint8)
        packed = packed.view(rows // TILE_ROWS, TILE_ROWS, groups, 8, 4)
        vectors = 8
    halves = [_exact_half(scale)] + ([] if offset is None else [_exact_half(offset)])
    if any(half is None for half in halves):
        return None
    packed = packed.permute(0, 2, 3, 1, 4).reshape(rows // TILE_ROWS, groups, 64 * vectors)

    def per_tile(values: torch.Tensor) -> torch.Tensor:  # [N, G] float16 -> [tiles, G, 32]
        values = values.view(rows // TILE_ROWS, TILE_ROWS, groups).transpose(1, 2)
        return values.contiguous().view(torch.uint8)

    return torch.cat([packed, *map(per_tile, halves)], dim=-1).contiguous()


# Bytes of a tile: 4-bit codes, scales and offsets; 8-bit codes and scales.
TILE_BYTES = {4: 4 * 64 + 2 * 32, 8: 8 * 64 + 32}


def tile_bits(tiles: torch.Tensor) -> int:
    """4 or 8: the code width of `tiles` (from `pack_tiles`)."""
    return 4 if tiles.shape[-1] == TILE_BYTES[4] else 8


def tile_matmul(
    x: torch.Tensor, tiles: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor | None:
    """x [M, K] (float32 or bfloat16) @ w.T -> [M, N] in `out_dtype` (float32 or bfloat16), w
    given by `tiles` (from `pack_tiles`); None when the kernel is not available."""
    library = _library()
    if library is None:
        return None
    x = x.contiguous()
    rows, k = x.shape
    row_tiles, groups = tiles.shape[:2]
    if k != groups * GROUP:
        raise ValueError(f"x has {k} columns, the weight {groups * GROUP}")
    out = torch.empty(rows, row_tiles * TILE_ROWS, dtype=out_dtype)
    status = library.ember_tile_matmul(
        x.data_ptr(),
        x.dtype == torch.bfloat16,
        rows,
        k,
        tiles.data_ptr(),
        tile_bits(tiles),
        row_tiles * TILE_ROWS,
        out.data_ptr(),
        out_dtype == torch.bfloat16,
    )
    return out if status == 0 else None


def dequantize_tiles(
    tiles: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor | None:
    """The weight of `tiles` as dense [N, K] `dtype` (bfloat16 or float32: q * scale + offset,
    rounded to nearest even for bfloat16); None when the kernel is not available."""
    library = _library()
    if library is None:
        return None
    row_tiles, groups = tiles.shape[:2]
    out = torch.empty(row_tiles * TILE_ROWS, groups * GROUP, dtype=dtype)
    status = library.ember_tile_dequantize(
        tiles.data_ptr(),
        tile_bits(tiles),
        out.shape[0],
        out.shape[1],
        out.data_ptr(),
        dtype == torch.float32,
    )
    return out if status == 0 else None


def tile_rows(tiles: torch.Tensor, index: torch.Tensor) -> torch.Tensor | None:
    """The rows `index` (int64, any shape) of the weight of `tiles` as float32 [*index.shape, K]
    (q * scale + offset, rounded once, as `dequantize_tiles` computes them), each read from its
    own lane of its tiles; None when the kernel is not available or `tiles` is not contiguous.
    An index outside the weight raises IndexError."""
    library = _library()
    if library is None or not tiles.is_contiguous():
        return None
    row_tiles, groups = tiles.shape[:2]
    ids = index.reshape(-1).to(torch.int64).contiguous()
    out = torch.empty(ids.numel(), groups * GROUP, dtype=torch.float32)
    status = library.ember_tile_rows(
        tiles.data_ptr(),
        tile_bits(tiles),
        row_tiles * TILE_ROWS,
        groups * GROUP,
        ids.data_ptr(),
        ids.numel(),
        out.data_ptr(),
    )
    if status == 4:
        raise IndexError(f"row index out of range for a weight of {row_tiles * TILE_ROWS} rows")
    return out.view(*index.shape, -1) if status == 0 else None
