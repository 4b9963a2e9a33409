"""The C group search (`kernels/group_search.py`) against the torch reference of
`workers/layers/packed_int4.py`: the same groups, codes and scales bit for bit on weights gguf
quantised in each format, and the same refusals of weights off every grid."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from ember.kernels import group_search
from ember.workers.layers import packed_int4
from ember.workers.layers.packed_int4 import QuantizedWeight

pytestmark = pytest.mark.usefixtures("cpu_isa")


def _gguf_weight(kind: str, rows: int = 48, cols: int = 128, seed: int = 0) -> torch.Tensor:
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    weight = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32) * 0.05
    weight[3, :32] = 0.0  # an all-zero group
    weight[5, 32:64] = 0.7  # a constant group
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(weight, qtype), qtype))


def _assert_same(c_result, torch_result):
    if torch_result is None:
        assert c_result is None
        return
    for c_part, torch_part in zip(c_result, torch_result):
        assert torch.equal(c_part, torch_part)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0", "F32"])
def test_c_search_equals_the_torch_reference(kind):
    weight = _gguf_weight(kind) if kind != "F32" else torch.randn(48, 128)
    assert group_search.available()  # the library builds here
    c4, t4 = packed_int4.find_int4_groups(weight), packed_int4.find_int4_groups_torch(weight)
    _assert_same(c4 and (c4.q, c4.scale, c4.zero), t4 and (t4.q, t4.scale, t4.zero))
    _assert_same(packed_int4.find_int8_groups(weight), packed_int4.find_int8_groups_torch(weight))
    # each kind is found as what it is: Q4_x as 4-bit groups, Q8_0 as 8-bit ones
    assert (c4 is not None) == kind.startswith("Q4")
    assert (packed_int4.find_int8_groups(weight) is not None) == (kind == "Q8_0")


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_packed_tables_equal_those_of_the_torch_reference(kind, monkeypatch):
    weight = _gguf_weight(kind, seed=1)
    packed = QuantizedWeight.from_weight(weight)
    monkeypatch.setattr(group_search, "_library", lambda: None)  # the torch path
    reference = QuantizedWeight.from_weight(weight)
    assert torch.equal(packed.codes, reference.codes)
    assert packed.scale.dtype == reference.scale.dtype == torch.float16
    assert torch.equal(packed.scale, reference.scale)
    if reference.offset is None:
        assert packed.offset is None
    else:
        assert torch.equal(packed.offset, reference.offset)
    torch.testing.assert_close(packed.rows(torch.arange(weight.shape[0])), weight)


def test_one_value_off_the_grid_refuses_the_weight():
    weight = _gguf_weight("Q4_1")
    weight[40, 77] += 1e-3
    assert packed_int4.find_int4_groups(weight) is None
    assert packed_int4.find_int4_groups_torch(weight) is None
    assert group_search.find_groups(torch.zeros(2, 48), "q8_0") is None  # K not whole groups
