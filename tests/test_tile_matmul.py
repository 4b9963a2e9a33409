"""The tile matmul (`kernels/tile_matmul.py`), under each ISA (AVX-512 VNNI, AVX2 with and
without AVX-VNNI; the generic build has none), against a plain-torch reference that quantizes
the activations the same way (15-bit groups of 32: max|x| / 16383 with VNNI, / 16256 with
AVX2), its layout, and `TiledWeight`'s rows against the dense weight."""

from __future__ import annotations

import ctypes

import gguf
import numpy as np
import pytest
import torch

from ember.kernels import cpu_library, tile_matmul
from ember.kernels.cpu_features import cpu_flags, native_bfloat16
from ember.workers.layers.context import ModelContext
from ember.workers.layers.linear import ReplicatedLinear
from ember.workers.layers.packed_int4 import pack_weight
from ember.workers.layers.quantization import (
    get_quantization_config,
    process_weights_after_loading,
)
from ember.workers.layers.tiled_weight import BF16_VECTORS_MAX_TOKENS, TiledWeight, dense_dtype
from tests.helpers import quantized_activations, random_group_weight

pytestmark = pytest.mark.usefixtures("cpu_isa")


@pytest.fixture
def needs_tiles(cpu_isa):
    if not tile_matmul.available():
        pytest.skip(f"the {cpu_isa} build has no tile kernel (block_matmul serves)")


@pytest.mark.usefixtures("needs_tiles")
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("rows", "n", "k"),
    # One row and one tile; a chunk of four and a partial one; more rows than two chunks with
    # enough tiles for both threads; a model-sized shape; one block of 16 rows over an odd
    # number of groups (AMX: each of its four chains of sums, and a lone last group); rows over
    # several blocks and a partial one (prefill chunks; AMX: row tiles in pairs, a last chunk
    # of one block, two spans of rows).
    [
        (1, 16, 32),
        (5, 48, 96),
        (9, 320, 64),
        (33, 96, 576),
        (16, 48, 160),
        (211, 32, 96),
        (70, 64, 96),
        (400, 32, 1536),
    ],
)
def test_tile_matmul_equals_the_quantized_reference(bits, x_dtype, rows, n, k):
    codes, scale, offset, dense = random_group_weight(n, k, bits, torch.float16, seed=rows + k)
    tiles = tile_matmul.pack_tiles(codes, scale, offset)
    assert tiles is not None and tile_matmul.tile_bits(tiles) == bits
    torch.manual_seed(rows)
    x = torch.randn(rows, k).to(x_dtype)
    out = tile_matmul.tile_matmul(x, tiles, torch.float32)
    assert out is not None and out.shape == (rows, n) and out.dtype == torch.float32
    if tile_matmul.multiplies_in_bfloat16(rows, x_dtype, bits):
        # AMX-BF16: x as it is, by the weight's bfloat16 copy (rounded once from float32)
        quantized = x.double()
        weight = _exact_dense(codes, scale, offset, bits).bfloat16().double()
    else:
        quantized = quantized_activations(x.float(), tile_matmul.activation_levels()).double()
        weight = dense.double()
    expected = quantized @ weight.T
    # Equal up to float32 rounding, which is relative to the terms summed (a 4-bit group's
    # offset and scale parts may cancel).
    bound = 1e-6 * (quantized.abs() @ weight.abs().T) + 1e-30
    assert bool(((out.double() - expected).abs() <= bound).all())
    # Close to the exact product: the 15-bit groups' steps, or the weights' bfloat16 rounding
    # (each term off by |x| times its weight's rounding at most).
    exact = x.float() @ dense.T
    if tile_matmul.multiplies_in_bfloat16(rows, x_dtype, bits):
        rounding = x.double().abs() @ (weight - dense.double()).abs().T
        assert bool(((out.double() - exact.double()).abs() <= rounding + 2 * bound).all())
        assert float(rounding.max()) <= 2**-8 * float((x.double().abs() @ weight.abs().T).max())
    else:
        torch.testing.assert_close(out, exact, rtol=0.01, atol=1e-3 * float(exact.abs().max()))
    # bfloat16 out: the float32 result rounded to nearest even.
    rounded = tile_matmul.tile_matmul(x, tiles, torch.bfloat16)
    assert torch.equal(rounded, out.bfloat16())


@pytest.mark.usefixtures("needs_tiles")
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


@pytest.mark.usefixtures("needs_tiles")
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
    torch.testing.assert_close(tiled.rows_torch(ids), dense[ids], rtol=0, atol=1e-6)


@pytest.mark.usefixtures("needs_tiles")
@pytest.mark.parametrize("bits", [4, 8])
def test_rows_read_in_c_equal_the_dequantized_weight(bits):
    """`tile_rows` reads each row from its lane: exactly the rows of the float32 dequantized
    tiles (one rounding of q * scale + offset), for ids from every lane, repeated, in any shape;
    an id outside the weight is an IndexError, not a read beyond it."""
    codes, scale, offset, _ = random_group_weight(64, 128, bits, torch.float16, seed=10 + bits)
    tiles = tile_matmul.pack_tiles(codes, scale, offset)
    ids = torch.tensor([[63, 0, 5], [16, 16, 47]])
    rows = tile_matmul.tile_rows(tiles, ids)
    assert rows.shape == (2, 3, 128)
    assert torch.equal(rows, tile_matmul.dequantize_tiles(tiles, torch.float32)[ids])
    many = torch.arange(300) % 64  # enough rows for the threads to share them
    assert torch.equal(tile_matmul.tile_rows(tiles, many), TiledWeight(tiles).rows_torch(many))
    for bad in (64, -1):
        with pytest.raises(IndexError, match="out of range for a weight of 64 rows"):
            tile_matmul.tile_rows(tiles, torch.tensor([3, bad]))


@pytest.mark.usefixtures("needs_tiles")
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


def test_each_build_says_what_it_computes(cpu_isa):
    """AVX-512 VNNI and AVX2 builds (including an AVX-512 CPU without VNNI, which takes the
    AVX2 path) compute; a build without AVX2 says so and computes nothing."""
    no_vnni = cpu_library.load_c_library("tile_matmul.c", ("-mno-avx512vnni",))
    assert no_vnni is not None
    levels = {"avx512": 16256, "avx2-vnni": 16256, "avx2": 16256, "generic": 0}[cpu_isa]
    assert no_vnni.ember_tile_activation_levels() == levels
    avx512_kernel = "avx512-vnni" if "avx512_vnni" in cpu_flags() else "avx2"
    kernels = {"avx512": avx512_kernel, "avx2-vnni": "avx2-vnni", "avx2": "avx2", "generic": "none"}
    assert tile_matmul.kernel_name() == kernels[cpu_isa]
    library = cpu_library.load_c_library("tile_matmul.c", ("-mno-avx2",))
    assert library.ember_tile_matmul_supported() == 0
    fn = library.ember_tile_matmul
    fn.restype = ctypes.c_int
    args = [None, 0, ctypes.c_int64(1), ctypes.c_int64(32), None, 4, ctypes.c_int64(16), None, 0]
    assert fn(*args) == 1  # nothing computed: the caller keeps another kernel


def test_the_avx_vnni_path_gives_the_avx2_paths_outputs(cpu_isa, monkeypatch):
    """AVX-VNNI's vpdpbusd sums the same integers as vpmaddubsw + vpmaddwd (both take the
    activations of the AVX2 path), so the two builds' outputs are equal bit for bit."""
    if cpu_isa != "avx2-vnni":
        pytest.skip(f"compares the avx2-vnni build with the avx2 one ({cpu_isa} here)")
    outputs = {}
    for name, flags in (("avx2-vnni", ()), ("avx2", ("-mno-avxvnni",))):
        library = cpu_library.load_c_library("tile_matmul.c", flags)
        library.ember_tile_kernel.restype = ctypes.c_char_p
        assert library.ember_tile_kernel().decode() == name
        library.ember_tile_matmul.argtypes = tile_matmul._library().ember_tile_matmul.argtypes
        monkeypatch.setattr(tile_matmul, "_library", lambda library=library: library)
        for bits in (4, 8):
            codes, scale, offset, _ = random_group_weight(48, 576, bits, torch.float16, seed=bits)
            tiles = tile_matmul.pack_tiles(codes, scale, offset)
            for rows in (1, 3, 4, 7, 13, 33, 211):
                x = torch.randn(rows, 576, generator=torch.Generator().manual_seed(rows))
                outputs[name, bits, rows] = tile_matmul.tile_matmul(x, tiles, torch.float32)
    for (name, bits, rows), out in outputs.items():
        if name == "avx2":
            assert torch.equal(out, outputs["avx2-vnni", bits, rows]), (bits, rows)


@pytest.mark.usefixtures("needs_tiles")
def test_amx_tiles_take_16_rows_and_more_and_int8_ones_give_the_vnni_outputs(cpu_isa):
    """Where the CPU has AMX (the avx512 build on Sapphire Rapids and later), batches of 16 rows
    and more go through AMX tiles. tdpbusd (float32 activations) sums the VNNI path's integers:
    equal outputs bit for bit, whole and partial blocks of 16 rows, float32 and bfloat16
    outputs. tdpbf16ps (bfloat16 activations) multiplies the activations as they are by the
    weight's bfloat16 copy: within float32 rounding of that product (the reference test above),
    and within the 15-bit groups' step and the weights' rounding of the VNNI path. Fewer rows,
    or AMX off, take the vector path."""
    if not tile_matmul.use_amx(True):
        assert tile_matmul.path(64, torch.bfloat16, 4) != "amx-bf16"
        pytest.skip(f"the {cpu_isa} build has no AMX tiles on this CPU")
    try:
        assert tile_matmul.multiplies_in_bfloat16(16, torch.bfloat16, 4)
        assert tile_matmul.multiplies_in_bfloat16(64, torch.bfloat16, 8)
        assert not tile_matmul.multiplies_in_bfloat16(15, torch.bfloat16, 4)
        assert not tile_matmul.multiplies_in_bfloat16(64, torch.float32, 4)
        cases = [(8, torch.float32), (8, torch.bfloat16), (4, torch.float32), (4, torch.bfloat16)]
        for bits, dtype in cases:
            codes, scale, offset, dense = random_group_weight(
                48, 576, bits, torch.float16, seed=bits
            )
            tiles = tile_matmul.pack_tiles(codes, scale, offset)
            for rows in (16, 33, 211):
                x = torch.randn(rows, 576, generator=torch.Generator().manual_seed(rows))
                x = x.to(dtype)
                tile_matmul.use_amx(True)
                amx = [tile_matmul.tile_matmul(x, tiles, out) for out in (dtype, torch.float32)]
                tile_matmul.use_amx(False)
                tile_matmul.use_bf16_vectors(False)
                assert not tile_matmul.multiplies_in_bfloat16(rows, dtype, bits)
                vnni = [tile_matmul.tile_matmul(x, tiles, out) for out in (dtype, torch.float32)]
                tile_matmul.use_bf16_vectors(True)
                if dtype == torch.bfloat16:
                    # the VNNI path's groups of 32 activations are off by half a step at most
                    levels = tile_matmul.activation_levels()
                    step = x.float().abs().unflatten(-1, (-1, 32)).amax(-1) / levels
                    bound = (
                        0.5 * step.double() @ dense.double().abs().unflatten(-1, (-1, 32)).sum(-1).T
                    )
                    rounding = (dense.double() - dense.bfloat16().double()).abs()
                    bound += x.double().abs() @ rounding.T
                    assert bool(((amx[1].double() - vnni[1].double()).abs() <= bound + 1e-5).all())
                else:
                    for a, v in zip(amx, vnni, strict=True):
                        assert torch.equal(a, v), (bits, rows, dtype)
    finally:
        tile_matmul.use_amx(True)
        tile_matmul.use_bf16_vectors(True)


@pytest.mark.usefixtures("needs_tiles")
def test_bf16_vectors_take_16_rows_and_more_each_row_on_its_own(cpu_isa):
    """On CPUs with AVX-512 BF16 and no AMX tiles (Zen 4, Cooper Lake; or AMX off) bfloat16
    batches of 16 rows and more multiply by vdpbf16ps on the weights dequantised to bfloat16:
    the AMX-BF16 path's products (the reference test above holds them to the bfloat16 copy's
    product), within the 15-bit groups' step and the weights' rounding of the VNNI path. Each
    row's sum is one chain over K in order, so a row's output is the same bits in any batch."""
    tile_matmul.use_amx(False)
    try:
        if tile_matmul.path(16, torch.bfloat16, 4) != "avx512-bf16":
            pytest.skip(f"the {cpu_isa} build has no AVX-512 BF16 vectors on this CPU")
        assert tile_matmul.path(15, torch.bfloat16, 4) == "vector"
        assert tile_matmul.path(16, torch.float32, 4) == "vector"
        assert tile_matmul.path(16, torch.bfloat16, 8) == "avx512-bf16"
        for bits in (4, 8):
            codes, scale, offset, dense = random_group_weight(
                48, 576, bits, torch.float16, seed=bits
            )
            tiles = tile_matmul.pack_tiles(codes, scale, offset)
            x = torch.randn(211, 576, generator=torch.Generator().manual_seed(bits)).bfloat16()
            whole = tile_matmul.tile_matmul(x, tiles, torch.float32)
            # blocks of 16 rows and fewer (as even as they go), in spans: any batch, same rows
            for first, rows in ((0, 16), (5, 17), (100, 33), (0, 200), (190, 21)):
                part = tile_matmul.tile_matmul(x[first : first + rows], tiles, torch.float32)
                assert torch.equal(part, whole[first : first + rows]), (bits, first, rows)
            tile_matmul.use_bf16_vectors(False)
            assert tile_matmul.path(211, torch.bfloat16, bits) == "vector"
            vnni = tile_matmul.tile_matmul(x, tiles, torch.float32)
            tile_matmul.use_bf16_vectors(True)
            levels = tile_matmul.activation_levels()
            step = x.float().abs().unflatten(-1, (-1, 32)).amax(-1) / levels
            bound = 0.5 * step.double() @ dense.double().abs().unflatten(-1, (-1, 32)).sum(-1).T
            bound += x.double().abs() @ (dense.double() - dense.bfloat16().double()).abs().T
            assert bool(((whole.double() - vnni.double()).abs() <= bound + 1e-5).all()), bits
    finally:
        tile_matmul.use_amx(True)
        tile_matmul.use_bf16_vectors(True)


def _exact_dense(codes, scale, offset, bits) -> torch.Tensor:
    if bits == 4:
        q = torch.stack((codes & 15, codes >> 4), dim=-1).flatten(-2).double()
    else:
        q = codes.double()
    w = q.unflatten(-1, (-1, 32)) * scale.double()[..., None]
    if offset is not None:
        w = w + offset.double()[..., None]
    return w.flatten(-2).float()


@pytest.mark.usefixtures("needs_tiles")
@pytest.mark.parametrize("bits", [4, 8])
def test_dequantized_tiles_equal_the_dense_weight(bits):
    codes, scale, offset, dense = random_group_weight(48, 96, bits, torch.float16, seed=bits)
    tiles = tile_matmul.pack_tiles(codes, scale, offset)
    dequantized = tile_matmul.dequantize_tiles(tiles)
    assert dequantized.dtype == torch.bfloat16
    assert torch.equal(dequantized, dense.bfloat16())
    # float32: q * scale + offset rounded once (a fused multiply-add)
    exact = _exact_dense(codes, scale, offset, bits)
    assert torch.equal(tile_matmul.dequantize_tiles(tiles, torch.float32), exact)


@pytest.mark.usefixtures("needs_tiles")
def test_large_batches_never_read_the_dense_copy_of_a_tiled_layer(cpu_isa):
    """Prefill-sized batches multiply by the tiles themselves where a VNNI kernel beats the
    float32 dense matmul (`serves_prefill`), else by a dense weight made from the tiles
    (`dense_dtype`), so that the layer's dense copy (mapped from the weights cache) never
    becomes resident."""
    layer = ReplicatedLinear(
        128, 64, ctx=ModelContext(quant_config=get_quantization_config("gguf"))
    )
    qtype = gguf.GGMLQuantizationType.Q4_1
    weight = np.random.default_rng(1).standard_normal((64, 128)).astype(np.float32) * 0.05
    dense = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(weight, qtype), qtype))
    layer.weight.data.copy_(dense)
    process_weights_after_loading(layer)
    assert isinstance(layer.packed_weight, TiledWeight)
    vnni = tile_matmul.kernel_name() in ("avx512-vnni", "avx2-vnni")
    serves_prefill = vnni and dense_dtype() == torch.float32
    assert layer.packed_weight.serves_prefill == serves_prefill
    assert serves_prefill == (cpu_isa == "avx2-vnni" or (vnni and not native_bfloat16()))
    if layer.packed_weight.max_tokens == BF16_VECTORS_MAX_TOKENS:
        # AVX-512 BF16 without AMX: every batch through the tiles, bfloat16 in and out
        assert tile_matmul.path(4096, torch.bfloat16, 4) == "avx512-bf16"
        big = torch.randn(2100, 128)
        expected = big.bfloat16().double() @ dense.bfloat16().double().T
        layer.weight.data.fill_(float("nan"))
        out = layer(big)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, expected.float(), rtol=2**-8, atol=1e-6)
        return
    big = torch.randn(layer.packed_weight.max_tokens + 1, 128)
    if serves_prefill:  # float32 activations in 15-bit groups, as the kernel's reference
        quantized = quantized_activations(big, tile_matmul.activation_levels()).double()
        expected = (quantized @ dense.double().T).float()
        tolerance = 1e-5  # float32 sums of the groups' parts
    else:
        dtype = dense_dtype()  # bfloat16 on CPUs that compute in it, else float32
        expected = torch.nn.functional.linear(big.to(dtype), dense.to(dtype)).float()
        tolerance = 1e-6
    layer.weight.data.fill_(float("nan"))  # were it read, the result would be NaN
    torch.testing.assert_close(layer(big), expected, rtol=tolerance, atol=tolerance)
