"""The C matmul over GGUF-style groups (`kernels/block_matmul.py`) against a plain-torch
reference that quantizes the activations the same way (16-bit groups of 32, max|x| / 32767)."""

from __future__ import annotations

import pytest
import torch

from ember.kernels import block_matmul, cpu_library
from ember.kernels.cpu_features import supported_isas
from tests.helpers import quantized_activations, random_group_weight


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize(
    ("rows", "n", "k"),
    # One row; a tile of four and a partial one; an odd number of groups (a pair and a
    # single group); enough rows and columns for both threads.
    [(1, 40, 64), (5, 24, 96), (3, 7, 32), (33, 300, 576)],
)
def test_block_matmul_equals_the_quantized_reference(bits, scale_dtype, rows, n, k):
    codes, scale, offset, dense = random_group_weight(n, k, bits, scale_dtype, seed=rows + k)
    torch.manual_seed(rows)
    x = torch.randn(rows, k)
    out = block_matmul.block_matmul(x, codes, scale, offset, torch.float32)
    assert out is not None and out.shape == (rows, n) and out.dtype == torch.float32
    expected = quantized_activations(x) @ dense.T
    # Equal up to float32 summation order.
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    # Close to the exact product.
    torch.testing.assert_close(out, x @ dense.T, rtol=0.05, atol=0.05 * float(expected.std()))


# Builds for CPUs with less than AVX-512 (the AVX2 and plain-C paths), on this machine.
@pytest.mark.parametrize("flags", [("-mno-avx512f",), ("-mno-avx2", "-mno-avx512f")])
@pytest.mark.parametrize("bits", [4, 8])
def test_the_avx2_and_plain_c_paths_agree_with_the_reference(flags, bits, monkeypatch):
    library = block_matmul.with_signatures(cpu_library.load_c_library("block_matmul.c", flags))
    assert library is not None
    monkeypatch.setattr(block_matmul, "_library", lambda: library)
    codes, scale, offset, dense = random_group_weight(300, 96, bits, torch.float16, seed=bits)
    x = torch.randn(5, 96)
    out = block_matmul.block_matmul(x, codes, scale, offset, torch.float32)
    expected = quantized_activations(x) @ dense.T
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_the_avx2_override_builds_without_avx512(monkeypatch):
    """EMBER_CPU_ISA=avx2 (how an AVX2-only CPU is simulated here) drops AVX-512 from every
    build: the tiles take their AVX2 path, and block_matmul its own."""
    if "avx2" not in supported_isas():
        pytest.skip("this CPU has no AVX2")
    monkeypatch.setenv("EMBER_CPU_ISA", "avx2")
    cpu_library.clear_caches()
    try:
        tiles = cpu_library.load_c_library("tile_matmul.c")
        assert tiles is not None and tiles.ember_tile_activation_levels() == 16256
        library = block_matmul.with_signatures(cpu_library.load_c_library("block_matmul.c"))
        codes, scale, offset, dense = random_group_weight(40, 64, 4, torch.float16, seed=4)
        monkeypatch.setattr(block_matmul, "_library", lambda: library)
        x = torch.randn(3, 64)
        out = block_matmul.block_matmul(x, codes, scale, offset, torch.float32)
        expected = quantized_activations(x) @ dense.T
        torch.testing.assert_close(
            out, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max())
        )
        monkeypatch.setenv("EMBER_CPU_ISA", "avx3")
        with pytest.raises(ValueError, match=r"EMBER_CPU_ISA must be one of \[.*'avx2'.*\]"):
            cpu_library.load_c_library("block_matmul.c", ("-DUNCACHED",))
    finally:
        cpu_library.clear_caches()


def test_block_matmul_reads_and_writes_bfloat16():
    codes, scale, offset, dense = random_group_weight(64, 128, 4, torch.float16, seed=1)
    x = torch.randn(2, 128).bfloat16()
    out = block_matmul.block_matmul(x, codes, scale, offset, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    expected = quantized_activations(x) @ dense.T
    torch.testing.assert_close(out.float(), expected.bfloat16().float(), rtol=8e-3, atol=1e-3)


def test_zero_activations_and_unsupported_widths():
    codes, scale, offset, _ = random_group_weight(8, 64, 4, torch.float16, seed=2)
    out = block_matmul.block_matmul(torch.zeros(1, 64), codes, scale, offset, torch.float32)
    assert torch.equal(out, torch.zeros(1, 8))  # x = 0: zero steps, no NaN
    with pytest.raises(ValueError, match="x has 48 columns"):
        block_matmul.block_matmul(torch.zeros(1, 48), codes, scale, offset, torch.float32)
    narrow = torch.zeros(8, 24, dtype=torch.uint8)  # K = 48: not whole groups
    assert (
        block_matmul.block_matmul(torch.zeros(1, 48), narrow, scale, offset, torch.float32) is None
    )


def test_no_compiler_means_no_kernel(monkeypatch):
    monkeypatch.setattr(cpu_library.shutil, "which", lambda name: None)
    cpu_library.clear_caches()
    try:
        assert not block_matmul.available()
        codes, scale, offset, _ = random_group_weight(8, 64, 4, torch.float16, seed=3)
        assert (
            block_matmul.block_matmul(torch.ones(1, 64), codes, scale, offset, torch.float32)
            is None
        )
    finally:
        cpu_library.clear_caches()
