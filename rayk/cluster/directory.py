"""The prefix directory: which workers hold each block key, and in which tier.

The coordinator feeds it every worker's ``KVEventBatch`` es (``apply``) and asks it, for a
request's chain of block keys, how many leading blocks each worker holds (``match``). It is plain
Python: no Ray, no torch.

Layout. Each registered worker has a *slot* (a small int, reused after the worker is removed)
and four *containers*, in ``MATCH_TIERS`` order: a set of keys per stored tier (device, host,
disk) and its pending keys (a dict key → owner). Pending keys are blocks a request routed to the
worker will store soon; the router claims and ends them (``mark_pending`` / ``end_pending``), and
the worker storing a key in any tier ends its claim. Ingesting an event is one bulk set operation
on one container (``set.update`` / ``difference_update``, C speed, no per-key Python), which is
why this is faster than a key → bitmask dict that must read and write every key.

Two small indexes make ``match`` cheap without a per-key index:

* ``_heads``: key → slot bits of the workers that stored it as the *first* key of an event (or
  claimed it pending, or listed it in an inventory). A prompt's first block has the chain's root
  as its parent, and no event stores a root, so every holder of a first block stored it as the
  first key of one of its events: ``_heads[keys[0]]`` is a superset of its holders. Bits go stale
  when blocks are removed (removals do not touch this index); ``match`` verifies candidates and
  drops stale bits, and a sweep drops stale entries whenever the index doubles.
* ``_shared``: key → exact *container bits* (bit ``4 * slot + container``), over every worker, of
  the keys a match walked while more than ``MANY_HOLDERS`` workers still held the prefix (a system
  prompt on every worker): such a walk goes key by key on these masks, not worker by worker.
  Ingest and claims keep each entry exact (one C-level intersection per event); bulk changes (a
  cleared tier, a new epoch, an inventory, a removed worker) drop the whole cache, which later
  matches refill. Its size is bounded (oldest entries leave first).

Prefixes held. The router notes every request's first key (``note_prefix``); each worker keeps
the set of noted first keys it holds in its device pool or has pending, so ``prefixes_held``
says in O(1) how many distinct prefixes a worker's cache serves now, which is what spreading new
prefixes over the workers must balance. A first key is always the first key of a stored event
(its parent is a root, which no event stores), so storing costs one lookup; removals and ended
claims intersect with the worker's set only when it is not empty. Noted keys no worker holds are
swept whenever the set of noted keys doubles.

Sequencing. A worker incarnation is ``(worker_id, epoch)``; its batches carry ``seq`` from 0 with
no gaps. Entries of an old epoch are never routed to: a newer epoch drops them at once.

Invariants (``check_invariants`` asserts them):

* every registered worker has one slot; ``_by_slot[slot]`` is it; ``_containers[4 * slot:4 * slot
  + 4]`` are its containers; a free slot holds four empty placeholders;
* every ``_shared`` entry equals the container bits recomputed from the containers;
* every worker's ``prefixes`` are the noted first keys in its device set or its pending keys;
* (not asserted: it needs to know which keys start chains) every worker holding a chain's first
  block has its bit in ``_heads`` for that key.
* ``next_seq`` is the seq of the next batch the worker's state needs (seq of the last applied
  batch, or of the inventory, plus one).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from itertools import compress, islice, repeat, takewhile
from operator import contains, eq
from typing import NamedTuple

from rayk.cache.events import AllBlocksCleared, BlocksRemoved, BlocksStored, KVEventBatch
from rayk.hashing import BlockHash

TIERS = ("device", "host", "disk")
"""Stored tiers, best first: a block held in several counts in the best."""
MATCH_TIERS = ("device", "pending", "host", "disk")
"""The order of a worker's containers and of ``BlocksByTier``: pending is as good as device."""
MANY_HOLDERS = 4
"""Above this many workers holding a prefix, ``match`` walks shared masks key by key instead of
walking each worker's sets (about 2 µs per worker, against about 1 µs per key)."""

_CONTAINER_OF_TIER = {tier: MATCH_TIERS.index(tier) for tier in TIERS}
_PENDING = MATCH_TIERS.index("pending")
_CONTAINERS = len(MATCH_TIERS)
_FREE_SLOT = (frozenset(),) * _CONTAINERS
_FLAG_TO_DIGIT = bytes.maketrans(b"\x00\x01", b"01")
_DIGIT_TO_FLAG = bytes.maketrans(b"01", b"\x00\x01")
_MIN_HEADS_SWEEP = 4096
_EVENT_TYPES = (BlocksStored, BlocksRemoved, AllBlocksCleared)


class BlocksByTier(NamedTuple):
    """A worker's leading blocks of a request, split by the best container holding each (blocks)."""

    device: int = 0
    pending: int = 0
    host: int = 0
    disk: int = 0

    @property
    def num_blocks(self) -> int:
        return self.device + self.pending + self.host + self.disk


class _Worker:
    __slots__ = ("worker_id", "slot", "epoch", "next_seq", "pending", "containers", "key_sets", "prefixes")

    def __init__(self, worker_id: str, slot: int, epoch: int):
        self.worker_id = worker_id
        self.slot = slot
        self.epoch = epoch
        self.next_seq = 0
        self.pending: dict[BlockHash, str] = {}  # key -> the owner of its latest claim
        # MATCH_TIERS order. ``key_sets`` are the same, with the pending keys as a set-like view.
        self.containers: tuple[set, dict, set, set] = (set(), self.pending, set(), set())
        self.key_sets = (self.containers[0], self.pending.keys(), *self.containers[2:])
        self.prefixes: set[BlockHash] = set()  # noted first keys held in device or pending

    def drop_prefixes(self, keys: Iterable[BlockHash]) -> None:
        """Forgets the noted first keys among ``keys`` that are no longer in device or pending."""
        if self.prefixes:
            device, pending = self.containers[0], self.pending
            for key in self.prefixes.intersection(keys):
                if key not in device and key not in pending:
                    self.prefixes.discard(key)

    @property
    def slot_bit(self) -> int:
        return 1 << (_CONTAINERS * self.slot)

    def bits_holding(self, key: BlockHash) -> int:
        """Container bits (``4 * slot + container``) of this worker's containers holding ``key``."""
        bits, bit = 0, self.slot_bit
        for container in self.containers:
            if key in container:
                bits |= bit
            bit <<= 1
        return bits

    def stored_sets(self) -> list[set]:
        return [self.containers[_CONTAINER_OF_TIER[tier]] for tier in TIERS]

    def stored_keys(self) -> set[BlockHash]:
        """The keys it stores in any tier (pending excluded), as a new set."""
        return set().union(*self.stored_sets())


class PrefixDirectory:
    """Block key → the workers holding it and in which tier, fed by KV event batches."""

    def __init__(self, shared_capacity: int = 65536):
        if not isinstance(shared_capacity, int) or shared_capacity < 0:
            raise ValueError(f"PrefixDirectory.shared_capacity must be an int >= 0 (keys), got {shared_capacity!r}")
        self.shared_capacity = shared_capacity
        self._workers: dict[str, _Worker] = {}
        self._by_slot: list[_Worker | None] = []
        self._slot_ids: list[str | None] = []
        self._containers: list = []
        self._slot_unit = 0  # one bit per slot, at bit 4 * slot
        self._heads: dict[BlockHash, int] = {}
        self._heads_sweep_at = _MIN_HEADS_SWEEP
        self._shared: dict[BlockHash, int] = {}
        self._prefixes: set[BlockHash] = set()  # noted first keys (see the module doc)
        self._prefixes_sweep_at = _MIN_HEADS_SWEEP

    # -- workers ------------------------------------------------------------------------------

    def register(self, worker_id: str, epoch: int) -> None:
        """Adds a worker, or a new incarnation of one (a larger epoch): its old entries are
        dropped and its next batch must be seq 0. The current or an older epoch changes nothing."""
        if not isinstance(worker_id, str) or not worker_id:
            raise ValueError(f"worker_id must be a non-empty str, got {worker_id!r}")
        _check_epoch(epoch)
        worker = self._workers.get(worker_id)
        if worker is None:
            self._add(worker_id, epoch)
        elif epoch > worker.epoch:
            self._reset(worker, epoch)

    def remove(self, worker_id: str) -> None:
        """Forgets a (dead) worker and all its entries; its slot is reused by the next worker."""
        worker = self._worker(worker_id)
        del self._workers[worker_id]
        self._by_slot[worker.slot] = None
        self._slot_ids[worker.slot] = None
        start = _CONTAINERS * worker.slot
        self._containers[start : start + _CONTAINERS] = _FREE_SLOT
        self._slot_unit &= ~worker.slot_bit
        self._shared.clear()

    def workers(self) -> list[str]:
        """Registered worker ids, in registration order."""
        return list(self._workers)

    # -- ingest -------------------------------------------------------------------------------

    def apply(self, worker_id: str, epoch: int, batch: KVEventBatch) -> bool:
        """Ingests one event batch. Returns False when the caller must load the worker's inventory.

        * an older epoch than registered: ignored (True);
        * a newer epoch: the worker is registered at it (old entries dropped), the batch is not
          applied, False;
        * ``batch.seq`` below the next expected: already applied or in an inventory, ignored (True);
        * above it: events were lost, nothing applied, False;
        * otherwise applied, True.
        """
        worker = self._worker(worker_id)
        _check_epoch(epoch)
        if epoch < worker.epoch:
            return True
        if epoch > worker.epoch:
            self._reset(worker, epoch)
            return False
        if batch.seq < worker.next_seq:
            return True
        if batch.seq > worker.next_seq:
            return False
        for event in batch.events:  # all checked before any is applied: a bad batch changes nothing
            if type(event) not in _EVENT_TYPES:
                raise TypeError(f"batch events must be BlocksStored, BlocksRemoved or AllBlocksCleared, got {type(event).__name__}")
            if event.tier not in _CONTAINER_OF_TIER:
                raise ValueError(f"event tier must be one of {TIERS}, got {event.tier!r} (worker {worker_id!r}, seq {batch.seq})")
        for event in batch.events:
            kind = type(event)
            if kind is BlocksStored:
                self._store(worker, _CONTAINER_OF_TIER[event.tier], event.block_hashes)
            elif kind is BlocksRemoved:
                self._discard(worker, _CONTAINER_OF_TIER[event.tier], event.block_hashes)
            else:
                worker.containers[_CONTAINER_OF_TIER[event.tier]].clear()
                if event.tier == "device":
                    worker.prefixes.intersection_update(worker.pending)
                self._shared.clear()
        worker.next_seq += 1
        return True

    def load_inventory(self, worker_id: str, epoch: int, seq: int, inventory: Mapping[str, Iterable[BlockHash]]) -> None:
        """Replaces the worker's stored entries with ``inventory`` (tier → keys held).

        ``seq`` is the last batch the inventory includes (-1 if none): the next batch expected is
        ``seq + 1``. An inventory of an older epoch than registered is ignored; a newer one
        registers that epoch first. Pending keys the inventory holds end.
        """
        worker = self._worker(worker_id)
        _check_epoch(epoch)
        if not isinstance(seq, int) or seq < -1:
            raise ValueError(f"seq must be an int >= -1 (the last batch the inventory includes), got {seq!r}")
        unknown = set(inventory) - set(TIERS)
        if unknown:
            raise ValueError(f"inventory tiers must be among {TIERS}, got {sorted(unknown)}")
        if epoch < worker.epoch:
            return
        if epoch > worker.epoch:
            self._reset(worker, epoch)
        heads, bit = self._heads, worker.slot_bit
        for tier in TIERS:
            container = worker.containers[_CONTAINER_OF_TIER[tier]]
            container.clear()
            container.update(inventory.get(tier, ()))
            # An inventory does not say which keys start a chain: any may be a prompt's first block.
            for key in container:
                heads[key] = heads.get(key, 0) | bit
        pending = worker.pending
        for tier_keys in worker.stored_sets():
            for key in pending.keys() & tier_keys:
                del pending[key]
        worker.prefixes.clear()
        worker.prefixes.update(self._prefixes.intersection(worker.containers[0]), self._prefixes.intersection(pending))
        worker.next_seq = seq + 1
        self._shared.clear()
        if len(self._heads) > self._heads_sweep_at:
            self._sweep_heads()

    def _store(self, worker: _Worker, container_index: int, keys: Sequence[BlockHash]) -> None:
        if not keys:
            return
        worker.containers[container_index].update(keys)
        self._note_first(worker, keys[0], container_index == 0)
        self._mark_shared(worker, container_index, keys, True)
        pending = worker.pending
        if pending and not pending.keys().isdisjoint(keys):
            self._end_claims(worker, pending.keys() & keys)

    def _discard(self, worker: _Worker, container_index: int, keys: Sequence[BlockHash]) -> None:
        worker.containers[container_index].difference_update(keys)
        if container_index == 0:
            worker.drop_prefixes(keys)
        self._mark_shared(worker, container_index, keys, False)

    def _note_first(self, worker: _Worker, key: BlockHash, in_device_or_pending: bool) -> None:
        """Records that ``worker`` holds ``key`` as the first key of a chain (``_heads``), and
        counts it among the worker's prefixes when it is a noted first key in device or pending."""
        self._heads[key] = self._heads.get(key, 0) | worker.slot_bit
        if in_device_or_pending and key in self._prefixes:
            worker.prefixes.add(key)
        if len(self._heads) > self._heads_sweep_at:
            self._sweep_heads()

    def _mark_shared(self, worker: _Worker, container_index: int, keys: Collection[BlockHash], held: bool) -> None:
        """Sets (``held``) or clears the worker's container bit in the cached masks of ``keys``."""
        shared = self._shared
        if shared and not shared.keys().isdisjoint(keys):
            bit = 1 << (_CONTAINERS * worker.slot + container_index)
            for key in shared.keys() & keys:
                shared[key] = shared[key] | bit if held else shared[key] & ~bit

    # -- pending ------------------------------------------------------------------------------

    def mark_pending(self, worker_id: str, keys: Sequence[BlockHash], owner: str) -> None:
        """Claims ``keys`` (a chain, in prefix order) as soon to be stored by the worker, for
        ``owner`` (a request id); a key claimed again belongs to its latest owner. A worker the
        directory does not know (removed meanwhile) is ignored."""
        worker = self._workers.get(worker_id)
        if worker is None or not keys:
            return
        worker.pending.update(zip(keys, repeat(owner)))
        self._note_first(worker, keys[0], True)
        self._mark_shared(worker, _PENDING, keys, True)

    def end_pending(self, worker_id: str, keys: Sequence[BlockHash], owner: str) -> None:
        """Ends ``owner``'s claims on ``keys``; keys claimed since by another owner stay pending."""
        worker = self._workers.get(worker_id)
        if worker is None or not worker.pending or not keys:
            return
        self._end_claims(worker, list(compress(keys, map(eq, map(worker.pending.get, keys), repeat(owner)))))

    def _end_claims(self, worker: _Worker, keys: Collection[BlockHash]) -> None:
        deque(map(worker.pending.__delitem__, keys), maxlen=0)
        worker.drop_prefixes(keys)
        self._mark_shared(worker, _PENDING, keys, False)

    # -- lookup -------------------------------------------------------------------------------

    def match(self, keys: Sequence[BlockHash]) -> dict[BlocksByTier, list[str]]:
        """For a request's chain of keys (from its first block, in prefix order), the workers
        holding ``keys[0]`` in any container, grouped by their leading blocks: each walks the
        chain while it holds each key in any container, and each block counts in the best
        container holding it. Workers with equal counts share one entry (usually few entries,
        however many workers), which keeps scoring cheap.

        ``keys[0]`` must be a chain's first block (see ``_heads``: holders of a block that is not
        may be missed). Pass only the keys a hit may cover.
        """
        if not keys:
            return {}
        first = keys[0]
        mask = self._shared.get(first)
        if mask is None:
            mask = self._verified_holders(first)
        alive = self._slot_bits(mask)
        found: dict[BlocksByTier, list[str]] = {}
        start, classes = 0, [(alive, BlocksByTier())]
        if alive.bit_count() > MANY_HOLDERS:
            if first not in self._shared:
                mask = self._shared_mask(first)  # over every worker: cached masks are exact
                classes = [(self._slot_bits(mask), BlocksByTier())]
            start, classes = self._walk_shared(keys, mask, classes, found)
        for bits, counts in classes:
            for worker in self._workers_in(bits):
                grown = _walk_worker(worker, keys, start, counts)
                found.setdefault(grown, []).append(worker.worker_id)
        return found

    def _verified_holders(self, first: BlockHash) -> int:
        """Exact container bits of a chain's first key, from the candidates in ``_heads``."""
        candidates = self._heads.get(first)
        if candidates is None:
            return 0
        mask = 0
        for worker in self._workers_in(candidates & self._slot_unit):
            mask |= worker.bits_holding(first)
        held = self._slot_bits(mask)
        if held != candidates:
            if held:
                self._heads[first] = held
            elif candidates:
                del self._heads[first]
        return mask

    def _walk_shared(self, keys: Sequence[BlockHash], mask: int, classes: list, found: dict) -> tuple[int, list]:
        """Walks while more than ``MANY_HOLDERS`` workers hold each key, one shared mask per key.

        Workers with identical container bits over a run of keys stay in one *class* (slot bits,
        counts so far), so the cost is per run of equal masks, not per worker. Returns the index
        the walk stopped at and the classes still alive there; finished workers go to ``found``.
        """
        shared = self._shared
        run_mask, run_start = mask, 0
        for index in range(1, len(keys) + 1):
            if index < len(keys):
                mask = shared.get(keys[index])
                if mask is None:
                    mask = self._shared_mask(keys[index])
            else:
                mask = None
            if mask == run_mask:
                continue
            classes = self._split(classes, index - run_start, run_mask, found)
            if index == len(keys):
                return index, classes
            holders = self._slot_bits(mask) & sum(bits for bits, _ in classes)
            if holders.bit_count() <= MANY_HOLDERS:
                # The workers lacking keys[index] finish here; the few left walk alone.
                remaining = []
                for bits, counts in classes:
                    if bits & ~holders:
                        found.setdefault(counts, []).extend(self._worker_ids(bits & ~holders))
                    if bits & holders:
                        remaining.append((bits & holders, counts))
                return index, remaining
            run_mask, run_start = mask, index
        raise AssertionError("unreachable: the last index always ends the walk")

    def _split(self, classes: list, length: int, mask: int, found: dict) -> list:
        """Advances each class over ``length`` keys held per ``mask``: each worker's blocks go to
        its best container; workers holding none of them finish."""
        unit = self._slot_unit
        device = mask & unit
        pending = (mask >> 1) & unit & ~device
        held = device | pending
        host = (mask >> 2) & unit & ~held
        held |= host
        disk = (mask >> 3) & unit & ~held
        held |= disk
        advanced = []
        for bits, counts in classes:
            finished = bits & ~held
            if finished:
                found.setdefault(counts, []).extend(self._worker_ids(finished))
            for container_index, part in enumerate((bits & device, bits & pending, bits & host, bits & disk)):
                if part:
                    grown = list(counts)
                    grown[container_index] += length
                    advanced.append((part, BlocksByTier(*grown)))
        return advanced

    def _shared_mask(self, key: BlockHash) -> int:
        """The key's container bits over every worker (4 x workers lookups), cached in ``_shared``."""
        flags = bytes(map(contains, self._containers, repeat(key)))
        mask = int(flags.translate(_FLAG_TO_DIGIT)[::-1], 2) if flags else 0
        self._cache_shared(key, mask)
        return mask

    def _cache_shared(self, key: BlockHash, mask: int) -> None:
        if self.shared_capacity == 0:
            return
        if len(self._shared) >= self.shared_capacity:
            del self._shared[next(iter(self._shared))]
        self._shared[key] = mask

    # -- size ---------------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        """Distinct keys stored by any worker in any tier (pending excluded). O(blocks): for stats."""
        return len(set().union(*(s for worker in self._workers.values() for s in worker.stored_sets())))

    def blocks_per_worker(self) -> dict[str, int]:
        """Worker → distinct keys it stores in any tier (pending excluded). O(blocks): for stats."""
        return {worker_id: len(worker.stored_keys()) for worker_id, worker in self._workers.items()}

    def held_twice(self) -> set[BlockHash]:
        """The keys stored (any tier) by two workers or more. O(blocks held)."""
        seen: set[BlockHash] = set()
        twice: set[BlockHash] = set()
        for worker in self._workers.values():
            mine = worker.stored_keys()
            twice |= mine & seen
            seen |= mine
        return twice

    def stored_keys(self, worker_id: str) -> set[BlockHash]:
        """The keys the worker stores, in any tier. O(its blocks)."""
        return self._worker(worker_id).stored_keys()

    def blocks_per_tier(self, worker_id: str) -> dict[str, int]:
        """Tier → keys the worker stores there (a key in two tiers counts in both). O(1)."""
        worker = self._worker(worker_id)
        return {tier: len(worker.containers[_CONTAINER_OF_TIER[tier]]) for tier in TIERS}

    def note_prefix(self, first_key: BlockHash) -> None:
        """Notes a request's first key, so that the workers holding it count it in
        ``prefixes_held``. Noting a key again is one lookup."""
        if first_key in self._prefixes:
            return
        if len(self._prefixes) >= self._prefixes_sweep_at:
            self._sweep_prefixes()
        self._prefixes.add(first_key)
        candidates = self._heads.get(first_key, 0) & self._slot_unit
        for worker in self._workers_in(candidates):
            if first_key in worker.containers[0] or first_key in worker.pending:
                worker.prefixes.add(first_key)

    def prefixes_held(self, worker_ids: Iterable[str]) -> list[int]:
        """Per worker, in order: the noted first keys (distinct prefixes) it holds in its device
        pool or has pending there. O(1) per worker."""
        return list(map(len, self.prefix_sets(worker_ids)))

    def prefix_sets(self, worker_ids: Iterable[str]) -> list[set[BlockHash]]:
        """Per worker, in order: the set behind ``prefixes_held``, a live view that stays the
        worker's until it is removed (read it, never change it)."""
        workers = self._workers
        return [workers[w].prefixes for w in worker_ids]

    def next_seq(self, worker_id: str) -> int:
        """The seq of the batch the worker's entries need next."""
        return self._worker(worker_id).next_seq

    # -- internals ----------------------------------------------------------------------------

    def _worker(self, worker_id: str) -> _Worker:
        worker = self._workers.get(worker_id)
        if worker is None:
            raise ValueError(f"worker_id {worker_id!r} is not registered; registered: {sorted(self._workers)}")
        return worker

    def _add(self, worker_id: str, epoch: int) -> None:
        slot = next((s for s, w in enumerate(self._by_slot) if w is None), len(self._by_slot))
        worker = _Worker(worker_id, slot, epoch)
        if slot == len(self._by_slot):
            self._by_slot.append(None)
            self._slot_ids.append(None)
            self._containers.extend(_FREE_SLOT)
        self._by_slot[slot] = worker
        self._slot_ids[slot] = worker_id
        self._containers[_CONTAINERS * slot : _CONTAINERS * (slot + 1)] = worker.containers
        self._slot_unit |= worker.slot_bit
        self._workers[worker_id] = worker

    def _reset(self, worker: _Worker, epoch: int) -> None:
        for container in worker.stored_sets():
            container.clear()
        worker.pending.clear()
        worker.prefixes.clear()
        worker.epoch = epoch
        worker.next_seq = 0
        self._shared.clear()

    def _slot_bits(self, mask: int) -> int:
        """Container bits → one bit per slot holding any of them (at bit 4 * slot)."""
        return (mask | mask >> 1 | mask >> 2 | mask >> 3) & self._slot_unit

    def _slot_flags(self, slot_bits: int) -> bytes:
        """Slot bits → one byte per slot (0 or 1), for ``itertools.compress``."""
        return format(slot_bits, "b")[::-1][::_CONTAINERS].encode().translate(_DIGIT_TO_FLAG)

    def _worker_ids(self, slot_bits: int) -> Iterator[str]:
        return compress(self._slot_ids, self._slot_flags(slot_bits))

    def _workers_in(self, slot_bits: int) -> list[_Worker]:
        """The workers of ``slot_bits``: bit by bit when few, else through ``_slot_flags``."""
        if slot_bits.bit_count() > 8:
            return list(compress(self._by_slot, self._slot_flags(slot_bits)))
        workers = []
        while slot_bits:
            lowest = slot_bits & -slot_bits
            workers.append(self._by_slot[lowest.bit_length() >> 2])  # bit 4 * slot
            slot_bits ^= lowest
        return workers

    def _sweep_heads(self) -> None:
        """Drops stale candidates; called once the index has doubled since the last sweep, so
        its O(entries) cost is amortised over as many stored events."""
        live = {}
        for key, candidates in self._heads.items():
            held = 0
            for worker in self._workers_in(candidates & self._slot_unit):
                if worker.bits_holding(key):
                    held |= worker.slot_bit
            if held:
                live[key] = held
        self._heads = live
        self._heads_sweep_at = max(2 * len(live), _MIN_HEADS_SWEEP)

    def _sweep_prefixes(self) -> None:
        """Keeps the noted first keys some worker holds in device or pending; called once the set
        has doubled since the last sweep, so its cost is amortised over as many notes."""
        self._prefixes = set().union(*(worker.prefixes for worker in self._workers.values()))
        self._prefixes_sweep_at = max(2 * len(self._prefixes), _MIN_HEADS_SWEEP)

    def check_invariants(self) -> None:
        assert len(self._by_slot) == len(self._slot_ids) and len(self._containers) == _CONTAINERS * len(self._by_slot)
        unit = 0
        for slot, worker in enumerate(self._by_slot):
            containers = tuple(self._containers[_CONTAINERS * slot : _CONTAINERS * (slot + 1)])
            if worker is None:
                assert self._slot_ids[slot] is None and all(c is e for c, e in zip(containers, _FREE_SLOT))
                continue
            assert self._workers[worker.worker_id] is worker and worker.slot == slot
            assert self._slot_ids[slot] == worker.worker_id
            assert all(c is e for c, e in zip(containers, worker.containers)), "slot containers must be the worker's"
            assert worker.epoch >= 0 and worker.next_seq >= 0
            held = (worker.containers[0] | worker.pending.keys()) & self._prefixes
            assert worker.prefixes == held, f"prefixes held by {worker.worker_id} are stale"
            unit |= worker.slot_bit
        assert len(self._workers) == sum(w is not None for w in self._by_slot)
        assert unit == self._slot_unit
        assert len(self._shared) <= self.shared_capacity
        for key, mask in self._shared.items():
            exact = sum(worker.bits_holding(key) for worker in self._workers.values())
            assert mask == exact, f"shared mask of {key.hex()} is stale"


def _walk_worker(worker: _Worker, keys: Sequence[BlockHash], start: int, counts: BlocksByTier) -> BlocksByTier:
    """``counts`` grown by one worker's blocks from ``keys[start]`` while it holds each key.

    The walk goes by runs of keys in one container, found at C speed (``takewhile``); a run's
    keys count in its container unless a better container also holds some (rare: storing a key
    ends its pending claim), which then count there, so the split is exact.
    """
    containers, end = worker.containers, len(keys)
    device = containers[0]
    index = start + len(list(takewhile(device.__contains__, islice(keys, start, end))))
    if index == end or not any(map(contains, containers, repeat(keys[index]))):
        if index == start:
            return counts
        return BlocksByTier(counts.device + index - start, counts.pending, counts.host, counts.disk)
    grown = list(counts)
    grown[0] += index - start
    while index < end:
        key = keys[index]
        for container_index, container in enumerate(containers):
            if key in container:
                break
        else:
            break
        run = keys[index : index + len(list(takewhile(container.__contains__, islice(keys, index, end))))]
        index += len(run)
        moved = None
        for better in range(container_index):
            if not worker.key_sets[better].isdisjoint(run):
                if moved is None:
                    moved = set(run)
                held = worker.key_sets[better] & moved
                grown[better] += len(held)
                moved -= held
        grown[container_index] += len(run) if moved is None else len(moved)
    return BlocksByTier(*grown)


def _check_epoch(epoch: int) -> None:
    if not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
