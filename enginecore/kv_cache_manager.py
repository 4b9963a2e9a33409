"""The KV-cache manager: which blocks each request holds, and the prefix cache over them.
Called by the `Scheduler`; the blocks themselves live in `ember.enginecore.block_pool.BlockPool`.

    block_size 4, request r with a 10-token prompt whose first 8 tokens another request cached:
      get_computed_blocks(r)       -> blocks [7, 2], 8 tokens (ref_cnt of 7 and 2 goes up on
                                      allocation: both requests hold them)
      allocate_slots(r, 2, [7, 2]) -> new block [4]; r holds [7, 2, 4]; tokens 8, 9 computed
      r decodes tokens 10, 11: block 4 is full, so it is hashed and cached for later requests

A hit never covers the last token of a request: it is computed, so that there are logits to
sample from. Allocation either succeeds whole or changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ember.enginecore.block_pool import BlockPool, KVCacheBlock, hash_block_tokens
from ember.enginecore.request import Request


@dataclass(slots=True)
class PrefixCacheStats:
    """Counted once per request, when it is first scheduled (a resumed preempted request is
    not counted again)."""

    requests: int = 0
    queries: int = 0  # tokens looked up
    hits: int = 0  # of them found in the cache

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True):
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.block_pool = BlockPool(num_blocks, enable_caching)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        # How many leading blocks of each request have been offered to the prefix cache.
        self.num_cached_blocks: dict[str, int] = {}
        self.prefix_cache_stats = PrefixCacheStats()

    # ---- lookups -----------------------------------------------------------------------

    def get_blocks(self, request: Request) -> list[KVCacheBlock]:
        return self.req_to_blocks.get(request.request_id, [])

    def get_block_ids(self, request: Request) -> list[int]:
        return [block.block_id for block in self.req_to_blocks.get(request.request_id, ())]

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """The longest run of the request's leading full blocks found in the prefix cache, and
        the number of tokens they hold; never the block holding the request's last token."""
        params = request.sampling_params  # None for a pooling request
        if not self.enable_caching or (params is not None and params.prompt_logprobs is not None):
            # Prompt logprobs need every prompt token's logits: nothing may be skipped (the
            # request's own blocks are still offered to the cache as they fill).
            return [], 0
        num_tokens = request.num_tokens
        self._hash_full_blocks(request, num_tokens)
        max_hit_blocks = (num_tokens - 1) // self.block_size
        get_cached_block = self.block_pool.get_cached_block
        hits = []
        for block_hash in request.block_hashes:
            if len(hits) == max_hit_blocks:
                break
            block = get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def record_prefix_cache_lookup(self, request: Request, num_hit_tokens: int) -> None:
        """Count a request's lookup in the stats (the scheduler calls this once it is admitted)."""
        stats = self.prefix_cache_stats
        stats.requests += 1
        stats.queries += request.num_tokens
        stats.hits += num_hit_tokens

    # ---- allocation --------------------------------------------------------------------

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: Sequence[KVCacheBlock] = (),
    ) -> list[int] | None:
        """Blocks for `num_new_tokens` more tokens of `request`, after its computed tokens and
        the prefix hits `new_computed_blocks` (from `get_computed_blocks`, for a request that
        holds no blocks yet). Returns the ids of the newly allocated blocks (hits excluded), or
        None, with nothing changed, when the pool is short."""
        request_id = request.request_id
        block_size = self.block_size
        pool = self.block_pool
        blocks = self.req_to_blocks.get(request_id)
        num_held = len(blocks) if blocks is not None else 0
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * block_size
        num_tokens = num_computed + num_new_tokens
        num_to_allocate = -(-num_tokens // block_size) - num_held - len(new_computed_blocks)
        if new_computed_blocks:
            # Free cached hits leave the free queue, so they count against it too.
            num_revived = sum(1 for block in new_computed_blocks if block.ref_cnt == 0)
            if num_to_allocate + num_revived > pool.num_free_blocks:
                return None
            pool.touch(new_computed_blocks)
        elif num_to_allocate > pool.num_free_blocks:
            return None
        if blocks is None:
            blocks = self.req_to_blocks[request_id] = list(new_computed_blocks)
            self.num_cached_blocks[request_id] = len(new_computed_blocks)
        new_block_ids = []
        if num_to_allocate > 0:
            new_blocks = pool.get_new_blocks(num_to_allocate)
            blocks.extend(new_blocks)
            new_block_ids = [block.block_id for block in new_blocks]
        if self.enable_caching:
            # The tokens scheduled now are computed before any later step can hit them (and
            # within this step each attention layer writes the cache before it reads it).
            # Only known tokens: under async scheduling the last one may still be coming.
            num_full_blocks = min(num_tokens, request.num_tokens) // block_size
            if num_full_blocks > self.num_cached_blocks[request_id]:
                self._cache_full_blocks(request, blocks, num_full_blocks)
        return new_block_ids

    def _cache_full_blocks(
        self, request: Request, blocks: list[KVCacheBlock], num_full_blocks: int
    ) -> None:
        self._hash_full_blocks(request, num_full_blocks * self.block_size)
        block_hashes = request.block_hashes
        cache_full_block = self.block_pool.cache_full_block
        for index in range(self.num_cached_blocks[request.request_id], num_full_blocks):
            cache_full_block(blocks[index], block_hashes[index])
        self.num_cached_blocks[request.request_id] = num_full_blocks

    def _hash_full_blocks(self, request: Request, num_tokens: int) -> None:
        """Extend `request.block_hashes` over the full blocks of its first `num_tokens` tokens."""
        block_hashes = request.block_hashes
        num_full_blocks = num_tokens // self.block_size
        if len(block_hashes) >= num_full_blocks:
            return
        block_size = self.block_size
        token_ids = request.all_token_ids
        parent = block_hashes[-1] if block_hashes else None
        for index in range(len(block_hashes), num_full_blocks):
            start = index * block_size
            parent = hash_block_tokens(
                parent, tuple(token_ids[start : start + block_size]), _extra_keys(request, index)
            )
            block_hashes.append(parent)

    def free(self, request: Request) -> None:
        """Release the request's blocks. Its last blocks go to the free queue first, so they are
        evicted before the blocks of its head, which other requests are likelier to share."""
        blocks = self.req_to_blocks.pop(request.request_id, None)
        self.num_cached_blocks.pop(request.request_id, None)
        if blocks:
            self.block_pool.free_blocks(reversed(blocks))

    def uncache_blocks_of(self, request: Request) -> None:
        """Take the blocks only `request` holds out of the prefix cache (before `free`), so no
        later request reuses what a failed step may have left in them."""
        cache = self.block_pool.cached_block_hash_to_block
        for block in self.req_to_blocks.get(request.request_id, ()):
            if block.ref_cnt == 1 and block.block_hash is not None:
                del cache[block.block_hash]
                block.block_hash = None

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block; False (and nothing done) while a request holds blocks."""
        return self.block_pool.reset_prefix_cache()

    @property
    def usage(self) -> float:
        return self.block_pool.usage


def _extra_keys(request: Request, block_index: int) -> tuple | None:
    """Keys besides the tokens: the LoRA adapter (every block) and the cache salt (the first
    block only; the hash chain carries it to the rest)."""
    cache_salt = request.cache_salt if block_index == 0 else None
    if request.lora_name is None and cache_salt is None:
        return None
    return (request.lora_name, cache_salt)
