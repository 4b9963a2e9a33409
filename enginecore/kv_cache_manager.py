"""The KV-cache block manager: which physical blocks each request owns.

Block 0 is the null block, never handed out (a padded block-table entry points at it).
Allocation either succeeds whole or changes nothing.

    block_size 4, request with 10 tokens computed and 3 more scheduled (13 -> 4 blocks):
      blocks[r] = [7, 2, 9]  ->  allocate_slots(r, 3) appends one block  ->  [7, 2, 9, 4]
"""

from __future__ import annotations

from collections import deque

from ember.enginecore.request import Request


class BlockPool:
    """The free physical blocks, handed out first-in first-out."""

    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks, got {num_blocks}")
        self.num_blocks = num_blocks
        self.free_blocks: deque[int] = deque(range(1, num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def take(self, count: int) -> list[int]:
        return [self.free_blocks.popleft() for _ in range(count)]

    def give_back(self, block_ids: list[int]) -> None:
        self.free_blocks.extend(block_ids)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / (self.num_blocks - 1)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.block_pool = BlockPool(num_blocks)
        self.req_to_blocks: dict[str, list[int]] = {}

    def blocks_of(self, request: Request) -> list[int]:
        return self.req_to_blocks.get(request.request_id, [])

    def allocate_slots(self, request: Request, num_new_tokens: int) -> list[int] | None:
        """Blocks for `num_new_tokens` more tokens of `request`: the newly added block ids, or
        None (and nothing changed) when the pool is short."""
        blocks = self.req_to_blocks.setdefault(request.request_id, [])
        needed = -(-(request.num_computed_tokens + num_new_tokens) // self.block_size)
        count = max(0, needed - len(blocks))
        if count > self.block_pool.num_free_blocks:
            if not blocks:
                del self.req_to_blocks[request.request_id]
            return None
        new_blocks = self.block_pool.take(count)
        blocks.extend(new_blocks)
        return new_blocks

    def free(self, request: Request) -> None:
        blocks = self.req_to_blocks.pop(request.request_id, [])
        # Last blocks first, so the blocks of a request's head are reused last.
        self.block_pool.give_back(blocks[::-1])

    @property
    def usage(self) -> float:
        return self.block_pool.usage
