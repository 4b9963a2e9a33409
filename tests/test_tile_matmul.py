"""The VNNI tile matmul (`kernels/tile_matmul.py`) against a plain-torch reference that quantizes
the activations the same way (15-bit groups of 32, max|x| / 16383), its layout, and
`TiledWeight`'s rows against the dense weight."""

from __future__ import annotations

import ctypes

import gguf
import numpy as np
import pytest
import torch

from ember.kernels import cpu_library, tile_matmul
from ember.workers.layers.context import ModelContext
from ember.workers.layers.linear import ReplicatedLinear
from ember.workers.layers.packed_int4 import pack_weight
from ember.workers.layers.quantization import (
    get_quantization_config,
    process_weights_after_loading,
)
from ember.workers.layers.tiled_weight import TiledWeight
from tests.helpers import quantized_activations, random_group_weight

needs_vnni = pytest.mark.skipif(
    not tile_matmul.available(), reason="this CPU has no AVX-512 VNNI (torch's 4-bit path serves)"
)


@needs_vnni
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("rows", "n", "k"),
    # One row and one tile; a chunk of four and a partial one; more rows than two chunks with
    # enough tiles for both threads; a model-sized shape.
    [(1, 16, 32), (5, 48, 96), (9, 320, 64), (33, 96, 576)],
)
def test_tile_matmul_equals_the_quantized_reference(bits, x_dtype, rows, n, k):
    codes, scale, offset, dense = random_group_weight(n, k, bits, torch.float16, seed=rows + k)
    tiles = tile_matmul.pack_tiles(codes, scale, offset)
    assert tiles is not None and tile_matmul.tile_bits(tiles) == bits
    torch.manual_seed(rows)
    x = torch.randn(rows, k).to(x_dtype)
    out = tile_matmul.tile_matmul(x, tiles, torch.float32)
    assert out is not None and out.shape == (rows, n) and out.dtype == torch.float32
    quantized = quantized_activations(x.float(), levels=16383).double()
    expected = quantized @ dense.double().T
    # Equal up to float32 rounding, which is relative to the terms summed (a 4-bit group's
    # offset and scale parts may cancel).
    bound = 1e-6 * (quantized.abs() @ dense.double().abs().T) + 1e-30
    assert bool(((out.double() - expected).abs() <= bound).all())
    # Close to the exact product.
    exact = x.float() @ dense.T
    torch.testing.assert_close(out, exact, rtol=0.01, atol=1e-3 * float(exact.abs().max()))
    # bfloat16 out: the float32 result rounded to nearest even.
    rounded = tile_matmul.tile_matmul(x, tiles, torch.bfloat16)
    assert torch.equal(rounded, out.bfloat16())


@needs_vnni
def test_special_rows_zero_and_non_finite():
    codes, scale, offset, dense = random_group_weight(32, 64, 4, torch.float16, seed=1)
    tiles = tile_matmul.pack_tiles(codes, scale, offset)
    x = torch.zeros(3, 64)
    x[1, 5] = float("inf")
    x[2, :32] = 1e30  # large but finite: one group's scale, no overflow
    out = tile_matmul.tile_matmul(x, tiles, torch.float32)
    assert torch.equal(out[0], torch.zeros(32))  # an all-zero group contributes nothing
    assert not torch.isfinite(out[1]).all()  # an infinity is not hidden
    expected = x[2:].double() @ dense.double().T
    torch.testing.assert_close(out[2:].double(), expected, rtol=1e-4, atol=0)


def test_the_layout_refuses_what_it_cannot_hold():
    codes, scale, offset, _ = random_group_weight(24, 64, 4, torch.float16, seed=0)
    assert tile_matmul.pack_tiles(codes, scale, offset) is None  # 24 rows: not tiles of 16
    codes, scale, offset, _ = random_group_weight(32, 64, 4, torch.float32, seed=0)
    assert tile_matmul.pack_tiles(codes, scale, offset) is None  # float32 scales off float16
    assert tile_matmul.pack_tiles(codes, scale.half().float(), offset.half().float()) is not None


@needs_vnni
def test_a_width_mismatch_is_a_value_error():
    codes, scale, offset, _ = random_group_weight(16, 64, 4, torch.float16, seed=0)
    tiles = tile_matmul.pack_tiles(codes, scale, offset)
    with pytest.raises(ValueError, match="x has 96 columns, the weight 64"):
        tile_matmul.tile_matmul(torch.randn(1, 96), tiles, torch.float32)


@pytest.mark.parametrize("bits", [4, 8])
def test_tiled_rows_read_the_dense_rows(bits):
    codes, scale, offset, dense = random_group_weight(48, 96, bits, torch.float16, seed=bits)
    tiled = TiledWeight(tile_matmul.pack_tiles(codes, scale, offset))
    assert tiled.shape == (48, 96) and tiled.bits == bits
    ids = torch.tensor([[0, 47, 17], [16, 15, 31]])
    torch.testing.assert_close(tiled.rows(ids), dense[ids], rtol=0, atol=1e-6)


@needs_vnni
@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_pack_weight_takes_tiles_and_both_matmuls_agree(kind):
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    weight = np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32) * 0.05
    dense = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(weight, qtype), qtype))
    packed = pack_weight(dense)
    assert isinstance(packed, TiledWeight) and packed.max_tokens >= 8
    x = torch.randn(4, 128)
    out = packed.matmul(x)
    assert out.dtype == torch.float32
    assert torch.equal(out, packed.matmul_bfloat16(x.bfloat16()).float())
    torch.testing.assert_close(out, x @ dense.T, rtol=2e-2, atol=2e-2)


def test_a_build_without_vnni_says_so():
    library = cpu_library.load_c_library("tile_matmul.c", ("-mno-avx512vnni",))
    assert library is not None
    assert library.ember_tile_matmul_supported() == 0
    fn = library.ember_tile_matmul
    fn.restype = ctypes.c_int
    args = [None, 0, ctypes.c_int64(1), ctypes.c_int64(32), None, 4, ctypes.c_int64(16), None, 0]
    assert fn(*args) == 1  # nothing computed: the caller keeps torch's kernel


@needs_vnni
@pytest.mark.parametrize("bits", [4, 8])
def test_dequantized_tiles_equal_the_bfloat16_dense_weight(bits):
    codes, scale, offset, dense = random_group_weight(48, 96, bits, torch.float16, seed=bits)
    dequantized = tile_matmul.dequantize_tiles(tile_matmul.pack_tiles(codes, scale, offset))
    assert dequantized.dtype == torch.bfloat16
    assert torch.equal(dequantized, dense.bfloat16())


@needs_vnni
def test_large_batches_never_read_the_dense_copy_of_a_tiled_layer():
    """Prefill-sized batches multiply by a bfloat16 weight made from the tiles, so that the
    layer's dense copy (mapped from the weights cache) never becomes resident."""
    layer = ReplicatedLinear(
        128, 64, ctx=ModelContext(quant_config=get_quantization_config("gguf"))
    )
    qtype = gguf.GGMLQuantizationType.Q4_1
    weight = np.random.default_rng(1).standard_normal((64, 128)).astype(np.float32) * 0.05
    layer.weight.data.copy_(
        torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(weight, qtype), qtype))
    )
    process_weights_after_loading(layer)
    assert isinstance(layer.packed_weight, TiledWeight)
    big = torch.randn(layer.packed_weight.max_tokens + 1, 128)
    expected = (big.bfloat16() @ layer.weight.T).float()
    layer.weight.data.fill_(float("nan"))  # were it read, the result would be NaN
    torch.testing.assert_close(layer(big), expected, rtol=0, atol=0)
