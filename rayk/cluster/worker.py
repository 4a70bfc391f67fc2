"""``CacheWorker``: the Ray actor that serves one engine (one GPU, or a share of a CPU node).

A thin shell: an ``EngineLoop`` drives the engine, an ``EventReporter`` sends its KV events and
load to the coordinator, and the actor's methods forward to them. The actor runs on asyncio, so
many requests wait on it at once while the loop thread steps the engine; each incarnation has an
``epoch`` (nanoseconds at start), larger after every restart.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator

import ray
import torch

from rayk.cluster.engine_loop import EngineLoop
from rayk.cluster.reporting import EventReporter
from rayk.config import EngineConfig
from rayk.engine.llm_engine import LLMEngine
from rayk.outputs import CompletionDelta, RequestOutput
from rayk.sampling_params import SamplingParams

WORKER_NAME_PREFIX = "rayk-"

# The manual controls a driver may run on a worker: name -> the engine call.
_CONTROLS = {
    "evict": lambda engine, keys: engine.memory.evict(keys),
    "pin": lambda engine, keys: engine.memory.pin(keys),
    "unpin": lambda engine, keys: engine.memory.unpin(keys),
    "offload": lambda engine, keys, tier: engine.memory.offload(keys, tier),
    "prefetch": lambda engine, keys, tier: engine.memory.prefetch(keys, tier),
    "set_budget": lambda engine, tier, num_bytes: engine.memory.set_budget(tier, num_bytes),
    "set_eviction_policy": lambda engine, policy: engine.memory.set_eviction_policy(policy),
    "reset_prefix_cache": lambda engine, tiers: engine.memory.clear(tiers),
}


def worker_actor_name(worker_id: str) -> str:
    return WORKER_NAME_PREFIX + worker_id


@ray.remote
class CacheWorker:
    def __init__(self, worker_id: str, config: EngineConfig, coordinator_name: str, namespace: str, num_threads: int, report_interval_s: float = 0.01):
        torch.set_num_threads(num_threads)
        self.worker_id = worker_id
        self.epoch = time.time_ns()
        self.engine = LLMEngine(config)
        self.loop = EngineLoop(self.engine)
        coordinator = ray.get_actor(coordinator_name, namespace=namespace)

        # The reporter's own thread waits on these futures; the actor's event loop never blocks.
        def send_report(batches, load, received) -> bool:
            return coordinator.report.remote(worker_id, self.epoch, batches, load, received).future().result(timeout=10)

        def send_inventory(seq, inventory) -> None:
            coordinator.load_inventory.remote(worker_id, self.epoch, seq, inventory).future().result(timeout=30)

        self.reporter = EventReporter(self.loop, send_report, send_inventory, interval_s=report_interval_s)

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

    async def generate(self, token_ids: list[int], params: SamplingParams, cache_salt: str | None, request_id: str) -> RequestOutput:
        async for delta in self.stream(token_ids, params, cache_salt, request_id):
            if delta.finished:
                return delta.output
        raise RuntimeError(f"request {request_id} ended without an output")

    async def stream(self, token_ids: list[int], params: SamplingParams, cache_salt: str | None, request_id: str) -> AsyncIterator[CompletionDelta]:
        """Yields the request's deltas as the engine produces them; the last one is finished."""
        event_loop = asyncio.get_running_loop()
        deltas: asyncio.Queue = asyncio.Queue()
        self.loop.submit(token_ids, params, cache_salt, request_id, lambda d: event_loop.call_soon_threadsafe(deltas.put_nowait, d))
        ended = False  # finished or failed: nothing to abort
        try:
            while True:
                delta = await deltas.get()
                if isinstance(delta, BaseException):
                    ended = True
                    raise delta
                ended = delta.finished
                yield delta
                if ended:
                    return
        finally:
            if not ended:  # the caller went away (cancelled, or stopped reading)
                try:
                    self.loop.abort(request_id)
                except RuntimeError:
                    pass  # the loop is closed or failed: the request is gone with it

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
        stats = await asyncio.wrap_future(self.loop.call(lambda engine: engine.stats()))
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
        return stats

    def shutdown(self) -> None:
        """Stops reporting and the engine (spilling the cache to disk when it has a disk tier)."""
        self.reporter.close()
        self.loop.close()
