"""Per-request block tables over one device's block pool, with prefix caching across tiers.

What the scheduler talks to. For each request the manager keeps its block table, the keys of its
full blocks (hashed once, incrementally) and how many of those blocks it has published. It owns
one reference on every block in a request's table; ``free`` returns them.

Where blocks are is the ``TierChain``'s business (``rayk.cache.tier_chain``): device pool, host,
disk, and blocks staged from a peer for one request. ``find_prefix`` walks a request's chain of
keys and asks the chain for each block, stopping at the first block found nowhere. Every hit is
confirmed against the stored parent key and token ids (on disk and from peers, also the payload's
checksum), so by induction from the root every served block holds exactly the request's tokens. At least one token of every request
is always computed: a hit never covers the last prompt token, whose logits the first sample needs.

Blocks that an admitted request will compute but has not published yet are *in flight*: a
waiting request whose next uncached block is in flight waits for it (``waits_for_in_flight``)
rather than computing it again, so a burst sharing a new prefix computes it once.

``admit`` then takes the hit: it protects the hit's blocks, allocates the rest (the chain demotes
the cached device blocks it evicted), and has the chain promote the host, disk and remote hits
into their new device blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from rayk.cache.events import TIERS
from rayk.cache.tier_chain import Source, TierChain
from rayk.hashing import TOKEN_BYTES, BlockHash, BlockHasher, token_bytes


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class _RequestBlocks:
    root: BlockHash
    token_bytes: bytearray = field(default_factory=bytearray)  # the request's tokens, grown as they come
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[BlockHash] = field(default_factory=list)
    num_published_blocks: int = 0
    num_slots_used: int = 0
    num_in_flight_blocks: int = 0  # its blocks from num_published_blocks on are registered in flight


@dataclass(frozen=True)
class PrefixHit:
    """The cached blocks that hold the first ``num_tokens`` of a request's ``num_query_tokens``.

    ``sources[i]`` says where block ``i`` is (a ``tier_chain.Source``). Nothing is referenced
    until ``admit``.
    """

    sources: tuple[Source, ...]
    num_tokens: int
    num_query_tokens: int

    def device_blocks(self) -> list[int]:
        return [ref for tier, ref in self.sources if tier == "device"]


class KVCacheManager:
    def __init__(self, chain: TierChain, hasher: BlockHasher, enable_prefix_caching: bool = True):
        if chain.pool.block_size != hasher.block_size:
            raise ValueError(f"pool block_size {chain.pool.block_size} != hasher block_size {hasher.block_size}")
        self.chain = chain
        self.pool = chain.pool
        self.kv_cache = chain.kv_cache
        self.host = chain.host
        self.disk = chain.disk
        self.hasher = hasher
        self.block_size = chain.pool.block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._requests: dict[str, _RequestBlocks] = {}
        # Blocks set aside by a budget below a tier's size; each holds one reference.
        self.reserved: dict[str, list[int]] = {"device": [], "host": []}
        # Key of a block an admitted request computes but has not published yet → that request.
        self._in_flight: dict[BlockHash, str] = {}
        self.num_query_tokens = 0
        self.num_hit_tokens = 0
        self.hit_tokens_by_tier = dict.fromkeys(TIERS, 0)

    def block_ids(self, request_id: str) -> list[int]:
        return self._requests[request_id].block_ids

    # -- prefix lookup ------------------------------------------------------------------------

    def find_prefix(self, request_id: str, token_ids: Sequence[int], cache_salt: str | bytes | None = None) -> PrefixHit:
        """The longest confirmed cached prefix of a request that holds no blocks yet."""
        state = self._requests.get(request_id)
        if state is None:
            state = self._requests[request_id] = _RequestBlocks(root=self.hasher.root(cache_salt))
        assert not state.block_ids, f"request {request_id} already holds blocks"
        if not self.enable_prefix_caching:
            return PrefixHit((), 0, len(token_ids))
        self.chain.begin_lookup()
        _sync_token_bytes(state, token_ids)
        self.hasher.extend(state.block_hashes, state.token_bytes, state.root)
        max_blocks = (len(token_ids) - 1) // self.block_size
        sources: list[tuple[str, object]] = []
        parent = state.root
        step = self.hasher.block_bytes
        for i, key in enumerate(state.block_hashes[:max_blocks]):
            tokens = state.token_bytes[i * step : (i + 1) * step]
            source = self.chain.locate(key, parent, tokens, request_id)
            if source is None:
                break
            sources.append(source)
            parent = key
        return PrefixHit(tuple(sources), len(sources) * self.block_size, len(token_ids))

    def waits_for_in_flight(self, request_id: str, hit: PrefixHit) -> bool:
        """Whether another request is computing the block right after ``hit`` (found by
        ``find_prefix``): then this one should wait, and find it cached once published."""
        state = self._requests[request_id]
        next_block = len(hit.sources)
        if next_block >= min((hit.num_query_tokens - 1) // self.block_size, len(state.block_hashes)):
            return False
        owner = self._in_flight.get(state.block_hashes[next_block])
        return owner is not None and owner != request_id

    # -- allocation ---------------------------------------------------------------------------

    def num_blocks_needed(self, request_id: str, num_tokens: int, hit: PrefixHit | None = None) -> int:
        """Free device blocks that holding ``num_tokens`` tokens (after taking ``hit``) consumes."""
        state = self._requests[request_id]
        device_hits = hit.device_blocks() if hit is not None else []
        new_blocks = max(0, ceil_div(num_tokens, self.block_size) - len(state.block_ids) - len(device_hits))
        pool = self.pool
        revived = sum(1 for b in device_hits if pool.ref_counts[b] == 0 and pool.block_hashes[b] not in pool.pinned)
        return new_blocks + revived

    def allocate_slots(self, request_id: str, num_tokens: int) -> bool:
        """Grows a running request's table to hold ``num_tokens`` tokens; False (changing
        nothing) when the pool has too few free blocks."""
        if self.num_blocks_needed(request_id, num_tokens) > self.pool.num_free_blocks:
            return False
        state = self._requests[request_id]
        state.block_ids.extend(self.allocate_blocks(ceil_div(num_tokens, self.block_size) - len(state.block_ids)))
        state.num_slots_used = max(state.num_slots_used, num_tokens)
        return True

    def admit(self, request_id: str, num_tokens: int, hit: PrefixHit, count_stats: bool = True) -> dict[str, int] | None:
        """Takes ``hit`` and room for ``num_tokens`` tokens in all; returns the cached tokens by
        tier, or None (changing nothing) when the pool has too few free blocks."""
        if self.num_blocks_needed(request_id, num_tokens, hit) > self.pool.num_free_blocks:
            return None
        state = self._requests[request_id]
        self.chain.hold(hit.sources)
        new_blocks = self.allocate_blocks(ceil_div(num_tokens, self.block_size) - len(hit.device_blocks()))
        # Each non-device hit takes the next new block, in chain order.
        fresh = iter(new_blocks)
        table = [ref if tier == "device" else next(fresh) for tier, ref in hit.sources]
        targets = [block for (tier, _), block in zip(hit.sources, table) if tier != "device"]
        table.extend(fresh)
        state.block_ids.extend(table)
        self.chain.promote(hit.sources, targets)
        self.chain.drop_remote(request_id)
        self._publish(request_id, state, len(hit.sources))
        if self.enable_prefix_caching:
            self._register_in_flight(request_id, state, hit.num_query_tokens // self.block_size)
        state.num_slots_used = max(state.num_slots_used, num_tokens)
        by_tier = dict.fromkeys(TIERS, 0)
        for tier, _ in hit.sources:
            by_tier[tier] += self.block_size
        if count_stats:
            self.num_query_tokens += hit.num_query_tokens
            self.num_hit_tokens += hit.num_tokens
            for tier, tokens in by_tier.items():
                self.hit_tokens_by_tier[tier] += tokens
        return by_tier

    def allocate_blocks(self, count: int) -> list[int]:
        """Takes ``count`` free device blocks for the caller (the chain demotes what they held)."""
        return self.chain.allocate(count)

    # -- publishing and freeing ---------------------------------------------------------------

    def cache_blocks(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Publishes the request's blocks that are full of computed KV."""
        if not self.enable_prefix_caching:
            return
        state = self._requests[request_id]
        num_full = num_computed_tokens // self.block_size
        if num_full <= state.num_published_blocks:
            return
        _sync_token_bytes(state, token_ids)
        self.hasher.extend(state.block_hashes, state.token_bytes[: num_full * self.hasher.block_bytes], state.root)
        self._publish(request_id, state, num_full)

    def _publish(self, request_id: str, state: _RequestBlocks, num_full: int) -> None:
        step = self.hasher.block_bytes
        for i in range(state.num_published_blocks, num_full):
            parent = state.block_hashes[i - 1] if i else state.root
            self.pool.cache_block(state.block_ids[i], state.block_hashes[i], parent, state.token_bytes[i * step : (i + 1) * step], depth=i)
        self._unregister_in_flight(request_id, state, state.num_published_blocks, min(num_full, state.num_in_flight_blocks))
        state.num_published_blocks = max(state.num_published_blocks, num_full)

    def _register_in_flight(self, request_id: str, state: _RequestBlocks, num_full_prompt_blocks: int) -> None:
        """Announces the prompt's full blocks this request will compute (the first request to
        announce a key owns it)."""
        for key in state.block_hashes[state.num_published_blocks : num_full_prompt_blocks]:
            self._in_flight.setdefault(key, request_id)
        state.num_in_flight_blocks = max(state.num_in_flight_blocks, num_full_prompt_blocks)

    def _unregister_in_flight(self, request_id: str, state: _RequestBlocks, start: int, end: int) -> None:
        """Withdraws the request's in-flight keys among its blocks ``start:end``."""
        in_flight = self._in_flight
        for key in state.block_hashes[start:end]:
            if in_flight.get(key) == request_id:
                del in_flight[key]

    def free(self, request_id: str) -> None:
        """Returns every block of the request, tail first, and forgets it (and what a peer
        sent it)."""
        self.chain.drop_remote(request_id)
        state = self._requests.pop(request_id, None)
        if state is None:
            return
        self._unregister_in_flight(request_id, state, state.num_published_blocks, state.num_in_flight_blocks)
        if state.block_ids:
            self.pool.free(reversed(state.block_ids))

    # -- introspection ------------------------------------------------------------------------

    def request_usage(self) -> list[tuple[int, int]]:
        """(blocks in its table, token slots it uses) for each request holding blocks."""
        return [(len(s.block_ids), s.num_slots_used) for s in self._requests.values() if s.block_ids]

    @property
    def num_unused_slots(self) -> int:
        """Token slots allocated to requests but not holding a token (internal fragmentation)."""
        return sum(len(s.block_ids) * self.block_size - s.num_slots_used for s in self._requests.values())

    def check_invariants(self) -> None:
        """Asserts the pools' invariants and that ref counts equal the tables holding each block."""
        self.pool.check_invariants()
        if self.host is not None:
            self.host.pool.check_invariants()
            held = [0] * self.host.pool.num_blocks
            for slot in self.reserved["host"] + self.host.pending_slots:
                held[slot] += 1
            assert held == self.host.pool.ref_counts, "a host block is held by no reservation or copy"
        holders = [0] * self.pool.num_blocks
        for block in self.reserved["device"]:
            holders[block] += 1
        for state in self._requests.values():
            for block in state.block_ids:
                holders[block] += 1
        assert holders == self.pool.ref_counts, "ref counts disagree with the block tables"


def _sync_token_bytes(state: _RequestBlocks, token_ids: Sequence[int]) -> None:
    """Encodes the tokens the request gained since the last call (tokens are only appended)."""
    known = len(state.token_bytes) // TOKEN_BYTES
    if len(token_ids) > known:
        state.token_bytes += token_bytes(token_ids[known:])
