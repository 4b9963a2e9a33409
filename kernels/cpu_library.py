"""C kernels for the CPU, built on first use: a source in `csrc/` is compiled once per machine
with the system C compiler (`$CC`, else `cc`/`gcc`, `-O3 -march=native`) into ember's cache
directory (`~/.cache/ember/kernels/`, keyed by the source, the flags and the CPU) and loaded
with ctypes. Where no compiler works, `load_c_library` returns None and the caller's torch
reference serves."""

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
from pathlib import Path

logger = logging.getLogger(__name__)

_SOURCES = Path(__file__).with_name("csrc")
# -fassociative-math and friends let the compiler vectorise float sums (not -ffast-math: the
# online softmax starts from -inf).
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros"]
_FLAGS += ["-fno-trapping-math", "-shared", "-fPIC"]


def _cache_dir() -> str:
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


def load_openmp_library(source_name: str) -> ctypes.CDLL | None:
    """`csrc/<source_name>` built with OpenMP (`-fopenmp`: it links `libgomp.so.1`, which the
    loader finds already loaded with torch, so the kernel shares torch's threads and its
    `torch.set_num_threads`), or without where OpenMP cannot be built; None without a compiler."""
    return load_c_library(source_name, ("-fopenmp",)) or load_c_library(source_name)


@functools.cache
def load_c_library(source_name: str, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """`csrc/<source_name>` compiled (with `extra_flags` after the common ones) and loaded,
    built on first use and then taken from the cache; None when it cannot be built here."""
    flags = [*_FLAGS, *extra_flags]
    source_path = _SOURCES / source_name
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        logger.warning("no C compiler: %s is replaced by its torch reference", source_name)
        return None
    source = source_path.read_bytes()
    for header in sorted(_SOURCES.glob("*.h")):  # what the source may include
        source += header.read_bytes()
    key = hashlib.sha256(source + " ".join(flags).encode() + _cpu_key().encode()).hexdigest()
    path = os.path.join(_cache_dir(), f"{source_path.stem}-{key[:16]}.so")
    if not os.path.exists(path):
        os.makedirs(_cache_dir(), exist_ok=True)
        handle, staging = tempfile.mkstemp(suffix=".so", dir=_cache_dir())
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
