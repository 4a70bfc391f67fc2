"""The block pool keeps its invariants under any sequence of operations, with O(1) free-queue moves."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from rayk.cache.block_pool import BlockPool
from rayk.cache.events import AllBlocksCleared, BlocksRemoved, BlocksStored, EventBuffer
from rayk.cache.kv_cache_manager import KVCacheManager
from rayk.cache.tier_chain import TierChain
from rayk.hashing import BlockHasher, token_bytes


def _key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def test_fresh_pool_hands_out_low_ids_first_and_keeps_invariants():
    pool = BlockPool(8, 4)
    pool.check_invariants()
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.num_free_blocks == 5 and pool.num_used_blocks == 3
    pool.check_invariants()


def test_free_blocks_keep_their_key_and_uncached_ones_are_used_first():
    pool = BlockPool(4, 2)
    blocks = pool.allocate(4)
    pool.cache_block(blocks[0], _key(1), bytes(16), token_bytes([7, 8]))
    pool.free(reversed(blocks))
    assert pool.num_free_blocks == 4
    assert pool.lookup(_key(1), bytes(16), token_bytes([7, 8])) == 0
    assert sorted(pool.allocate(3)) == [1, 2, 3]
    assert pool.num_cached_blocks == 1 and pool.num_evictions == 0
    evicted = []
    assert pool.allocate(1, evicted) == [0]
    assert pool.num_cached_blocks == 0 and pool.num_evictions == 1
    assert [(e.block, e.key, e.tokens) for e in evicted] == [(0, _key(1), token_bytes([7, 8]))]
    pool.check_invariants()


def _pool_of_cached_free_blocks(n: int, policy=None) -> BlockPool:
    pool = BlockPool(n, 1, policy=policy, bytes_per_block=64)
    blocks = pool.allocate(n)
    for block in blocks:
        pool.cache_block(block, _key(block), bytes(16), token_bytes([block]), depth=block)
    pool.free(blocks)
    return pool


def test_touching_a_free_cached_block_makes_it_unevictable_until_freed():
    pool = _pool_of_cached_free_blocks(3)
    pool.touch([0])
    assert pool.ref_counts[0] == 1 and pool.num_free_blocks == 2
    assert sorted(pool.allocate(2)) == [1, 2]
    pool.free([0])
    assert pool.allocate(1) == [0]
    pool.check_invariants()


def test_lookup_confirms_tokens_and_parent_so_a_colliding_key_is_never_served():
    pool = BlockPool(2, 2)
    [block] = pool.allocate(1)
    pool.cache_block(block, _key(5), _key(4), token_bytes([1, 2]))
    assert pool.lookup(_key(5), _key(4), token_bytes([1, 2])) == block
    assert pool.lookup(_key(5), _key(4), token_bytes([1, 3])) is None
    assert pool.lookup(_key(5), _key(9), token_bytes([1, 2])) is None


def test_a_key_already_cached_is_not_taken_by_a_second_block():
    pool = BlockPool(2, 1)
    a, b = pool.allocate(2)
    assert pool.cache_block(a, _key(1), bytes(16), token_bytes([3]))
    assert not pool.cache_block(b, _key(1), bytes(16), token_bytes([3]))
    assert pool.cached == {_key(1): a}
    pool.check_invariants()


def test_allocating_more_than_is_free_is_refused():
    pool = BlockPool(2, 1)
    with pytest.raises(RuntimeError, match="only 2 are free"):
        pool.allocate(3)


def test_evict_drops_keys_of_free_blocks_only():
    pool = BlockPool(2, 1)
    a, b = pool.allocate(2)
    pool.cache_block(a, _key(1), bytes(16), token_bytes([1]))
    pool.cache_block(b, _key(2), bytes(16), token_bytes([2]))
    pool.free([a])
    assert [e.key for e in pool.evict([_key(1), _key(2), _key(3)])] == [_key(1)]
    assert list(pool.cached) == [_key(2)]
    pool.check_invariants()


def test_events_keep_order_and_batch_runs():
    pool = BlockPool(1, 1)
    [a] = pool.allocate(1)
    pool.cache_block(a, _key(1), bytes(16), token_bytes([1]))
    pool.free([a])
    [a] = pool.allocate(1)
    pool.cache_block(a, _key(2), bytes(16), token_bytes([2]))
    assert pool.events.drain() == [
        BlocksStored("device", (_key(1),), bytes(16)),
        BlocksRemoved("device", (_key(1),)),
        BlocksStored("device", (_key(2),), bytes(16)),
    ]
    assert pool.events.drain() == []


def test_a_stored_event_holds_one_prefix_chain_with_the_parent_of_its_first_key():
    buffer = EventBuffer("host")
    root = bytes(16)
    buffer.stored(_key(1), root)
    buffer.stored(_key(2), _key(1))
    buffer.stored(_key(7), root)  # another prompt's first block starts a new event
    buffer.stored(_key(8), _key(7))
    assert buffer.drain() == [BlocksStored("host", (_key(1), _key(2)), root), BlocksStored("host", (_key(7), _key(8)), root)]


def test_clearing_a_tier_replaces_its_pending_events_with_one():
    buffer = EventBuffer("disk")
    buffer.stored(_key(1), bytes(16))
    buffer.removed(_key(1))
    buffer.cleared()
    buffer.stored(_key(3), bytes(16))
    assert buffer.drain() == [AllBlocksCleared("disk"), BlocksStored("disk", (_key(3),), bytes(16))]


def test_the_manager_never_serves_the_last_prompt_token_from_cache():
    pool = BlockPool(8, 4)
    manager = KVCacheManager(TierChain(pool), BlockHasher(bytes(32), 4))
    tokens = list(range(8))
    manager.admit("a", 8, manager.find_prefix("a", tokens))
    manager.cache_blocks("a", tokens, 8)
    manager.free("a")
    hit = manager.find_prefix("b", tokens)
    assert hit.num_tokens == 4 and hit.device_blocks() == [0]
    assert manager.find_prefix("c", tokens + [99]).num_tokens == 8


def test_a_failed_allocation_changes_nothing():
    pool = BlockPool(3, 2)
    manager = KVCacheManager(TierChain(pool), BlockHasher(bytes(32), 2))
    hit = manager.find_prefix("a", list(range(10)))
    assert manager.admit("a", 10, hit) is None
    assert pool.num_free_blocks == 3 and manager.block_ids("a") == []
    assert manager.num_query_tokens == 0
    manager.check_invariants()


class PoolMachine(RuleBasedStateMachine):
    """Random requests that allocate, hit shared prefixes, grow, publish, free and evict."""

    def __init__(self):
        super().__init__()
        self.block_size = 2
        self.pool = BlockPool(12, self.block_size)
        self.manager = KVCacheManager(TierChain(self.pool), BlockHasher(bytes(32), self.block_size))
        self.live: dict[str, list[int]] = {}
        self.next_id = 0

    @rule(prefix=st.sampled_from([[], [1, 2], [1, 2, 3, 4], [5, 6, 7]]), tail=st.lists(st.integers(0, 3), min_size=1, max_size=6))
    def admit(self, prefix, tail):
        request_id = str(self.next_id)
        self.next_id += 1
        tokens = prefix + tail
        hit = self.manager.find_prefix(request_id, tokens)
        if self.manager.admit(request_id, len(tokens), hit) is not None:
            self.manager.cache_blocks(request_id, tokens, len(tokens))
            self.live[request_id] = tokens
        else:
            self.manager.free(request_id)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), extra=st.integers(1, 4))
    def grow(self, data, extra):
        request_id = data.draw(st.sampled_from(sorted(self.live)))
        tokens = self.live[request_id] + [9] * extra
        if self.manager.allocate_slots(request_id, len(tokens)):
            self.manager.cache_blocks(request_id, tokens, len(tokens))
            self.live[request_id] = tokens

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def finish(self, data):
        request_id = data.draw(st.sampled_from(sorted(self.live)))
        self.manager.free(request_id)
        del self.live[request_id]

    @rule(n=st.integers(1, 3))
    def evict_some(self, n):
        self.pool.evict(list(self.pool.cached)[:n])

    @invariant()
    def invariants_hold(self):
        self.manager.check_invariants()
        bs = self.block_size
        for request_id, tokens in self.live.items():
            table = self.manager.block_ids(request_id)
            assert len(table) == -(-len(tokens) // bs)
            for i, block in enumerate(table[: len(tokens) // bs]):
                if self.pool.block_hashes[block] is not None:
                    assert self.pool.block_token_ids(block) == tokens[i * bs : (i + 1) * bs]

    def teardown(self):
        for request_id in list(self.live):
            self.manager.free(request_id)
        self.manager.check_invariants()
        assert self.pool.num_used_blocks == 0


PoolMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_random_operations_keep_invariants = PoolMachine.TestCase
