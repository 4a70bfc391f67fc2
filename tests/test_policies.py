"""Each eviction policy picks its victims in a known order; user policies plug in; pins hold."""

from __future__ import annotations

import pytest

from rayk.cache.block_pool import BlockPool
from rayk.cache.policies import BlockInfo, EvictionPolicy, LRUPolicy, make_policy, register_policy
from rayk.hashing import token_bytes


def _key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def _pool(policy, depths=(0, 0, 0, 0), sizes=None) -> BlockPool:
    """A pool of cached free blocks 0..n-1 (block i freed i-th), each at the given depth."""
    pool = BlockPool(len(depths), 1, policy=make_policy(policy), bytes_per_block=100)
    blocks = pool.allocate(len(depths))
    for block, depth in zip(blocks, depths):
        pool.cache_block(block, _key(block), bytes(16), token_bytes([block]), depth=depth)
    pool.free(blocks)
    return pool


def _hit(pool: BlockPool, block: int, times: int = 1) -> None:
    for _ in range(times):
        pool.touch([block])
        pool.free([block])


def _victims(pool: BlockPool, n: int) -> list[int]:
    evicted = []
    pool.allocate(n, evicted)
    pool.check_invariants()
    return [e.block for e in evicted]


def test_lru_evicts_the_least_recently_freed_or_hit():
    pool = _pool("lru")
    _hit(pool, 0)
    assert _victims(pool, 4) == [1, 2, 3, 0]


def test_lfu_evicts_the_least_hit_and_breaks_ties_by_recency():
    pool = _pool("lfu")
    _hit(pool, 0, times=3)
    _hit(pool, 1, times=2)
    _hit(pool, 3, times=2)
    assert _victims(pool, 4) == [2, 1, 3, 0]


def test_adaptive_ages_out_blocks_that_stop_being_hit():
    pool = _pool("adaptive", depths=(0, 0, 0, 0, 0))
    _hit(pool, 0, times=4)
    assert _victims(pool, 2) == [1, 2]
    # Eviction raised the age: a block hit once now outranks block 0's old frequency.
    pool.touch([3])
    pool.free([3])
    _hit(pool, 3, times=3)
    assert _victims(pool, 1) == [4]
    assert _victims(pool, 1) == [0]


def test_cost_aware_keeps_blocks_deep_in_long_prefixes():
    pool = _pool("cost_aware", depths=(5, 0, 9, 2))
    assert _victims(pool, 4) == [1, 3, 0, 2]


def test_a_custom_policy_protects_a_system_prompt_by_instance_and_by_name():
    class KeepSystemPrompt(LRUPolicy):
        protected = {_key(0), _key(1)}

        def select_victims(self, candidates, n):
            allowed = [k for k in super().select_victims(candidates, len(self._order)) if k not in self.protected]
            return allowed[:n]

    pool = _pool(KeepSystemPrompt())
    assert _victims(pool, 2) == [2, 3]
    with pytest.raises(AssertionError, match="chose 0 victims, 1 were needed"):
        pool.allocate(1)
    register_policy("keep_system_prompt", KeepSystemPrompt)
    assert _victims(_pool("keep_system_prompt"), 2) == [2, 3]


def test_pinned_blocks_survive_pressure_and_become_evictable_when_unpinned():
    pool = _pool("lru")
    assert pool.pin(_key(1)) and pool.pin(_key(2))
    assert pool.num_free_blocks == 2
    assert _victims(pool, 2) == [0, 3]
    with pytest.raises(RuntimeError, match="only 0 are free"):
        pool.allocate(1)
    pool.unpin(_key(2))
    assert _victims(pool, 1) == [2]
    assert _key(1) in pool.cached


def test_switching_policy_hands_over_every_candidate():
    pool = _pool("lru", depths=(3, 0, 1, 2))
    pool.set_policy(make_policy("cost_aware"))
    assert _victims(pool, 4) == [1, 2, 3, 0]


def test_unknown_policy_names_are_refused_with_the_known_ones():
    with pytest.raises(ValueError, match=r"one of \[.*'adaptive'.*'cost_aware'.*'lfu'.*'lru'"):
        make_policy("fifo")


@pytest.mark.parametrize("name", ["lru", "lfu", "adaptive", "cost_aware"])
def test_policies_stay_compact_under_churn(name):
    policy = make_policy(name)
    live = set()
    for i in range(20_000):
        info = BlockInfo(_key(i % 500), depth=i % 7, num_bytes=64)
        policy.on_insert(info)
        live.add(info.key)
        policy.on_access(info)
        if i % 3 == 0:
            [victim] = policy.select_victims(live, 1)
            policy.on_remove(victim)
            live.discard(victim)
    heap = getattr(policy, "_heap", None)
    assert heap is None or len(heap) <= 2 * len(live) + 64
    assert isinstance(policy, EvictionPolicy)


@pytest.mark.parametrize("name", ["lfu", "adaptive", "cost_aware"])
def test_policies_forget_what_they_knew_of_dropped_blocks(name):
    policy = make_policy(name)
    for i in range(1000):
        info = BlockInfo(_key(i), depth=0, num_bytes=64)
        policy.on_insert(info)
        policy.on_access(info)
        policy.on_remove(info.key, dropped=True)
    assert len(policy.frequency) == 0


def test_cluster_aware_evicts_replicas_before_last_copies_and_is_lru_within_each():
    pool = _pool("cluster_aware")
    assert _victims(_pool("cluster_aware"), 4) == [0, 1, 2, 3]  # nothing replicated: plain LRU
    pool.policy.set_replicated([_key(2), _key(3)], True)
    assert _victims(pool, 3) == [2, 3, 0]
    pool = _pool("cluster_aware")
    pool.policy.set_replicated([_key(1)], True)
    pool.policy.set_replicated([_key(1)], False)  # its replica went away: a last copy again
    pool.policy.set_replicated([_key(0)], True)
    assert _victims(pool, 4) == [0, 2, 3, 1]


def test_cluster_aware_remembers_replicas_of_blocks_taken_into_use():
    pool = _pool("cluster_aware")
    pool.policy.set_replicated([_key(3)], True)
    pool.touch([3])  # in use: no longer a candidate
    pool.free([3])  # a candidate again, still a replica
    assert _victims(pool, 1) == [3]
