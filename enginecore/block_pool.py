"""The pool of physical KV-cache blocks: ref counts, the LRU free queue, and the prefix-cache map
from block hashes to blocks. Used by `ember.enginecore.kv_cache_manager.KVCacheManager`.

    free queue (LRU head first):  head <-> [5] <-> [2] <-> [9] <-> tail
    get_new_blocks(2) pops 5 and 2 (evicting their hashes); touch([9]) unlinks 9 in O(1).

A block with ref_cnt 0 sits in the free queue; if it still has a hash it is a cached block that
a prefix hit may take back (`touch`) until an allocation evicts it from the queue's head.

A freed block with no hash holds nothing a prefix hit could take, so it joins the queue's head
rather than its tail, and `reset_prefix_cache` moves every block once handed out before those
never handed out: the next allocations reuse blocks whose memory is already resident (a CPU's
cache pages are faulted in on first write, `ember.workers.host_kv_cache`) and leave cached
blocks' eviction order as it was.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple


class BlockHash(NamedTuple):
    """The key of one full block: a hash chained from the parent block's `hash_value`, plus the
    block's own tokens and extra keys, so two blocks are equal only if their tokens are equal
    and their (hashed) prefixes collide on all 64 bits."""

    hash_value: int
    token_ids: tuple[int, ...]
    extra_keys: tuple | None = None


def hash_block_tokens(
    parent_block_hash: BlockHash | None, token_ids: tuple[int, ...], extra_keys: tuple | None
) -> BlockHash:
    """The hash of a full block whose parent (the previous block) has `parent_block_hash`."""
    parent_hash_value = None if parent_block_hash is None else parent_block_hash.hash_value
    return BlockHash(hash((parent_hash_value, token_ids, extra_keys)), token_ids, extra_keys)


@dataclass(slots=True, eq=False)
class KVCacheBlock:
    """One physical block. `prev_free_block` / `next_free_block` link it into the free queue
    while it is free (ref_cnt 0); they are None while requests hold it."""

    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None  # set once the block is full and cached
    handed_out: bool = False  # some request held it once: its memory has been written
    prev_free_block: KVCacheBlock | None = None
    next_free_block: KVCacheBlock | None = None
    is_null: bool = False

    def __repr__(self) -> str:
        hashed = self.block_hash is not None
        return f"KVCacheBlock(id={self.block_id}, ref_cnt={self.ref_cnt}, hashed={hashed})"


class FreeKVCacheBlockQueue:
    """A doubly linked list of free blocks, least recently freed first, with O(1) `popleft`,
    `append` and `remove` from the middle (a prefix hit on a free cached block).

    Two sentinel blocks (never handed out) bound the list so that no operation tests for None.
    """

    def __init__(self, blocks: Iterable[KVCacheBlock]):
        self.head = KVCacheBlock(-1)
        self.tail = KVCacheBlock(-1)
        self.head.next_free_block = self.tail
        self.tail.prev_free_block = self.head
        self.num_free_blocks = 0
        self.append_n(blocks)

    def popleft(self) -> KVCacheBlock:
        block = self.head.next_free_block
        if block is self.tail:
            raise ValueError("no free block to pop")
        self.remove(block)
        return block

    def popleft_n(self, count: int) -> list[KVCacheBlock]:
        if count > self.num_free_blocks:
            raise ValueError(f"asked for {count} free blocks, only {self.num_free_blocks} left")
        blocks = []
        block = self.head.next_free_block
        for _ in range(count):
            blocks.append(block)
            following = block.next_free_block
            block.prev_free_block = block.next_free_block = None
            block = following
        self.head.next_free_block = block
        block.prev_free_block = self.head
        self.num_free_blocks -= count
        return blocks

    def remove(self, block: KVCacheBlock) -> None:
        previous, following = block.prev_free_block, block.next_free_block
        if previous is None or following is None:
            raise ValueError(f"block {block.block_id} is not in the free queue")
        previous.next_free_block = following
        following.prev_free_block = previous
        block.prev_free_block = block.next_free_block = None
        self.num_free_blocks -= 1

    def append(self, block: KVCacheBlock) -> None:
        last = self.tail.prev_free_block
        last.next_free_block = block
        block.prev_free_block = last
        block.next_free_block = self.tail
        self.tail.prev_free_block = block
        self.num_free_blocks += 1

    def append_n(self, blocks: Iterable[KVCacheBlock]) -> None:
        for block in blocks:
            self.append(block)

    def appendleft(self, block: KVCacheBlock) -> None:
        first = self.head.next_free_block
        first.prev_free_block = block
        block.next_free_block = first
        block.prev_free_block = self.head
        self.head.next_free_block = block
        self.num_free_blocks += 1

    def get_all_free_blocks(self) -> list[KVCacheBlock]:
        """The free blocks from head to tail (for tests and debugging; O(n))."""
        blocks = []
        block = self.head.next_free_block
        while block is not self.tail:
            blocks.append(block)
            block = block.next_free_block
        return blocks


class BlockPool:
    """All KV blocks of the engine. Block 0 is the null block: never handed out, never freed (a
    padded block-table entry points at it). Every other block is either in the free queue with
    ref_cnt 0 or held by `ref_cnt` requests; `block.block_hash` is set exactly when
    `cached_block_hash_to_block[block.block_hash] is block`."""

    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(block_id) for block_id in range(num_blocks)]
        self.null_block = self.blocks[0]
        self.null_block.is_null = True
        self.free_block_queue = FreeKVCacheBlockQueue(self.blocks[1:])
        self.cached_block_hash_to_block: dict[BlockHash, KVCacheBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take: the free ones, cached or not."""
        return self.free_block_queue.num_free_blocks

    @property
    def usage(self) -> float:
        """The fraction of usable blocks held by requests (cached free blocks count as free)."""
        return 1.0 - self.num_free_blocks / (self.num_blocks - 1)

    def get_cached_block(self, block_hash: BlockHash) -> KVCacheBlock | None:
        return self.cached_block_hash_to_block.get(block_hash)

    def get_new_blocks(self, count: int) -> list[KVCacheBlock]:
        """`count` blocks from the LRU head, each with ref_cnt 1; a cached one loses its hash."""
        blocks = self.free_block_queue.popleft_n(count)
        cache = self.cached_block_hash_to_block
        for block in blocks:
            if block.block_hash is not None:  # evict it from the prefix cache
                del cache[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            block.handed_out = True
        return blocks

    def touch(self, blocks: Sequence[KVCacheBlock]) -> None:
        """One more holder for each block (a prefix hit); a free one leaves the free queue."""
        for block in blocks:
            if block.ref_cnt == 0 and not block.is_null:
                self.free_block_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        """One holder fewer for each block; those left with none join the queue: cached ones
        its tail in the given order (so the first of them is evicted first), those without a
        hash its head (reused first)."""
        for block in ordered_blocks:
            block.ref_cnt -= 1
            if block.ref_cnt == 0 and not block.is_null:
                if block.block_hash is None:
                    self.free_block_queue.appendleft(block)
                else:
                    self.free_block_queue.append(block)

    def cache_full_block(self, block: KVCacheBlock, block_hash: BlockHash) -> None:
        """Record that `block` holds the full block `block_hash`. When another block already
        holds the same content (two requests computed it at once), the first stays the cached
        one and `block` stays unhashed, to be recycled when freed."""
        if block.block_hash is not None or block.is_null:
            return
        cache = self.cached_block_hash_to_block
        if block_hash not in cache:
            cache[block_hash] = block
            block.block_hash = block_hash

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block; only possible when no request holds a block."""
        if self.num_free_blocks != self.num_blocks - 1:
            return False
        for block in self.cached_block_hash_to_block.values():
            block.block_hash = None
        self.cached_block_hash_to_block.clear()
        free = self.free_block_queue.get_all_free_blocks()
        self.free_block_queue = FreeKVCacheBlockQueue(
            [block for block in free if block.handed_out]
            + [block for block in free if not block.handed_out]
        )
        return True
