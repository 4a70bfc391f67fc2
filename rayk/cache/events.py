"""KV events: every block stored in, or removed from, a tier is announced to subscribers.

The cache layers only append block keys to an ``EventBuffer`` (list appends on the hot path);
whoever drives the engine drains the buffers once per step into one ``KVEventBatch``. A worker
forwards these batches to the coordinator's prefix directory.

Contract of a batch, which a directory relies on:

* ``seq`` counts the batches of one engine from 0 with no gaps, so a missing number means lost
  events (the directory then asks for the engine's inventory);
* within a batch, events are in the order the tiers changed, per tier;
* a ``BlocksStored`` holds keys in prefix order: each key's parent is the key before it, and the
  first key's parent is ``parent_hash`` (the root key for a prefix's first block);
* ``AllBlocksCleared`` replaces a removal of every block of its tier.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from rayk.hashing import BlockHash

TIERS = ("device", "host", "disk", "remote")
"""Where a worker's blocks can be: its own tiers, then blocks staged from a peer ("remote")."""
STORED_TIERS = ("device", "host", "disk")
"""The tiers a worker stores blocks in (and announces events for)."""


@dataclass(frozen=True)
class BlocksStored:
    """Blocks whose KV is now held by ``tier`` under these keys, in prefix order."""

    tier: str
    block_hashes: tuple[BlockHash, ...]
    parent_hash: BlockHash


@dataclass(frozen=True)
class BlocksRemoved:
    """Blocks that ``tier`` no longer holds (evicted or dropped)."""

    tier: str
    block_hashes: tuple[BlockHash, ...]


@dataclass(frozen=True)
class AllBlocksCleared:
    """``tier`` dropped every block it held."""

    tier: str


KVEvent = BlocksStored | BlocksRemoved | AllBlocksCleared


@dataclass(frozen=True)
class KVEventBatch:
    """One engine's events of one step: ``seq`` numbers batches from 0 without gaps;
    ``timestamp`` is wall-clock seconds (``time.time()``) when the batch was drained."""

    seq: int
    timestamp: float
    events: tuple[KVEvent, ...]


KVEventSubscriber = Callable[[KVEventBatch], None]


class EventBuffer:
    """The keys stored in and removed from one tier since the last drain, in order.

    Consecutive changes of one kind share an event while they stay in prefix order, so a step
    that stores a thousand blocks of one prompt yields one ``BlocksStored``; order across kinds is
    kept, so a key stored and then evicted in one step ends up removed.
    """

    def __init__(self, tier: str):
        self.tier = tier
        self._events: list[KVEvent] = []
        self._run_kind: type | None = None
        self._run: list[BlockHash] = []
        self._run_parent: BlockHash | None = None

    def stored(self, block_hash: BlockHash, parent_hash: BlockHash) -> None:
        if self._run_kind is not BlocksStored or self._run[-1] != parent_hash:
            self._close_run()
            self._run_kind = BlocksStored
            self._run_parent = parent_hash
        self._run.append(block_hash)

    def removed(self, block_hash: BlockHash) -> None:
        if self._run_kind is not BlocksRemoved:
            self._close_run()
            self._run_kind = BlocksRemoved
        self._run.append(block_hash)

    def cleared(self) -> None:
        """Every block of the tier is gone: earlier pending events of it no longer matter."""
        self._run, self._run_kind = [], None
        self._events = [AllBlocksCleared(self.tier)]

    def drain(self) -> list[KVEvent]:
        """Returns and forgets the pending events, oldest first."""
        self._close_run()
        events, self._events = self._events, []
        return events

    def _close_run(self) -> None:
        if self._run:
            if self._run_kind is BlocksStored:
                self._events.append(BlocksStored(self.tier, tuple(self._run), self._run_parent))
            else:
                self._events.append(BlocksRemoved(self.tier, tuple(self._run)))
            self._run = []
        self._run_kind = None


class EventSequencer:
    """Numbers an engine's event batches from 0, one per non-empty drain."""

    def __init__(self):
        self.next_seq = 0

    def batch(self, events: list[KVEvent]) -> KVEventBatch:
        batch = KVEventBatch(self.next_seq, time.time(), tuple(events))
        self.next_seq += 1
        return batch
