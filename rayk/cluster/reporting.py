"""A worker's reports to the coordinator: its KV event batches and load, batched in time.

Every ``interval_s`` (about 10 ms) the reporter sends what the engine loop collected since the
last report: event batches (in ``seq`` order), the load, and the ids of requests received. It
sends sooner when the loop says enough block events are waiting (``report_ready``), and at least every ``heartbeat_s`` even when
nothing happened: the coordinator takes a silent worker for dead.

``flush`` sends at once what the loop has collected and returns when it is sent: a memory
control (a reset, an eviction) returns only when the coordinator's directory shows it, so the
next request is routed on what the cache holds now.

When the coordinator answers that it needs the worker's inventory (it restarted, never saw this
worker, or saw a gap in ``seq``), the reporter takes it between two steps and sends it. What a
failed report carried (the coordinator is restarting, or slow) is sent again with the next one:
the directory ignores batches it has applied already. Past ``MAX_UNSENT_BATCHES`` the oldest
are dropped; the gap they leave makes the coordinator ask for the inventory.

About once a heartbeat it also runs ``sync_replicas`` (when given, a ``ReplicaSync.ask``): the
worker asks the coordinator which of its blocks gained or lost a replica elsewhere and tells its
engine, without ever waiting for either: a report is never held up behind a busy engine step.

If the engine loop has failed, the reporter stops, heartbeats included: the coordinator then
takes the worker for dead and routes nothing more to it.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Sequence

from rayk.cache.events import KVEventBatch
from rayk.cluster.engine_loop import EngineLoop
from rayk.cluster.routing import WorkerLoad
from rayk.hashing import BlockHash

# (event batches, load, received request ids) -> whether the coordinator wants the inventory
SendReport = Callable[[Sequence[KVEventBatch], WorkerLoad, Sequence[str]], bool]
# (seq of the last batch it includes, keys per tier)
SendInventory = Callable[[int, dict[str, list[BlockHash]]], None]

HEARTBEAT_S = 0.5
"""A report at least this often (seconds), even when nothing happened."""
MAX_UNSENT_BATCHES = 10_000

logger = logging.getLogger(__name__)


class EventReporter:
    def __init__(
        self,
        loop: EngineLoop,
        send_report: SendReport,
        send_inventory: SendInventory,
        interval_s: float = 0.01,
        heartbeat_s: float = HEARTBEAT_S,
        sync_replicas: Callable[[], None] | None = None,
    ):
        self.loop = loop
        self.sync_replicas = sync_replicas
        self.send_report = send_report
        self.send_inventory = send_inventory
        self.interval_s = interval_s
        self.heartbeat_s = heartbeat_s
        self.num_reports = 0
        self.num_failed_reports = 0
        self.num_inventories = 0
        self._stop = threading.Event()
        self._flushes = threading.Condition()
        self._flush_requested = 0  # flushes asked for, and the last one a report has covered
        self._flushed = 0
        self._thread = threading.Thread(target=self._run, name="rayk-event-reporter", daemon=True)
        self._thread.start()

    def flush(self, timeout: float = 10.0) -> bool:
        """Sends what the engine loop has collected so far and waits for it to be sent (or for
        the attempt to fail: it goes again with the next report). False on a timeout."""
        with self._flushes:
            self._flush_requested += 1
            target = self._flush_requested
        self.loop.report_ready.set()
        with self._flushes:
            return self._flushes.wait_for(lambda: self._flushed >= target or self._stop.is_set(), timeout)

    def close(self) -> None:
        self._stop.set()
        self.loop.report_ready.set()
        self._thread.join()
        with self._flushes:
            self._flushes.notify_all()

    def _covered(self, flush: int) -> None:
        with self._flushes:
            self._flushed = flush
            self._flushes.notify_all()

    def _run(self) -> None:
        last_sent = last_synced = 0.0
        pending: list[KVEventBatch] = []
        received: list[str] = []
        while not self._stop.is_set():
            if self.loop.failed is not None:
                logger.error("the engine loop failed; this worker stops reporting so that the coordinator drops it")
                self._covered(self._flush_requested)
                return
            if self.loop.report_ready.wait(self.interval_s):
                self.loop.report_ready.clear()
            with self._flushes:
                flush = self._flush_requested  # what this report covers: taken before the report
            batches, load, new_received = self.loop.take_report()
            pending += batches
            received += new_received
            now = time.monotonic()
            if self.sync_replicas is not None and now - last_synced >= self.heartbeat_s:
                last_synced = now
                try:
                    self.sync_replicas()
                except Exception:
                    logger.warning("asking the coordinator about replicas failed; asking again next heartbeat", exc_info=True)
            if not pending and not received and now - last_sent < self.heartbeat_s:
                self._covered(flush)
                continue
            last_sent = now
            try:
                wants_inventory = self.send_report(pending, load, received)
                self.num_reports += 1
            except Exception:
                self.num_failed_reports += 1
                logger.warning("report to the coordinator failed; sending it again with the next", exc_info=True)
                del pending[:-MAX_UNSENT_BATCHES]
                self._covered(flush)
                continue
            pending, received = [], []
            self._covered(flush)
            if wants_inventory:
                self._send_inventory()

    def _send_inventory(self) -> None:
        try:
            seq, inventory = self.loop.call(lambda engine: engine.inventory()).result()
            self.send_inventory(seq, inventory)
            self.num_inventories += 1
        except Exception:
            logger.warning("sending the inventory failed; the next report asks again", exc_info=True)


class ReplicaSync:
    """Keeps a worker's replica marks current, never blocking the caller.

    ``ask(applied)`` returns a future of the coordinator's answer (generation, reset, gained,
    lost) to "what changed since the answer I applied last"; ``apply(gained, lost, reset)``
    returns a future of the engine having applied it. An answer counts as applied only once its
    future succeeds, so a lost answer is followed by a whole-set reset. One exchange at a time.
    """

    def __init__(self, ask: Callable[[str | None], concurrent.futures.Future], apply: Callable[[list, list, bool], concurrent.futures.Future]):
        self._ask = ask
        self._apply = apply
        self.applied: str | None = None
        self._busy = threading.Lock()

    def ask(self) -> None:
        if not self._busy.acquire(blocking=False):
            return  # the previous exchange is still going
        try:
            self._ask(self.applied).add_done_callback(self._answered)
        except BaseException:
            self._busy.release()
            raise

    def _answered(self, answer: concurrent.futures.Future) -> None:
        try:
            generation, reset, gained, lost = answer.result()
            if generation is None or not (reset or gained or lost):
                self._done(generation)
                return
            self._apply(gained, lost, reset).add_done_callback(lambda applied: self._done(generation if applied.exception() is None else None))
        except BaseException:
            logger.warning("the replica answer could not be applied; the next one resets", exc_info=True)
            self._done(None)

    def _done(self, generation: str | None) -> None:
        if generation is not None:
            self.applied = generation
        self._busy.release()
