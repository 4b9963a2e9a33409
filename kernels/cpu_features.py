"""What the CPU can run, and which of it ember uses: the instruction set (ISA) its C kernels are
built for, and whether it multiplies bfloat16 in hardware. Standard library only, so that the
engine's argument resolution (`arg_utils`) reads it without importing torch.

`EMBER_CPU_ISA` picks the ISA (inherited by the engine's worker processes):

    native     (default) the best this CPU has: avx512, else avx2-vnni, else avx2, else
               generic
    avx512     a CPU with AVX-512F (and VNNI, bfloat16 where it has them)
    avx2-vnni  AVX2 + FMA + F16C with AVX-VNNI (vpdpbusd on 256-bit vectors), no AVX-512:
               Intel client chips from Alder Lake on, E-core Xeons (Sierra Forest)
    avx2       AVX2 + FMA + F16C, no AVX-512 and no AVX-VNNI: AMD Zen 2/3, older Intel
               client chips. On an AVX-512 machine these two run and test those CPUs' paths;
               pair them with `ATEN_CPU_CAPABILITY=avx2` (and `ONEDNN_MAX_CPU_ISA=AVX2`,
               `MKL_ENABLE_INSTRUCTIONS=AVX2`) to hold torch to the same.
    generic  no AVX at all: the kernels' plain-C paths (`plain` is the older name;
             `ATEN_CPU_CAPABILITY=default` for torch)
"""

from __future__ import annotations

import functools
import os

ISAS = ("avx512", "avx2-vnni", "avx2", "generic")  # best first
# What each ISA needs of the CPU (its /proc/cpuinfo flags); generic needs nothing.
_ISA_NEEDS = {
    "avx512": ("avx512f", "avx2", "fma", "f16c"),
    "avx2-vnni": ("avx2", "fma", "f16c", "avx_vnni"),
    "avx2": ("avx2", "fma", "f16c"),
}
_ALIASES = {"plain": "generic"}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            line = next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def supported_isas() -> tuple[str, ...]:
    """The ISAs this CPU runs, best first; always ends with generic."""
    return _isas_with(cpu_flags())


@functools.cache
def _isas_with(flags: frozenset[str]) -> tuple[str, ...]:
    """The ISAs a CPU with `flags` runs; cached, since every kernel call asks for the ISA
    (`cpu_isa()` 2.2 -> 0.7 us a call)."""
    return tuple(isa for isa in ISAS if all(flag in flags for flag in _ISA_NEEDS.get(isa, ())))


def cpu_isa() -> str:
    """`EMBER_CPU_ISA` resolved to one of `ISAS` (see the module's docstring); a ValueError for
    an unknown name or an ISA this CPU does not run."""
    name = os.environ.get("EMBER_CPU_ISA", "").strip().lower() or "native"
    supported = supported_isas()
    if name == "native":
        return supported[0]
    isa = _ALIASES.get(name, name)
    if isa not in ISAS:
        choices = sorted([*ISAS, *_ALIASES, "native"])
        raise ValueError(f"EMBER_CPU_ISA must be one of {choices}, got {name!r}")
    if isa not in supported:
        raise ValueError(
            f"EMBER_CPU_ISA={name!r}: this CPU lacks {isa} (it runs {', '.join(supported)})"
        )
    return isa


def native_bfloat16() -> bool:
    """Whether ember computes in bfloat16 in hardware here: the avx512 ISA on a CPU with
    AVX-512 BF16 or AMX. Elsewhere (AVX2 CPUs, or the avx2 override) torch's bfloat16 matmul
    converts in software and measured 3.5x slower than float32 (SmolLM2's layers, 256 rows)."""
    flags = cpu_flags()
    return cpu_isa() == "avx512" and ("avx512_bf16" in flags or "amx_bf16" in flags)


def packed_kernels() -> bool:
    """Whether the packed 4- and 8-bit tile kernels run here (AVX-512 VNNI or AVX2)."""
    return cpu_isa() != "generic"
