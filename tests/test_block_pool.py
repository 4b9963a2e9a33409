"""Property tests (hypothesis) of the block pool, its LRU free queue and the KV-cache manager,
as plain Python: random allocate / compute / decode / free / cache-hit / evict / reset
sequences keep every block accounted for, ref counts equal to holders, and hits correct."""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ember.enginecore.block_pool import BlockPool, FreeKVCacheBlockQueue, KVCacheBlock
from ember.enginecore.kv_cache_manager import KVCacheManager
from ember.enginecore.request import Request
from ember.workers.sampling_params import SamplingParams

# ---- the free queue against a list ---------------------------------------------------------


class FreeQueueMachine(RuleBasedStateMachine):
    """`FreeKVCacheBlockQueue` behaves as a list: popleft / append / appendleft / remove from
    the middle."""

    def __init__(self):
        super().__init__()
        self.blocks = [KVCacheBlock(i) for i in range(12)]
        self.queue = FreeKVCacheBlockQueue(self.blocks[:8])
        self.model = list(self.blocks[:8])

    @rule(count=st.integers(0, 3))
    def popleft_n(self, count):
        if count > len(self.model):
            return
        assert self.queue.popleft_n(count) == self.model[:count]
        del self.model[:count]

    @precondition(lambda self: self.model)
    @rule()
    def popleft(self):
        assert self.queue.popleft() is self.model.pop(0)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def remove(self, data):
        block = data.draw(st.sampled_from(self.model))
        self.queue.remove(block)
        self.model.remove(block)

    @rule(data=st.data())
    def append(self, data):
        outside = [b for b in self.blocks if b not in self.model]
        if outside:
            block = data.draw(st.sampled_from(outside))
            self.queue.append(block)
            self.model.append(block)

    @rule(data=st.data())
    def appendleft(self, data):
        outside = [b for b in self.blocks if b not in self.model]
        if outside:
            block = data.draw(st.sampled_from(outside))
            self.queue.appendleft(block)
            self.model.insert(0, block)

    @invariant()
    def matches_the_list_both_ways(self):
        assert self.queue.get_all_free_blocks() == self.model
        assert self.queue.num_free_blocks == len(self.model)
        backwards, block = [], self.queue.tail.prev_free_block
        while block is not self.queue.head:
            backwards.append(block)
            block = block.prev_free_block
        assert backwards == self.model[::-1]
        for block in self.blocks:
            if block not in self.model:
                assert block.prev_free_block is None and block.next_free_block is None


TestFreeQueue = FreeQueueMachine.TestCase
TestFreeQueue.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)


# ---- the KV-cache manager ------------------------------------------------------------------

# Prompts start from a few shared prefixes so that cache hits are frequent; tokens come from a
# small alphabet so that different requests also produce equal blocks.
_PREFIXES = [[], [5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 8, 1, 2, 3, 4, 1, 2], [1, 2, 3, 4, 5, 6]]
_SALTS = [None, None, "tenant-b"]


class KVCacheManagerMachine(RuleBasedStateMachine):
    """Drives a KVCacheManager the way the scheduler does and checks it after every call.

    A shadow of the KV cache records, for every slot a request computed, what the slot holds:
    (salt, all tokens up to and including that position). A prefix hit must point at slots
    holding exactly what the request would have computed itself.
    """

    def __init__(self):
        super().__init__()
        self.ids = itertools.count()
        self.live: dict[str, Request] = {}
        self.slot_contents: dict[tuple[int, int], tuple] = {}

    @initialize(num_blocks=st.integers(2, 24), block_size=st.sampled_from([1, 2, 4]))
    def make_manager(self, num_blocks, block_size):
        self.block_size = block_size
        self.manager = KVCacheManager(num_blocks, block_size)
        self.pool: BlockPool = self.manager.block_pool

    # ---- what the scheduler does ---------------------------------------------------------

    def _snapshot(self):
        pool = self.pool
        return (
            [b.block_id for b in pool.free_block_queue.get_all_free_blocks()],
            [(b.ref_cnt, b.block_hash) for b in pool.blocks],
            dict(pool.cached_block_hash_to_block),
            {r: list(blocks) for r, blocks in self.manager.req_to_blocks.items()},
            dict(self.manager.num_cached_blocks),
        )

    def _compute(self, request: Request, start: int, end: int) -> None:
        """The model runs over positions [start, end): write them into the shadow cache."""
        blocks = self.manager.get_blocks(request)
        for position in range(start, end):
            block = blocks[position // self.block_size]
            assert not block.is_null
            self.slot_contents[block.block_id, position % self.block_size] = (
                request.cache_salt,
                tuple(request.all_token_ids[: position + 1]),
            )
        request.num_computed_tokens = end

    def _allocate_or_nothing(self, request, num_new, hits=()):
        before = self._snapshot()
        new_block_ids = self.manager.allocate_slots(request, num_new, hits)
        if new_block_ids is None:
            assert self._snapshot() == before, "a failed allocation changed the pool"
        return new_block_ids

    @rule(
        prefix=st.sampled_from(_PREFIXES),
        suffix=st.lists(st.integers(1, 3), max_size=9),
        salt=st.sampled_from(_SALTS),
        data=st.data(),
    )
    def admit_request(self, prefix, suffix, salt, data):
        prompt = prefix + suffix
        if not prompt:
            return
        request = Request(
            request_id=f"r{next(self.ids)}",
            prompt_token_ids=prompt,
            sampling_params=SamplingParams(temperature=0.0),
            eos_token_ids=(),
            cache_salt=salt,
        )
        hits, num_hit_tokens = self.manager.get_computed_blocks(request)
        assert num_hit_tokens == len(hits) * self.block_size
        assert num_hit_tokens < len(prompt), "a hit covered the last prompt token"
        for index, block in enumerate(hits):  # what the hit holds is what we would compute
            for offset in range(self.block_size):
                position = index * self.block_size + offset
                assert self.slot_contents[block.block_id, offset] == (
                    salt,
                    tuple(prompt[: position + 1]),
                )
        num_new = data.draw(st.integers(1, len(prompt) - num_hit_tokens), label="chunk")
        if self._allocate_or_nothing(request, num_new, hits) is None:
            return  # it stays waiting: it holds nothing
        self.live[request.request_id] = request
        request.num_computed_tokens = num_hit_tokens
        self._compute(request, num_hit_tokens, num_hit_tokens + num_new)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), token=st.integers(1, 3))
    def step_request(self, data, token):
        """Its next prefill chunk, or one decode token (sampled as the previous step ended)."""
        request = self.live[data.draw(st.sampled_from(sorted(self.live)), label="request")]
        if request.num_computed_tokens == request.num_tokens:
            request.append_output_token_id(token)
        remaining = request.num_tokens - request.num_computed_tokens
        num_new = data.draw(st.integers(1, remaining), label="chunk")
        if self._allocate_or_nothing(request, num_new) is None:
            self._free(request)  # preempted: recomputed later from scratch
            return
        self._compute(request, request.num_computed_tokens, request.num_computed_tokens + num_new)

    def _free(self, request: Request) -> None:
        self.manager.free(request)
        del self.live[request.request_id]

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def finish_request(self, data):
        self._free(self.live[data.draw(st.sampled_from(sorted(self.live)), label="request")])

    @rule(roll=st.integers(0, 7))
    def reset_prefix_cache(self, roll):
        if roll:  # rarely: a reset empties the cache that the other rules exercise
            return
        anyone_holds_blocks = any(self.manager.get_blocks(r) for r in self.live.values())
        assert self.manager.reset_prefix_cache() is not anyone_holds_blocks
        if not anyone_holds_blocks:
            assert not self.pool.cached_block_hash_to_block
            assert all(b.block_hash is None for b in self.pool.blocks)

    # ---- what must always hold -----------------------------------------------------------

    @invariant()
    def every_block_is_free_or_held_never_both(self):
        if not hasattr(self, "pool"):
            return
        pool = self.pool
        free_ids = [b.block_id for b in pool.free_block_queue.get_all_free_blocks()]
        assert len(free_ids) == len(set(free_ids)) == pool.num_free_blocks
        held_ids = {b.block_id for blocks in self.manager.req_to_blocks.values() for b in blocks}
        assert 0 not in free_ids and 0 not in held_ids, "the null block was handed out"
        assert not held_ids & set(free_ids)
        assert held_ids | set(free_ids) == set(range(1, pool.num_blocks)), "a block leaked"

    @invariant()
    def ref_counts_equal_holders(self):
        if not hasattr(self, "pool"):
            return
        holders: dict[int, list[tuple[str, int]]] = {}
        for request_id, blocks in self.manager.req_to_blocks.items():
            assert request_id in self.live
            for index, block in enumerate(blocks):
                holders.setdefault(block.block_id, []).append((request_id, index))
        for block in self.pool.blocks[1:]:
            assert block.ref_cnt == len(holders.get(block.block_id, []))
        for block_id, holding in holders.items():
            if len(holding) > 1:  # shared only through a prefix hit: cached, same position
                assert self.pool.blocks[block_id].block_hash is not None
                assert len({index for _, index in holding}) == 1
                assert len({request_id for request_id, _ in holding}) == len(holding)

    @invariant()
    def requests_hold_blocks_for_their_computed_tokens(self):
        for request in self.live.values():
            blocks = self.manager.get_blocks(request)
            assert len(blocks) == -(-request.num_computed_tokens // self.block_size)

    @invariant()
    def hash_map_and_block_hashes_agree(self):
        if not hasattr(self, "pool"):
            return
        cache = self.pool.cached_block_hash_to_block
        for block_hash, block in cache.items():
            assert block.block_hash == block_hash
        for block in self.pool.blocks:
            if block.block_hash is not None:
                assert cache[block.block_hash] is block


TestKVCacheManager = KVCacheManagerMachine.TestCase
TestKVCacheManager.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# ---- examples worth spelling out -----------------------------------------------------------


def _request(request_id, prompt, salt=None):
    return Request(request_id, prompt, SamplingParams(temperature=0.0), (), cache_salt=salt)


def _admit(manager, request):
    hits, num_hit_tokens = manager.get_computed_blocks(request)
    new_block_ids = manager.allocate_slots(request, request.num_tokens - num_hit_tokens, hits)
    request.num_computed_tokens = request.num_tokens
    return hits, new_block_ids


def test_prefix_hit_shares_blocks_with_a_ref_count_per_holder():
    manager = KVCacheManager(num_blocks=10, block_size=4)
    first, second = _request("a", list(range(10))), _request("b", list(range(9)) + [99])
    _admit(manager, first)
    hits, new_block_ids = _admit(manager, second)
    assert [b.block_id for b in hits] == manager.get_block_ids(first)[:2]
    assert [b.ref_cnt for b in manager.get_blocks(first)] == [2, 2, 1]
    assert len(new_block_ids) == 1
    manager.free(first)
    assert [b.ref_cnt for b in manager.get_blocks(second)] == [1, 1, 1]


def test_cache_hit_never_covers_the_last_prompt_token():
    manager = KVCacheManager(num_blocks=10, block_size=4)
    _admit(manager, _request("a", list(range(8))))
    _, num_hit_tokens = manager.get_computed_blocks(_request("b", list(range(8))))
    assert num_hit_tokens == 4  # the second block holds the last token: computed again


def test_freed_blocks_stay_cached_until_evicted_from_the_lru_head():
    manager = KVCacheManager(num_blocks=5, block_size=2)  # 4 usable blocks
    _admit(manager, _request("a", [1, 2, 3, 4, 5]))  # blocks for [1,2] [3,4] [5]
    manager.free(_request("a", []))
    assert manager.get_computed_blocks(_request("b", [1, 2, 3, 4, 9]))[1] == 4
    # The free queue now holds a's tail block (no hash: at the head), the never-used block,
    # [3,4], then [1,2]: taking three blocks takes [5]'s block, the never-used one and [3,4]'s
    # (evicting it), leaving [1,2].
    manager.allocate_slots(_request("c", [7] * 6), 6)
    assert manager.get_computed_blocks(_request("d", [1, 2, 3, 4, 9]))[1] == 2


def test_cache_salt_separates_otherwise_equal_prompts():
    manager = KVCacheManager(num_blocks=10, block_size=4)
    _admit(manager, _request("a", list(range(10)), salt="x"))
    assert manager.get_computed_blocks(_request("b", list(range(10))))[1] == 0
    assert manager.get_computed_blocks(_request("c", list(range(10)), salt="y"))[1] == 0
    assert manager.get_computed_blocks(_request("d", list(range(10)), salt="x"))[1] == 8


def test_decoded_tokens_fill_blocks_that_later_requests_hit():
    manager = KVCacheManager(num_blocks=10, block_size=4)
    first = _request("a", [1, 2, 3, 4, 5, 6])
    _admit(manager, first)
    for token in (7, 8, 9):  # decode: each step computes the previous step's token
        first.append_output_token_id(token)
        manager.allocate_slots(first, 1)
        first.num_computed_tokens += 1
    assert manager.num_cached_blocks["a"] == 2  # [1..4] and [5, 6, 7, 8]
    later = _request("b", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    assert manager.get_computed_blocks(later)[1] == 8


def test_prefix_caching_off_never_hits():
    manager = KVCacheManager(num_blocks=10, block_size=4, enable_caching=False)
    _admit(manager, _request("a", list(range(10))))
    assert manager.get_computed_blocks(_request("b", list(range(10)))) == ([], 0)
    assert not manager.block_pool.cached_block_hash_to_block


def test_blocks_without_a_hash_are_reused_before_fresh_ones_and_cached_ones_keep_their_order():
    """A freed block that no prefix hit can take (no hash) joins the free queue's head, so that
    the next allocation reuses memory already written; cached blocks still leave in LRU order
    behind the never-used ones. A reset puts every block once handed out before those never
    handed out."""
    manager = KVCacheManager(num_blocks=9, block_size=2)  # 8 usable blocks, ids 1..8
    pool = manager.block_pool
    first = _request("a", [1, 2, 3, 4, 5])  # blocks 1, 2 full (cached), 3 partial
    _admit(manager, first)
    assert manager.get_block_ids(first) == [1, 2, 3]
    manager.free(first)

    def queue():
        return [b.block_id for b in pool.free_block_queue.get_all_free_blocks()]

    assert queue()[:1] == [3] and queue()[-2:] == [2, 1]  # unhashed first, cached last
    second = _request("b", [7, 8, 9])
    _admit(manager, second)
    assert manager.get_block_ids(second) == [3, 4]  # the written block, then a fresh one
    manager.free(second)
    assert manager.get_computed_blocks(_request("c", [1, 2, 3, 4, 9]))[1] == 4  # still cached
    assert manager.reset_prefix_cache()
    handed_out = {1, 2, 3, 4}
    assert set(queue()[:4]) == handed_out and set(queue()[4:]) == {5, 6, 7, 8}
    third = _request("d", list(range(100, 108)))
    _admit(manager, third)
    assert set(manager.get_block_ids(third)) == handed_out  # no fresh memory touched
