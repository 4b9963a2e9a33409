"""C kernels for the CPU, built on first use: a source in `csrc/` is compiled once per machine
with the system C compiler (`$CC`, else `cc`/`gcc`, `-O3 -march=native`) into ember's cache
directory (`~/.cache/ember/kernels/`, keyed by the source, the flags and the CPU) and loaded
with ctypes. Where no compiler works, `load_c_library` returns None and the caller's torch
reference serves.

The kernels pick their instruction set at compile time (`#if defined(__AVX512F__)` ...,
`#elif defined(__AVX2__)` ...), so a build for less than the CPU has is a build with fewer
`-m` flags: `ISA_FLAGS` holds them for each ISA that `EMBER_CPU_ISA` names
(`ember.kernels.cpu_features`).

Each kernel module caches its loaded library per ISA (`isa_cached`), so that tests can run the
same kernels under every ISA the machine supports in one process.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ember.kernels import cpu_features
from ember.kernels.cpu_features import cpu_isa

logger = logging.getLogger(__name__)

_SOURCES = Path(__file__).with_name("csrc")
# -fassociative-math and friends let the compiler vectorise float sums (not -ffast-math: the
# online softmax starts from -inf).
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros"]
_FLAGS += ["-fno-trapping-math", "-shared", "-fPIC"]
# ISA (`cpu_features.ISAS`) -> the flags after -march=native that hold a build to it.
ISA_FLAGS = {
    "avx512": (),
    "avx2-vnni": ("-mno-avx512f", "-mavxvnni"),
    "avx2": ("-mno-avx512f",),
    "generic": ("-mno-avx",),
}


def isa_flags() -> tuple[str, ...]:
    """The compiler flags of `cpu_isa()`. The avx2 build on a CPU with AVX-VNNI also drops that
    (`-march=native` turns it on there; a compiler older than AVX-VNNI never does)."""
    isa = cpu_isa()
    if isa == "avx2" and "avx_vnni" in cpu_features.cpu_flags():
        return (*ISA_FLAGS[isa], "-mno-avxvnni")
    return ISA_FLAGS[isa]


_T = TypeVar("_T")
_ISA_CACHES: list[dict[str, object]] = []  # every `isa_cached` function's cache, for clearing
_LOADERS: list[Callable[[], object]] = []  # every `isa_cached` function, for `build_all`


def isa_cached(load: Callable[[], _T]) -> Callable[[], _T]:
    """`load()` (a kernel module's library loader) called once per ISA (`cpu_isa()`); callers
    in other threads wait for a load in flight (`build_in_background`)."""
    cache: dict[str, _T] = {}
    lock = threading.Lock()
    _ISA_CACHES.append(cache)

    @functools.wraps(load)
    def cached() -> _T:
        isa = cpu_isa()
        with lock:
            if isa not in cache:
                cache[isa] = load()
            return cache[isa]

    _LOADERS.append(cached)
    return cached


def build_in_background() -> list[threading.Thread]:
    """Start compiling (or loading from the cache) every kernel library of the modules
    imported so far, each in its own thread: the compiler runs beside the model's loading
    instead of after it, and the libraries' first users wait only for what is still in
    flight. On a fresh 2-core machine the six libraries took about 10 s one after another.
    A failure here is left for the first user to meet and report."""

    def build(load: Callable[[], object]) -> None:
        try:
            load()
        except Exception:  # e.g. a bad EMBER_CPU_ISA, raised again in use
            logger.debug("background build of %s failed", load.__qualname__, exc_info=True)

    threads = [
        threading.Thread(target=build, args=(load,), name="ember-kernel-build", daemon=True)
        for load in _LOADERS
    ]
    for thread in threads:
        thread.start()
    return threads


def clear_caches() -> None:
    """Forget every loaded library (tests that take the compiler away, then give it back)."""
    _load.cache_clear()
    for cache in _ISA_CACHES:
        cache.clear()


def kernel_cache_dir() -> str:
    """Where built kernels are kept: `$XDG_CACHE_HOME/ember/kernels` (~/.cache/ember/kernels)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "ember", "kernels")


def _cpu_key() -> str:
    """The CPU's identity (`-march=native` code runs only where it was built)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            lines = [line for line in cpuinfo if line.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def load_openmp_library(source: str | Path) -> ctypes.CDLL | None:
    """`source` (see `load_c_library`) built with OpenMP (`-fopenmp`: it links `libgomp.so.1`,
    which the loader finds already loaded with torch, so the kernel shares torch's threads and
    its `torch.set_num_threads`), or without where OpenMP cannot be built; None without a
    compiler."""
    return load_c_library(source, ("-fopenmp",)) or load_c_library(source)


def load_c_library(source: str | Path, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """`source` compiled (with the `EMBER_CPU_ISA` flags and `extra_flags` after the common
    ones) and loaded, built on first use and then taken from the cache; None when it cannot be
    built here. `source`: a file name in `csrc/`, or the path of a C file elsewhere (a runner's
    own step, which may include the headers of `csrc/`)."""
    return _load(source, (*_FLAGS, *isa_flags(), *extra_flags))


@functools.cache
def _load(source: str | Path, flags: tuple[str, ...]) -> ctypes.CDLL | None:
    source_path = _SOURCES / source  # an absolute path stays itself
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        logger.warning("no C compiler: %s is replaced by its torch reference", source_path.name)
        return None
    text = source_path.read_bytes()
    for header in sorted(_SOURCES.glob("*.h")):  # what the source may include
        text += header.read_bytes()
    key = hashlib.sha256(text + " ".join(flags).encode() + _cpu_key().encode()).hexdigest()
    path = os.path.join(kernel_cache_dir(), f"{source_path.stem}-{key[:16]}.so")
    if not os.path.exists(path):
        os.makedirs(kernel_cache_dir(), exist_ok=True)
        handle, staging = tempfile.mkstemp(suffix=".so", dir=kernel_cache_dir())
        os.close(handle)
        command = [compiler, *flags, f"-I{_SOURCES}", str(source_path), "-o", staging, "-lm"]
        try:
            subprocess.run(command, check=True, capture_output=True, timeout=120)
            os.replace(staging, path)
        except (OSError, subprocess.SubprocessError) as exc:
            os.unlink(staging)
            logger.warning("could not compile %s (%s): using the torch reference", source_path, exc)
            return None
    try:
        return ctypes.CDLL(path)
    except OSError as exc:  # e.g. an OpenMP runtime that lacks a symbol the build needs
        logger.warning("could not load %s (%s): using the torch reference", path, exc)
        return None
