"""Per-request block tables over one device's block pool, with prefix caching.

What the scheduler talks to. For each request the manager keeps its block table, the keys of its
full blocks (hashed once, incrementally) and how many of those blocks it has published. It owns
one reference on every block in a request's table; ``free`` returns them.

A prefix hit is confirmed block by block against the stored parent key and token ids
(``BlockPool.lookup``), so by induction from the root every served block holds exactly the
request's tokens. At least one token of every request is always computed: a hit never covers the
last prompt token, whose logits the first sample needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from rayk.cache.block_pool import BlockPool
from rayk.hashing import TOKEN_BYTES, BlockHash, BlockHasher, token_bytes


@dataclass
class _RequestBlocks:
    root: BlockHash
    token_bytes: bytearray = field(default_factory=bytearray)  # the request's tokens, grown as they come
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[BlockHash] = field(default_factory=list)
    num_published_blocks: int = 0
    num_slots_used: int = 0


@dataclass(frozen=True)
class PrefixHit:
    """Blocks that already hold the first ``num_tokens`` of a request's ``num_query_tokens``.

    The blocks are not referenced until ``allocate_slots`` takes them.
    """

    block_ids: tuple[int, ...]
    num_tokens: int
    num_query_tokens: int


class KVCacheManager:
    def __init__(self, pool: BlockPool, hasher: BlockHasher, enable_prefix_caching: bool = True):
        if pool.block_size != hasher.block_size:
            raise ValueError(f"pool block_size {pool.block_size} != hasher block_size {hasher.block_size}")
        self.pool = pool
        self.hasher = hasher
        self.block_size = pool.block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._requests: dict[str, _RequestBlocks] = {}
        self.num_query_tokens = 0
        self.num_hit_tokens = 0

    def block_ids(self, request_id: str) -> list[int]:
        return self._requests[request_id].block_ids

    def find_prefix(self, request_id: str, token_ids: Sequence[int], cache_salt: str | bytes | None = None) -> PrefixHit:
        """The longest confirmed cached prefix of a request that holds no blocks yet."""
        state = self._requests.get(request_id)
        if state is None:
            state = self._requests[request_id] = _RequestBlocks(root=self.hasher.root(cache_salt))
        assert not state.block_ids, f"request {request_id} already holds blocks"
        if not self.enable_prefix_caching:
            return PrefixHit((), 0, len(token_ids))
        _sync_token_bytes(state, token_ids)
        self.hasher.extend(state.block_hashes, state.token_bytes, state.root)
        max_blocks = (len(token_ids) - 1) // self.block_size
        hits = []
        parent = state.root
        step = self.hasher.block_bytes
        for i, block_hash in enumerate(state.block_hashes[:max_blocks]):
            block = self.pool.lookup(block_hash, parent, state.token_bytes[i * step : (i + 1) * step])
            if block is None:
                break
            hits.append(block)
            parent = block_hash
        return PrefixHit(tuple(hits), len(hits) * self.block_size, len(token_ids))

    def num_blocks_needed(self, request_id: str, num_tokens: int, hit: PrefixHit | None = None) -> int:
        """Free blocks that ``allocate_slots`` would consume to hold ``num_tokens`` tokens."""
        state = self._requests[request_id]
        held = len(state.block_ids) + (len(hit.block_ids) if hit is not None else 0)
        new_blocks = max(0, -(-num_tokens // self.block_size) - held)
        revived = sum(1 for b in hit.block_ids if self.pool.ref_counts[b] == 0) if hit is not None else 0
        return new_blocks + revived

    def allocate_slots(self, request_id: str, num_tokens: int, hit: PrefixHit | None = None) -> bool:
        """Grows the request's table to hold ``num_tokens`` tokens, first taking ``hit``'s blocks.

        Returns False, changing nothing, when the pool has too few free blocks. A request's
        admission passes its ``hit`` (possibly empty); that is when hit statistics count.
        """
        if self.num_blocks_needed(request_id, num_tokens, hit) > self.pool.num_free_blocks:
            return False
        state = self._requests[request_id]
        if hit is not None:
            self.num_query_tokens += hit.num_query_tokens
            self.num_hit_tokens += hit.num_tokens
        if hit is not None and hit.block_ids:
            self.pool.touch(hit.block_ids)
            state.block_ids.extend(hit.block_ids)
            state.num_published_blocks = len(state.block_ids)
        new_blocks = -(-num_tokens // self.block_size) - len(state.block_ids)
        if new_blocks > 0:
            state.block_ids.extend(self.pool.allocate(new_blocks))
        state.num_slots_used = max(state.num_slots_used, num_tokens)
        return True

    def cache_blocks(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Publishes the request's blocks that are full of computed KV."""
        if not self.enable_prefix_caching:
            return
        state = self._requests[request_id]
        num_full = num_computed_tokens // self.block_size
        if num_full <= state.num_published_blocks:
            return
        _sync_token_bytes(state, token_ids)
        step = self.hasher.block_bytes
        self.hasher.extend(state.block_hashes, state.token_bytes[: num_full * step], state.root)
        for i in range(state.num_published_blocks, num_full):
            parent = state.block_hashes[i - 1] if i else state.root
            self.pool.cache_block(state.block_ids[i], state.block_hashes[i], parent, state.token_bytes[i * step : (i + 1) * step], depth=i)
        state.num_published_blocks = num_full

    def free(self, request_id: str) -> None:
        """Returns every block of the request, tail first, and forgets it."""
        state = self._requests.pop(request_id, None)
        if state is not None and state.block_ids:
            self.pool.free(reversed(state.block_ids))

    @property
    def num_active_requests(self) -> int:
        return sum(1 for s in self._requests.values() if s.block_ids)

    @property
    def num_unused_slots(self) -> int:
        """Token slots allocated to requests but not holding a token (internal fragmentation)."""
        return sum(len(s.block_ids) * self.block_size - s.num_slots_used for s in self._requests.values())

    def check_invariants(self) -> None:
        """Asserts the pool's invariants and that ref counts equal the tables holding each block."""
        self.pool.check_invariants()
        holders = [0] * self.pool.num_blocks
        for state in self._requests.values():
            for block in state.block_ids:
                holders[block] += 1
        assert holders == self.pool.ref_counts, "ref counts disagree with the block tables"


def _sync_token_bytes(state: _RequestBlocks, token_ids: Sequence[int]) -> None:
    """Encodes the tokens the request gained since the last call (tokens are only appended)."""
    known = len(state.token_bytes) // TOKEN_BYTES
    if len(token_ids) > known:
        state.token_bytes += token_bytes(token_ids[known:])
