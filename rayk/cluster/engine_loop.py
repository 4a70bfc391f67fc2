"""One engine driven continuously by one thread: what a cache worker runs.

The engine is not thread-safe, so every touch of it happens on the loop thread. Other threads
(a Ray actor's event loop, the event reporter) hand it work through an inbox: requests to add,
requests to abort, and calls to run between two steps (memory control, stats, the inventory).
Requests that arrive while a batch runs join the next step.

Each request's deltas go to the callback given with it, called on the loop thread; a request the
engine refuses gets its error through the same callback instead. After every step the loop
records the worker's load and collects the step's event batch for the reporter. It also measures
the engine's prefill rate (prompt tokens per second, over steps that prefill at least a block),
which goes out with the load, beside the pull rate the worker measures (``pull_rate``).

Should the loop itself fail (not a step: a failed step fails its requests and the loop goes on),
it records the error in ``failed``, fails every request and call still waiting, and refuses new
ones; the reporter then stops, so the coordinator drops the worker.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from rayk.cache.block_codec import DecodedBatch
from rayk.cache.events import KVEventBatch
from rayk.cluster.routing import WorkerLoad
from rayk.cluster.transfer import RateMeter
from rayk.engine.llm_engine import LLMEngine
from rayk.outputs import CompletionDelta
from rayk.sampling_params import SamplingParams

DeltaCallback = Callable[[CompletionDelta | BaseException], None]

logger = logging.getLogger(__name__)


class EngineLoop:
    """Runs ``engine.step()`` whenever it has work; idles on its inbox otherwise."""

    def __init__(self, engine: LLMEngine, idle_wait_s: float = 0.05, report_after_blocks: int = 1024):
        self.engine = engine
        self.idle_wait_s = idle_wait_s
        self.report_after_blocks = report_after_blocks
        # Set when at least report_after_blocks block events wait for the reporter.
        self.report_ready = threading.Event()
        self._num_unreported_blocks = 0
        self._inbox: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._callbacks: dict[str, DeltaCallback] = {}
        self._report_lock = threading.Lock()
        self._batches: list[KVEventBatch] = []
        self._received: list[str] = []
        self.load = WorkerLoad(free_blocks=engine.pool.num_free_blocks)
        self.prefill_rate = RateMeter()  # prompt tokens per second
        self.pull_rate: RateMeter | None = None  # tokens of KV per second, set by the worker
        self._prefill_tokens = 0
        engine.step_observers.append(self)
        self.failed: BaseException | None = None
        self._calls: set[concurrent.futures.Future] = set()  # calls not yet run
        self._unadded: dict[str, DeltaCallback] = {}  # requests submitted, not yet added
        engine.subscribe(self._collect)
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="rayk-engine-loop", daemon=True)
        self._thread.start()

    # -- from any thread ----------------------------------------------------------------------

    def submit(
        self,
        token_ids: list[int],
        params: SamplingParams,
        cache_salt: str | None,
        request_id: str,
        on_delta: DeltaCallback,
        remote: DecodedBatch | None = None,
    ) -> None:
        """Queues a request (with blocks pulled for it, if any); ``on_delta`` gets each of its
        deltas, or the error that refused it."""

        def add() -> None:
            self._unadded.pop(request_id, None)
            try:
                self.engine.add_request(token_ids, params, cache_salt=cache_salt, request_id=request_id, remote=remote)
            except Exception as error:  # a refused request must reach its caller, not stop the loop
                on_delta(error)
                return
            self._callbacks[request_id] = on_delta
            with self._report_lock:
                self._received.append(request_id)

        self._unadded[request_id] = on_delta
        try:
            self._post(add)
        except RuntimeError:
            self._unadded.pop(request_id, None)
            raise

    def abort(self, request_id: str) -> None:
        def abort() -> None:
            if self._callbacks.pop(request_id, None) is not None:
                self.engine.abort_request(request_id)

        self._post(abort)

    def call(self, fn: Callable[[LLMEngine], Any]) -> concurrent.futures.Future:
        """Runs ``fn(engine)`` between two steps; the future holds its result or its error."""
        future: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            self._calls.discard(future)
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn(self.engine))
            except BaseException as error:
                future.set_exception(error)

        self._calls.add(future)
        self._post(run)
        return future

    def take_report(self) -> tuple[list[KVEventBatch], WorkerLoad, list[str]]:
        """The event batches and received request ids since the last call, and the load now."""
        with self._report_lock:
            batches, self._batches = self._batches, []
            received, self._received = self._received, []
            self._num_unreported_blocks = 0
        return batches, self.load, received

    def close(self) -> None:
        """Stops the loop after the work queued so far, fails what is unfinished, closes the engine."""
        if self._stopped:
            return
        self._stopped = True
        self._inbox.put(None)
        self._thread.join()
        error = RuntimeError("the worker shut down before the request finished")
        for callback in self._callbacks.values():
            callback(error)
        self._callbacks.clear()
        self.engine.close()

    # -- on the loop thread -------------------------------------------------------------------

    def before_step(self, engine: LLMEngine, batch) -> None:
        """A step observer: counts the prompt tokens the step prefills."""
        self._prefill_tokens = sum(n for r, n in zip(batch.requests, batch.num_new_tokens) if r.num_computed_tokens < len(r.prompt_token_ids))

    def after_step(self, engine: LLMEngine, batch, start_s: float, end_s: float) -> None:
        if self._prefill_tokens >= engine.pool.block_size:
            self.prefill_rate.add(self._prefill_tokens, end_s - start_s)

    def _post(self, work: Callable[[], None]) -> None:
        if self.failed is not None:
            raise RuntimeError(f"this worker's engine loop failed: {self.failed!r}")
        if self._stopped:
            raise RuntimeError("this worker's engine loop is closed")
        self._inbox.put(work)

    def _collect(self, batch: KVEventBatch) -> None:
        with self._report_lock:
            self._batches.append(batch)
            self._num_unreported_blocks += sum(len(getattr(e, "block_hashes", ())) for e in batch.events)
            if self._num_unreported_blocks >= self.report_after_blocks:
                self.report_ready.set()

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as error:
            logger.exception("the engine loop failed; failing every request and call still waiting")
            self.failed = error
            for callback in [*self._callbacks.values(), *list(self._unadded.values())]:
                callback(error)
            self._callbacks.clear()
            self._unadded.clear()
            for future in list(self._calls):
                if future.set_running_or_notify_cancel():
                    future.set_exception(error)
            self._calls.clear()

    def _serve(self) -> None:
        inbox = self._inbox
        while True:
            idle = not self.engine.has_unfinished_requests()
            try:
                work = inbox.get(timeout=self.idle_wait_s) if idle else inbox.get_nowait()
            except queue.Empty:
                work = False
            ran = work is not False
            while work is not False:
                if work is None:
                    return
                work()
                try:
                    work = inbox.get_nowait()
                except queue.Empty:
                    work = False
            if ran:
                self.engine.publish_events()  # what control calls changed, an idle engine reports too
                self.load = self._load()  # the requests just added count from now on
            if self.engine.has_unfinished_requests():
                self._step()

    def _step(self) -> None:
        try:
            deltas = self.engine.step()
        except Exception as error:
            # The engine's state after a failed step is unknown: fail its requests rather than hang them.
            logger.exception("engine step failed; failing %d requests", len(self._callbacks))
            for request_id, callback in list(self._callbacks.items()):
                self.engine.abort_request(request_id)
                callback(error)
            self._callbacks.clear()
            return
        for delta in deltas:
            callback = self._callbacks.get(delta.request_id)
            if callback is None:
                continue
            if delta.finished:
                del self._callbacks[delta.request_id]
            callback(delta)
        self.load = self._load()

    def _load(self) -> WorkerLoad:
        engine = self.engine
        scheduler = engine.scheduler
        queued = sum(r.num_tokens for r in scheduler.waiting)
        queued += sum(len(r.prompt_token_ids) - r.num_computed_tokens for r in scheduler.running if r.num_computed_tokens < len(r.prompt_token_ids))
        return WorkerLoad(
            num_waiting=len(scheduler.waiting),
            num_running=len(scheduler.running),
            queued_prefill_tokens=queued,
            free_blocks=engine.pool.num_free_blocks,
            prefill_tokens_per_s=self.prefill_rate.rate,
            pull_tokens_per_s=self.pull_rate.rate if self.pull_rate is not None else 0.0,
        )
