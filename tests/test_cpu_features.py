"""`EMBER_CPU_ISA` and what the CPU can run (`kernels/cpu_features.py`): names resolved,
refused with a ValueError that says what the CPU runs, and the decisions taken from them (the
GGUF packing default, bfloat16 dense copies)."""

from __future__ import annotations

import pytest

from ember.enginecore.arg_utils import EngineArgs
from ember.kernels import cpu_features, cpu_library

ZEN3 = frozenset({"sse4_2", "avx", "avx2", "fma", "f16c"})
ZEN4 = ZEN3 | {"avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"}
SKYLAKE_X = ZEN3 | {"avx512f", "avx512bw"}  # AVX-512 without VNNI or bfloat16
ALDER_LAKE = ZEN3 | {"avx_vnni"}  # AVX-VNNI on 256-bit vectors, no AVX-512
SAPPHIRE_RAPIDS = ZEN4 | {"avx_vnni", "amx_bf16"}


@pytest.fixture
def cpu(monkeypatch):
    def use(flags: frozenset[str], isa: str | None = None) -> None:
        monkeypatch.setattr(cpu_features, "cpu_flags", lambda: flags)
        if isa is None:
            monkeypatch.delenv("EMBER_CPU_ISA", raising=False)
        else:
            monkeypatch.setenv("EMBER_CPU_ISA", isa)

    return use


def test_native_is_the_best_the_cpu_runs(cpu):
    cpu(ZEN4)
    assert cpu_features.supported_isas() == ("avx512", "avx2", "generic")
    assert cpu_features.cpu_isa() == "avx512" and cpu_features.native_bfloat16()
    cpu(ZEN3)
    assert cpu_features.supported_isas() == ("avx2", "generic")
    assert cpu_features.cpu_isa() == "avx2" and not cpu_features.native_bfloat16()
    assert cpu_features.packed_kernels()
    cpu(SKYLAKE_X)
    assert cpu_features.cpu_isa() == "avx512" and not cpu_features.native_bfloat16()
    cpu(ALDER_LAKE)
    assert cpu_features.supported_isas() == ("avx2-vnni", "avx2", "generic")
    assert cpu_features.cpu_isa() == "avx2-vnni" and not cpu_features.native_bfloat16()
    assert cpu_features.packed_kernels()
    cpu(frozenset({"sse4_2"}))
    assert cpu_features.cpu_isa() == "generic" and not cpu_features.packed_kernels()


def test_the_override_holds_a_cpu_to_less(cpu):
    cpu(ZEN4, "avx2")
    assert cpu_features.cpu_isa() == "avx2"
    assert not cpu_features.native_bfloat16()  # bfloat16 dense copies only under avx512
    cpu(ZEN4, "plain")  # the older name of generic
    assert cpu_features.cpu_isa() == "generic" and not cpu_features.packed_kernels()
    cpu(ZEN4, " AVX512 ")
    assert cpu_features.cpu_isa() == "avx512"
    cpu(SAPPHIRE_RAPIDS, "avx2-vnni")
    assert cpu_features.cpu_isa() == "avx2-vnni" and not cpu_features.native_bfloat16()


def test_each_isa_builds_with_its_flags(cpu):
    """The avx2 build leaves AVX-VNNI out where -march=native would bring it in; avx2-vnni
    asks for it."""
    cpu(SAPPHIRE_RAPIDS, "avx2")
    assert cpu_library.isa_flags() == ("-mno-avx512f", "-mno-avxvnni")
    cpu(ZEN3, "avx2")  # a compiler that predates AVX-VNNI takes these flags too
    assert cpu_library.isa_flags() == ("-mno-avx512f",)
    cpu(SAPPHIRE_RAPIDS, "avx2-vnni")
    assert cpu_library.isa_flags() == ("-mno-avx512f", "-mavxvnni")
    cpu(SAPPHIRE_RAPIDS, "avx512")
    assert cpu_library.isa_flags() == ()


def test_unknown_or_unsupported_isas_are_value_errors(cpu):
    cpu(ZEN4, "avx3")
    with pytest.raises(ValueError, match=r"EMBER_CPU_ISA must be one of .*got 'avx3'"):
        cpu_features.cpu_isa()
    cpu(ZEN3, "avx512")
    with pytest.raises(ValueError, match=r"this CPU lacks avx512 \(it runs avx2, generic\)"):
        cpu_features.cpu_isa()
    cpu(ZEN4, "avx2-vnni")
    with pytest.raises(ValueError, match=r"lacks avx2-vnni \(it runs avx512, avx2, generic\)"):
        cpu_features.cpu_isa()


def test_the_gguf_packing_default_follows_the_isa(cpu, default_gguf):
    cpu(ZEN3)  # an AVX2 CPU without native bfloat16 packs by default too
    assert EngineArgs(model=default_gguf).create_engine_config().model.quantization == "gguf"
    cpu(ZEN4, "generic")
    assert EngineArgs(model=default_gguf).create_engine_config().model.quantization is None
    cpu(ZEN4, "avx3")  # refused in the user's process, before any engine starts
    with pytest.raises(ValueError, match="EMBER_CPU_ISA"):
        EngineArgs(model=default_gguf).create_engine_config()
