"""``CacheWorker``: the Ray actor that serves one engine (one GPU, or a share of a CPU node).

A thin shell: an ``EngineLoop`` drives the engine, an ``EventReporter`` sends its KV events and
load to the coordinator, a ``PeerPuller`` runs fetch plans against other workers'
``export_blocks``, and the actor's methods forward to them. A ``WorkerMetrics`` turns the engine's
counts into Ray metrics once a second (``rayk.cluster.metrics``). The actor runs on asyncio, so
many requests wait on it at once while the loop thread steps the engine; each incarnation has an
``epoch`` (nanoseconds at start), larger after every restart.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator

import numpy as np
import ray
import torch

from rayk.cluster.engine_loop import EngineLoop
from rayk.cluster.metrics import PeriodicExport, RayMetricsSink, WorkerMetrics
from rayk.cluster.reporting import EventReporter, ReplicaSync
from rayk.cluster.routing import FetchPlan
from rayk.cluster.transfer import PeerPuller
from rayk.config import EngineConfig
from rayk.engine.llm_engine import LLMEngine
from rayk.outputs import CompletionDelta, RequestOutput
from rayk.profiler import start_profiling, take_profile
from rayk.sampling_params import SamplingParams

WORKER_NAME_PREFIX = "rayk-"

# The manual controls a driver may run on a worker: name -> the engine call.
_CONTROLS = {
    "locate": lambda engine, keys: engine.memory.locate(keys),
    "evict": lambda engine, keys: engine.memory.evict(keys),
    "pin": lambda engine, keys: engine.memory.pin(keys),
    "unpin": lambda engine, keys: engine.memory.unpin(keys),
    "offload": lambda engine, keys, tier: engine.memory.offload(keys, tier),
    "prefetch": lambda engine, keys, tier: engine.memory.prefetch(keys, tier),
    "set_budget": lambda engine, tier, num_bytes: engine.memory.set_budget(tier, num_bytes),
    "set_eviction_policy": lambda engine, policy: engine.memory.set_eviction_policy(policy),
    "reset_prefix_cache": lambda engine, tiers: engine.memory.clear(tiers),
    "flush_events": lambda engine: None,  # returns once the coordinator has every event so far
    "check_invariants": lambda engine: _check_invariants(engine),
    "start_profile": start_profiling,  # records until take_profile (see rayk.profiler)
    "take_profile": take_profile,  # the recording, if any, and the memory profile, as plain data
}


def _check_invariants(engine: LLMEngine) -> dict:
    """Asserts the cache's invariants (an AssertionError says which broke); returns the device
    blocks in use, for checking that nothing leaked once the worker is idle."""
    engine.kv_cache_manager.check_invariants()
    return {
        "used_blocks": engine.pool.num_used_blocks,
        "running": len(engine.scheduler.running),
        "waiting": len(engine.scheduler.waiting),
        "staged_requests": len(engine.cache.chain.remote),
    }


def worker_actor_name(worker_id: str) -> str:
    return WORKER_NAME_PREFIX + worker_id


@ray.remote
class CacheWorker:
    def __init__(
        self,
        worker_id: str,
        config: EngineConfig,
        coordinator_name: str,
        namespace: str,
        num_threads: int,
        report_interval_s: float = 0.01,
        pull_timeout_s: float = 10.0,
    ):
        torch.set_num_threads(num_threads)
        self.worker_id = worker_id
        self.namespace = namespace
        self.epoch = time.time_ns()
        self.engine = LLMEngine(config)
        self.loop = EngineLoop(self.engine)
        self._peers: dict[str, ray.actor.ActorHandle] = {}
        self.puller = PeerPuller(
            self._fetch, self.engine.kv_cache_manager.hasher, self.engine.kv_cache.layout, pull_timeout_s, self.engine.cache.chain.integrity_key
        )
        self.loop.pull_rate = self.puller.rate
        coordinator = ray.get_actor(coordinator_name, namespace=namespace)

        # The reporter's own thread waits on these futures; the actor's event loop never blocks.
        def send_report(batches, load, received) -> bool:
            return coordinator.report.remote(worker_id, self.epoch, batches, load, received).future().result(timeout=10)

        def send_inventory(seq, inventory) -> None:
            coordinator.load_inventory.remote(worker_id, self.epoch, seq, inventory).future().result(timeout=30)

        self._replicas = ReplicaSync(
            lambda applied: coordinator.replica_changes.remote(worker_id, self.epoch, applied).future(),
            lambda gained, lost, reset: self.loop.call(lambda engine: engine.memory.mark_replicated(gained, lost, reset)),
        )

        self.reporter = EventReporter(self.loop, send_report, send_inventory, interval_s=report_interval_s, sync_replicas=self._replicas.ask)
        sink = RayMetricsSink.create()  # None without Ray's metrics agent: nothing is measured
        self.metrics = WorkerMetrics(worker_id, namespace) if sink is not None else None
        self._metrics_export = self._export_metrics(sink) if sink is not None else None

    def info(self) -> dict:
        """What a driver needs to tokenize, hash and validate requests for this model."""
        engine = self.engine
        hasher = engine.kv_cache_manager.hasher
        return {
            "worker_id": self.worker_id,
            "epoch": self.epoch,
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "fingerprint": hasher.fingerprint,
            "block_size": hasher.block_size,
            "hash_algorithm": hasher.algorithm,
            "vocab_size": engine.arch.vocab_size,
            "max_model_len": engine.max_model_len,
            "tokenizer": engine.tokenizer,
        }

    async def generate(
        self, token_ids: list[int], params: SamplingParams, cache_salt: str | None, request_id: str, plan: FetchPlan | None = None
    ) -> RequestOutput:
        async for delta in self.stream(token_ids, params, cache_salt, request_id, plan):
            if delta.finished:
                return delta.output
        raise RuntimeError(f"request {request_id} ended without an output")

    async def stream(
        self, token_ids: list[int], params: SamplingParams, cache_salt: str | None, request_id: str, plan: FetchPlan | None = None
    ) -> AsyncIterator[CompletionDelta]:
        """Yields the request's deltas as the engine produces them; the last one is finished.
        With a ``plan`` the planned blocks are pulled from their peer first (a failed pull only
        means those tokens are computed)."""
        remote = await self._pull(plan) if plan is not None else None
        event_loop = asyncio.get_running_loop()
        deltas: asyncio.Queue = asyncio.Queue()
        self.loop.submit(token_ids, params, cache_salt, request_id, lambda d: event_loop.call_soon_threadsafe(deltas.put_nowait, d), remote)
        ended = False  # finished or failed: nothing to abort
        try:
            while True:
                delta = await deltas.get()
                if isinstance(delta, BaseException):
                    ended = True
                    raise delta
                ended = delta.finished
                if ended and self.metrics is not None:
                    self.metrics.request_finished(delta.output)
                yield delta
                if ended:
                    return
        finally:
            if not ended:  # the caller went away (cancelled, or stopped reading)
                try:
                    self.loop.abort(request_id)
                except RuntimeError:
                    pass  # the loop is closed or failed: the request is gone with it

    def _export_metrics(self, sink: RayMetricsSink) -> PeriodicExport:
        """Exports this worker's metrics once a second (``rayk.cluster.metrics``)."""
        self.engine.cache.chain.transfer_observers.append(self.metrics.transfer_done)

        def collect():
            engine_stats = self.loop.call(lambda engine: engine.stats()).result(timeout=10)
            return self.metrics.updates(engine_stats, self.puller.stats())

        return PeriodicExport(collect, sink)

    async def _pull(self, plan: FetchPlan):
        if self.metrics is None:
            return await self.puller.pull(plan)
        start = time.perf_counter()
        try:
            return await self.puller.pull(plan)
        finally:
            self.metrics.pull_done(time.perf_counter() - start)

    async def export_blocks(self, keys: list[bytes]) -> np.ndarray:
        """The leading run of ``keys`` this worker holds, in any tier, as one block batch (Ray
        stores the returned buffer as one object for the puller to fetch)."""
        buffer, num_blocks = await asyncio.wrap_future(self.loop.call(lambda engine: engine.cache.chain.export(keys)))
        self.puller.served(num_blocks, len(buffer))
        return buffer

    async def _fetch(self, source: str, keys) -> np.ndarray:
        peer = self._peers.get(source)
        if peer is None:
            peer = await asyncio.to_thread(ray.get_actor, worker_actor_name(source), namespace=self.namespace)
            self._peers[source] = peer
        try:
            return await peer.export_blocks.remote(list(keys))
        except Exception:
            self._peers.pop(source, None)  # look the peer up again next time (it may have restarted)
            raise

    async def control(self, name: str, *args):
        """Runs one manual control (``_CONTROLS``) between two steps and returns its result once
        the coordinator has the events it caused (after at most 10 s of trying: a report that
        cannot get through is sent again later, or replaced by the inventory)."""
        if name not in _CONTROLS:
            raise ValueError(f"unknown control {name!r}; known: {sorted(_CONTROLS)}")
        control = _CONTROLS[name]

        def run(engine: LLMEngine):
            result = control(engine, *args)
            engine.publish_events()
            return result

        result = await asyncio.wrap_future(self.loop.call(run))
        await asyncio.to_thread(self.reporter.flush)
        return result

    async def stats(self) -> dict:
        stats = await asyncio.wrap_future(self.loop.call(lambda engine: engine.stats() | {"replicated_blocks": len(engine.memory.replicated)}))
        load = self.loop.load
        stats["node_id"] = ray.get_runtime_context().get_node_id()
        stats["actor_name"] = worker_actor_name(self.worker_id)
        stats["epoch"] = self.epoch
        stats["load"] = {
            "waiting": load.num_waiting,
            "running": load.num_running,
            "queued_prefill_tokens": load.queued_prefill_tokens,
            "free_blocks": load.free_blocks,
        }
        stats["reporter"] = {
            "reports": self.reporter.num_reports,
            "failed_reports": self.reporter.num_failed_reports,
            "inventories_sent": self.reporter.num_inventories,
        }
        stats["transfers"] = self.puller.stats() | {"prefill_tokens_per_s": self.loop.prefill_rate.rate}
        return stats

    def shutdown(self) -> None:
        """Stops reporting and the engine (spilling the cache to disk when it has a disk tier)."""
        if self._metrics_export is not None:
            self._metrics_export.close()
        self.reporter.close()
        self.loop.close()
