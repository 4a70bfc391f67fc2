"""Eviction policies: which cached blocks a tier gives up when it needs room.

A tier keeps a policy informed about its *candidates*, the blocks it could evict now (cached,
unreferenced, unpinned):

* ``on_insert(block)``: the block became a candidate;
* ``on_remove(key, dropped)``: it stopped being one: taken into use or pinned, or ``dropped``
  from the tier altogether (then the policy forgets what it knew of it);
* ``on_access(block)``: it was hit (candidate or not), which feeds recency and frequency;
* ``select_victims(candidates, n)``: up to ``n`` keys to evict, each in ``candidates`` (a
  container the tier owns, for O(1) membership checks). The tier then calls ``on_remove``.

Because the policy mirrors the candidate set, no policy scans in-use or pinned blocks. The
built-in policies cost O(1) (``lru``) or O(log n) (heap-ordered, with lazy deletion) per call.

A user's policy subclasses ``EvictionPolicy`` and is passed as an instance, or registered with
``register_policy(name, factory)`` and passed by name.
"""

from __future__ import annotations

import copy
import heapq
import itertools
from collections import OrderedDict
from collections.abc import Callable, Container
from typing import NamedTuple

from rayk.hashing import BlockHash


class BlockInfo(NamedTuple):
    """What a policy may weigh: the key, the block's depth in its prefix chain (0 for a first
    block, so ``depth + 1`` blocks must be computed to rebuild it) and its size in this tier.

    A named tuple: one is built per policy call, on the allocation path."""

    key: BlockHash
    depth: int
    num_bytes: int


class EvictionPolicy:
    """The interface. Subclasses must keep every call O(1) or O(log n) in the number of blocks."""

    name = "custom"

    def on_insert(self, block: BlockInfo) -> None:
        raise NotImplementedError

    def on_access(self, block: BlockInfo) -> None:
        raise NotImplementedError

    def on_remove(self, key: BlockHash, dropped: bool = False) -> None:
        raise NotImplementedError

    def select_victims(self, candidates: Container[BlockHash], n: int) -> list[BlockHash]:
        raise NotImplementedError


class LRUPolicy(EvictionPolicy):
    """Least recently used (insertion or access) first."""

    name = "lru"

    def __init__(self):
        self._order: OrderedDict[BlockHash, None] = OrderedDict()

    def on_insert(self, block: BlockInfo) -> None:
        self._order[block.key] = None
        self._order.move_to_end(block.key)

    def on_access(self, block: BlockInfo) -> None:
        if block.key in self._order:
            self._order.move_to_end(block.key)

    def on_remove(self, key: BlockHash, dropped: bool = False) -> None:
        self._order.pop(key, None)

    def select_victims(self, candidates: Container[BlockHash], n: int) -> list[BlockHash]:
        victims = []
        for key in self._order:
            if len(victims) == n:
                break
            if key in candidates:
                victims.append(key)
        return victims


class ClusterAwarePolicy(EvictionPolicy):
    """LRU within two classes: blocks another worker also holds (replicas) go first, last copies
    after. The coordinator tells each worker which of its blocks have replicas elsewhere
    (``set_replicated``), so the cluster gives up a block it holds twice before one it holds
    once. With nothing marked it is plain LRU, as on a single engine."""

    name = "cluster_aware"

    def __init__(self):
        self._replicas: OrderedDict[BlockHash, None] = OrderedDict()
        self._last_copies: OrderedDict[BlockHash, None] = OrderedDict()
        self.replicated: set[BlockHash] = set()

    def set_replicated(self, keys, replicated: bool) -> None:
        """Marks keys as held elsewhere too (``replicated``) or no longer; a candidate moves to
        the other class, as its most recent member."""
        source, target = (self._last_copies, self._replicas) if replicated else (self._replicas, self._last_copies)
        for key in keys:
            if replicated:
                self.replicated.add(key)
            else:
                self.replicated.discard(key)
            if key in source:
                del source[key]
                target[key] = None

    def on_insert(self, block: BlockInfo) -> None:
        order = self._replicas if block.key in self.replicated else self._last_copies
        order[block.key] = None
        order.move_to_end(block.key)

    def on_access(self, block: BlockInfo) -> None:
        for order in (self._replicas, self._last_copies):
            if block.key in order:
                order.move_to_end(block.key)

    def on_remove(self, key: BlockHash, dropped: bool = False) -> None:
        self._replicas.pop(key, None)
        self._last_copies.pop(key, None)

    def select_victims(self, candidates: Container[BlockHash], n: int) -> list[BlockHash]:
        victims = []
        for order in (self._replicas, self._last_copies):
            for key in order:
                if len(victims) == n:
                    return victims
                if key in candidates:
                    victims.append(key)
        return victims


class _HeapPolicy(EvictionPolicy):
    """Lowest priority first, from a heap with lazy deletion.

    A block's current entry is the one whose stamp matches ``_stamps``; older entries are skipped
    when popped and purged when they outnumber live ones, so every call is O(log n) amortized.
    """

    def __init__(self):
        self._heap: list[tuple[float, int, BlockHash]] = []
        self._stamps: dict[BlockHash, int] = {}
        self._counter = itertools.count()
        self.frequency: dict[BlockHash, int] = {}

    def priority(self, block: BlockInfo) -> float:
        raise NotImplementedError

    def on_insert(self, block: BlockInfo) -> None:
        self.frequency.setdefault(block.key, 1)
        self._push(block)

    def on_access(self, block: BlockInfo) -> None:
        self.frequency[block.key] = self.frequency.get(block.key, 0) + 1
        if block.key in self._stamps:
            self._push(block)

    def on_remove(self, key: BlockHash, dropped: bool = False) -> None:
        self._stamps.pop(key, None)
        if dropped:
            self.frequency.pop(key, None)

    def select_victims(self, candidates: Container[BlockHash], n: int) -> list[BlockHash]:
        victims, skipped = [], []
        while self._heap and len(victims) < n:
            entry = heapq.heappop(self._heap)
            _, stamp, key = entry
            if self._stamps.get(key) != stamp:
                continue
            if key in candidates:
                victims.append(key)
                self.frequency.pop(key, None)
                self.evicted(entry[0])
            else:
                skipped.append(entry)
        for entry in skipped:
            heapq.heappush(self._heap, entry)
        return victims

    def evicted(self, priority: float) -> None:
        """Called with a victim's priority (GDSF ages the cache with it)."""

    def _push(self, block: BlockInfo) -> None:
        stamp = next(self._counter)
        self._stamps[block.key] = stamp
        heapq.heappush(self._heap, (self.priority(block), stamp, block.key))
        if len(self._heap) > 2 * len(self._stamps) + 64:
            self._heap = [e for e in self._heap if self._stamps.get(e[2]) == e[1]]
            heapq.heapify(self._heap)


class LFUPolicy(_HeapPolicy):
    """Least frequently accessed first; ties go to the least recently touched."""

    name = "lfu"

    def priority(self, block: BlockInfo) -> float:
        return self.frequency[block.key]


class GreedyDualPolicy(_HeapPolicy):
    """Greedy-Dual-Size-Frequency: priority = age + frequency x cost / size.

    ``age`` rises to each victim's priority, so blocks not touched for a while fall behind newly
    touched ones (recency) while frequently hit, costly, small blocks stay longest.
    """

    def __init__(self):
        super().__init__()
        self.age = 0.0

    def cost(self, block: BlockInfo) -> float:
        raise NotImplementedError

    def priority(self, block: BlockInfo) -> float:
        return self.age + self.frequency[block.key] * self.cost(block) / max(block.num_bytes, 1)

    def evicted(self, priority: float) -> None:
        self.age = max(self.age, priority)


class AdaptivePolicy(GreedyDualPolicy):
    """Recency x frequency x size, every block equally costly to recompute."""

    name = "adaptive"

    def cost(self, block: BlockInfo) -> float:
        return 1.0


class CostAwarePolicy(GreedyDualPolicy):
    """Recompute cost against bytes kept: a block deep in a long prefix needs its whole prefix
    recomputed, ``depth + 1`` blocks, so it outlives a shallow block of the same size."""

    name = "cost_aware"

    def cost(self, block: BlockInfo) -> float:
        return float(block.depth + 1)


_REGISTRY: dict[str, Callable[[], EvictionPolicy]] = {}


def copy_policy(policy: str | EvictionPolicy) -> EvictionPolicy:
    """A fresh policy for one more tier: a new one by name, or a copy of the instance."""
    return make_policy(policy) if isinstance(policy, str) else copy.deepcopy(policy)


def register_policy(name: str, factory: Callable[[], EvictionPolicy]) -> None:
    """Makes ``eviction_policy=name`` build a fresh policy from ``factory`` for each tier."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"policy name must be a non-empty string, got {name!r}")
    _REGISTRY[name] = factory


def make_policy(policy: str | EvictionPolicy) -> EvictionPolicy:
    """A policy from a registered name, or the instance itself."""
    if isinstance(policy, EvictionPolicy):
        return policy
    if not isinstance(policy, str):
        raise TypeError(f"eviction_policy must be a policy name or an EvictionPolicy, got {type(policy).__name__}")
    if policy not in _REGISTRY:
        raise ValueError(f"eviction_policy must be an EvictionPolicy or one of {sorted(_REGISTRY)}, got {policy!r}")
    return _REGISTRY[policy]()


for _policy in (LRUPolicy, LFUPolicy, AdaptivePolicy, CostAwarePolicy, ClusterAwarePolicy):
    register_policy(_policy.name, _policy)
