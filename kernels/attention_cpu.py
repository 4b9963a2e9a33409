"""Decode attention over a bfloat16 paged KV cache on CPU, in C (`csrc/paged_decode_attention.c`).

The torch reference in `attention.py` gathers every decoding request's blocks into a padded
batch, converts them to float32 and runs SDPA: about 50 MB of memory traffic per layer per step
for 32 requests of a few hundred tokens. The C kernel reads each cached key and value once, in
place (about 7 MB there), with float32 math.

The source is compiled once per machine with the system C compiler (`$CC`, else `cc`/`gcc`,
`-O3 -march=native`) into ember's cache directory and loaded with ctypes; where no compiler
works, `paged_decode_attention_cpu` returns None and the torch reference serves. It runs on
the calling thread: splitting the requests over two threads measured no faster here (W1 decode
step 114 vs 117 ms), the second core being busy with torch's own OpenMP threads.
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
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("csrc") / "paged_decode_attention.c"
# -fassociative-math and friends let the compiler vectorise the dot products' float sums (not
# -ffast-math: the online softmax starts from -inf).
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


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled kernel (built on first use, then reused from the cache), or None."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        logger.warning("no C compiler: CPU decode attention uses the torch reference")
        return None
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(_FLAGS).encode() + _cpu_key().encode()).hexdigest()
    path = os.path.join(_cache_dir(), f"paged_decode_attention-{key[:16]}.so")
    if not os.path.exists(path):
        os.makedirs(_cache_dir(), exist_ok=True)
        handle, staging = tempfile.mkstemp(suffix=".so", dir=_cache_dir())
        os.close(handle)
        command = [compiler, *_FLAGS, str(_SOURCE), "-o", staging, "-lm"]
        try:
            subprocess.run(command, check=True, capture_output=True, timeout=120)
            os.replace(staging, path)
        except (OSError, subprocess.SubprocessError) as exc:
            os.unlink(staging)
            logger.warning("could not compile %s (%s): using the torch reference", _SOURCE, exc)
            return None
    library = ctypes.CDLL(path)
    function = library.ember_paged_decode_attention
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    function.argtypes = [ptr, ptr, ptr, i64, ptr, i64, i64, i64, i64, i64, i64]
    function.argtypes += [ctypes.c_float, i64, ptr]
    function.restype = ctypes.c_int
    return library


def paged_decode_attention_cpu(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor | None:
    """Attention of `query` [B, Hq, D] (float32, one token per request) over the bfloat16
    `kv_cache` [2, num_blocks, block_size, Hkv, D] of each request's `block_table` row and
    `seq_lens` entry; None when the kernel cannot serve these inputs (the caller falls back)."""
    if (
        query.dtype != torch.float32
        or kv_cache.dtype != torch.bfloat16
        or not kv_cache.is_contiguous()
        or block_table.dtype != torch.int64
        or seq_lens.dtype != torch.int32
    ):
        return None
    library = _library()
    if library is None:
        return None
    query = query.contiguous()
    block_table = block_table.contiguous()
    seq_lens = seq_lens.contiguous()
    num_reqs, num_heads, head_dim = query.shape
    _, num_blocks, block_size, num_kv_heads, _ = kv_cache.shape
    out = torch.empty_like(query)

    status = library.ember_paged_decode_attention(
        query.data_ptr(),
        kv_cache.data_ptr(),
        block_table.data_ptr(),
        block_table.stride(0),
        seq_lens.data_ptr(),
        num_reqs,
        num_heads,
        num_kv_heads,
        head_dim,
        block_size,
        num_blocks,
        scale,
        sliding_window or 0,
        out.data_ptr(),
    )
    return out if status == 0 else None
