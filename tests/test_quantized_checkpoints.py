"""Tests of tests/quantized_checkpoints.py: the GPTQ / AWQ writers and the reference dequantizer."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import write_random_llama
from tests.quantized_checkpoints import (
    AWQ_ORDER,
    QUANTIZED_LINEARS,
    dequantize_checkpoint,
    pack_int32,
    read_tensors,
    unpack_int32,
    write_awq_checkpoint,
    write_dequantized_checkpoint,
    write_gptq_checkpoint,
)

NUM_LAYERS = 2


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory) -> str:
    """A random Llama whose linears split into groups of 32, 64 and 128."""
    path = tmp_path_factory.mktemp("dense")
    return write_random_llama(path, hidden_size=128, intermediate_size=256)


def _int32(word: int) -> int:
    """The int32 value of a 32-bit word written in hex."""
    return word - 2**32 if word >= 2**31 else word


def _write_dense(path, tensors: dict[str, torch.Tensor]) -> str:
    """A hand-built dense directory: only the tensors given, and a minimal config."""
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, f)
    return str(path)


def _known_codes_weight(out_features: int, in_features: int, bits: int, zero_base: int, scale):
    """(weight, codes, zeros) of a one-group weight that min/max quantization maps back to
    exactly `codes` [n, k] = (k + n) % 2**bits with zero point zero_base + n per row."""
    levels = 2**bits
    codes = (torch.arange(in_features)[None, :] + torch.arange(out_features)[:, None]) % levels
    zeros = zero_base + torch.arange(out_features)
    weight = scale * (codes - zeros[:, None]).float()
    return weight, codes, zeros


def _assert_round_trip(dense_dir: str, quant_dir: str, method: str, group_size: int) -> None:
    """Quantized linears dequantize to within half a step of the dense weight; every other
    tensor is stored unchanged."""
    original = read_tensors(dense_dir)
    packed = read_tensors(quant_dir)
    dense = dequantize_checkpoint(quant_dir)
    assert set(dense) == set(original)
    for name, tensor in original.items():
        module = name.rpartition(".")[0]
        if f"{module}.qweight" not in packed:
            assert packed[name].dtype == tensor.dtype and torch.equal(packed[name], tensor), name
            assert torch.equal(dense[name], tensor), name
            continue
        assert name not in packed
        in_features = tensor.shape[1]
        if method == "gptq":
            g_idx = packed[f"{module}.g_idx"].long()
        else:
            size = in_features if group_size == -1 else group_size
            g_idx = torch.arange(in_features) // size
        step = packed[f"{module}.scales"].float()[g_idx].T  # [N, K]
        error = (dense[name] - tensor).abs()
        assert dense[name].dtype == torch.float32 and dense[name].shape == tensor.shape
        assert bool((error <= step * (0.5 + 1e-5)).all()), f"{name}: {(error / step).max():.4f}"
        assert error.max() > 0  # really quantized


def _quantized_modules() -> list[str]:
    """The names of the linears the writers quantize in the random Llama."""
    llama = [proj for proj in QUANTIZED_LINEARS if proj.endswith("_proj")]  # not Mixtral's
    blocks = {
        proj: "mlp" if proj in ("gate_proj", "up_proj", "down_proj") else "self_attn"
        for proj in llama
    }
    return [
        f"model.layers.{layer}.{blocks[proj]}.{proj}"
        for layer in range(NUM_LAYERS)
        for proj in llama
    ]


# ---- round trips ------------------------------------------------------------------------------

GPTQ_CASES = [
    # bits, group_size, sym, desc_act, checkpoint_format
    (4, 128, True, False, "gptq"),
    (4, 32, False, False, "gptq"),
    (4, -1, True, False, "gptq_v2"),
    (4, 64, False, True, "gptq_v2"),
    (4, 32, True, True, "gptq"),
    (8, 128, True, False, "gptq"),
    (8, 32, False, True, "gptq"),
    (8, -1, False, False, "gptq_v2"),
]


@pytest.mark.parametrize("bits,group_size,sym,desc_act,fmt", GPTQ_CASES)
def test_gptq_round_trip_is_within_half_a_step(
    dense_dir, tmp_path, bits, group_size, sym, desc_act, fmt
):
    quant_dir = write_gptq_checkpoint(
        dense_dir,
        str(tmp_path / "gptq"),
        bits=bits,
        group_size=group_size,
        sym=sym,
        desc_act=desc_act,
        checkpoint_format=fmt,
    )
    _assert_round_trip(dense_dir, quant_dir, "gptq", group_size)
    packed = read_tensors(quant_dir)
    pack = 32 // bits
    for module in _quantized_modules():
        out_features, in_features = read_tensors(dense_dir)[f"{module}.weight"].shape
        groups = 1 if group_size == -1 else in_features // group_size
        assert packed[f"{module}.qweight"].shape == (in_features // pack, out_features)
        assert packed[f"{module}.qzeros"].shape == (groups, out_features // pack)
        assert packed[f"{module}.scales"].shape == (groups, out_features)
        assert packed[f"{module}.g_idx"].shape == (in_features,)
        assert packed[f"{module}.qweight"].dtype == torch.int32
        assert packed[f"{module}.qzeros"].dtype == torch.int32
        assert packed[f"{module}.scales"].dtype == torch.float16
        assert packed[f"{module}.g_idx"].dtype == torch.int32


@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_awq_round_trip_is_within_half_a_step(dense_dir, tmp_path, group_size):
    quant_dir = write_awq_checkpoint(dense_dir, str(tmp_path / "awq"), group_size=group_size)
    _assert_round_trip(dense_dir, quant_dir, "awq", group_size)
    packed = read_tensors(quant_dir)
    for module in _quantized_modules():
        out_features, in_features = read_tensors(dense_dir)[f"{module}.weight"].shape
        groups = 1 if group_size == -1 else in_features // group_size
        assert packed[f"{module}.qweight"].shape == (in_features, out_features // 8)
        assert packed[f"{module}.qzeros"].shape == (groups, out_features // 8)
        assert packed[f"{module}.scales"].dtype == torch.float16
        assert f"{module}.g_idx" not in packed


# ---- layouts, word by word --------------------------------------------------------------------

Q_PROJ = "model.layers.0.self_attn.q_proj"


def test_gptq_4bit_packs_input_rows_lowest_bits_first(tmp_path):
    weight, codes, zeros = _known_codes_weight(8, 32, bits=4, zero_base=3, scale=0.5)
    dense_dir = _write_dense(tmp_path / "dense", {f"{Q_PROJ}.weight": weight})
    v2 = read_tensors(
        write_gptq_checkpoint(
            dense_dir, str(tmp_path / "v2"), group_size=32, sym=False, checkpoint_format="gptq_v2"
        )
    )
    qweight = v2[f"{Q_PROJ}.qweight"]
    assert qweight.shape == (4, 8)
    # word (i, n) holds q[n, 8i .. 8i+7], the first in the lowest nibble
    assert qweight[0, 0].item() == 0x76543210
    assert qweight[1, 0].item() == _int32(0xFEDCBA98)
    assert qweight[0, 1].item() == _int32(0x87654321)
    assert torch.equal(unpack_int32(qweight, 4, dim=0), codes.T)
    # zero points are packed along the output dim: column n in nibble n; v2 stores z = n + 3
    assert v2[f"{Q_PROJ}.qzeros"].tolist() == [[_int32(0xA9876543)]]
    assert torch.equal(unpack_int32(v2[f"{Q_PROJ}.qzeros"], 4, dim=1), zeros[None])
    assert v2[f"{Q_PROJ}.scales"].tolist() == [[0.5] * 8]
    assert v2[f"{Q_PROJ}.g_idx"].tolist() == [0] * 32
    v1 = read_tensors(
        write_gptq_checkpoint(dense_dir, str(tmp_path / "v1"), group_size=32, sym=False)
    )
    assert torch.equal(v1[f"{Q_PROJ}.qweight"], qweight)
    assert v1[f"{Q_PROJ}.qzeros"].tolist() == [[_int32(0x98765432)]]  # v1 stores z - 1
    for quant_dir in (tmp_path / "v1", tmp_path / "v2"):
        assert torch.equal(dequantize_checkpoint(str(quant_dir))[f"{Q_PROJ}.weight"], weight)


def test_gptq_8bit_packs_four_input_rows_per_word(tmp_path):
    weight, codes, zeros = _known_codes_weight(4, 256, bits=8, zero_base=100, scale=2**-6)
    dense_dir = _write_dense(tmp_path / "dense", {f"{Q_PROJ}.weight": weight})
    v1 = read_tensors(
        write_gptq_checkpoint(dense_dir, str(tmp_path / "v1"), bits=8, group_size=-1, sym=False)
    )
    qweight = v1[f"{Q_PROJ}.qweight"]
    assert qweight.shape == (64, 4)
    assert qweight[0, 0].item() == 0x03020100
    assert qweight[0, 1].item() == 0x04030201
    assert qweight[63, 0].item() == _int32(0xFFFEFDFC)
    assert torch.equal(unpack_int32(qweight, 8, dim=0), codes.T)
    assert v1[f"{Q_PROJ}.qzeros"].tolist() == [[0x66656463]]  # z - 1 = 99, 100, 101, 102
    v2 = read_tensors(
        write_gptq_checkpoint(
            dense_dir,
            str(tmp_path / "v2"),
            bits=8,
            group_size=-1,
            sym=False,
            checkpoint_format="gptq_v2",
        )
    )
    assert v2[f"{Q_PROJ}.qzeros"].tolist() == [[0x67666564]]
    assert torch.equal(unpack_int32(v2[f"{Q_PROJ}.qzeros"], 8, dim=1), zeros[None])
    assert torch.equal(dequantize_checkpoint(str(tmp_path / "v1"))[f"{Q_PROJ}.weight"], weight)


def test_awq_interleaves_output_columns_in_awq_order(tmp_path):
    weight, codes, zeros = _known_codes_weight(8, 32, bits=4, zero_base=3, scale=0.5)
    dense_dir = _write_dense(tmp_path / "dense", {f"{Q_PROJ}.weight": weight})
    packed = read_tensors(write_awq_checkpoint(dense_dir, str(tmp_path / "awq"), group_size=32))
    qweight = packed[f"{Q_PROJ}.qweight"]
    assert qweight.shape == (32, 1)
    # nibble i of word (k, 0) holds column AWQ_ORDER[i] = 0, 2, 4, 6, 1, 3, 5, 7
    assert AWQ_ORDER == (0, 2, 4, 6, 1, 3, 5, 7)
    assert qweight[0, 0].item() == 0x75316420
    assert qweight[1, 0].item() == _int32(0x86427531)
    assert packed[f"{Q_PROJ}.qzeros"].tolist() == [[_int32(0xA8649753)]]  # z stored as is
    assert torch.equal(unpack_int32(qweight, 4, dim=1), codes.T[:, list(AWQ_ORDER)])
    assert torch.equal(
        unpack_int32(packed[f"{Q_PROJ}.qzeros"], 4, dim=1), zeros[None, list(AWQ_ORDER)]
    )
    assert torch.equal(dequantize_checkpoint(str(tmp_path / "awq"))[f"{Q_PROJ}.weight"], weight)


@pytest.mark.parametrize(
    "bits,fmt,word",
    [
        (4, "gptq", 0x77777777),
        (4, "gptq_v2", 0x88888888),
        (8, "gptq", 0x7F7F7F7F),
        (8, "gptq_v2", 0x80808080),
    ],
)
def test_gptq_symmetric_zero_point_is_half_the_code_range(dense_dir, tmp_path, bits, fmt, word):
    packed = read_tensors(
        write_gptq_checkpoint(dense_dir, str(tmp_path / "q"), bits=bits, checkpoint_format=fmt)
    )
    for module in _quantized_modules():
        assert bool((packed[f"{module}.qzeros"] == _int32(word)).all()), module


def test_gptq_v1_and_v2_differ_only_by_one_in_each_stored_zero(dense_dir, tmp_path):
    kwargs = {"bits": 4, "group_size": 32, "sym": False, "desc_act": True}
    v1 = read_tensors(write_gptq_checkpoint(dense_dir, str(tmp_path / "v1"), **kwargs))
    v2 = read_tensors(
        write_gptq_checkpoint(
            dense_dir, str(tmp_path / "v2"), checkpoint_format="gptq_v2", **kwargs
        )
    )
    for module in _quantized_modules():
        for suffix in (".qweight", ".scales", ".g_idx"):
            assert torch.equal(v1[module + suffix], v2[module + suffix])
        zeros_v1 = unpack_int32(v1[f"{module}.qzeros"], 4, dim=1)
        zeros_v2 = unpack_int32(v2[f"{module}.qzeros"], 4, dim=1)
        assert torch.equal(zeros_v1 + 1, zeros_v2)


def test_gptq_v1_gives_a_group_without_negatives_a_zero_point_it_can_store(tmp_path):
    generator = torch.Generator().manual_seed(0)
    weight = torch.rand(8, 32, generator=generator) * 0.9 + 0.1  # min/max zero point would be 0
    dense_dir = _write_dense(tmp_path / "dense", {f"{Q_PROJ}.weight": weight})
    quant_dir = write_gptq_checkpoint(dense_dir, str(tmp_path / "v1"), group_size=32, sym=False)
    packed = read_tensors(quant_dir)
    assert packed[f"{Q_PROJ}.qzeros"].tolist() == [[0]]  # z - 1 = 0: z = 1, not 0 - 1
    _assert_round_trip(dense_dir, quant_dir, "gptq", 32)


def test_desc_act_g_idx_follows_a_seeded_permutation(dense_dir, tmp_path):
    def g_idx(name, **kwargs):
        quant_dir = write_gptq_checkpoint(dense_dir, str(tmp_path / name), group_size=32, **kwargs)
        return read_tensors(quant_dir)[f"{Q_PROJ}.g_idx"]

    ordered = g_idx("ordered")
    assert torch.equal(ordered, (torch.arange(128) // 32).int())
    shuffled = g_idx("seed0", desc_act=True, seed=0)
    assert torch.equal(shuffled, g_idx("seed0-again", desc_act=True, seed=0))
    assert not torch.equal(shuffled, g_idx("seed1", desc_act=True, seed=1))
    assert not torch.equal(shuffled, ordered)
    assert torch.bincount(shuffled.long()).tolist() == [32] * 4  # every group holds 32 columns


def test_bias_of_a_quantized_linear_is_stored_in_float16(tmp_path):
    weight, _, _ = _known_codes_weight(8, 32, bits=4, zero_base=3, scale=0.5)
    bias = torch.randn(8, generator=torch.Generator().manual_seed(0))
    tensors = {f"{Q_PROJ}.weight": weight, f"{Q_PROJ}.bias": bias}
    dense_dir = _write_dense(tmp_path / "dense", tensors)
    for quant_dir in (
        write_gptq_checkpoint(dense_dir, str(tmp_path / "gptq"), group_size=32),
        write_awq_checkpoint(dense_dir, str(tmp_path / "awq"), group_size=32),
    ):
        stored = read_tensors(quant_dir)[f"{Q_PROJ}.bias"]
        assert stored.dtype == torch.float16 and torch.equal(stored, bias.half())
        assert torch.equal(dequantize_checkpoint(quant_dir)[f"{Q_PROJ}.bias"], bias.half())


# ---- configs and the dense oracle -------------------------------------------------------------


def test_configs_carry_the_tools_quantization_config(dense_dir, tmp_path):
    gptq_dir = write_gptq_checkpoint(
        dense_dir,
        str(tmp_path / "gptq"),
        bits=8,
        group_size=64,
        sym=False,
        desc_act=True,
        checkpoint_format="gptq_v2",
    )
    with open(os.path.join(gptq_dir, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(gptq_dir, "quantize_config.json")) as f:
        assert json.load(f) == config["quantization_config"]
    expected = {
        "quant_method": "gptq",
        "bits": 8,
        "group_size": 64,
        "desc_act": True,
        "sym": False,
        "lm_head": False,
        "checkpoint_format": "gptq_v2",
        "format": "gptq_v2",
        "pack_dtype": "int32",
    }
    assert expected.items() <= config["quantization_config"].items()
    assert config["quantization_config"]["meta"]["static_groups"] is False
    assert os.path.exists(os.path.join(gptq_dir, "generation_config.json"))

    awq_dir = write_awq_checkpoint(dense_dir, str(tmp_path / "awq"), group_size=64)
    with open(os.path.join(awq_dir, "config.json")) as f:
        assert json.load(f)["quantization_config"] == {
            "quant_method": "awq",
            "bits": 4,
            "group_size": 64,
            "zero_point": True,
            "version": "gemm",
            "modules_to_not_convert": None,
        }


def test_dequantized_checkpoint_loads_in_transformers(dense_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    quant_dir = write_gptq_checkpoint(
        dense_dir, str(tmp_path / "gptq"), group_size=32, sym=False, desc_act=True
    )
    out_dir = write_dequantized_checkpoint(quant_dir, str(tmp_path / "dense-again"))
    with open(os.path.join(out_dir, "config.json")) as f:
        assert "quantization_config" not in json.load(f)
    assert not os.path.exists(os.path.join(out_dir, "quantize_config.json"))
    assert os.path.exists(os.path.join(out_dir, "generation_config.json"))
    oracle = dequantize_checkpoint(quant_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    state = model.state_dict()
    for name, tensor in oracle.items():
        assert torch.equal(state[name], tensor.float()), name
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 42]])).logits
    assert logits.shape == (1, 4, 512) and bool(logits.isfinite().all())


# ---- packing primitives and argument errors ---------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_int32_round_trips_along_either_dim(bits):
    generator = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (16, 32), generator=generator)
    for dim in (0, 1):
        assert torch.equal(unpack_int32(pack_int32(codes, bits, dim), bits, dim), codes)
    with pytest.raises(ValueError, match="codes must be in"):
        pack_int32(codes + 2**bits, bits, 0)


def test_writers_reject_what_the_formats_cannot_hold(dense_dir, tmp_path):
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        write_gptq_checkpoint(dense_dir, str(tmp_path / "a"), bits=3)
    with pytest.raises(ValueError, match="checkpoint_format"):
        write_gptq_checkpoint(dense_dir, str(tmp_path / "b"), checkpoint_format="marlin")
    with pytest.raises(ValueError, match="not a multiple of 96"):
        write_gptq_checkpoint(dense_dir, str(tmp_path / "c"), group_size=96)
