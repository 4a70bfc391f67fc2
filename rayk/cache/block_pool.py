"""The block pool of one device: ref counts, an LRU free queue and the key → block map.

Invariants (``check_invariants`` asserts them):

* Every block is either *used* (ref count > 0) or *free* (ref count 0, in the free queue), never
  both; ``num_free_blocks`` counts the free queue exactly.
* A free block keeps its key, stored tokens and parent key until it is handed out again: the
  free queue doubles as the cache's eviction order (least recently freed at the head). Eviction is
  lazy: a key is dropped only when its block is reallocated, so cached data is never thrown away
  while there is still an untouched free block.
* ``cached`` maps a key to exactly one block, and that block's stored key is the key. A block
  computed twice under the same key (two requests racing) stays uncached: the map keeps the first.
* Ref counts are owned by the KV cache manager: one per request whose block table holds the block.

The free queue is a doubly linked list threaded through two preallocated int lists (``_next``,
``_prev``) with sentinels at indices ``num_blocks`` (head) and ``num_blocks + 1`` (tail), so
popping, appending and unlinking a block from the middle are O(1) and allocate nothing.

Each cached block's tokens sit in one preallocated bytearray in ``rayk.hashing.token_bytes``
encoding, so storing them is a slice copy and confirming a hit is a memcmp.
"""

from __future__ import annotations

from collections.abc import Iterable

from rayk.cache.events import EventBuffer
from rayk.hashing import TOKEN_BYTES, BlockHash, token_ids_from_bytes


class BlockPool:
    """Bookkeeping for ``num_blocks`` KV blocks of ``block_size`` tokens each (no tensors)."""

    def __init__(self, num_blocks: int, block_size: int, tier: str = "device"):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.events = EventBuffer(tier)
        self.ref_counts: list[int] = [0] * num_blocks
        self.block_hashes: list[BlockHash | None] = [None] * num_blocks
        self.parent_hashes: list[BlockHash | None] = [None] * num_blocks
        self.block_bytes = block_size * TOKEN_BYTES
        self._token_bytes = bytearray(num_blocks * self.block_bytes)
        self.cached: dict[BlockHash, int] = {}
        self._head = num_blocks
        self._tail = num_blocks + 1
        # Initially block i follows block i-1: allocation hands out low ids first.
        self._next = list(range(1, num_blocks + 1)) + [0, -1]
        self._prev = [num_blocks] + list(range(num_blocks - 1)) + [-1, num_blocks - 1]
        self._next[self._head] = 0
        self._next[num_blocks - 1] = self._tail
        self.num_free_blocks = num_blocks
        self.num_evictions = 0

    # -- allocation ---------------------------------------------------------------------------

    def allocate(self, n: int) -> list[int]:
        """Takes ``n`` blocks from the head of the free queue, evicting their cached keys."""
        if n > self.num_free_blocks:
            raise RuntimeError(f"asked for {n} blocks, only {self.num_free_blocks} are free")
        nxt, prv, refs, hashes = self._next, self._prev, self.ref_counts, self.block_hashes
        head = self._head
        blocks = []
        block = nxt[head]
        for _ in range(n):
            refs[block] = 1
            if hashes[block] is not None:
                self._drop_key(block)
            blocks.append(block)
            block = nxt[block]
        nxt[head] = block
        prv[block] = head
        self.num_free_blocks -= n
        return blocks

    def touch(self, blocks: Iterable[int]) -> None:
        """Adds one reference to each block, taking free (cached) blocks out of the free queue."""
        nxt, prv, refs = self._next, self._prev, self.ref_counts
        for block in blocks:
            if refs[block] == 0:
                before, after = prv[block], nxt[block]
                nxt[before] = after
                prv[after] = before
                self.num_free_blocks -= 1
            refs[block] += 1

    def free(self, blocks: Iterable[int]) -> None:
        """Drops one reference from each block; blocks reaching zero join the tail, in order.

        Pass a request's blocks last-first so that its tail blocks are evicted before its prefix.
        """
        nxt, prv, refs = self._next, self._prev, self.ref_counts
        tail = self._tail
        for block in blocks:
            refs[block] -= 1
            if refs[block] == 0:
                last = prv[tail]
                nxt[last] = block
                prv[block] = last
                nxt[block] = tail
                prv[tail] = block
                self.num_free_blocks += 1

    # -- the key map --------------------------------------------------------------------------

    def cache_block(self, block: int, block_hash: BlockHash, parent_hash: BlockHash, tokens: bytes) -> bool:
        """Publishes a full, computed block under ``block_hash``; False if the key was taken.

        ``tokens`` is the block's ``token_bytes``.
        """
        if block_hash in self.cached or self.block_hashes[block] is not None:
            return False
        self.cached[block_hash] = block
        self.block_hashes[block] = block_hash
        self.parent_hashes[block] = parent_hash
        offset = block * self.block_bytes
        self._token_bytes[offset : offset + self.block_bytes] = tokens
        self.events.stored(block_hash)
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

    def evict(self, block_hashes: Iterable[BlockHash]) -> int:
        """Drops the given keys of free blocks (used blocks keep theirs); returns how many."""
        dropped = 0
        for block_hash in block_hashes:
            block = self.cached.get(block_hash)
            if block is not None and self.ref_counts[block] == 0:
                self._drop_key(block)
                dropped += 1
        return dropped

    def _drop_key(self, block: int) -> None:
        block_hash = self.block_hashes[block]
        del self.cached[block_hash]
        self.block_hashes[block] = None
        self.parent_hashes[block] = None
        self.num_evictions += 1
        self.events.removed(block_hash)

    # -- introspection ------------------------------------------------------------------------

    def block_token_ids(self, block: int) -> list[int]:
        """The token ids stored with a cached block."""
        offset = block * self.block_bytes
        return token_ids_from_bytes(self._token_bytes[offset : offset + self.block_bytes])

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self.cached)

    def free_queue(self) -> list[int]:
        """The free blocks from next-to-allocate to most recently freed (O(n); for tests and tools)."""
        order = []
        block = self._next[self._head]
        while block != self._tail:
            order.append(block)
            block = self._next[block]
        return order

    def check_invariants(self) -> None:
        """Asserts the invariants in the module docstring (O(n); for tests)."""
        free = self.free_queue()
        free_set = set(free)
        assert len(free) == len(free_set), "a block is in the free queue twice"
        assert len(free) == self.num_free_blocks, f"free queue has {len(free)}, counter says {self.num_free_blocks}"
        backward = []
        block = self._prev[self._tail]
        while block != self._head:
            backward.append(block)
            block = self._prev[block]
        assert backward[::-1] == free, "free queue links disagree"
        for block in range(self.num_blocks):
            refs = self.ref_counts[block]
            assert refs >= 0, f"block {block} has ref count {refs}"
            assert (refs == 0) == (block in free_set), f"block {block}: ref count {refs}, free={block in free_set}"
            block_hash = self.block_hashes[block]
            if block_hash is not None:
                assert self.cached.get(block_hash) == block, f"block {block}'s key maps elsewhere"
        for block_hash, block in self.cached.items():
            assert self.block_hashes[block] == block_hash, f"key maps to block {block}, which holds another"
