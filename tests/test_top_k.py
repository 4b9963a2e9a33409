"""The C top-k of `kernels/top_k.py` against torch.topk, under each ISA of this CPU."""

from __future__ import annotations

import pytest
import torch

from ember.kernels import top_k


def _as_sets(indices: torch.Tensor) -> list[set[int]]:
    return [set(row) for row in indices.tolist()]


@pytest.mark.usefixtures("cpu_isa")
@pytest.mark.parametrize("shape", [(32, 49152), (3, 1000), (1, 33), (5, 64)])
@pytest.mark.parametrize("k", [1, 32, 64])
def test_top_k_indices_are_torch_topk_set(shape, k):
    assert top_k._library() is not None  # the C kernel serves here
    torch.manual_seed(0)
    x = torch.randn(shape)
    k = min(k, shape[1])
    found = top_k.top_k_indices(x, k)
    assert found.shape == (shape[0], k) and found.dtype == torch.int64
    assert _as_sets(found) == _as_sets(top_k.top_k_indices_torch(x, k))


@pytest.mark.usefixtures("cpu_isa")
def test_top_k_finds_values_placed_late_in_rising_and_falling_rows():
    # Rows whose best values come last (the floor moves at every block) or first (it never
    # moves), and the last values beyond the last whole block of 32.
    cols = 1000
    rising = torch.arange(cols, dtype=torch.float32).repeat(2, 1)
    rising[1] = rising[1].flip(0)
    rising[0, cols - 3] = 5000.0
    assert _as_sets(top_k.top_k_indices(rising, 8)) == _as_sets(rising.topk(8).indices)


def test_top_k_takes_torch_where_the_kernel_cannot_serve():
    x = torch.randn(4, 300)
    for tensor, k in ((x, 65), (x.T, 3), (x.double(), 3)):  # k over MAX_K, strided, float64
        assert _as_sets(top_k.top_k_indices(tensor, k)) == _as_sets(tensor.topk(k).indices)
