"""The KV cache's memory on a CPU: one anonymous mapping per layer, whose pages the worker
populates in bulk ahead of the blocks a step writes.

An anonymous mapping costs no memory until a page is first written, so resident memory follows
the blocks in use rather than the cache's budget (4 GiB by default). But the first write to
each 4 KiB page is a page fault, taken inside the step's kernels by every thread at once: W1 on
a 2-core Sapphire Rapids touched about 40,000 fresh pages a pass (the block pool hands out
never-used blocks before it evicts cached ones, as vLLM's does) and its prefill took 1.95 s
against 1.62 s with the pages already there. One `madvise(MADV_POPULATE_WRITE)` per mapping
and plane faults a range in the kernel in one call (165 MiB: about 45 ms on one thread).

Blocks are handed out in ascending order until the pool first runs dry, so `populate_through`
keeps a watermark: blocks below it have their pages, and a step that writes a block at or past
it populates up to that block and `POPULATE_AHEAD_BLOCKS` more (about 24 MiB of SmolLM2's
cache). Where the kernel lacks MADV_POPULATE_WRITE (Linux before 5.14) pages fault as before.
"""

from __future__ import annotations

import math
import mmap

import torch

# Linux's MADV_POPULATE_WRITE (5.14); Python names it from 3.12 on only where built against it.
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
POPULATE_AHEAD_BLOCKS = 64


class HostKVCache:
    """Each layer's cache [2, num_blocks, *block_shape] in its own private anonymous mapping
    (`tensors`), zero until written, and the watermark below which their pages are resident."""

    def __init__(self, shapes: list[tuple[int, ...]], dtype: torch.dtype):
        element_bytes = torch.empty(0, dtype=dtype).element_size()
        self.num_blocks = shapes[0][1] if shapes else 0
        self.tensors: list[torch.Tensor] = []
        self._mappings: list[tuple[mmap.mmap, int]] = []  # (mapping, bytes of one block)
        for shape in shapes:
            numel = math.prod(shape)
            mapping = mmap.mmap(
                -1, numel * element_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
            )
            tensor = torch.frombuffer(mapping, dtype=dtype, count=numel).view(shape)
            self.tensors.append(tensor)
            self._mappings.append((mapping, math.prod(shape[2:]) * element_bytes))
        self.populated = 0  # blocks [0, populated) are resident in every layer

    def populate_through(self, block: int) -> None:
        """Make block `block` resident in every layer (and POPULATE_AHEAD_BLOCKS after it)
        when it lies at or past the watermark."""
        if block < self.populated:
            return
        end = min(self.num_blocks, block + 1 + POPULATE_AHEAD_BLOCKS)
        try:
            for mapping, block_bytes in self._mappings:
                plane_bytes = self.num_blocks * block_bytes
                for plane in (0, 1):  # keys, then values
                    start = plane * plane_bytes + self.populated * block_bytes
                    start -= start % mmap.PAGESIZE
                    stop = plane * plane_bytes + end * block_bytes
                    mapping.madvise(MADV_POPULATE_WRITE, start, stop - start)
        except OSError:  # a kernel without MADV_POPULATE_WRITE: pages fault on first write
            end = self.num_blocks
        self.populated = end
