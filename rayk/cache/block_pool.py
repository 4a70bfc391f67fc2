"""The block pool of one device: ref counts, free blocks, and the key → block map.

Invariants (``check_invariants`` asserts them):

* Every block is exactly one of: *used* (ref count > 0); *free and uncached* (in
  ``_uncached_free``); *free and cached* (in ``_evictable``, known to the eviction policy); or
  *free and pinned* (cached, kept, not allocatable). ``num_free_blocks`` counts the first two
  kinds of free blocks.
* A free block keeps its key, stored tokens and parent key until it is handed out again: eviction
  is lazy, and allocation takes uncached free blocks before it asks the policy for victims, so
  cached data is only thrown away when there is no other room.
* ``cached`` maps a key to exactly one block, and that block's stored key is the key. A block
  computed twice under the same key (two requests racing) stays uncached: the map keeps the first.
* Ref counts are owned by the KV cache manager: one per request whose block table holds the block.

Every operation is O(1) per block, plus the policy's cost (O(1) for LRU, O(log n) otherwise).
Each cached block's tokens sit in one preallocated bytearray in ``rayk.hashing.token_bytes``
encoding, so storing them is a slice copy and confirming a hit is a memcmp.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass

from rayk.cache.events import EventBuffer
from rayk.cache.lifecycle import LifecycleSampler
from rayk.cache.policies import BlockInfo, EvictionPolicy, LRUPolicy
from rayk.hashing import TOKEN_BYTES, BlockHash, token_ids_from_bytes


@dataclass(frozen=True)
class BlockRecord:
    """A cached block as it moves between tiers: its id in the tier it leaves, and what it holds.

    For a block evicted to make room, the KV at ``block`` stays intact until the block is
    written again, so it can be demoted to a lower tier first.
    """

    block: int
    key: BlockHash
    parent: BlockHash
    depth: int
    tokens: bytes


class BlockPool:
    """Bookkeeping for ``num_blocks`` KV blocks of ``block_size`` tokens each (no tensors)."""

    def __init__(self, num_blocks: int, block_size: int, tier: str = "device", policy: EvictionPolicy | None = None, bytes_per_block: int = 0):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.bytes_per_block = bytes_per_block
        self.events = EventBuffer(tier)
        self.policy = policy or LRUPolicy()
        self.ref_counts: list[int] = [0] * num_blocks
        self.block_hashes: list[BlockHash | None] = [None] * num_blocks
        self.parent_hashes: list[BlockHash | None] = [None] * num_blocks
        self.depths: list[int] = [0] * num_blocks
        # What policies see of each cached block, built once when it is published.
        self._infos: list[BlockInfo | None] = [None] * num_blocks
        self.block_bytes = block_size * TOKEN_BYTES
        self._token_bytes = bytearray(num_blocks * self.block_bytes)
        self.cached: dict[BlockHash, int] = {}
        # Allocation pops from the end: low ids are handed out first.
        self._uncached_free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._evictable: dict[BlockHash, int] = {}
        self.pinned: set[BlockHash] = set()
        self.num_evictions = 0
        self.lifecycle: LifecycleSampler | None = None

    # -- allocation ---------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._uncached_free) + len(self._evictable)

    def allocate(self, n: int, evicted: list[BlockRecord] | None = None) -> list[int]:
        """Takes ``n`` free blocks, uncached ones first, then the policy's victims.

        Each victim's key is dropped; if ``evicted`` is given, the victims are appended to it so
        that their KV can be demoted to a lower tier before the blocks are overwritten.
        """
        if n > self.num_free_blocks:
            raise RuntimeError(f"asked for {n} blocks, only {self.num_free_blocks} are free")
        take = min(n, len(self._uncached_free))
        blocks = self._uncached_free[len(self._uncached_free) - take :][::-1]
        del self._uncached_free[len(self._uncached_free) - take :]
        if take < n:
            for key in self.policy.select_victims(self._evictable, n - take):
                block = self._evictable[key]
                if evicted is not None:
                    evicted.append(self.record(block))
                self._drop_key(block)
                blocks.append(block)
            assert len(blocks) == n, f"policy {self.policy.name!r} chose {len(blocks) - take} victims, {n - take} were needed"
        refs = self.ref_counts
        for block in blocks:
            refs[block] = 1
        return blocks

    def touch(self, blocks: Iterable[int]) -> None:
        """Adds one reference to each block (a prefix hit), taking free ones out of the free set."""
        refs, hashes = self.ref_counts, self.block_hashes
        for block in blocks:
            key = hashes[block]
            if refs[block] == 0 and key not in self.pinned:
                del self._evictable[key]
                self.policy.on_remove(key)
            refs[block] += 1
            self.policy.on_access(self._info(block))
            if self.lifecycle is not None:
                self.lifecycle.accessed(key)

    def free(self, blocks: Iterable[int]) -> None:
        """Drops one reference from each block; blocks reaching zero become free, in order.

        Pass a request's blocks last-first, so that with LRU its tail is evicted before its prefix.
        """
        refs, hashes = self.ref_counts, self.block_hashes
        for block in blocks:
            refs[block] -= 1
            if refs[block] == 0:
                key = hashes[block]
                if key is None:
                    self._uncached_free.append(block)
                elif key not in self.pinned:
                    self._evictable[key] = block
                    self.policy.on_insert(self._info(block))

    # -- the key map --------------------------------------------------------------------------

    def cache_block(self, block: int, block_hash: BlockHash, parent_hash: BlockHash, tokens: bytes, depth: int = 0) -> bool:
        """Publishes a full, computed, referenced block under ``block_hash``; False if the key was taken.

        ``tokens`` is the block's ``token_bytes``; ``depth`` its index in its prefix chain.
        """
        if block_hash in self.cached or self.block_hashes[block] is not None:
            return False
        assert self.ref_counts[block] > 0, f"block {block} is free: only a referenced block is published"
        self.cached[block_hash] = block
        self.block_hashes[block] = block_hash
        self.parent_hashes[block] = parent_hash
        self.depths[block] = depth
        self._infos[block] = BlockInfo(block_hash, depth, self.bytes_per_block)
        offset = block * self.block_bytes
        self._token_bytes[offset : offset + self.block_bytes] = tokens
        self.events.stored(block_hash, parent_hash)
        if self.lifecycle is not None:
            self.lifecycle.cached(block_hash)
        return True

    def lookup(self, block_hash: BlockHash, parent_hash: BlockHash, tokens: bytes) -> int | None:
        """The block cached under ``block_hash``, confirmed against its parent key and ``token_bytes``."""
        block = self.cached.get(block_hash)
        if block is None or self.parent_hashes[block] != parent_hash:
            return None
        offset = block * self.block_bytes
        if self._token_bytes[offset : offset + self.block_bytes] != tokens:
            return None
        return block

    def evict(self, block_hashes: Iterable[BlockHash]) -> list[BlockRecord]:
        """Drops the given keys of free, unpinned blocks (used or pinned blocks keep theirs)."""
        evicted = []
        for key in block_hashes:
            block = self._evictable.get(key)
            if block is not None:
                evicted.append(self.record(block))
                self._drop_key(block)
                self._uncached_free.append(block)
        return evicted

    def clear(self) -> list[BlockRecord]:
        """Drops every free, unpinned cached block. When no cached block is left, the removals
        are announced as one ``AllBlocksCleared``."""
        evicted = self.evict(list(self._evictable))
        if not self.cached:
            self.events.cleared()
        return evicted

    def pin(self, key: BlockHash) -> bool:
        """Keeps a cached block resident until ``unpin``; False if the key is not cached here."""
        block = self.cached.get(key)
        if block is None:
            return False
        if key not in self.pinned and self.ref_counts[block] == 0:
            del self._evictable[key]
            self.policy.on_remove(key)
        self.pinned.add(key)
        return True

    def unpin(self, key: BlockHash) -> None:
        if key not in self.pinned:
            return
        self.pinned.discard(key)
        block = self.cached[key]
        if self.ref_counts[block] == 0:
            self._evictable[key] = block
            self.policy.on_insert(self._info(block))

    def set_policy(self, policy: EvictionPolicy) -> None:
        """Replaces the policy, handing it every current candidate (least recently freed first)."""
        self.policy = policy
        for block in self._evictable.values():
            policy.on_insert(self._info(block))

    def _drop_key(self, block: int) -> None:
        key = self.block_hashes[block]
        self._evictable.pop(key, None)
        self.policy.on_remove(key, dropped=True)
        del self.cached[key]
        self.block_hashes[block] = None
        self.parent_hashes[block] = None
        self._infos[block] = None
        self.num_evictions += 1
        self.events.removed(key)
        if self.lifecycle is not None:
            self.lifecycle.evicted(key)

    def _info(self, block: int) -> BlockInfo:
        return self._infos[block]

    # -- introspection ------------------------------------------------------------------------

    def record(self, block: int) -> BlockRecord:
        """What a cached block holds, for moving it to another tier."""
        return BlockRecord(block, self.block_hashes[block], self.parent_hashes[block], self.depths[block], self.token_bytes(block))

    def token_bytes(self, block: int) -> bytes:
        offset = block * self.block_bytes
        return bytes(self._token_bytes[offset : offset + self.block_bytes])

    def block_token_ids(self, block: int) -> list[int]:
        """The token ids stored with a cached block."""
        return token_ids_from_bytes(self.token_bytes(block))

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self.cached)

    def bookkeeping_bytes(self) -> int:
        """An estimate of the host memory this bookkeeping takes (lists, maps, keys, tokens)."""
        containers = (self.ref_counts, self.block_hashes, self.parent_hashes, self.depths, self._token_bytes, self.cached, self._evictable)
        keys = sum(sys.getsizeof(k) for k in self.cached) * 2  # each key, and its copy as a parent
        return sum(sys.getsizeof(c) for c in containers) + keys

    def free_block_ids(self) -> list[int]:
        """The blocks an allocation could take now (uncached or evictable), in id order."""
        return sorted(self._uncached_free + list(self._evictable.values()))

    def check_invariants(self) -> None:
        """Asserts the invariants in the module docstring (O(n); for tests)."""
        uncached = set(self._uncached_free)
        assert len(uncached) == len(self._uncached_free), "a block is in the uncached free list twice"
        evictable = set(self._evictable.values())
        assert len(evictable) == len(self._evictable), "two keys point at one evictable block"
        pinned_free = {self.cached[k] for k in self.pinned if k in self.cached and self.ref_counts[self.cached[k]] == 0}
        assert not (uncached & evictable) and not (uncached & pinned_free) and not (evictable & pinned_free)
        for block in range(self.num_blocks):
            refs = self.ref_counts[block]
            key = self.block_hashes[block]
            assert refs >= 0, f"block {block} has ref count {refs}"
            free_states = (block in uncached) + (block in evictable) + (block in pinned_free)
            assert free_states == (refs == 0), f"block {block}: ref count {refs}, in {free_states} free sets"
            if block in uncached:
                assert key is None, f"uncached free block {block} holds a key"
            if block in evictable:
                assert self._evictable[key] == block, f"evictable block {block} is listed under another key"
            if key is not None:
                assert self.cached.get(key) == block, f"block {block}'s key maps elsewhere"
        for key, block in self.cached.items():
            assert self.block_hashes[block] == key, f"key maps to block {block}, which holds another"
        assert self.pinned <= set(self.cached), "a pinned key is not cached"
