"""The coordinator: one named, detached, restartable actor that routes every request.

``CoordinatorState`` is the whole logic, plain Python: the prefix directory, the router, and
which workers are alive. ``Coordinator`` is the Ray actor around it.

* Workers report event batches and load every ~10 ms and at least every heartbeat. A report
  from a worker or epoch it does not know registers that incarnation and asks for its inventory;
  so does a gap in ``seq``. Entries of an old epoch are never routed to.
* Liveness: a worker silent for ``liveness_timeout_s`` is dead: it leaves the directory and the
  routing table. The actor checks every ``liveness_timeout_s / 4``, so a dead worker is gone at
  most 1.25 × ``liveness_timeout_s`` after its last report.
* After a restart the state is empty: workers are learned from their next report (within one
  heartbeat), with their inventories. A request that arrives before any worker (or the one it
  names) has reported waits for it, up to ``liveness_timeout_s`` after the start. Until the
  inventories are in, requests are routed without cache knowledge
  (to the least loaded worker the coordinator knows), never to wrong data: a worker confirms
  every hit against the block's tokens.
* Replicas: a worker asks about once a heartbeat which of its blocks another worker now holds
  too, or no longer (``replica_changes``), so that its ``cluster_aware`` policy evicts replicas
  before last copies. Answers are changes since the answer the worker says it applied last; a
  worker that missed one (or a coordinator that restarted) gets the whole set instead. The keys
  held twice are computed from the directory at most every ``REPLICAS_REFRESH_S``, O(blocks).
* Tokens and KV bytes never pass through it: the driver sends block keys.
* Backpressure: with ``max_queued_requests`` the router refuses a request past that many in
  flight with ``rayk.Overloaded``; ``route_many`` returns it in the request's place.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import ray

from rayk.cache.events import AllBlocksCleared, KVEventBatch
from rayk.cluster.directory import PrefixDirectory
from rayk.cluster.metrics import EXPORT_INTERVAL_S, CoordinatorMetrics, RayMetricsSink
from rayk.cluster.routing import RouteDecision, Router, WorkerLoad
from rayk.hashing import BlockHash

COORDINATOR_NAME = "rayk-coordinator"
REPLICAS_REFRESH_S = 0.25
MIN_LIVENESS_TIMEOUT_S = 1.0
"""Twice the workers' heartbeat: a shorter timeout would take idle workers for dead."""

logger = logging.getLogger(__name__)


@dataclass
class _Member:
    epoch: int
    last_report: float


class CoordinatorState:
    def __init__(
        self, block_size: int, routing: str = "prefix", liveness_timeout_s: float = 3.0, pull: str = "auto", max_queued_requests: int | None = None
    ):
        self.block_size = block_size
        self.liveness_timeout_s = liveness_timeout_s
        self.directory = PrefixDirectory()
        self.router = Router(self.directory, block_size, routing, pull=pull, max_queued_requests=max_queued_requests)
        self.members: dict[str, _Member] = {}
        # worker -> (the generation of the last answer, the replicated keys it said)
        self._replicas_told: dict[str, tuple[str, set[BlockHash]]] = {}
        self._generations = itertools.count(1)
        self._instance = f"{time.time_ns():x}"  # generations of another coordinator never match
        self._held_twice: tuple[float, set[BlockHash]] = (-math.inf, set())
        self.num_dead_workers = 0
        self.num_inventories = 0

    # -- workers ------------------------------------------------------------------------------

    def report(
        self, worker_id: str, epoch: int, batches: Sequence[KVEventBatch], load: WorkerLoad, received: Sequence[str], now: float | None = None
    ) -> bool:
        """Takes a worker's report; True when the coordinator wants that worker's inventory."""
        now = time.monotonic() if now is None else now
        member = self.members.get(worker_id)
        wants_inventory = False
        if member is None or epoch > member.epoch:
            self.directory.register(worker_id, epoch)
            if member is None:
                self.router.add_worker(worker_id)
            member = self.members[worker_id] = _Member(epoch, now)
            self._replicas_told.pop(worker_id, None)
            wants_inventory = True
        elif epoch < member.epoch:
            return False  # a report of an old incarnation: nothing of it is routed to
        member.last_report = now
        for batch in batches:
            if not self.directory.apply(worker_id, epoch, batch):
                wants_inventory = True
            elif any(type(e) is AllBlocksCleared and e.tier == "device" for e in batch.events):
                self.router.worker_cleared(worker_id)
        self.router.report_load(worker_id, load, received)
        return wants_inventory

    def load_inventory(self, worker_id: str, epoch: int, seq: int, inventory: dict[str, list[BlockHash]]) -> None:
        member = self.members.get(worker_id)
        if member is None or member.epoch != epoch:
            return
        self.directory.load_inventory(worker_id, epoch, seq, inventory)
        self.num_inventories += 1

    def replica_changes(self, worker_id: str, epoch: int, applied: str | None, now: float | None = None) -> tuple[str | None, bool, list, list]:
        """What changed in which of the worker's blocks another worker also holds:
        (generation, reset, gained, lost). ``applied`` is the generation of the last answer the
        worker applied; when it is not the last one given (an answer was lost, or this
        coordinator restarted), the answer is the whole set with ``reset`` True. An unknown
        worker or epoch gets (None, False, [], [])."""
        member = self.members.get(worker_id)
        if member is None or member.epoch != epoch:
            return None, False, [], []
        now = time.monotonic() if now is None else now
        stamp, held_twice = self._held_twice
        if now - stamp >= REPLICAS_REFRESH_S:
            held_twice = self.directory.held_twice()
            self._held_twice = (now, held_twice)
        replicated = self.directory.stored_keys(worker_id) & held_twice
        generation = f"{self._instance}-{next(self._generations)}"
        told = self._replicas_told.get(worker_id)
        self._replicas_told[worker_id] = (generation, replicated)
        if told is None or told[0] != applied:
            return generation, True, list(replicated), []
        return generation, False, list(replicated - told[1]), list(told[1] - replicated)

    def remove_worker(self, worker_id: str) -> bool:
        """Forgets a worker (dead, or shut down); False if it was not known."""
        self._replicas_told.pop(worker_id, None)
        if self.members.pop(worker_id, None) is None:
            return False
        self.directory.remove(worker_id)
        self.router.remove_worker(worker_id)
        return True

    def expire(self, now: float | None = None) -> list[str]:
        """Removes the workers silent for longer than ``liveness_timeout_s``, and ends the pending
        claims whose time is up; returns the removed workers' ids."""
        now = time.monotonic() if now is None else now
        self.router.expire_claims(now)
        dead = [w for w, m in self.members.items() if now - m.last_report > self.liveness_timeout_s]
        for worker_id in dead:
            self.remove_worker(worker_id)
        self.num_dead_workers += len(dead)
        return dead

    def workers(self) -> list[str]:
        return sorted(self.members)

    # -- requests -----------------------------------------------------------------------------

    def route(
        self,
        request_id: str,
        keys: Sequence[BlockHash],
        num_tokens: int,
        policy: str | None = None,
        worker: str | None = None,
        pull: str | None = None,
    ) -> RouteDecision:
        return self.router.route(request_id, keys, num_tokens, policy=policy, worker=worker, pull=pull)

    def complete(self, results: Sequence[tuple[str, int | None]]) -> None:
        """(request id, actual hit tokens, or None for a failed request) for finished requests."""
        for request_id, actual_hit_tokens in results:
            self.router.complete(request_id, actual_hit_tokens)

    def stats(self) -> dict:
        self.router.expire_claims()
        return {
            "directory": {
                "blocks": self.directory.num_blocks,
                "workers": self.directory.blocks_per_worker(),
                "prefixes": dict(zip(self.workers(), self.directory.prefixes_held(self.workers()))),
            },
            "routing": self.router.stats(),
            "liveness": {
                "workers": self.workers(),
                "epochs": {w: m.epoch for w, m in self.members.items()},  # the incarnation routed to
                "dead_workers": self.num_dead_workers,
                "inventories": self.num_inventories,
                "liveness_timeout_s": self.liveness_timeout_s,
            },
        }


@ray.remote
class Coordinator:
    """The actor around ``CoordinatorState``. It runs on an asyncio loop: calls run one at a time,
    and a background task removes silent workers."""

    def __init__(self, block_size: int, routing: str, liveness_timeout_s: float, pull: str = "auto", max_queued_requests: int | None = None):
        self.state = CoordinatorState(block_size, routing, liveness_timeout_s, pull, max_queued_requests)
        self._started = time.monotonic()
        self._watcher: asyncio.Task | None = None
        self._metrics = CoordinatorMetrics(ray.get_runtime_context().namespace)
        self._metrics_sink = RayMetricsSink.create()
        self._exporter: asyncio.Task | None = None

    def _watch(self) -> None:
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._expire_forever())
        if self._exporter is None and self._metrics_sink is not None:
            self._exporter = asyncio.get_running_loop().create_task(self._export_metrics_forever())

    async def _expire_forever(self) -> None:
        while True:
            await asyncio.sleep(self.state.liveness_timeout_s / 4)
            try:
                self.state.expire()
            except Exception:  # liveness must outlive any one failure
                logger.exception("expiring silent workers failed; trying again")

    async def _export_metrics_forever(self) -> None:
        """Reads the router's counts into the metrics once a second, on the actor's loop (the
        state is not thread-safe), between two calls."""
        while True:
            await asyncio.sleep(EXPORT_INTERVAL_S)
            state = self.state
            try:
                updates = self._metrics.updates(state.router.stats(), state.directory.num_blocks, len(state.members))
                self._metrics_sink.apply(updates)
            except Exception:
                logger.exception("exporting the coordinator's metrics failed; trying again")

    async def report(self, worker_id, epoch, batches, load, received) -> bool:
        self._watch()
        return self.state.report(worker_id, epoch, batches, load, received)

    async def replica_changes(self, worker_id, epoch, applied):
        return self.state.replica_changes(worker_id, epoch, applied)

    async def load_inventory(self, worker_id, epoch, seq, inventory) -> None:
        self.state.load_inventory(worker_id, epoch, seq, inventory)

    async def _await_workers(self, named: Sequence[str | None]) -> None:
        """Right after a (re)start the state knows no worker until each one's next report (within
        a heartbeat). A request that needs a worker not known yet (any, or the one it names)
        waits for it, at most ``liveness_timeout_s`` from the start, rather than failing; other
        calls (the reports among them) run meanwhile."""
        members = self.state.members
        deadline = self._started + self.state.liveness_timeout_s
        while (not members or any(w is not None and w not in members for w in named)) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def route(self, request_id, keys, num_tokens, policy=None, worker=None, pull=None) -> RouteDecision:
        self._watch()
        await self._await_workers([worker])
        return self.state.route(request_id, keys, num_tokens, policy, worker, pull)

    async def route_many(self, requests) -> list[RouteDecision | Exception]:
        """Routes a batch in order, (request id, keys, num_tokens, policy, worker, pull) each; a
        request that cannot be routed gets its error in its place."""
        self._watch()
        await self._await_workers([request[4] for request in requests])
        decisions = []
        for request in requests:
            try:
                decisions.append(self.state.route(*request))
            except (ValueError, RuntimeError) as error:
                decisions.append(error)
        return decisions

    async def complete(self, results) -> None:
        self.state.complete(results)

    async def remove_worker(self, worker_id) -> bool:
        return self.state.remove_worker(worker_id)

    async def workers(self) -> list[str]:
        self._watch()
        return self.state.workers()

    async def stats(self) -> dict:
        return self.state.stats()

    async def config(self) -> dict:
        router = self.state.router
        return {
            "block_size": self.state.block_size,
            "routing": router.policy,
            "pull": router.pull,
            "liveness_timeout_s": self.state.liveness_timeout_s,
            "max_queued_requests": router.max_queued_requests,
        }
