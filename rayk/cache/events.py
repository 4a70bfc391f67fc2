"""KV events: every block stored in, or removed from, a tier is announced to subscribers.

The cache layers only append block keys to an ``EventBuffer`` (two list appends on the hot
path); whoever drives the engine drains the buffer once per step and hands subscribers one batch.
This is what a worker will later forward to the coordinator's prefix directory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from rayk.hashing import BlockHash


@dataclass(frozen=True)
class BlocksStored:
    """Blocks whose KV is now held by ``tier`` under these keys."""

    tier: str
    block_hashes: tuple[BlockHash, ...]


@dataclass(frozen=True)
class BlocksRemoved:
    """Blocks that ``tier`` no longer holds (evicted or dropped)."""

    tier: str
    block_hashes: tuple[BlockHash, ...]


KVEvent = BlocksStored | BlocksRemoved
KVEventSubscriber = Callable[[list[KVEvent]], None]


class EventBuffer:
    """The keys stored in and removed from one tier since the last drain, in order.

    Consecutive changes of one kind share an event, so a step that stores a thousand blocks
    yields one ``BlocksStored``; order across kinds is kept, so a key stored and then evicted
    in one step ends up removed.
    """

    def __init__(self, tier: str):
        self.tier = tier
        self._events: list[KVEvent] = []
        self._run_kind: type | None = None
        self._run: list[BlockHash] = []

    def stored(self, block_hash: BlockHash) -> None:
        if self._run_kind is not BlocksStored:
            self._close_run()
            self._run_kind = BlocksStored
        self._run.append(block_hash)

    def removed(self, block_hash: BlockHash) -> None:
        if self._run_kind is not BlocksRemoved:
            self._close_run()
            self._run_kind = BlocksRemoved
        self._run.append(block_hash)

    def drain(self) -> list[KVEvent]:
        """Returns and forgets the pending events, oldest first."""
        self._close_run()
        events, self._events = self._events, []
        return events

    def _close_run(self) -> None:
        if self._run:
            self._events.append(self._run_kind(self.tier, tuple(self._run)))
            self._run = []
        self._run_kind = None
