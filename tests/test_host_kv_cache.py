"""The CPU KV cache's memory (`ember.workers.host_kv_cache`): zero until written, pages made
resident in bulk ahead of the blocks a step writes (no page faults when the step writes them),
contents kept across that, and a kernel without MADV_POPULATE_WRITE left to fault as before."""

from __future__ import annotations

import mmap
import resource

import pytest
import torch

from ember.workers import host_kv_cache
from ember.workers.host_kv_cache import POPULATE_AHEAD_BLOCKS, HostKVCache

# Two layers of different shapes: [2, num_blocks, block_size, Hkv, D]; a block of the first is
# 6 KiB a plane, of the second 8 KiB.
SHAPES = [(2, 512, 16, 3, 64), (2, 512, 16, 2, 128)]


def _kernel_populates() -> bool:
    mapping = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        mapping.madvise(host_kv_cache.MADV_POPULATE_WRITE, 0, mmap.PAGESIZE)
        return True
    except OSError:
        return False
    finally:
        mapping.close()


def _faults_writing(cache: HostKVCache, first: int, last: int) -> int:
    """Page faults taken writing blocks [first, last) of every layer, keys and values."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for tensor in cache.tensors:
        tensor[:, first:last].fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(not _kernel_populates(), reason="this kernel has no MADV_POPULATE_WRITE")
def test_blocks_below_the_watermark_are_written_without_page_faults():
    cache = HostKVCache(SHAPES, torch.bfloat16)
    assert [tuple(t.shape) for t in cache.tensors] == SHAPES
    assert all(t.dtype == torch.bfloat16 and not t.any() for t in cache.tensors)
    cache.tensors[0][0, 5] = 3.0  # a block written before its pages were populated
    cache.populate_through(10)
    assert cache.populated == 11 + POPULATE_AHEAD_BLOCKS
    assert bool(cache.tensors[0][0, 5].eq(3.0).all())  # kept
    assert not cache.tensors[0][:, 6:].any() and not cache.tensors[1].any()
    # 70 blocks of both layers' planes are some 240 pages: all resident already.
    assert _faults_writing(cache, 0, cache.populated) <= 4
    # Past the watermark every page is a fault.
    assert _faults_writing(cache, 300, 400) >= 100 * (6 + 8) * 1024 * 2 // mmap.PAGESIZE - 4
    cache.populate_through(3)  # below the watermark: nothing to do
    assert cache.populated == 11 + POPULATE_AHEAD_BLOCKS
    cache.populate_through(450)
    assert cache.populated == 512  # the ahead part ends with the cache
    assert _faults_writing(cache, 100, 300) <= 4


def test_a_kernel_without_populate_leaves_pages_to_fault(monkeypatch):
    monkeypatch.setattr(host_kv_cache, "MADV_POPULATE_WRITE", 0x7FFF)  # no such advice: EINVAL
    cache = HostKVCache(SHAPES, torch.float8_e4m3fn)
    cache.populate_through(0)
    assert cache.populated == 512  # not tried again
    cache.tensors[1][1, 511] = 2.0
    assert float(cache.tensors[1][1, 511].float().min()) == 2.0
